"""Quantizers: pure functions with straight-through gradients (`jax.custom_vjp`).

Each function keeps its input's dtype and works under `jit`, `vmap` and `grad`.
The forward of every binarizer is `jnp.sign`, so `sign(0) = 0`, as in the
authors' PyTorch release (`torch.sign`). Beyond one bit: ternary (BitNet b1.58,
TWN) and k-bit uniform kernels, int8 per-token activations. The `Quantizer`
objects wrap them for the layers (`QuantDense`, `QuantConv`) and tell OvSW's
transforms and metrics each weight's integer level (docs/method.md §10).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp

from ovsw_jax import bitpack


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ste_sign(x: jax.Array, clip_value: float | None = None) -> jax.Array:
  """Sign with a straight-through gradient.

  Forward: `sign(x)`. Backward: `g` (identity) when `clip_value` is None, else
  `g * (|x| <= clip_value)` (the gradient is cancelled outside the clip range,
  as in BinaryConnect). OvSW binarizes latent weights with the identity form
  (docs/method.md §5, step 3).

  Args:
    x: input array.
    clip_value: optional clip range of the backward pass.

  Returns:
    `sign(x)` in `x.dtype`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([-2.0, 0.0, 0.5])
    >>> ste_sign(x).tolist(), jax.grad(lambda x: ste_sign(x).sum())(x).tolist()
    ([-1.0, 0.0, 1.0], [1.0, 1.0, 1.0])
  """
  return jnp.sign(x)


def _ste_sign_fwd(x, clip_value):
  return jnp.sign(x), x


def _ste_sign_bwd(clip_value, x, g):
  if clip_value is None:
    return (g,)
  return (jnp.where(jnp.abs(x) <= clip_value, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
  """Sign with the ApproxSign gradient of Bi-Real Net (Liu et al., 2018).

  Forward: `sign(x)`. Backward: `g * max(0, 2 - 2|x|)`, the derivative of the
  piecewise-quadratic approximation of sign. Used for activations (docs/method.md §5, step 2).

  >>> import jax, jax.numpy as jnp
  >>> jax.grad(lambda x: approx_sign(x).sum())(jnp.array([-2.0, -0.25, 0.0, 0.75])).tolist()
  [0.0, 1.5, 2.0, 0.5]
  """
  return jnp.sign(x)


def _approx_sign_fwd(x):
  return jnp.sign(x), x


def _approx_sign_bwd(x, g):
  two = jnp.asarray(2, dtype=x.dtype)
  return (g * jnp.maximum(jnp.zeros_like(x), two - two * jnp.abs(x)).astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def channel_scale(w: jax.Array, axis: int = -1, eps: float = 1e-5) -> jax.Array:
  """Per-output-channel scale `alpha` of a binary kernel (docs/method.md §5, step 4).

  The kernel is standardised per channel, `(w - mean_o) / sqrt(var_o + eps)`
  with the unbiased variance (as `torch.var`), and `alpha_o` is the mean
  absolute value of the standardised channel. No gradient flows through it.

  Args:
    w: latent kernel, rank >= 2.
    axis: the output-channel axis (last for Flax's HWIO kernels).
    eps: added to the variance.

  Returns:
    A vector of length `w.shape[axis]`, in `w.dtype`.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 5.0], [-1.0, 5.0]])  # channel 0: +-1; channel 1: constant
    >>> channel_scale(w).tolist()  # |+-1| / sqrt(2 + 1e-5); 0 / sqrt(0 + 1e-5)
    [0.7071..., 0.0]
  """
  if w.ndim < 2:
    raise ValueError(
        f"channel_scale needs a kernel of rank >= 2, got shape {w.shape}.")
  axis = axis % w.ndim
  others = tuple(a for a in range(w.ndim) if a != axis)
  w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
  mean = jnp.mean(w32, axis=others, keepdims=True)
  var = jnp.var(w32, axis=others, keepdims=True, ddof=1)
  standardised = (w32 - mean) / jnp.sqrt(var + eps)
  return jnp.mean(jnp.abs(standardised), axis=others).astype(w.dtype)


# --- more than two levels: ternary and k-bit kernels, int8 activations -----------------------
#
# A multi-level quantizer maps a latent weight `w` to an integer level `l` and
# a value `l * s` with a scale `s` (per tensor, or per output channel along
# `axis`). Its gradient is straight through (identity), as BitNet's
# `w + stop_gradient(q(w) - w)`: the scale is data, not a function to
# differentiate. docs/method.md §10 gives the rules and SAD's targets.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def straight_through(fn, x: jax.Array) -> jax.Array:
  """`fn(x)` forward, the identity backward (`fn` must keep `x`'s shape and dtype).

  Unlike `x + stop_gradient(fn(x) - x)`, the forward value is exactly `fn(x)`
  (no rounding of the sum).

  >>> import jax, jax.numpy as jnp
  >>> jax.grad(lambda x: straight_through(jnp.round, x).sum())(jnp.array([0.3, 1.7])).tolist()
  [1.0, 1.0]
  """
  return fn(x)


def _st_fwd(fn, x):
  return fn(x), None


def _st_bwd(fn, _, g):
  return (g,)


straight_through.defvjp(_st_fwd, _st_bwd)


def _reduce_axes(x: jax.Array, axis: int | None) -> tuple[int, ...]:
  """The axes a scale reduces over: all (per tensor) or all but `axis` (per channel)."""
  if axis is None:
    return tuple(range(x.ndim))
  if x.ndim < 2 or not -x.ndim <= axis < x.ndim:
    raise ValueError(
        f"a per-channel scale needs axis in [-{x.ndim}, {x.ndim}) of a kernel of rank >= 2, "
        f"got axis={axis} for shape {x.shape}; use axis=None for one scale per tensor.")
  return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def _stat(x: jax.Array, kind: str, axis: int | None) -> jax.Array:
  """mean |x| or max |x| (float32, keepdims), per tensor or per channel, no gradient."""
  a = jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32))
  axes = _reduce_axes(x, axis)
  if kind == "absmean":
    return jnp.mean(a, axis=axes, keepdims=True)
  if kind == "absmax":
    return jnp.max(a, axis=axes, keepdims=True)
  raise ValueError(f"scale={kind!r}: use 'absmean' or 'absmax'.")


# BitNet's floor on a scale (`clamp_(min=1e-5)`): an all-zero tensor gets levels 0.
SCALE_EPS = 1e-5


def uniform_scale(w: jax.Array, bits: int, scale: str = "absmax",
                  axis: int | None = None) -> jax.Array:
  """The step `s` of the symmetric `bits`-bit grid `{-q, ..., q} * s`, `q = 2**(bits-1) - 1`.

  absmax: `s = max|w| / q` (the largest weight on the top level, nothing clipped).
  absmean: `s = mean|w| / ((q + 1) / 2)`, the mean magnitude halfway up the
  grid; for 2 bits (`q = 1`) that is BitNet b1.58's `s = mean|w|`. Float32,
  keepdims, at least `SCALE_EPS`.

  >>> import jax.numpy as jnp
  >>> uniform_scale(jnp.array([0.5, -1.0, 0.25, 0.25]), 2, 'absmean').ravel().tolist()
  [0.5]
  """
  q = 2 ** (bits - 1) - 1
  stat = _stat(w, scale, axis)
  s = stat / q if scale == "absmax" else stat / ((q + 1) / 2)
  return jnp.maximum(s, SCALE_EPS)


def uniform_levels(w: jax.Array, bits: int, scale: str = "absmax",
                   axis: int | None = None) -> jax.Array:
  """`clip(round(w / s), -q, q)` as int8 (`uniform_scale`); round half to even.

  >>> import jax.numpy as jnp
  >>> uniform_levels(jnp.array([0.5, -1.0, 0.25, 0.25]), 2, 'absmean').tolist()  # s = 0.5
  [1, -1, 0, 0]
  """
  q = 2 ** (bits - 1) - 1
  s = uniform_scale(w, bits, scale, axis)
  w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
  return jnp.clip(jnp.round(w32 / s), -q, q).astype(jnp.int8)


def twn_threshold(w: jax.Array, axis: int | None = None) -> jax.Array:
  """TWN's threshold `0.7 * mean|w|` (Li et al., 2016), float32, keepdims."""
  return 0.7 * _stat(w, "absmean", axis)


def twn_levels(w: jax.Array, axis: int | None = None) -> jax.Array:
  """`sign(w) * (|w| > 0.7 mean|w|)` as int8: TWN's ternary levels."""
  w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
  return (jnp.sign(w32) * (jnp.abs(w32) > twn_threshold(w, axis))).astype(jnp.int8)


def twn_scale(w: jax.Array, axis: int | None = None) -> jax.Array:
  """TWN's scale: the mean |w| of the weights above the threshold (float32, keepdims)."""
  w32 = jnp.abs(jax.lax.stop_gradient(w).astype(jnp.float32))
  above = (w32 > twn_threshold(w, axis)).astype(jnp.float32)
  axes = _reduce_axes(w, axis)
  total = jnp.sum(w32 * above, axis=axes, keepdims=True)
  count = jnp.sum(above, axis=axes, keepdims=True)
  return jnp.maximum(total / jnp.maximum(count, 1.0), SCALE_EPS)


def int8_per_token(x: jax.Array) -> jax.Array:
  """BitNet's activation quantizer: int8 absmax per token (the last axis), straight through.

  `s = max(max|x|, 1e-5) / 127` per row of the last axis, value
  `clip(round(x / s), -128, 127) * s`; the gradient is the identity.

  >>> import jax.numpy as jnp
  >>> int8_per_token(jnp.array([[127.0, -63.5, 0.4]])).tolist()  # s = 1; -63.5 to even
  [[127.0, -64.0, 0.0]]
  """
  return straight_through(
      lambda v: (int8_levels(v).astype(jnp.float32) * int8_scale(v)).astype(v.dtype), x)


def int8_scale(x: jax.Array) -> jax.Array:
  """`max(max|x|, 1e-5) / 127` per row of the last axis (float32, keepdims, no gradient)."""
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  return jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), SCALE_EPS) / 127.0


def int8_levels(x: jax.Array) -> jax.Array:
  """`clip(round(x / s), -128, 127)` as int8, `s = int8_scale(x)`."""
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  return jnp.clip(jnp.round(x32 / int8_scale(x)), -128, 127).astype(jnp.int8)


# --- quantizers as objects: what a layer computes and what OvSW tracks ----------------------


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A quantizer a layer applies and OvSW's transforms and metrics read levels from.

  Subclasses define `__call__` (the quantized value, straight-through
  gradient), `levels` (the integer level of every entry, int8), `cells`
  (the bounds of each entry's level: where it would change) and two class
  attributes: `planes`, the bit-planes a packed level takes (`pack`), and
  `bits`, the bits a deployed weight takes (`reported_bits` for the cost
  summary: 1.58 for ternary). Frozen dataclasses: hashable, so they are static
  attributes of linen and nnx modules and safe to close over under `jit`.
  """
  planes: ClassVar[int] = 2
  bits: ClassVar[int] = 1

  @property
  def reported_bits(self) -> float:
    return float(self.bits)

  def __call__(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def levels(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def cells(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(low, high)`, float32: each entry's level holds on the cell between them.

    An end level's open side is infinite.
    """
    raise NotImplementedError

  def pack(self, x: jax.Array) -> jax.Array:
    """The levels of `x`, bit-packed: uint8 of shape `(planes, ceil(x.size / 8))`."""
    return bitpack.pack_levels(self.levels(x), self.planes)

  def boundary(self, x: jax.Array) -> jax.Array:
    """The level-change threshold nearest to each entry (float32, `x`'s shape).

    SAD's `toward="boundary"` pulls a silent weight there (docs/method.md §10).
    Ties go to the upper threshold.
    """
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    low, high = self.cells(x)
    return jnp.where(high - x32 <= x32 - low, high, low)


@dataclasses.dataclass(frozen=True)
class Sign(Quantizer):
  """`ste_sign` (values -1, 0, +1; levels = the signs): the release's kernel binarizer."""
  clip_value: float | None = None

  def __call__(self, x):
    return ste_sign(x, self.clip_value)

  def levels(self, x):
    return jnp.sign(x).astype(jnp.int8)

  def pack(self, x):
    return bitpack.pack_signs(x)  # the same bits as pack_levels(levels): the oracle's path

  def cells(self, x):
    # sign(0) = 0 is a level of its own: every level changes at 0.
    zeros = jnp.zeros(x.shape, jnp.float32)
    return zeros, zeros

  def boundary(self, x):
    return jnp.zeros(x.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class ApproxSign(Sign):
  """`approx_sign` (Bi-Real Net's gradient): the release's activation binarizer."""
  clip_value: None = None

  def __call__(self, x):
    return approx_sign(x)


@dataclasses.dataclass(frozen=True)
class ScaledSign(Sign):
  """`sign(w) * mean|w|`, straight through: BitNet's 1-bit weights (Wang et al., 2023).

  The levels are the signs (a flip is a sign change, as for `Sign`); the
  scale keeps a layer's output at its float twin's magnitude, which a
  residual network without BatchNorm after each linear needs. `axis` as for
  `Ternary` (None: one scale per tensor). Unlike `Sign`, the gradient is
  the plain identity (BitNet's STE), never clipped.
  """
  axis: int | None = None
  clip_value: None = None

  def scale(self, x: jax.Array) -> jax.Array:
    return uniform_scale(x, 2, "absmean", self.axis)  # mean|w| (ternary's absmean scale)

  def __call__(self, x):
    return straight_through(
        lambda v: (jnp.sign(v).astype(jnp.float32) * self.scale(v)).astype(v.dtype), x)


def _grid_cells(levels: jax.Array, lowest: int, highest: int, s: jax.Array):
  """Cells of the grid `{lowest..highest} * s` with rounding at the midpoints, ends open."""
  lv = levels.astype(jnp.float32)
  low = jnp.where(levels > lowest, (lv - 0.5) * s, -jnp.inf)
  high = jnp.where(levels < highest, (lv + 0.5) * s, jnp.inf)
  return low, high


@dataclasses.dataclass(frozen=True)
class _Scaled(Quantizer):
  """A quantizer whose value is `levels(x) * scale(x)`, straight through."""

  def scale(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def __call__(self, x):
    return straight_through(
        lambda v: (self.levels(v).astype(jnp.float32) * self.scale(v)).astype(v.dtype), x)


@dataclasses.dataclass(frozen=True)
class Ternary(_Scaled):
  """Ternary weights `{-1, 0, +1} * s`, straight through (docs/method.md §10).

  rule='absmean' (BitNet b1.58, Ma et al., 2024): `s = mean|w|`,
  `level = clip(round(w / s), -1, 1)`. rule='twn' (Li et al., 2016):
  `level = sign(w) * (|w| > 0.7 mean|w|)`, `s` the mean |w| of the weights above
  the threshold. `axis=None`: one scale per tensor; an int: one per slice
  along that axis (-1, the output channel of Flax kernels).
  Stored in 2 bits (`reported_bits` log2(3) = 1.58).
  """
  rule: str = "absmean"
  axis: int | None = None
  bits: ClassVar[int] = 2

  def __post_init__(self):
    if self.rule not in ("absmean", "twn"):
      raise ValueError(f"Ternary(rule={self.rule!r}): use 'absmean' (BitNet b1.58) or 'twn'.")

  @property
  def reported_bits(self) -> float:
    return math.log2(3)

  def scale(self, x):
    if self.rule == "twn":
      return twn_scale(x, self.axis)
    return uniform_scale(x, 2, "absmean", self.axis)

  def levels(self, x):
    if self.rule == "twn":
      return twn_levels(x, self.axis)
    return uniform_levels(x, 2, "absmean", self.axis)

  def pack(self, x):
    return bitpack.pack_signs(self.levels(x))  # levels -1, 0, +1: the sign planes

  def cells(self, x):
    lv = self.levels(x)
    if self.rule == "absmean":
      return _grid_cells(lv, -1, 1, self.scale(x))
    t = twn_threshold(x, self.axis)  # level 0 on [-t, t], +-1 beyond
    low = jnp.where(lv == 1, t, jnp.where(lv == 0, -t, -jnp.inf))
    high = jnp.where(lv == -1, -t, jnp.where(lv == 0, t, jnp.inf))
    return low, high


@dataclasses.dataclass(frozen=True)
class _KBit(_Scaled):
  """A k-bit grid (`Uniform`, `Midrise`): `bits` from 2 to 8, a scale rule, an axis;
  levels packed in k bit-planes (two's complement)."""
  bits: int = 4
  scale_rule: str = "absmax"
  axis: int | None = None

  def __post_init__(self):
    name = type(self).__name__
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise ValueError(f"{name}(bits={self.bits!r}): give an int from 2 to 8.")
    if self.scale_rule not in ("absmax", "absmean"):
      raise ValueError(f"{name}(scale_rule={self.scale_rule!r}): use 'absmax' or 'absmean'.")

  @property
  def planes(self) -> int:  # type: ignore[override]
    return self.bits


@dataclasses.dataclass(frozen=True)
class Uniform(_KBit):
  """k-bit symmetric uniform weights `{-q..q} * s`, `q = 2**(k-1) - 1`, straight through.

  `scale`: 'absmax' (`s = max|w| / q`) or 'absmean' (`uniform_scale`);
  `axis` as for `Ternary`. Levels are packed in k bit-planes (two's complement).
  """

  @property
  def q(self) -> int:
    return 2 ** (self.bits - 1) - 1

  def scale(self, x):
    return uniform_scale(x, self.bits, self.scale_rule, self.axis)

  def levels(self, x):
    return uniform_levels(x, self.bits, self.scale_rule, self.axis)

  def cells(self, x):
    return _grid_cells(self.levels(x), -self.q, self.q, self.scale(x))


@dataclasses.dataclass(frozen=True)
class Midrise(_KBit):
  """k-bit weights on the 2**k-level grid without zero, `(l + 1/2) * s`, straight through.

  `l = clip(floor(w / s), -2**(k-1), 2**(k-1) - 1)`: every level is used (a
  symmetric grid with a zero, `Uniform`, leaves one code unused, so its 2 bits
  are ternary). 2 bits give `{-1.5, -0.5, 0.5, 1.5} * s` with the level changes
  at 0 and +-s (DoReFa's and LQ-Nets' 2-bit weights). `scale_rule`: 'absmax'
  (`s = max|w| / 2**(k-1)`, the largest weight on the top cell's edge) or
  'absmean' (`s = mean|w| / 2**(k-2)`, the mean magnitude halfway up the grid:
  `s = mean|w|` for 2 bits). `axis` as for `Ternary`.
  """
  bits: int = 2

  @property
  def half(self) -> int:
    """2**(k-1): the levels are -half .. half - 1."""
    return 2 ** (self.bits - 1)

  def scale(self, x):
    stat = _stat(x, self.scale_rule, self.axis)
    s = stat / self.half if self.scale_rule == "absmax" else stat / (self.half / 2)
    return jnp.maximum(s, SCALE_EPS)

  def levels(self, x):
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    return jnp.clip(jnp.floor(x32 / self.scale(x)), -self.half, self.half - 1).astype(jnp.int8)

  def __call__(self, x):
    return straight_through(
        lambda v: ((self.levels(v).astype(jnp.float32) + 0.5) * self.scale(v)).astype(v.dtype),
        x)

  def cells(self, x):
    lv = self.levels(x)
    s = self.scale(x)
    low = jnp.where(lv > -self.half, lv.astype(jnp.float32) * s, -jnp.inf)
    high = jnp.where(lv < self.half - 1, (lv.astype(jnp.float32) + 1) * s, jnp.inf)
    return low, high


@dataclasses.dataclass(frozen=True)
class Int8PerToken(_Scaled):
  """`int8_per_token`: BitNet's activation quantizer (levels -128..127 per row)."""
  bits: ClassVar[int] = 8
  planes: ClassVar[int] = 8

  def scale(self, x):
    return int8_scale(x)

  def levels(self, x):
    return int8_levels(x)

  def cells(self, x):
    return _grid_cells(self.levels(x), -128, 127, self.scale(x))


SIGN = Sign()

_NAMES = {
    "sign": Sign(), "ste_sign": Sign(), "approx_sign": ApproxSign(),
    "scaled_sign": ScaledSign(),
    "ternary": Ternary(), "twn": Ternary(rule="twn"), "int8": Int8PerToken(),
}


def names() -> list[str]:
  """The short names `get` accepts (`uniform<k>`, `midrise<k>` for k = 2..8, `_absmean`
  optional)."""
  return sorted(_NAMES) + ["uniform<k>", "uniform<k>_absmean", "midrise<k>",
                           "midrise<k>_absmean"]


def get(spec: "str | Quantizer | None") -> "Quantizer | None":
  """A quantizer from a short name (larq's style) or itself; None stays None.

  Names: 'sign' (= 'ste_sign'), 'approx_sign', 'ternary' (BitNet b1.58),
  'twn', 'uniform<k>' (k-bit absmax, k = 2..8), 'uniform<k>_absmean',
  'midrise<k>' and 'midrise<k>_absmean' (2**k levels, no zero: `Midrise`),
  'int8' (per-token activations). Per-channel scales: the objects, e.g.
  `Ternary(axis=-1)`.

  >>> get('uniform4')
  Uniform(bits=4, scale_rule='absmax', axis=None)
  """
  if spec is None or isinstance(spec, Quantizer):
    return spec
  if isinstance(spec, str):
    if spec in _NAMES:
      return _NAMES[spec]
    m = re.fullmatch(r"(uniform|midrise)(\d+)(_absmean)?", spec)
    if m and 2 <= int(m.group(2)) <= 8:
      grid = Uniform if m.group(1) == "uniform" else Midrise
      return grid(int(m.group(2)), "absmean" if m.group(3) else "absmax")
  raise ValueError(
      f"quantizer {spec!r} is unknown: give one of {', '.join(names())} (k = 2..8), "
      "an ovsw_jax.quantizers.Quantizer, or None.")
