"""The last step of the input pipeline, on the device: uint8 pixels to model inputs.

Pipelines that ship uint8 pixels (ImageNet's, see `data.tf_images`) leave
this to the accelerator, where it is a fused elementwise op: scaling to
[0, 1], the example's PCA lighting offset (`rgb_offset`, drawn on the host
with the rest of its augmentation), and the per-channel normalisation
`(x - mean) / std` of the release. Pipelines that ship normalised float32
images pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def model_images(batch: dict[str, jax.Array], pixel_stats: Any = None) -> jax.Array:
  """`batch['image']` as the model takes it (`pixel_stats`: DatasetInfo.pixel_stats)."""
  image = batch["image"]
  if pixel_stats is None:
    return image
  mean, std = (jnp.asarray(v, jnp.float32) for v in pixel_stats)
  x = image.astype(jnp.float32) / 255.0
  if "rgb_offset" in batch:
    x = x + batch["rgb_offset"].astype(jnp.float32)[..., None, None, :]
  return (x - mean) / std
