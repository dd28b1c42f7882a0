"""ovsw_jax: binary (and ternary, k-bit) neural networks trained with OvSW in JAX, Flax and Optax.

The names below load on first use, so `import ovsw_jax.optim` (the Optax
transforms alone) does not import Flax, and `import ovsw_jax` imports nothing
of the trainer (TensorFlow, clu, orbax).

>>> import ovsw_jax as ow
>>> ow.ovsw.__module__, ow.BinaryConv.__module__
('ovsw_jax.optim.chain', 'ovsw_jax.layers')
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AddSadPenaltyState": "ovsw_jax.optim",
    "ScaleByAgsState": "ovsw_jax.optim",
    "add_sad_penalty": "ovsw_jax.optim",
    "binary_weight_mask": "ovsw_jax.optim",
    "ovsw": "ovsw_jax.optim",
    "scale_by_ags": "ovsw_jax.optim",
    "LATENT_KERNEL": "ovsw_jax.naming",
    "BinaryConv": "ovsw_jax.layers",
    "QuantConv": "ovsw_jax.layers",
    "QuantDense": "ovsw_jax.layers",
    "kernel_quantizers": "ovsw_jax.layers",
    "xnor_conv": "ovsw_jax.layers",
    "approx_sign": "ovsw_jax.quantizers",
    "channel_scale": "ovsw_jax.quantizers",
    "ste_sign": "ovsw_jax.quantizers",
}
# Submodules reachable as attributes (`ow.nnx.BinaryConv`) without an import.
_SUBMODULES = ("bitpack", "layers", "naming", "nnx", "optim", "quantizers")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value  # later look-ups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
