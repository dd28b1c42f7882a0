"""OvSW's Optax transforms: AGS, SAD, their chain and the binary-weight mask."""

from ovsw_jax.optim._common import HyperparameterError
from ovsw_jax.optim.ags import ScaleByAgsState, scale_by_ags
from ovsw_jax.optim.chain import binary_weight_mask, ovsw
from ovsw_jax.optim.sad import AddSadPenaltyState, add_sad_penalty

__all__ = [
    "AddSadPenaltyState", "HyperparameterError", "ScaleByAgsState", "add_sad_penalty",
    "binary_weight_mask", "ovsw", "scale_by_ags",
]
