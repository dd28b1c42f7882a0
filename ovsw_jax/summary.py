"""Cost of a binary network: parameters, memory and operations, per layer and in total.

Counted as BNN papers count them (XNOR-Net, Bi-Real Net, ReActNet):
  * binary MACs (BOPs): multiply-accumulates of 1-bit weights with 1-bit
    activations, `H_out * W_out * C_out * kh * kw * C_in` per binary conv;
  * integer MACs: those of a quantized layer (`QuantDense`, `QuantConv`) whose
    weights and inputs are both quantized, not both to 1 bit (ternary or k-bit
    weights with binary or int8 inputs), counted one operation each; quantized
    weights with full-precision inputs count as FLOPs;
  * FLOPs: multiply-accumulates of the full-precision convs and dense layers;
  * OPs = BOPs / 64 + integer MACs + FLOPs (a 64-bit word does 64 binary MACs
    per XNOR + popcount);
  * memory: 1 bit per binary weight, the quantizer's stored bits per quantized
    weight (2 for ternary, whose 1.58 bits of information are what `weight_bits`
    reports; k for k-bit), 32 bits per full-precision parameter.
BatchNorm (a per-channel affine at inference, into which the binary conv's
scale `alpha` is folded), activations, pooling and residual adds are not counted
as operations. Parameters are the trainable ones (BatchNorm's running
statistics are buffers, as in torch's parameter counts). Counts are per image.

    python -m ovsw_jax.summary                  # the five paper models
    python -m ovsw_jax.summary resnet18         # one of them
    python -m ovsw_jax.summary --layers resnet20  # with a row per layer
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax import models, quantizers
from ovsw_jax.layer_calls import LayerCall, trace

# The paper's five models: (num_classes, image shape).
PAPER_MODELS = {
    "resnet20": (10, (32, 32, 3)),
    "resnet18_cifar": (10, (32, 32, 3)),
    "vgg_small": (10, (32, 32, 3)),
    "resnet18": (1000, (224, 224, 3)),
    "resnet34": (1000, (224, 224, 3)),
}


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One leaf layer's cost for one image."""
  path: str
  kind: str
  weight_bits: float       # information per weight: 1, log2(3) = 1.58 ternary, k, 32
  activation_bits: int
  params: int
  float32_bytes: int       # every parameter in float32
  deployed_bytes: float    # quantized weights at their stored bits, the rest float32
  binary_macs: int
  float_macs: int
  integer_macs: int = 0


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer costs and their totals (see the module docstring)."""
  layers: tuple[LayerCost, ...]

  def total(self, field: str) -> float:
    return sum(getattr(layer, field) for layer in self.layers)

  @property
  def params(self) -> int:
    return int(self.total("params"))

  @property
  def binary_params(self) -> int:
    """Parameters of the layers with 1-bit weights (their biases included)."""
    return int(sum(row.params for row in self.layers
                   if row.kind in _QUANTIZED and row.weight_bits == 1))

  @property
  def integer_macs(self) -> int:
    return int(self.total("integer_macs"))

  @property
  def bops(self) -> int:
    return int(self.total("binary_macs"))

  @property
  def flops(self) -> int:
    return int(self.total("float_macs"))

  @property
  def ops(self) -> float:
    """BOPs / 64 + integer MACs + FLOPs."""
    return self.bops / 64 + self.integer_macs + self.flops

  @property
  def float_model_flops(self) -> int:
    """FLOPs of the same network with every layer in full precision."""
    return self.bops + self.integer_macs + self.flops

  @property
  def float32_bytes(self) -> int:
    return int(self.total("float32_bytes"))

  @property
  def deployed_bytes(self) -> float:
    return self.total("deployed_bytes")

  @property
  def compression(self) -> float:
    """Memory of the float32 network over that of the binary one."""
    return self.float32_bytes / self.deployed_bytes


def _size(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _macs(call: LayerCall, params: Any) -> int:
  """Multiply-accumulates of a conv or dense call: output size times fan-in."""
  kernel = params.get("latent_kernel", params.get("kernel"))
  fan_in = math.prod(kernel.shape[:-1])
  return math.prod(call.out_shape) * fan_in


_QUANTIZED = ("binary_conv", "quant_conv", "quant_dense")


def _bits(quantizer) -> tuple[float, int]:
  """(reported, stored) bits of what `quantizer` makes: 32 for none (full precision)."""
  q = quantizers.get(quantizer)
  return (32.0, 32) if q is None else (q.reported_bits, q.bits)


def layer_cost(call: LayerCall, params: Any) -> LayerCost:
  """The cost of one traced layer call, from its parameter shapes (and quantizers)."""
  n = _size(params)
  macs = _macs(call, params) if call.kind in _QUANTIZED + ("conv", "dense") else 0
  if call.kind == "binary_conv":
    (w_bits, w_stored), a_bits = (1.0, 1), 1
  elif call.kind in _QUANTIZED:
    w_bits, w_stored = _bits(call.module.kernel_quantizer)
    a_bits = _bits(call.module.input_quantizer)[1]
  else:
    (w_bits, w_stored), a_bits = (32.0, 32), 32
  kernel = params.get("latent_kernel", params.get("kernel")) if call.kind in _QUANTIZED else None
  k = int(math.prod(kernel.shape)) if kernel is not None else 0
  binary = w_stored == 1 and a_bits == 1
  # Quantized weights with float inputs still multiply-accumulate in float.
  integer = not binary and w_stored < 32 and a_bits < 32
  return LayerCost(
      path=call.path, kind=call.kind, weight_bits=int(w_bits) if w_bits == int(w_bits) else w_bits,
      activation_bits=a_bits, params=n, float32_bytes=4 * n,
      deployed_bytes=k * w_stored / 8 + 4.0 * (n - k),
      binary_macs=macs if binary else 0, integer_macs=macs if integer else 0,
      float_macs=0 if binary or integer else macs)


def summarize(model: nn.Module, image_shape: Sequence[int]) -> Summary:
  """The cost summary of `model` on one `image_shape` image (no compute spent)."""
  calls = trace(model, image_shape)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]

  def at(path):
    tree = params
    for key in path.split("/"):
      tree = tree.get(key, {}) if hasattr(tree, "get") else {}
    return tree

  return Summary(tuple(layer_cost(c, at(c.path)) for c in calls))


def model_summary(name: str, num_classes: int | None = None,
                  image_shape: Sequence[int] | None = None, **kwargs: Any) -> Summary:
  """`summarize` of a registered model; paper models default to their data set's shapes."""
  default_classes, default_shape = PAPER_MODELS.get(name, (10, (32, 32, 3)))
  model = models.get_model(name, num_classes=num_classes or default_classes, **kwargs)
  return summarize(model, image_shape or default_shape)


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"


def format_layers(summary: Summary) -> str:
  """A markdown table, one row per layer."""
  integer = any(row.integer_macs for row in summary.layers)
  rows = ["| layer | kind | W/A bits | params | float32 | deployed | binary MACs | "
          + ("integer MACs | " if integer else "") + "float MACs |",
          "|---|---|---|---:|---:|---:|---:|" + ("---:|" if integer else "") + "---:|"]
  for row in summary.layers:
    w_bits = f"{row.weight_bits:.2f}" if isinstance(row.weight_bits, float) else row.weight_bits
    rows.append(
        f"| {row.path} | {row.kind} | {w_bits}/{row.activation_bits} | {row.params:,} | "
        f"{_si(row.float32_bytes)}B | {_si(row.deployed_bytes)}B | {_si(row.binary_macs)} | "
        + (f"{_si(row.integer_macs)} | " if integer else "") + f"{_si(row.float_macs)} |")
  return "\n".join(rows)


def format_totals(summary: Summary) -> str:
  """A markdown table of the totals, the binary network next to its float32 twin."""
  s = summary
  return "\n".join([
      "| | binary network | float32 network | float / binary |",
      "|---|---:|---:|---:|",
      f"| parameters | {s.params:,} ({s.binary_params:,} binary) | {s.params:,} | |",
      f"| memory | {_si(s.deployed_bytes)}B | {_si(s.float32_bytes)}B | {s.compression:.1f}x |",
      f"| BOPs (binary MACs) | {_si(s.bops)} | 0 | |",
  ] + ([f"| integer MACs | {_si(s.integer_macs)} | 0 | |"] if s.integer_macs else []) + [
      f"| FLOPs (float MACs) | {_si(s.flops)} | {_si(s.float_model_flops)} | |",
      f"| OPs = BOPs/64 + {'integer MACs + ' if s.integer_macs else ''}FLOPs | {_si(s.ops)} | "
      f"{_si(s.float_model_flops)} | {s.float_model_flops / s.ops:.1f}x |",
  ])


def main(argv: Sequence[str]) -> int:
  if any(a in ("-h", "--help") for a in argv):
    print(__doc__)
    return 0
  per_layer = "--layers" in argv
  names = [a for a in argv if a != "--layers"] or list(PAPER_MODELS)
  unknown = [n for n in names if n not in models.MODELS]
  if unknown:
    valid = ", ".join(sorted(models.MODELS))
    print(f"error: unknown model(s) {', '.join(unknown)}; valid: {valid}",
          file=sys.stderr)
    return 2
  for name in names:
    classes, shape = PAPER_MODELS.get(name, (10, (32, 32, 3)))
    print(f"## {name} ({classes} classes, {shape[0]}x{shape[1]}x{shape[2]})\n")
    cost = model_summary(name)
    if per_layer:
      print(format_layers(cost) + "\n")
    print(format_totals(cost) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
