"""Times the train step: OvSW vs vanilla vs the same network with float convolutions.

  python -m benchmarks.train_step [--model=resnet20|resnet18] [--batch=N] [--steps=20]
      [--repeats=3] [--arms=vanilla,ovsw,float[,vanilla-bf16,...]] [--bf16] [--kernels]

Arms, all in one process on the same inputs, one step of each in turn (A B C
A B C ...: drift of a shared machine hits every arm alike), reported as
medians, ratios as the median of the per-round ratios with quartiles,
compile time apart:

* vanilla: the binary network, AGS and SAD off (the flip metrics are in every arm);
* ovsw: the binary network with AGS and SAD, as trained here;
* float: the same network with every binary convolution replaced by a plain
  float convolution of the latent kernel (no normalisation, binarisers or
  channel scale), vanilla optimizer. XLA's own convolutions and BatchNorm are
  all that is left: the floor the binary step can approach on this backend.

With vanilla and ovsw both run, the last line times the optimizer update alone
(gradients in, parameters and optimizer state out) for both: OvSW's own cost,
which the whole-step difference (two large noisy numbers) cannot resolve.

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
import optax

from configs import common
from ovsw_jax import layers, models
from ovsw_jax.trainer import input_pipeline, train
from ovsw_jax.trainer.tasks import image_classification

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


def image_task(num_classes: int, image_shape) -> image_classification.ImageClassification:
  """The trainer's image task on random batches of `image_shape` (no data set read)."""
  info = input_pipeline.DatasetInfo("random", num_classes=num_classes,
                                    image_shape=tuple(image_shape), num_train=0, num_eval=0)
  return image_classification.ImageClassification(common.base_config(), info)


def arm_parts(model_name: str, arm: str, bf16: bool = False):
  """(learning-rate schedule, model, optimizer, image shape) of an arm: the
  OvSW config for `ovsw`, the vanilla one for the others."""
  config = common.apply_arg(common.base_config(), "ovsw" if arm == "ovsw" else "vanilla")
  config.half_precision = bf16
  shape = SHAPES[model_name]
  lr = train.create_learning_rate_fn(config, 100)
  model = models.get_model(model_name, num_classes=shape["classes"],
                           dtype=jnp.bfloat16 if bf16 else jnp.float32)
  return lr, model, train.create_optimizer(config, lr), (shape["size"], shape["size"], 3)


def build(arm: str, args):
  """A jitted step, its initial state and a batch; compiled. Returns (step, state, batch, s).

  `arm` is vanilla, ovsw or float, with `-bf16` appended for bfloat16 compute
  (or every arm in bfloat16 with `--bf16`).
  """
  arm, _, suffix = arm.partition("-")
  shape = SHAPES[args.model]
  lr, model, tx, image_shape = arm_parts(args.model, arm, args.bf16 or suffix == "bf16")
  context = float_convolutions() if arm == "float" else contextlib.nullcontext()
  with context:
    task = image_task(shape["classes"], image_shape)
    state = train.create_train_state(jax.random.key(0), model, tx, task.init_inputs())
    step = jax.jit(functools.partial(train.train_step, task=task, model=model, tx=tx,
                                     learning_rate_fn=lr, axis_name=None), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(args.batch,) + image_shape), jnp.float32),
             "label": jnp.asarray(rng.integers(0, shape["classes"], args.batch), jnp.int32)}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  return compiled, state, batch, compile_s


def xla_cost(compiled) -> tuple[float, float]:
  """(GFLOP, GB accessed) of a compiled step by XLA's cost analysis: no timing
  noise in it, so small differences between arms show here first."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops", 0.0) / 1e9, cost.get("bytes accessed", 0.0) / 1e9


def time_step(compiled, state, batch):
  """One step, timed to its result. Returns (state, seconds)."""
  start = time.perf_counter()
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  return state, time.perf_counter() - start


def time_interleaved(built, arms, steps: int, repeats: int):
  """Times every arm step by step in turn (A B C A B C ...), so that drift of a
  shared machine's speed hits every arm alike. Returns {arm: [seconds]}."""
  states = {arm: built[arm][1] for arm in arms}
  for arm in arms:  # warm-up
    states[arm], _ = time_step(built[arm][0], states[arm], built[arm][2])
  times = {arm: [] for arm in arms}
  for _ in range(steps * repeats):
    for arm in arms:
      states[arm], t = time_step(built[arm][0], states[arm], built[arm][2])
      times[arm].append(t)
  return times


def paired_ratio(times, a: str, b: str) -> tuple[float, float, float]:
  """Median and quartiles of a/b over the rounds (each round ran a and b back to back)."""
  ratios = sorted(x / y for x, y in zip(times[a], times[b]))
  q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
  return statistics.median(ratios), q[0], q[-1]


def optimizer_line(args, step_s: float) -> str:
  """OvSW's own cost measured directly: the optimizer update alone, vanilla vs OvSW.

  The whole-step difference of two arms is a small difference of two large
  noisy numbers on a shared machine; the update alone (gradients in, new
  parameters and optimizer state out, jitted, alternated) is what AGS and SAD
  add to the step, unless they change how XLA fuses the rest.
  """
  fns, states = {}, {}
  for arm in ("vanilla", "ovsw"):
    _, model, tx, image_shape = arm_parts(args.model, arm)
    state = train.create_train_state(jax.random.key(0), model, tx,
                                     image_task(10, image_shape).init_inputs())
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda p: jnp.asarray(1e-3 * rng.normal(size=p.shape), p.dtype),
                         state.params)

    def update(params, opt_state, grads, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    fns[arm] = (jax.jit(update, donate_argnums=(0, 1)), grads)
    states[arm] = fns[arm][0](state.params, state.opt_state, grads)
  times = {"vanilla": [], "ovsw": []}
  for _ in range(max(50, args.steps)):
    for arm, (fn, grads) in fns.items():
      start = time.perf_counter()
      states[arm] = fn(*states[arm], grads)
      jax.block_until_ready(states[arm])
      times[arm].append(time.perf_counter() - start)
  van, ovsw = (statistics.median(times[a]) for a in ("vanilla", "ovsw"))
  return (f"Optimizer update alone: vanilla {1e3 * van:.2f} ms, OvSW {1e3 * ovsw:.2f} ms; "
          f"OvSW adds {1e3 * (ovsw - van):.2f} ms = {100 * (ovsw - van) / step_s:.2f}% "
          "of the OvSW step")


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
  parser.add_argument("--steps", type=int, default=10,
                      help="timed rounds (one step of each arm in turn) per repeat")
  parser.add_argument("--repeats", type=int, default=3, help="rounds = steps x repeats")
  parser.add_argument("--arms", default="vanilla,ovsw,float",
                      help="vanilla, ovsw, float; a -bf16 suffix computes that arm in "
                           "bfloat16 (e.g. --arms=vanilla,ovsw,vanilla-bf16,ovsw-bf16)")
  parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
  parser.add_argument("--kernels", action="store_true", help="per-convolution timings too")
  args = parser.parse_args()
  args.batch = args.batch or SHAPES[args.model]["batch"]
  arms = args.arms.split(",")
  built = {arm: build(arm, args) for arm in arms}
  times = time_interleaved(built, arms, args.steps, args.repeats)
  dtype = "bfloat16" if args.bf16 else "float32"
  print(f"{args.model}, batch {args.batch}, {dtype}, {jax.devices()[0].platform}, "
        f"{args.repeats * args.steps} rounds of one step per arm:")
  print("| arm | ms/step (median) | images/s | compile s | GFLOP | GB accessed |\n"
        "|---|---|---|---|---|---|")
  med = {arm: statistics.median(times[arm]) for arm in arms}
  for arm in arms:
    flops, gbytes = xla_cost(built[arm][0])
    print(f"| {arm} | {1e3 * med[arm]:.1f} | {args.batch / med[arm]:.1f} | "
          f"{built[arm][3]:.1f} | {flops:.2f} | {gbytes:.3f} |")
  print("Ratios: median over rounds [quartiles]")
  for sfx in ("", "-bf16"):
    if f"ovsw{sfx}" in med and f"vanilla{sfx}" in med:
      r, lo, hi = paired_ratio(times, f"ovsw{sfx}", f"vanilla{sfx}")
      print(f"OvSW{sfx} / vanilla{sfx}: {r:.3f} [{lo:.3f}, {hi:.3f}] "
            f"(OvSW's share of the step {100 * (1 - 1 / r):.1f}%)")
    for arm in ("vanilla", "ovsw"):
      if f"float{sfx}" in med and f"{arm}{sfx}" in med:
        r, lo, hi = paired_ratio(times, f"{arm}{sfx}", f"float{sfx}")
        print(f"{arm}{sfx} / float{sfx} convolutions: {r:.3f} [{lo:.3f}, {hi:.3f}]")
  for arm in ("vanilla", "ovsw", "float"):
    if arm in med and f"{arm}-bf16" in med:
      r, lo, hi = paired_ratio(times, arm, f"{arm}-bf16")
      print(f"{arm}: bfloat16 speed-up (float32 time / bfloat16 time) {r:.3f} [{lo:.3f}, {hi:.3f}]")
  if "ovsw" in med and "vanilla" in med:
    print(optimizer_line(args, med["ovsw"]))
  if args.kernels:
    kernel_table(args)


if __name__ == "__main__":
  main()
