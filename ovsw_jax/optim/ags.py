"""Adaptive Gradient Scaling (AGS), OvSW's first transform (paper Eq. 6; docs/method.md §2)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ovsw_jax.optim import _common


class ScaleByAgsState(NamedTuple):
  """State of `scale_by_ags`.

  Attributes:
    count: number of updates so far (int32), for a `delta` schedule.
    scaled_fraction: per parameter leaf, the fraction of its output channels
      whose gradient AGS scaled up at the last step (float32 scalar). A
      measurement only: AGS itself is stateless.
  """
  count: jax.Array
  scaled_fraction: Any


_DELTA_HINT = ("delta is the smallest gradient-to-weight norm ratio AGS allows; the "
               "release uses 0.04 (CIFAR) and 0.01 (ImageNet), and 0 switches AGS off.")


def _check_hyperparams(delta, grad_eps, param_eps) -> None:
  """Rejects NaN, infinite and negative hyperparameters given as numbers.

  Why: NaN fails every comparison, so `delta=nan` would silently scale
  nothing, and an infinite `delta` would make every update infinite. Arrays
  and schedules (as under `optax.inject_hyperparams`) are not checked here;
  a schedule's step-0 value is checked by `init`.
  """
  _common.check_range("scale_by_ags", "delta", delta, hint=_DELTA_HINT)
  _common.check_range("scale_by_ags", "grad_eps", grad_eps, low_open=True,
                      hint="It keeps the gradient norm AGS divides by away from 0; keep the "
                      "default 1e-6.")
  _common.check_range("scale_by_ags", "param_eps", param_eps,
                      hint="It bounds the weight norm from below; keep the default 1e-3.")


def scale_by_ags(
    delta: float | jax.Array | optax.Schedule = 0.01,
    *,
    axis: int | None = None,
    grad_eps: float = 1e-6,
    param_eps: float = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""Scales up each output channel's gradient whose norm is small next to its weight's.

  Per output channel `o` of every leaf (Xiang et al., 2024, Eq. 6):

  .. math::
    gn_o = \max(\|g_o\|_2, \epsilon_g), \quad pn_o = \max(\|w_o\|_2, \epsilon_w)

    g_o \leftarrow g_o \cdot \delta \, pn_o / gn_o \quad \text{if } gn_o / pn_o < \delta

  so the ratio of gradient to weight norm is at least `delta`, and a weight far
  from zero still gets an update large enough to change sign. A zero gradient
  stays zero. This is the mirror image of `optax.adaptive_grad_clip`, which
  scales gradients *down* when the ratio is *above* a threshold. Put it first,
  on the raw loss gradient.

  Args:
    delta: the threshold ratio (the paper's lambda), a finite float >= 0 or a
      schedule. 0.04 in the release's CIFAR sweep, 0.01 for ImageNet.
    axis: output-channel axis of the kernels; None (the default) is the last
      axis, as in Flax's HWIO. With `optax.inject_hyperparams`, name a set
      axis static: `inject_hyperparams(scale_by_ags, static_args=('axis',))`.
      An axis that a kernel does not have (outside -r..r-1 for rank r) is an
      error at `init` and `update`.
    grad_eps: lower bound of the gradient norm (> 0).
    param_eps: lower bound of the weight norm (>= 0).
    mask: a pytree of bools or a callable returning one; only True leaves are
      scaled (use `binary_weight_mask` for the weights of binary layers).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: `delta`, `grad_eps` or `param_eps` is NaN, infinite or
      negative (`grad_eps` also 0), checked where they are Python or NumPy
      numbers; a schedule's value at step 0, checked by `init`; an `axis`
      that is not an int, or not an axis of a kernel (`init`, `update`).
      JAX arrays, such as the values `optax.inject_hyperparams` passes, are
      not checked.

  Example:
    >>> import jax.numpy as jnp, optax, ovsw_jax as ow
    >>> params = {'w': jnp.ones((3, 3, 2, 4))}
    >>> tx = ow.scale_by_ags(delta=0.1)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((3, 3, 2, 4), 1e-4)}
    >>> updates, state = tx.update(grads, state, params)
    >>> float(jnp.linalg.norm(updates['w'][..., 0]) / jnp.linalg.norm(params['w'][..., 0]))
    0.1...

  References:
    Xiang et al., "OvSW: Overcoming Silent Weights for Accurate Binary Neural
    Networks", ECCV 2024, https://arxiv.org/abs/2407.05257
  """
  _check_hyperparams(delta, grad_eps, param_eps)
  axis = _common.static_axis("scale_by_ags", axis)
  channel_axis = -1 if axis is None else axis

  def init_fn(params):
    _common.check_schedule_start("scale_by_ags", "delta", delta, hint=_DELTA_HINT)
    for leaf in jax.tree.leaves(params):
      if leaf.ndim < 2:
        raise ValueError(
            f"scale_by_ags: a parameter of shape {leaf.shape} has rank < 2; AGS "
            "acts per output channel of kernels. Pass mask=binary_weight_mask "
            "(or a mask excluding 1-D parameters).")
      _common.check_axis("scale_by_ags", channel_axis, leaf.shape)
    return ScaleByAgsState(
        count=jnp.zeros([], jnp.int32),
        scaled_fraction=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise _common.no_params_error("scale_by_ags")
    d = jnp.asarray(_common.value_at(delta, state.count), jnp.float32)

    def scale(g, w):
      if g.ndim < 2:
        raise ValueError(
            f"scale_by_ags: the gradient of shape {g.shape} has rank < 2; mask "
            "out 1-D parameters (mask=binary_weight_mask).")
      _common.check_axis("scale_by_ags", channel_axis, g.shape)
      gn = jnp.maximum(_common.per_channel_norm(g, channel_axis), grad_eps)
      pn = jnp.maximum(_common.per_channel_norm(w, channel_axis), param_eps)
      small = gn / pn < d
      factor = jnp.where(small, d * pn / gn, 1.0)
      return (g.astype(jnp.float32) * factor).astype(g.dtype), jnp.mean(small.astype(jnp.float32))

    new_updates, fractions = _common.tree_unzip(
        updates, jax.tree.map(scale, updates, params), 2)
    return new_updates, ScaleByAgsState(
        count=optax.safe_increment(state.count), scaled_fraction=fractions)

  tx = optax.GradientTransformation(init_fn, update_fn)
  return optax.masked(tx, mask) if mask is not None else tx

