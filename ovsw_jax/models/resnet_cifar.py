"""The paper's CIFAR ResNets (docs/method.md §6): ResNet-20 and ResNet-18.

Both follow the authors' release (`model/models/resnet_cifar_v2.py` for
ResNet-20, `model/models/resnet_cifar.py` for ResNet-18), with NHWC inputs.
Module names match the release's (`conv1`, `bn1`, `layer2_0/conv1`, ...; a
release `layer2.0.conv1.weight` is `layer2_0/conv1/latent_kernel` here).
Binary convs are `BinaryConv` (`latent_kernel`), so `binary_weight_mask`
finds exactly them.

The logits come back in float32 whatever `dtype` is: the body and the head
compute in `dtype` (as torch autocast runs the linear layer in half
precision), and the loss should see float32 logits.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax.layers import BinaryConv
from ovsw_jax.models.common import (BatchNorm, ProjectionShortcut,
                                    avgpool_zeropad_shortcut, block_conv, conv_fp,
                                    global_avg_pool, hardtanh)

Dtype = Any


def _stage_sizes(blocks: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
  if isinstance(blocks, int):
    return (blocks,) * num_stages
  blocks = tuple(blocks)
  if len(blocks) != num_stages:
    raise ValueError(
        f"{len(blocks)} stage sizes given for {num_stages} stages (widths).")
  return blocks


class BasicBlockCifar(nn.Module):
  """ResNet-20's block: a shortcut around every binary conv (docs/method.md §6).

    out = htanh(bn1(bconv1(x)) + sc(x))
    out = htanh(bn2(bconv2(out)) + out)

  `sc` is the identity, or, when the block changes stride or width, a
  parameter-free 2x2 average pool plus zero channel padding ("option A").
  """
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  kernel_quantizer: Any = None  # None: 1-bit (the release); else `common.block_conv`'s

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name, dtype=self.dtype)
    conv = functools.partial(block_conv, self.features, self.kernel_quantizer,
                             dtype=self.dtype)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = avgpool_zeropad_shortcut(x, self.features, self.strides)
    out = bn(name="bn1")(conv(strides=self.strides, name="conv1")(x, train))
    out = hardtanh(out + shortcut)
    y = bn(name="bn2")(conv(strides=1, name="conv2")(out, train))
    return hardtanh(y + out)


class ResNetCifar(nn.Module):
  """The ResNet-20 family for 32x32 inputs (docs/method.md §6).

  Full-precision 3x3 stem (`widths[0]` channels) + BN + hardtanh; one stage
  of `BasicBlockCifar` per entry of `widths` (stride 2 at the start of every
  stage but the first); global average pool, BatchNorm, dense. ResNet-20 is
  `widths=(16, 32, 64)`, 3 blocks per stage.

  Attributes:
    num_classes: number of logits.
    widths: channels of each stage.
    blocks_per_stage: an int for every stage, or one int per stage.
    dtype: compute dtype (parameters stay float32).
    bn_axis_name: pmap/shard_map axis over which BatchNorm averages its batch
      statistics in training, or None for per-device statistics.
    kernel_quantizer: None for the release's 1-bit convs, or the quantizer of
      every block conv's kernel (e.g. 'ternary', 'midrise2_absmean'; inputs stay
      1-bit), for the ternary and k-bit studies (`common.block_conv`).
  """
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int | Sequence[int] = 3
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  kernel_quantizer: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name, dtype=self.dtype)
    x = conv_fp(self.widths[0], 3, dtype=self.dtype, name="conv1")(x)
    x = hardtanh(bn(name="bn1")(x))
    for i, (width, n) in enumerate(
        zip(self.widths, _stage_sizes(self.blocks_per_stage, len(self.widths)))):
      for j in range(n):
        x = BasicBlockCifar(width, strides=2 if i > 0 and j == 0 else 1,
                            dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                            kernel_quantizer=self.kernel_quantizer,
                            name=f"layer{i + 1}_{j}")(x, train=train)
    x = bn(name="bn2")(global_avg_pool(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
    return x.astype(jnp.float32)


class BasicBlockCifar18(nn.Module):
  """CIFAR ResNet-18's block: one shortcut around both convs (docs/method.md §6).

    out = htanh(bn1(bconv1(x)))
    out = htanh(bn2(bconv2(out)) + sc(x))

  `sc` is the identity, or, when the block changes stride or width, a BINARY
  1x1 strided conv + BN (`shortcut/conv`, `shortcut/bn`), as the release
  builds it with `builder.conv1x1`.
  """
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name, dtype=self.dtype)
    conv = functools.partial(BinaryConv, self.features, (3, 3), padding=1,
                             dtype=self.dtype)
    out = bn(name="bn1")(conv(strides=self.strides, name="conv1")(x, train=train))
    out = hardtanh(out)
    out = bn(name="bn2")(conv(strides=1, name="conv2")(out, train=train))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = ProjectionShortcut(
          self.features, strides=self.strides, binary=True, dtype=self.dtype,
          bn_axis_name=self.bn_axis_name, name="shortcut")(x, train=train)
    return hardtanh(out + shortcut)


class ResNetCifar18(nn.Module):
  """The release's CIFAR ResNet-18 family ("cResNet", docs/method.md §6).

  Full-precision 3x3 stem (`widths[0]` channels) + BN, no activation; stages
  of `BasicBlockCifar18`; global average pool, BatchNorm and a 1x1 conv WITH
  bias as the classifier (`fc`, kernel `(1, 1, widths[-1], num_classes)`).
  ResNet-18 is `stage_sizes=(2, 2, 2, 2)`, `widths=(64, 128, 256, 512)`.

  Attributes: as `ResNetCifar`, with `stage_sizes` one int per stage.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name, dtype=self.dtype)
    x = conv_fp(self.widths[0], 3, dtype=self.dtype, name="conv1")(x)
    x = bn(name="bn1")(x)
    for i, (width, n) in enumerate(
        zip(self.widths, _stage_sizes(self.stage_sizes, len(self.widths)))):
      for j in range(n):
        x = BasicBlockCifar18(width, strides=2 if i > 0 and j == 0 else 1,
                              dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                              name=f"layer{i + 1}_{j}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = bn(name="bn2")(x)
    x = nn.Conv(self.num_classes, (1, 1), padding="VALID", use_bias=True,
                dtype=self.dtype, name="fc")(x)
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


resnet20 = functools.partial(ResNetCifar, widths=(16, 32, 64), blocks_per_stage=3)
resnet18_cifar = functools.partial(
    ResNetCifar18, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512))
# Test-sized ResNet-20: one block per stage and an 8 -> 8 stride-2 stage, so
# both the zero-padding and the pool-only shortcut run.
tiny = functools.partial(ResNetCifar, widths=(4, 8, 8), blocks_per_stage=1)
