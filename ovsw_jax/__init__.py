"""ovsw_jax: binary neural networks trained with OvSW in JAX, Flax and Optax."""

from ovsw_jax.layers import LATENT_KERNEL, BinaryConv, xnor_conv
from ovsw_jax.optim import (AddSadPenaltyState, ScaleByAgsState, add_sad_penalty,
                            binary_weight_mask, ovsw, scale_by_ags)
from ovsw_jax.quantizers import approx_sign, channel_scale, ste_sign

__version__ = "0.1.0"

__all__ = [
    "AddSadPenaltyState", "BinaryConv", "LATENT_KERNEL", "ScaleByAgsState",
    "add_sad_penalty", "approx_sign", "binary_weight_mask", "channel_scale",
    "ovsw", "scale_by_ags", "ste_sign", "xnor_conv",
]
