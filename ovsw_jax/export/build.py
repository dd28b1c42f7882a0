"""From trained parameters to the deployable network's arrays.

Binary kernels become packed sign bits with their per-channel scale `alpha`;
every BatchNorm becomes a per-channel affine `y = x * scale + shift` from its
running statistics. When a BatchNorm directly consumes a binary conv (the
sibling `bnK` of `convK`, `bn` of `conv`, as every model here names them),
the conv's `alpha` is folded into that affine too, so the conv can hand over
its raw integer sum. Only positive per-channel scalings lie between such a
conv and its BatchNorm in these models (VGG-small's max-pool commutes with
them, `alpha >= 0` being a mean of absolute values). Everything else (stem,
head, full-precision shortcuts, PReLU) is kept as it is, in float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from ovsw_jax import quantizers
from ovsw_jax.layer_calls import LayerCall


def pack_kernel(w: np.ndarray) -> dict[str, Any]:
  """Sign bits of a latent kernel: 1 bit per weight, plus a zero plane only if needed.

  `sign(0) = 0` in training (`jnp.sign`), so an exactly-zero latent weight
  contributes nothing to the simulated conv. To stay exact the file then
  carries a second plane marking those weights; a kernel without zeros (the
  normal case) costs exactly one bit per weight.
  """
  w = np.asarray(w, np.float32)
  entry = {"bits": np.packbits(w.reshape(-1) > 0),
           "shape": np.asarray(w.shape, np.int64)}
  zeros = w.reshape(-1) == 0
  if zeros.any():
    entry["zeros"] = np.packbits(zeros)
  return entry


def unpack_kernel(entry: Mapping[str, Any]) -> np.ndarray:
  """Inverse of `pack_kernel`: the int8 kernel of -1, 0, +1 (HWIO)."""
  shape = tuple(int(d) for d in entry["shape"])
  size = int(np.prod(shape))
  signs = np.unpackbits(entry["bits"], count=size).astype(np.int8) * 2 - 1
  if "zeros" in entry:
    signs[np.unpackbits(entry["zeros"], count=size).astype(bool)] = 0
  return signs.reshape(shape)


def fold_batch_norm(params: Mapping[str, Any], stats: Mapping[str, Any], epsilon: float,
                    alpha: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Inference BatchNorm (times `alpha` on its input) as `x * scale + shift`.

  Flax computes `(x - mean) * gamma / sqrt(var + eps) + beta`; with the
  input `acc * alpha` that is `acc * (alpha * m) + (beta - mean * m)`, where
  `m = gamma / sqrt(var + eps)`. Computed in float64, stored as float32.
  """
  var = np.asarray(stats["var"], np.float64)
  mean = np.asarray(stats["mean"], np.float64)
  m = 1.0 / np.sqrt(var + epsilon)
  if "scale" in params:
    m = m * np.asarray(params["scale"], np.float64)
  shift = -mean * m
  if "bias" in params:
    shift = shift + np.asarray(params["bias"], np.float64)
  scale = m if alpha is None else m * np.asarray(alpha, np.float64)
  return {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)}


def sibling_batch_norm(conv_path: str) -> str:
  """The BatchNorm that consumes `conv_path` by the models' naming: convK -> bnK."""
  parent, _, name = conv_path.rpartition("/")
  if not name.startswith("conv"):
    return ""
  bn = "bn" + name[len("conv"):]
  return f"{parent}/{bn}" if parent else bn


def _get(tree: Mapping[str, Any], path: str) -> Any:
  for key in path.split("/"):
    tree = tree[key]
  return tree


def without(tree: Mapping[str, Any], paths: set[str], prefix: str = "") -> dict[str, Any]:
  """`tree` without the subtrees at '/'-joined `paths` (and without emptied dicts)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if path in paths:
      continue
    if isinstance(value, Mapping):
      value = without(value, paths, path)
      if not value:
        continue
    out[key] = value
  return out


def build_payload(calls: list[LayerCall], params: Mapping[str, Any],
                  batch_stats: Mapping[str, Any]) -> dict[str, Any]:
  """The `payload` of an export (see `format`) from a model's layer calls and variables."""
  bn_calls = {c.path: c for c in calls if c.kind == "batch_norm"}
  binary, affine, folded = {}, {}, {}
  for call in calls:
    if call.kind != "binary_conv":
      continue
    w = np.asarray(_get(params, call.path)["latent_kernel"], np.float32)
    entry = pack_kernel(w)
    entry["alpha"] = np.asarray(quantizers.channel_scale(w), np.float32)
    bn = sibling_batch_norm(call.path)
    if bn in bn_calls and bn_calls[bn].in_shape[-1] == w.shape[-1]:
      folded[bn] = entry["alpha"]
    else:
      bn = ""
    entry["folded_into"] = bn
    binary[call.path] = entry
  for path, call in bn_calls.items():
    affine[path] = fold_batch_norm(
        _get(params, path), _get(batch_stats, path), call.module.epsilon, folded.get(path))
  dropped = set(binary) | set(affine)
  float_params = jax.tree.map(lambda x: np.asarray(x, np.float32), without(params, dropped))
  return {"binary": binary, "affine": affine, "float": float_params}
