"""VGG-small for CIFAR (docs/method.md §6), after the release's `model/models/vgg.py`.

    conv0 (full precision) 3->128, bn0, htanh
    bconv1 128->128, maxpool, bn1, htanh
    bconv2 128->256,          bn2, htanh
    bconv3 256->256, maxpool, bn3, htanh
    bconv4 256->512,          bn4, htanh
    bconv5 512->512, maxpool, bn5, PReLU
    flatten, fc 8192 -> classes

Pooling sits between each conv and its BatchNorm, as in the release. Every
conv, binary or not, is initialised normal(0, sqrt(2 / (k*k*c_out))), and the
classifier normal(0, 0.01) with zero bias (the release's `_initialize_weights`).

One layout difference: the release flattens NCHW (channel-major), this model
flattens NHWC, so `fc`'s input rows are a permutation of the release's. It
only matters when porting a trained torch checkpoint.

Logits are returned in float32 whatever `dtype` is (see `resnet_cifar`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax.layers import BinaryConv
from ovsw_jax.models.common import (BatchNorm, PReLU, conv_fp, hardtanh,
                                    vgg_conv_init)

Dtype = Any


class VGGSmall(nn.Module):
  """VGG-small with 1-bit weights and activations in conv1..conv5.

  Attributes:
    num_classes: number of logits.
    widths: the three widths (128, 256, 512 in the paper); conv0 and conv1
      have `widths[0]` channels, conv2/conv3 `widths[1]`, conv4/conv5
      `widths[2]`.
    dtype: compute dtype (parameters stay float32).
    bn_axis_name: axis over which BatchNorm averages batch statistics.
  """
  num_classes: int
  widths: Sequence[int] = (128, 256, 512)
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, use_running_average=not train,
                           axis_name=self.bn_axis_name, dtype=self.dtype)
    pool = lambda y: nn.max_pool(y, (2, 2), strides=(2, 2))
    w0, w1, w2 = self.widths
    x = conv_fp(w0, 3, dtype=self.dtype, kernel_init=vgg_conv_init, name="conv0")(x)
    x = hardtanh(bn(name="bn0")(x))
    # (features, max-pool after the conv) of conv1..conv5.
    plan = ((w0, True), (w1, False), (w1, True), (w2, False), (w2, True))
    for i, (features, pooled) in enumerate(plan, start=1):
      x = BinaryConv(features, (3, 3), padding=1, dtype=self.dtype,
                     kernel_init=vgg_conv_init, name=f"conv{i}")(x, train=train)
      if pooled:
        x = pool(x)
      x = bn(name=f"bn{i}")(x)
      # The last block uses PReLU, the others hardtanh (the release's comment:
      # "last block just use normal activation").
      x = PReLU(name="nonlinear5")(x) if i == len(plan) else hardtanh(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=nn.initializers.normal(0.01),
                 bias_init=nn.initializers.zeros, name="fc")(x)
    return x.astype(jnp.float32)


vgg_small = functools.partial(VGGSmall, widths=(128, 256, 512))
