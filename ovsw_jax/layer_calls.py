"""The leaf layers a model calls, in call order, with their shapes.

Both the exporter (which BatchNorm follows which binary conv, what to keep in
full precision) and the cost summary need the same inventory of a model's
layers. Rather than parse each architecture, the model is run once abstractly
(`jax.eval_shape`, no FLOPs spent) under a Flax method interceptor that records
every call of a leaf module: its path, its kind, its input and output shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax.layers import BinaryConv, QuantConv, QuantDense
from ovsw_jax.models.common import PReLU

# Leaf kinds, most specific first (BinaryConv is checked before nn.Conv).
_KINDS = (
    (BinaryConv, "binary_conv"),
    (QuantConv, "quant_conv"),
    (QuantDense, "quant_dense"),
    (nn.Conv, "conv"),
    (nn.Dense, "dense"),
    (nn.BatchNorm, "batch_norm"),
    (PReLU, "prelu"),
)


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a leaf layer, for a single example.

  Attributes:
    path: the module's path, '/'-joined (`layer1_0/conv1`): the key of its
      parameters in the params tree.
    kind: 'binary_conv', 'quant_conv', 'quant_dense', 'conv', 'dense',
      'batch_norm' or 'prelu'.
    in_shape: input shape without the batch axis.
    out_shape: output shape without the batch axis.
    module: the (bound-free) module, for its attributes (strides, padding,
      epsilon, ...).
  """
  path: str
  kind: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  module: Any


def module_kind(module: nn.Module) -> str | None:
  """The leaf kind of `module` (see `LayerCall.kind`), or None for containers."""
  for cls, kind in _KINDS:
    if isinstance(module, cls):
      return kind
  return None


def module_path(module: nn.Module) -> str:
  """The '/'-joined path of a bound module, as its params are keyed."""
  return "/".join(str(p) for p in module.path)


def trace(model: nn.Module, image_shape: Sequence[int]) -> list[LayerCall]:
  """Every leaf layer call of `model` on one `image_shape` image, in order."""
  return trace_with_params(model, image_shape)[0]


def trace_with_params(model: nn.Module, image_shape: Sequence[int]) -> tuple[list[LayerCall], Any]:
  """`trace`'s layer calls and the model's params as `jax.ShapeDtypeStruct`s.

  Runs `model.init` under `jax.eval_shape` with `train=False`, so it costs no
  compute and no memory for the weights.
  """
  calls: list[LayerCall] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    kind = module_kind(context.module)
    if kind is not None and context.method_name == "__call__":
      calls.append(LayerCall(
          path=module_path(context.module), kind=kind,
          in_shape=tuple(args[0].shape[1:]), out_shape=tuple(out.shape[1:]),
          module=context.module.clone(parent=None)))
    return out

  x = jnp.zeros((1,) + tuple(int(d) for d in image_shape), jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return calls, variables["params"]
