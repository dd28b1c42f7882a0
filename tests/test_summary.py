"""The cost summary against hand formulas and the models' actual parameters."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ovsw_jax import models, summary
from ovsw_jax.layers import BinaryConv
from ovsw_jax.optim import binary_weight_mask


class OneOfEach(nn.Module):
  """fp conv 3x3/2 -> BN -> binary conv 3x3 -> BN -> binary 1x1/2 -> pool -> dense."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False, name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn0")(x)
    x = BinaryConv(6, (3, 3), padding=1, name="conv1")(x, train=train)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = BinaryConv(7, (1, 1), strides=2, padding=0, name="conv2")(x, train=train)
    return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def _actual(model, shape):
  x = jnp.zeros((1,) + shape)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_small_model_by_hand():
  h, w, c = 12, 10, 4
  s = summary.summarize(OneOfEach(), (h, w, c))
  rows = {row.path: row for row in s.layers}
  assert [row.kind for row in s.layers] == ["conv", "batch_norm", "binary_conv", "batch_norm",
                                        "binary_conv", "dense"]
  out = lambda n, k, stride, pad: (n + 2 * pad - k) // stride + 1
  ho, wo = out(h, 3, 2, 1), out(w, 3, 2, 1)
  assert rows["stem"].float_macs == ho * wo * c * 5 * 3 * 3
  assert rows["conv1"].binary_macs == ho * wo * 5 * 6 * 3 * 3
  assert rows["conv2"].binary_macs == out(ho, 1, 2, 0) * out(wo, 1, 2, 0) * 6 * 7
  assert rows["fc"].float_macs == 7 * 3
  assert rows["conv1"].float_macs == 0 and rows["stem"].binary_macs == 0
  assert rows["conv1"].params == 3 * 3 * 5 * 6 and rows["fc"].params == 7 * 3 + 3
  assert rows["bn1"].params == 2 * 6
  assert (rows["conv1"].weight_bits, rows["conv1"].activation_bits) == (1, 1)
  assert rows["conv1"].deployed_bytes == 3 * 3 * 5 * 6 / 8
  assert rows["stem"].deployed_bytes == rows["stem"].float32_bytes == 4 * 3 * 3 * 4 * 5
  assert s.params == _count(_actual(OneOfEach(), (h, w, c)))
  assert s.ops == s.bops / 64 + s.flops
  assert s.float_model_flops == s.bops + s.flops
  binary = 3 * 3 * 5 * 6 + 6 * 7
  assert s.binary_params == binary
  assert s.deployed_bytes == binary / 8 + 4 * (s.params - binary)
  assert s.compression == pytest.approx(4 * s.params / s.deployed_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(summary.PAPER_MODELS))
def test_paper_models_count_their_actual_params(name):
  classes, shape = summary.PAPER_MODELS[name]
  model = models.get_model(name, num_classes=classes)
  params = _actual(model, shape)
  s = summary.summarize(model, shape)
  assert s.params == _count(params)
  mask = binary_weight_mask(params)
  assert s.binary_params == sum(math.prod(p.shape) for p, m in
                                zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  assert s.float32_bytes == 4 * s.params


def test_resnet18_imagenet_operations_by_hand():
  s = summary.model_summary("resnet18")
  widths, sizes = (64, 128, 256, 512), (56, 28, 14, 7)
  bops = 0
  for i, (c, hw) in enumerate(zip(widths, sizes)):
    c_in = widths[i - 1] if i else c
    bops += hw * hw * c * 9 * c_in   # first conv of the stage (strided after stage 1)
    bops += 3 * hw * hw * c * 9 * c  # the other three
  stem = 112 * 112 * 64 * 3 * 7 * 7
  downsample = sum(hw * hw * c * widths[i - 1] for i, (c, hw) in enumerate(zip(widths, sizes)) if i)
  fc = 512 * 1000
  assert s.bops == bops
  assert s.flops == stem + downsample + fc
  # The float ResNet-18's figure of the literature: about 1.8 GFLOPs.
  assert s.float_model_flops == pytest.approx(1.8e9, rel=0.02)
  assert s.ops == pytest.approx(bops / 64 + stem + downsample + fc)


def test_tables_render():
  s = summary.model_summary("resnet20")
  layers = summary.format_layers(s)
  assert layers.count("\n") == len(s.layers) + 1
  assert "OPs = BOPs/64 + FLOPs" in summary.format_totals(s)


def test_cli_rejects_unknown_models(capsys):
  assert summary.main(["nope"]) == 2
  assert "unknown model" in capsys.readouterr().err
