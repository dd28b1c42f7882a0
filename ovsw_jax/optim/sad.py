"""Silence Awareness Decaying (SAD), OvSW's second transform (paper Eqs. 8-9; docs/method.md §3)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ovsw_jax import bitpack
from ovsw_jax.optim import _common
from ovsw_jax.optim import levels as levels_lib


class AddSadPenaltyState(NamedTuple):
  """State of `add_sad_penalty`.

  Attributes:
    count: number of updates so far (int32), for a `dampen_weight` schedule.
    tracker: per weight, the exponential moving average of "its sign (its
      level) flipped at this step" (float32, same shape as the parameter;
      starts at 0).
    prev_signs: per parameter leaf, the signs of the weights seen at the last
      step, bit-packed by `bitpack.pack_signs` (uint8, 2 bits per weight); for
      a leaf with another quantizer (`levels=`), its levels packed by the
      quantizer (2 bits ternary, k bits k-bit). The release keeps the whole
      previous weight; only its sign is ever read.
    silent_fraction: per parameter leaf, the fraction of its weights that were
      silent (`tracker < track_threshold`) at the last step. A measurement.
  """
  count: jax.Array
  tracker: Any
  prev_signs: Any
  silent_fraction: Any


_GAMMA_HINT = ("dampen_weight is the L2 strength on silent weights; the release uses "
               "9e-4 (CIFAR ResNet-20) and 2e-5 (ImageNet), and 0 switches the penalty off.")


def _check_hyperparams(dampen_weight, track_momentum, track_threshold) -> None:
  """Rejects NaN, infinite and out-of-range hyperparameters given as numbers.

  Why: a NaN `dampen_weight` makes every update NaN, and a NaN threshold or
  momentum silently marks no weight (or every weight) silent. Arrays and
  schedules (as under `optax.inject_hyperparams`) are not checked here; a
  schedule's step-0 value is checked by `init`.
  """
  _common.check_range("add_sad_penalty", "dampen_weight", dampen_weight, hint=_GAMMA_HINT)
  _common.check_range(
      "add_sad_penalty", "track_momentum", track_momentum, high=1.0,
      hint="It is the flip tracker's momentum m; the release uses 0.999.")
  _common.check_range(
      "add_sad_penalty", "track_threshold", track_threshold,
      hint="It is the silence threshold sigma; the release uses 1e-4.")


def add_sad_penalty(
    dampen_weight: float | jax.Array | optax.Schedule = 2e-5,
    track_momentum: float | jax.Array = 0.999,
    track_threshold: float | jax.Array = 1e-4,
    *,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    levels: Any = None,
    toward: str = "zero",
) -> optax.GradientTransformation:
  r"""Adds an L2 decay on silent weights only: those that have not flipped sign lately.

  Per weight at step t (Xiang et al., 2024, Eqs. 8-9):

  .. math::
    f_t = [\mathrm{sign}(w_t) \ne \mathrm{sign}(w_{t-1})], \quad
    s_t = m\,s_{t-1} + (1 - m)\,f_t

    g_t \leftarrow g_t + \gamma\,[s_t < \sigma]\,w_t

  With `m = 0.999` and `sigma = 1e-4`, one flip lifts `s` to 1e-3 and about
  2,300 steps without another bring it back under `sigma`. The penalty pulls
  silent weights toward zero, where flipping is easy. `sign(0) = 0`. The
  previous signs start as the signs of the parameters given to `init`.
  Place it after `scale_by_ags` and before weight decay and momentum.

  Args:
    dampen_weight: gamma, the strength of the penalty, a finite float >= 0 or
      a schedule (9e-4 in the release's CIFAR ResNet-20 sweep, 2e-5 for ImageNet).
    track_momentum: m, in [0, 1).
    track_threshold: sigma, >= 0; a weight whose tracker is below it is silent.
    mask: a pytree of bools or a callable returning one; only True leaves are
      penalised and tracked (use `binary_weight_mask`).
    levels: each tracked leaf's quantizer (`ovsw_jax.optim.levels`): a flip is
      a change of its level. None: signs (the release). For ternary or k-bit
      kernels pass `ovsw_jax.kernel_quantizers(model, x)` (linen) or
      `ovsw_jax.nnx.kernel_quantizers(model)`.
    toward: where the penalty pulls a silent weight: 'zero' (the release,
      `gamma * w`) or 'boundary' (`gamma * (w - b)`, `b` the nearest
      threshold at which the weight's level changes, e.g. +-0.5 s for
      ternary; for signs that threshold is 0, so both agree). docs/method.md §10.

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: a hyperparameter is NaN, infinite or out of its range
      (`dampen_weight` and `track_threshold` >= 0, `track_momentum` in
      [0, 1)), checked where it is a Python or NumPy number; a
      `dampen_weight` schedule's value at step 0, checked by `init`. JAX
      arrays, such as the values `optax.inject_hyperparams` passes, are not
      checked.

  Example:
    >>> import jax.numpy as jnp, ovsw_jax as ow
    >>> params = {'w': jnp.array([[0.5, -2.0]])}
    >>> tx = ow.add_sad_penalty(dampen_weight=0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.zeros((1, 2))}, state, params)
    >>> updates['w']  # nothing flipped yet: every weight is silent
    Array([[ 0.05, -0.2 ]], dtype=float32)

  References:
    Xiang et al., "OvSW: Overcoming Silent Weights for Accurate Binary Neural
    Networks", ECCV 2024, https://arxiv.org/abs/2407.05257
  """
  _check_hyperparams(dampen_weight, track_momentum, track_threshold)
  if toward not in ("zero", "boundary"):
    raise _common.HyperparameterError(
        f"add_sad_penalty: toward={toward!r}: use 'zero' (the release) or 'boundary' "
        "(the nearest threshold of the weight's level).", "toward")
  if levels is not None:
    levels_lib.resolve(levels, {})  # a bad spec fails here, not inside jit

  def init_fn(params):
    _common.check_schedule_start("add_sad_penalty", "dampen_weight", dampen_weight,
                                 hint=_GAMMA_HINT)
    return AddSadPenaltyState(
        count=jnp.zeros([], jnp.int32),
        tracker=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        prev_signs=jax.tree.map(lambda q, p: q.pack(p),  # signs: `bitpack.pack_signs`
                                levels_lib.resolve(levels, params), params),
        silent_fraction=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise _common.no_params_error("add_sad_penalty")
    gamma = jnp.asarray(_common.value_at(dampen_weight, state.count), jnp.float32)
    m = jnp.asarray(track_momentum, jnp.float32)
    # 1 - m in double precision when m is a Python number, as the release does
    # (float32(1 - 0.999) is 1e-3; 1 - float32(0.999) is 0.99998713e-3).
    one_minus_m = (jnp.float32(1.0 - track_momentum)
                   if isinstance(track_momentum, (int, float)) else 1.0 - m)
    sigma = jnp.asarray(track_threshold, jnp.float32)

    def step(q, g, w, s, prev):
      now = q.pack(w)  # compared packed, and kept as the next step's `prev`
      flipped = bitpack.unpack_bits(bitpack.changed_bits(prev, now), w.shape)
      flipped = flipped.astype(jnp.float32)
      s = m * s + one_minus_m * flipped
      silent = s < sigma
      pull = w.astype(jnp.float32)
      if toward == "boundary":  # a sign's boundary is 0: the release's pull, bit for bit
        pull = pull - q.boundary(w)
      penalty = jnp.where(silent, gamma * pull, 0.0)
      g = (g.astype(jnp.float32) + penalty).astype(g.dtype)
      return g, s, now, jnp.mean(silent.astype(jnp.float32))

    qs = levels_lib.resolve(levels, params)
    new_updates, tracker, prev_signs, silent = _common.tree_unzip(
        updates, jax.tree.map(step, qs, updates, params, state.tracker, state.prev_signs), 4)
    return new_updates, AddSadPenaltyState(
        count=optax.safe_increment(state.count), tracker=tracker,
        prev_signs=prev_signs, silent_fraction=silent)

  tx = optax.GradientTransformation(init_fn, update_fn)
  return optax.masked(tx, mask) if mask is not None else tx
