"""The exported network in memory: header + arrays, built, saved, loaded, checked."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ovsw_jax import models
from ovsw_jax.export import build
from ovsw_jax.export.format import ExportError, check_array, decode, encode
from ovsw_jax.layer_calls import LayerCall, trace_with_params


@dataclasses.dataclass
class ExportedNetwork:
  """A deployable binary network: `header` (see `format`) and `payload` arrays."""
  header: dict[str, Any]
  payload: dict[str, Any]

  def model(self) -> nn.Module:
    """The architecture named in the header, float32, for inference."""
    return create_model(self.header)

  def to_bytes(self) -> bytes:
    return encode(self.header, self.payload)


def _plain(value: Any) -> Any:
  """Config values as msgpack-friendly builtins (tuples become lists)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return str(value)


def _tuples(value: Any) -> Any:
  """Lists back to tuples, for Flax module fields (widths, stage sizes)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def create_model(header: Mapping[str, Any]) -> nn.Module:
  """The float32 model of a header (no BatchNorm axis: inference only)."""
  kwargs = {k: _tuples(v) for k, v in (header.get("model_kwargs") or {}).items()}
  try:
    return models.get_model(header["model"], num_classes=int(header["num_classes"]),
                            **kwargs)
  except (KeyError, TypeError, ValueError) as e:
    raise ExportError(f"the header's model cannot be built ({e}); re-export the file.") from None


def export_network(model_name: str, num_classes: int, params: Mapping[str, Any],
                   batch_stats: Mapping[str, Any], image_shape, *,
                   model_kwargs: Mapping[str, Any] | None = None,
                   config: Mapping[str, Any] | None = None) -> ExportedNetwork:
  """Exports trained `params` and `batch_stats` of the named model.

  Args:
    model_name: a key of `models.MODELS`.
    num_classes: the model's logits.
    params, batch_stats: the trained variables (a `TrainState`'s fields).
    image_shape: one input image's (H, W, C).
    model_kwargs: the model fields the run set (`config.model_kwargs`).
    config: a subset of the run's config recorded in the header, for provenance.
  """
  header = {"model": model_name, "num_classes": int(num_classes),
            "image_shape": [int(d) for d in image_shape],
            "model_kwargs": _plain(dict(model_kwargs or {})),
            "config": _plain(dict(config or {}))}
  traced = trace_with_params(create_model(header), header["image_shape"])
  params = jax.device_get(params)
  batch_stats = jax.device_get(batch_stats)
  net = ExportedNetwork(header, build.build_payload(traced[0], params, batch_stats))
  validate(net, traced)
  return net


def _check_float_tree(expected: Mapping[str, Any], got: Any, prefix: str = "") -> None:
  if not isinstance(got, Mapping):
    raise ExportError(
        f"float parameters at {prefix or 'the root'} are missing; re-export the file.")
  for key, spec in expected.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(spec, Mapping):
      _check_float_tree(spec, got.get(key), path)
    else:
      check_array(got.get(key), spec.shape, np.float32, f"float parameter {path}")


def validate(net: ExportedNetwork, traced=None) -> list[LayerCall]:
  """Checks every array against the header's model; returns the model's layer calls.

  `traced` is the header model's `trace_with_params`, when the caller has it.

  Raises:
    ExportError: naming the first missing or mismatched array.
  """
  header, payload = net.header, net.payload
  image_shape = header.get("image_shape")
  if not (isinstance(image_shape, list) and len(image_shape) == 3
          and all(isinstance(d, int) and d > 0 for d in image_shape)):
    raise ExportError(
        f"the header's image_shape {image_shape!r} is not (H, W, C); re-export the file.")
  calls, expected = traced or trace_with_params(create_model(header), image_shape)
  if not isinstance(payload, Mapping) or not {"binary", "affine", "float"} <= set(payload):
    raise ExportError("the payload lacks binary/affine/float sections; re-export the file.")
  binary, affine = payload["binary"], payload["affine"]
  for call in calls:
    if call.kind == "binary_conv":
      entry = binary.get(call.path)
      if not isinstance(entry, Mapping):
        raise ExportError(f"binary layer {call.path} is missing from the file; re-export it.")
      kernel = call.module.kernel_size
      shape = tuple(kernel) + (call.in_shape[-1], call.module.features)
      check_array(entry.get("shape"), (len(shape),), np.int64, f"{call.path} shape")
      if tuple(int(d) for d in entry["shape"]) != shape:
        raise ExportError(
            f"binary layer {call.path} has kernel shape {tuple(entry['shape'])}, the model "
            f"{header['model']} needs {shape}: the file does not match its header; re-export it.")
      nbytes = math.ceil(math.prod(shape) / 8)
      check_array(entry.get("bits"), (nbytes,), np.uint8, f"{call.path} bits")
      if "zeros" in entry:
        check_array(entry["zeros"], (nbytes,), np.uint8, f"{call.path} zeros")
      check_array(entry.get("alpha"), (shape[-1],), np.float32, f"{call.path} alpha")
      folded = entry.get("folded_into")
      if not isinstance(folded, str) or (folded and folded not in affine):
        raise ExportError(f"{call.path}'s folded_into {folded!r} names no BatchNorm; re-export it.")
    elif call.kind == "batch_norm":
      entry = affine.get(call.path)
      if not isinstance(entry, Mapping):
        raise ExportError(f"BatchNorm {call.path} is missing from the file; re-export it.")
      for field in ("scale", "shift"):
        check_array(entry.get(field), (call.in_shape[-1],), np.float32, f"{call.path} {field}")
  dropped = {c.path for c in calls if c.kind in ("binary_conv", "batch_norm")}
  _check_float_tree(build.without(expected, dropped), payload["float"])
  return calls


def save(net: ExportedNetwork, path) -> int:
  """Writes `net` to `path`; returns the file size in bytes."""
  data = net.to_bytes()
  epath.Path(path).write_bytes(data)
  return len(data)


def from_bytes(data: bytes, *, source: str = "the file") -> ExportedNetwork:
  """Decodes and validates an export's bytes (see `format.decode`, `validate`)."""
  header, payload = decode(data, source=source)
  net = ExportedNetwork(header, payload)
  validate(net)
  return net


def load(path) -> ExportedNetwork:
  """Reads and validates an exported file.

  Raises:
    ExportError: the file is missing, unreadable, of another format/version,
      corrupted, or does not match the model its header names.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise ExportError(f"{path} does not exist or is not a file; give the path of an export.")
  return from_bytes(path.read_bytes(), source=str(path))
