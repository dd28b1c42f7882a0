"""The OvSW chain and the mask that picks the weights it acts on (docs/method.md §4)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from ovsw_jax.naming import is_latent_kernel
from ovsw_jax.optim.ags import scale_by_ags
from ovsw_jax.optim.sad import add_sad_penalty


def binary_weight_mask(params: Any) -> Any:
  """A pytree of bools: True exactly on the latent kernels of binary layers.

  Binary layers (`BinaryConv`, linen or nnx) name their latent weight
  `latent_kernel`; every other parameter (the full-precision stem, shortcut
  convs, classifier, BatchNorm, biases) is False. Works on params, gradients,
  or any tree of the same structure, frozen or not, and on `flax.nnx` state,
  whose paths end in the Variable's `.value`.

  Example:
    >>> import jax.numpy as jnp, ovsw_jax as ow
    >>> ow.binary_weight_mask({'conv': {'latent_kernel': jnp.ones((3, 3, 2, 4))},
    ...                        'head': {'kernel': jnp.ones((4, 10)), 'bias': jnp.ones(10)}})
    {'conv': {'latent_kernel': True}, 'head': {'bias': False, 'kernel': False}}
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: is_latent_kernel(path), params)


def ovsw(
    delta: float | jax.Array | optax.Schedule = 0.01,
    dampen_weight: float | jax.Array | optax.Schedule = 2e-5,
    track_momentum: float | jax.Array = 0.999,
    track_threshold: float | jax.Array = 1e-4,
    *,
    mask: Any | Callable[[optax.Params], Any] | None = binary_weight_mask,
    levels: Any = None,
    toward: str = "zero",
) -> optax.GradientTransformation:
  """AGS then SAD, ready to chain in front of any Optax optimizer.

  The release's step is loss gradient -> AGS -> SAD -> weight decay ->
  momentum -> learning rate, that is::

    optax.chain(ovsw(delta, dampen_weight), optax.add_decayed_weights(wd),
                optax.sgd(lr, momentum=0.9))

  Args:
    delta: AGS threshold (the paper's lambda); see `scale_by_ags`.
    dampen_weight: SAD strength (gamma); see `add_sad_penalty`.
    track_momentum: SAD's tracker momentum m.
    track_threshold: SAD's silence threshold sigma.
    mask: which leaves OvSW acts on; by default the latent kernels of binary
      layers (`binary_weight_mask`). None applies it to every leaf. Under
      `optax.inject_hyperparams`, name it static (it is callable, so it would
      be taken for a schedule): `inject_hyperparams(ovsw, static_args=('mask',))`.
    levels: the quantizer of each kernel, for SAD's flip tracking (a flip is a
      change of level): None for signs (binary kernels, the release); for
      ternary or k-bit kernels `ow.kernel_quantizers(model, x)` (linen) or
      `ow.nnx.kernel_quantizers(model)`. See `ovsw_jax.optim.levels`.
    toward: SAD's target for silent weights, 'zero' (the release) or
      'boundary' (the nearest level threshold); see `add_sad_penalty`.

  Returns:
    An `optax.GradientTransformation` whose state is
    `(ScaleByAgsState, AddSadPenaltyState)` (each inside `optax.MaskedState`
    when masked), readable with `optax.tree.get(state, 'tracker')`.

  Example:
    >>> import optax, ovsw_jax as ow
    >>> tx = optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4),
    ...                  optax.add_decayed_weights(5e-4),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  return optax.chain(
      scale_by_ags(delta, mask=mask),
      add_sad_penalty(dampen_weight, track_momentum, track_threshold, mask=mask,
                      levels=levels, toward=toward))
