"""The paper's ImageNet ResNet-18 and ResNet-34 (docs/method.md §6).

After the release's `model/models/resnet_imagenet.py`, NHWC:

    conv1 7x7/2 (full precision) 3->64, bn1, htanh, maxpool 3x3/2 (padding 1)
    layer1..layer4 of BasicBlockImageNet (64, 128, 256, 512 channels)
    global average pool, bn2, fc

Every 2-D BatchNorm (stem, blocks, downsample) has its scale initialised to
1e-8 and bias 0, as the release's `m.weight.data.fill_(1e-8)` loop over
`nn.BatchNorm2d` modules. The head's `bn2` is a `BatchNorm1d` in the release,
which that loop skips: it keeps scale 1 here too.

Logits are returned in float32 whatever `dtype` is (see `resnet_cifar`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax.layers import BinaryConv
from ovsw_jax.models.common import (BatchNorm, ProjectionShortcut, conv_fp,
                                    global_avg_pool, hardtanh, tiny_scale_init,
                                    torch_padding)

Dtype = Any


class BasicBlockImageNet(nn.Module):
  """The ImageNet ResNets' block: a shortcut around every binary conv.

    out = htanh(bn1(bconv1(x)) + downsample(x))
    out = htanh(bn2(bconv2(out)) + out)

  `downsample` is the identity, or, when the block changes stride or width, a
  full-precision strided 1x1 conv without bias + BN (`downsample/conv`,
  `downsample/bn`: the release's `downsample.0` / `downsample.1`).
  """
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_scale_init: Callable[..., jax.Array] = tiny_scale_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name,
                           scale_init=self.bn_scale_init, dtype=self.dtype)
    conv = functools.partial(BinaryConv, self.features, (3, 3), padding=1,
                             dtype=self.dtype)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = ProjectionShortcut(
          self.features, strides=self.strides, binary=False, dtype=self.dtype,
          bn_axis_name=self.bn_axis_name, bn_scale_init=self.bn_scale_init,
          name="downsample")(x, train=train)
    out = bn(name="bn1")(conv(strides=self.strides, name="conv1")(x, train=train))
    out = hardtanh(out + residual)
    y = bn(name="bn2")(conv(strides=1, name="conv2")(out, train=train))
    return hardtanh(y + out)


class ResNetImageNet(nn.Module):
  """The ImageNet ResNet family (ResNet-18: stage_sizes (2, 2, 2, 2); -34: (3, 4, 6, 3)).

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage.
    widths: channels per stage; the stem has `widths[0]`.
    dtype: compute dtype (parameters stay float32).
    bn_axis_name: axis over which BatchNorm averages batch statistics.
    bn_scale_init: init of every 2-D BatchNorm scale (1e-8 in the release).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_scale_init: Callable[..., jax.Array] = tiny_scale_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
          f"stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} "
          "must have the same length.")
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name, dtype=self.dtype)
    x = conv_fp(self.widths[0], 7, strides=2, dtype=self.dtype, name="conv1")(x)
    x = hardtanh(bn(scale_init=self.bn_scale_init, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=torch_padding(3))
    for i, (width, n) in enumerate(zip(self.widths, self.stage_sizes)):
      for j in range(n):
        x = BasicBlockImageNet(
            width, strides=2 if i > 0 and j == 0 else 1, dtype=self.dtype,
            bn_axis_name=self.bn_axis_name, bn_scale_init=self.bn_scale_init,
            name=f"layer{i + 1}_{j}")(x, train=train)
    x = bn(name="bn2")(global_avg_pool(x))  # BatchNorm1d: scale init 1.
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


resnet18 = functools.partial(ResNetImageNet, stage_sizes=(2, 2, 2, 2),
                             widths=(64, 128, 256, 512))
resnet34 = functools.partial(ResNetImageNet, stage_sizes=(3, 4, 6, 3),
                             widths=(64, 128, 256, 512))
# Test-sized ImageNet ResNet for small images (e.g. 32x32): one block per
# stage, a width change in stages 2 and 4 and a stride-only change in stage 3.
tiny_imagenet = functools.partial(ResNetImageNet, stage_sizes=(1, 1, 1, 1),
                                  widths=(4, 8, 8, 16))
