"""A small decoder-only transformer with BitNet-style quantized linears (language models).

Pre-norm blocks (`nn.RMSNorm`), causal multi-head attention and a 2-layer
MLP; every linear of the attention (q, k, v, o) and of the MLP (up, down) is
an `ovsw_jax.layers.QuantDense` without bias, as BitNet (Wang et al., 2023;
Ma et al., 2024): a quantized kernel (`kernel_quantizer`: 'scaled_sign' for
1-bit, 'ternary' for b1.58) on int8 per-token activations
(`input_quantizer`). The token and position embeddings and the output head
stay in full precision, as in BitNet. With `kernel_quantizer=None` and
`input_quantizer=None` it is the float twin: the same modules, the same
parameter shapes and initial values, plain matmuls (its kernels are named
`kernel`, so OvSW and the silent-weight metrics leave them alone).

Parameter paths name what each kernel is (`block_0/attn/q/latent_kernel`,
`block_1/mlp/down/latent_kernel`), so per-layer figures group by kind.

Called as the image models are: `model.apply(variables, tokens, train=...)`
with int tokens `(batch, length)`, `length <= context`; returns float32
logits `(batch, length, num_classes)`. `bn_axis_name` is accepted for the
trainer's sake and unused (there is no BatchNorm).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax.layers import QuantDense


class Attention(nn.Module):
  """Causal multi-head self-attention; `linear(features, name=...)` makes q, k, v and o."""
  num_heads: int
  linear: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    head = width // self.num_heads
    q, k, v = (self.linear(width, name=n)(x).reshape(batch, length, self.num_heads, head)
               for n in "qkv")
    mask = nn.make_causal_mask(jnp.ones((batch, length), bool))
    y = nn.dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
    return self.linear(width, name="o")(y.reshape(batch, length, width))


class MLP(nn.Module):
  """up (width -> mlp_ratio * width), squared ReLU (BitNet b1.58's), down."""
  mlp_ratio: int
  linear: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = jnp.square(nn.relu(self.linear(self.mlp_ratio * width, name="up")(x)))
    return self.linear(width, name="down")(h)


class Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); every linear a bias-free `QuantDense`."""
  num_heads: int
  mlp_ratio: int
  kernel_quantizer: Any
  input_quantizer: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    linear = functools.partial(QuantDense, use_bias=False, dtype=self.dtype,
                               kernel_quantizer=self.kernel_quantizer,
                               input_quantizer=self.input_quantizer)
    attn = Attention(self.num_heads, linear, dtype=self.dtype, name="attn")
    x = x + attn(nn.RMSNorm(name="norm_attn")(x))
    return x + MLP(self.mlp_ratio, linear, name="mlp")(nn.RMSNorm(name="norm_mlp")(x))


class TransformerLM(nn.Module):
  """Token logits of a causal language model (module docstring)."""
  num_classes: int              # the vocabulary
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  context: int = 128
  kernel_quantizer: Any = "ternary"
  input_quantizer: Any = "int8"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # unused: no BatchNorm

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no BatchNorm: training and evaluation compute the same
    if self.width % self.num_heads:
      raise ValueError(f"TransformerLM width={self.width} is not a multiple of "
                       f"num_heads={self.num_heads}: choose values that divide.")
    length = tokens.shape[-1]
    if length > self.context:
      raise ValueError(f"TransformerLM got {length} tokens, more than its context "
                       f"{self.context}: raise model_kwargs.context or feed shorter windows.")
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.num_classes, self.width, embedding_init=init, name="embed")(tokens)
    pos = self.param("position", init, (self.context, self.width))
    x = (x + pos[:length]).astype(self.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.kernel_quantizer, self.input_quantizer,
                dtype=self.dtype, name=f"block_{i}")(x)
    x = nn.RMSNorm(name="norm_out")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def transformer_lm(num_classes: int, **kwargs: Any) -> TransformerLM:
  return TransformerLM(num_classes=num_classes, **kwargs)
