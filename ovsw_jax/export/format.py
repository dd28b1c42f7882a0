"""The exported network's file format: versioned msgpack, checked on load.

A file is one msgpack map (written with `flax.serialization`, already a
dependency; it stores nested dicts of numpy arrays with their dtype and
shape, and needs no schema compiler or extra package):

    {"header":  {...},                 # readable without the payload
     "sha256":  "<hex digest of payload>",
     "payload": <bytes>}               # msgpack of the network's arrays

`header` holds `format` ("ovsw-bnn"), `version` (FORMAT_VERSION), `model`,
`num_classes`, `image_shape`, `model_kwargs` and a `config` subset of the run
(data set, seed, ...). `payload` unpacks to

    binary: {layer path: {"bits":  uint8, sign(w) > 0 packed 8 per byte (np.packbits
                                   of the HWIO kernel in C order),
                          "zeros": uint8, optional: w == 0 packed the same way,
                                   present only when some latent weight is exactly 0
                                   (sign(0) = 0 in training too),
                          "shape": int64 (kh, kw, c_in, c_out),
                          "alpha": float32 (c_out,), the per-channel scale,
                          "folded_into": path of the BatchNorm that absorbed
                                   alpha, or "" when the conv applies it itself}}
    affine: {BatchNorm path: {"scale": float32 (c,), "shift": float32 (c,)}}
    float:  the full-precision parameters (stem, head, fp shortcuts, PReLU)
            as a Flax params tree.

The digest makes damaged bytes inside the arrays an error instead of silently
wrong weights. Readers reject another `format` or `version`; what a field
means never changes within a version.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from flax import serialization

FORMAT_NAME = "ovsw-bnn"
FORMAT_VERSION = 1


class ExportError(ValueError):
  """An exported file or its inputs are unusable; the message says why and what to do."""


def encode(header: dict[str, Any], payload: dict[str, Any]) -> bytes:
  """The file's bytes for `header` and `payload` (see the module docstring)."""
  header = dict(header, format=FORMAT_NAME, version=FORMAT_VERSION)
  body = serialization.msgpack_serialize(payload)
  return serialization.msgpack_serialize(
      {"header": header, "sha256": hashlib.sha256(body).hexdigest(), "payload": body})


def decode(data: bytes, *, source: str = "the file") -> tuple[dict[str, Any], dict[str, Any]]:
  """`(header, payload)` of a file's bytes, after checking format, version and digest.

  Raises:
    ExportError: the bytes are not a readable export of this version.
  """
  redo = "re-export it with `python -m ovsw_jax.export --workdir=DIR --out=FILE`"
  try:
    outer = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types.
    raise ExportError(
        f"{source} is not a readable {FORMAT_NAME} file (truncated or corrupted: "
        f"{type(e).__name__}); {redo}.") from None
  if not isinstance(outer, dict) or not {"header", "sha256", "payload"} <= set(outer):
    raise ExportError(
        f"{source} is not an {FORMAT_NAME} file (no header/sha256/payload); "
        "give a file written by `python -m ovsw_jax.export`.")
  header = outer["header"]
  if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
    raise ExportError(
        f"{source} has format {header.get('format') if isinstance(header, dict) else None!r}, "
        f"expected {FORMAT_NAME!r}; give a file written by `python -m ovsw_jax.export`.")
  if header.get("version") != FORMAT_VERSION:
    raise ExportError(
        f"{source} has format version {header.get('version')!r}; this ovsw_jax reads "
        f"version {FORMAT_VERSION} only: {redo} with this version.")
  body = outer["payload"]
  if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != outer["sha256"]:
    raise ExportError(f"{source}'s payload does not match its sha256 digest (corrupted); {redo}.")
  try:
    payload = serialization.msgpack_restore(body)
  except Exception as e:
    raise ExportError(
        f"{source}'s payload cannot be decoded ({type(e).__name__}); {redo}.") from None
  return header, payload


def check_array(value: Any, shape: tuple[int, ...], dtype, what: str) -> np.ndarray:
  """`value` as a numpy array, or an ExportError naming `what` and the mismatch."""
  if not isinstance(value, np.ndarray):
    raise ExportError(f"{what} is missing or not an array (got {type(value).__name__}).")
  if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
    raise ExportError(
        f"{what} has shape {value.shape} and dtype {value.dtype}, the model needs "
        f"{tuple(shape)} {np.dtype(dtype)}: the file does not match its header's model; "
        "re-export it.")
  return value
