"""Times the train step: OvSW vs vanilla vs the same network with float convolutions.

  python -m benchmarks.train_step [--model=resnet20|resnet18] [--batch=N] [--steps=20]
      [--repeats=3] [--bf16] [--kernels]

Arms, all in one process on the same inputs, alternated (A B C A B C ...) and
reported as medians, compile time apart:

* vanilla: the binary network, AGS and SAD off (the flip metrics are in every arm);
* ovsw: the binary network with AGS and SAD, as trained here;
* float: the same network with every binary convolution replaced by a plain
  float convolution of the latent kernel (no normalisation, binarisers or
  channel scale), vanilla optimizer. XLA's own convolutions and BatchNorm are
  all that is left: the floor the binary step can approach on this backend.

Shapes: ResNet-20 CIFAR (32 x 32, 10 classes, batch 128 by default), ResNet-18
ImageNet (224 x 224, 1000 classes, batch 16 by default), the two rows of the
release comparison. `--kernels` also times one 3x3 convolution per stage
shape alone (forward, input gradient, weight gradient), naming the kernels
that set the floor; with torch installed, the same convolutions in torch next
to them (2 threads, as the release timer).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ovsw_jax import layers, models, train

SHAPES = {"resnet20": dict(size=32, classes=10, batch=128),
          "resnet18": dict(size=224, classes=1000, batch=16)}


def _float_conv(x, kernel, *, strides=1, padding=0, training=True):
  """A plain float convolution with `xnor_conv`'s signature (the floor arm)."""
  del training
  spatial = kernel.ndim - 2
  strides = (strides,) * spatial if isinstance(strides, int) else tuple(strides)
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=strides,
      padding=layers._lax_padding(padding, spatial),  # pylint: disable=protected-access
      dimension_numbers=dn)


@contextlib.contextmanager
def float_convolutions():
  original = layers.xnor_conv
  layers.xnor_conv = _float_conv
  try:
    yield
  finally:
    layers.xnor_conv = original


def build(arm: str, args):
  """A jitted step, its initial state and a batch; compiled. Returns (step, state, batch, s)."""
  config = common.apply_arg(common.base_config(), "ovsw" if arm == "ovsw" else "vanilla")
  config.half_precision = args.bf16
  shape = SHAPES[args.model]
  lr = train.create_learning_rate_fn(config, 100)
  model = models.get_model(args.model, num_classes=shape["classes"],
                           dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
  tx = train.create_optimizer(config, lr)
  image_shape = (shape["size"], shape["size"], 3)
  context = float_convolutions() if arm == "float" else contextlib.nullcontext()
  with context:
    state = train.create_train_state(jax.random.key(0), model, tx, image_shape)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                     learning_rate_fn=lr, num_classes=shape["classes"],
                                     axis_name=None), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(args.batch,) + image_shape), jnp.float32),
             "label": jnp.asarray(rng.integers(0, shape["classes"], args.batch), jnp.int32)}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  return compiled, state, batch, compile_s


def time_steps(compiled, state, batch, steps: int):
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  return state, times


def kernel_table(args) -> None:
  """One 3x3 conv per stage shape alone: forward, input gradient, weight gradient (ms)."""
  if args.model == "resnet20":
    shapes = [(args.batch, 32, 16, 1), (args.batch, 16, 32, 1), (args.batch, 8, 64, 1)]
  else:
    shapes = [(args.batch, 56, 64, 1), (args.batch, 28, 128, 1), (args.batch, 14, 256, 1),
              (args.batch, 7, 512, 1)]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(2)
  except ImportError:
    torch = None
  print("\n| activations (N, H=W, C) | XLA fwd | XLA input grad | XLA weight grad |"
        + (" torch fwd | torch input grad | torch weight grad |" if torch else ""))
  print("|---|---|---|---|" + ("---|---|---|" if torch else ""))
  for n, hw, c, stride in shapes:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, hw, hw, c)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, c, c)), jnp.float32)
    conv = functools.partial(_float_conv, strides=stride, padding=1)
    y = conv(x, w)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    row = []
    for fn, fargs in ((fwd, (x, w)), (dx, (x, w, y)), (dw, (x, w, y))):
      jax.block_until_ready(fn(*fargs))
      ts = []
      for _ in range(args.steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*fargs))
        ts.append(time.perf_counter() - t)
      row.append(1e3 * statistics.median(ts))
    cells = [f"{v:.2f}" for v in row]
    if torch is not None:
      tx_ = torch.randn(n, c, hw, hw, requires_grad=True)
      tw = torch.randn(c, c, 3, 3, requires_grad=True)
      tg = torch.randn(n, c, hw, hw)
      tt = {"fwd": [], "dx": [], "dw": []}
      for _ in range(args.steps + 2):
        t = time.perf_counter()
        out = torch.nn.functional.conv2d(tx_, tw, padding=1)
        tt["fwd"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.autograd.grad(out, tx_, tg, retain_graph=True)
        tt["dx"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.autograd.grad(out, tw, tg)
        tt["dw"].append(time.perf_counter() - t)
      cells += [f"{1e3 * statistics.median(tt[k][2:]):.2f}" for k in ("fwd", "dx", "dw")]
    print(f"| ({n}, {hw}, {c}) | " + " | ".join(cells) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(SHAPES), default="resnet20")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=3, help="alternations of the arms")
  parser.add_argument("--arms", default="vanilla,ovsw,float")
  parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
  parser.add_argument("--kernels", action="store_true", help="per-convolution timings too")
  args = parser.parse_args()
  args.batch = args.batch or SHAPES[args.model]["batch"]
  arms = args.arms.split(",")
  built = {arm: build(arm, args) for arm in arms}
  states = {arm: built[arm][1] for arm in arms}
  times = {arm: [] for arm in arms}
  for _ in range(args.repeats):
    for arm in arms:
      states[arm], ts = time_steps(built[arm][0], states[arm], built[arm][2], args.steps)
      times[arm] += ts
  dtype = "bfloat16" if args.bf16 else "float32"
  print(f"{args.model}, batch {args.batch}, {dtype}, {jax.devices()[0].platform}, "
        f"{args.repeats} x {args.steps} steps per arm:")
  print("| arm | ms/step (median) | images/s | compile s |\n|---|---|---|---|")
  med = {arm: statistics.median(times[arm]) for arm in arms}
  for arm in arms:
    print(f"| {arm} | {1e3 * med[arm]:.1f} | {args.batch / med[arm]:.1f} | "
          f"{built[arm][3]:.1f} |")
  if "ovsw" in med and "vanilla" in med:
    print(f"OvSW / vanilla: {med['ovsw'] / med['vanilla']:.3f} "
          f"(OvSW's share of the step {100 * (1 - med['vanilla'] / med['ovsw']):.1f}%)")
  if "float" in med:
    for arm in ("vanilla", "ovsw"):
      if arm in med:
        print(f"{arm} / float convolutions: {med[arm] / med['float']:.3f}")
  if args.kernels:
    kernel_table(args)


if __name__ == "__main__":
  main()
