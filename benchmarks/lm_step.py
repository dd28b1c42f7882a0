"""Times the language model's train step: quantized against its float twin, OvSW's own share.

  python -m benchmarks.lm_step [--batch=16] [--context=64] [--width=128] [--depth=2]
      [--steps=20] [--repeats=3] [--kernels=ternary,binary] [--opts=vanilla,ovsw]
      [--no_update]

Arms, in one process on the same batch, one step of each in turn (A B C A B C
...), medians and paired ratios as `benchmarks.train_step`:

* float: the float twin (`configs/lm_stdlib.py:float,vanilla`): plain matmuls;
* <kernel>-vanilla: ternary (b1.58) or binary (sign * mean|w|) linears on int8
  per-token inputs, AGS and SAD off;
* <kernel>-ovsw: the same with AGS and SAD (as `configs/lm_stdlib.py` trains);
  `--opts=vanilla,ags,sad,ovsw` adds <kernel>-ags and <kernel>-sad (one transform
  each), so the whole-step cost of each transform is measured too.

Goals (docs/performance.md): a quantized step within 1.10x of the float twin's;
OvSW's share of its step (ovsw vs vanilla of the same kernels) under 2%.
Per kernel, the optimizer update alone is timed too (vanilla, AGS, SAD, OvSW):
what the transforms themselves cost. The last line is JSON: every arm's ms/step
and tokens/s, and the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.train_step import paired_ratio, time_interleaved
from configs import lm_stdlib
from ovsw_jax.trainer import train
from ovsw_jax.trainer.tasks import language_model


def build(arm: str, args):
  """(compiled step, state, batch, compile s) of `arm` ('float' or '<kernel>-<vanilla|ovsw>')."""
  kernel, _, opt = arm.partition("-")
  config = lm_stdlib.get_config(f"{kernel},{opt or 'vanilla'}")
  mk = config.model_kwargs
  mk.width, mk.depth, mk.context = args.width, args.depth, args.context
  task = language_model.LanguageModel(config)
  run = train.setup(config, task)
  step = jax.jit(functools.partial(train.train_step, task=task, model=run.model, tx=run.tx,
                                   learning_rate_fn=run.learning_rate_fn, axis_name=None,
                                   levels=run.levels), donate_argnums=(0,))
  batch = next(task.train_batches(global_batch_size=args.batch, start_step=0, seed=0,
                                  process_index=0, process_count=1))
  start = time.perf_counter()
  compiled = step.lower(run.initial_state, batch).compile()
  return compiled, run.initial_state, batch, time.perf_counter() - start


def update_times(args, kernel: str, rounds: int = 60) -> dict[str, float]:
  """The optimizer update alone (gradients in, parameters and state out, jitted), in ms
  median, for the vanilla, AGS, SAD and OvSW optimizers of `kernel`'s model, alternated.

  What AGS and SAD themselves cost, apart from any change they make to how XLA
  compiles the rest of the step.
  """
  fns = {}
  for opt in ("vanilla", "ags", "sad", "ovsw"):
    config = lm_stdlib.get_config(f"{kernel},{opt}")
    mk = config.model_kwargs
    mk.width, mk.depth, mk.context = args.width, args.depth, args.context
    run = train.setup(config, language_model.LanguageModel(config))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(1e-3 * rng.normal(size=p.shape), p.dtype),
                         run.initial_state.params)

    def update(params, opt_state, grads, tx=run.tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    fn = jax.jit(update)
    fns[opt] = (fn, fn(run.initial_state.params, run.initial_state.opt_state, grads), grads)
  times = {opt: [] for opt in fns}
  for _ in range(rounds):
    for opt, (fn, state, grads) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*state, grads))
      times[opt].append(time.perf_counter() - start)
  return {opt: 1e3 * statistics.median(t) for opt, t in times.items()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--kernels", default="ternary,binary")
  parser.add_argument("--opts", default="vanilla,ovsw",
                      help="optimizer arms per kernel: vanilla and ovsw, and ags, sad")
  parser.add_argument("--no_update", action="store_true",
                      help="skip the optimizer-update-alone timings")
  args = parser.parse_args(argv)
  opts = args.opts.split(",")
  if "vanilla" not in opts or "ovsw" not in opts or not set(opts) <= {
      "vanilla", "ags", "sad", "ovsw"}:
    parser.error(f"--opts={args.opts}: give vanilla, ovsw and optionally ags, sad")
  arms = ["float"] + [f"{k}-{o}" for k in args.kernels.split(",") for o in opts]
  built = {arm: build(arm, args) for arm in arms}
  times = time_interleaved(built, arms, args.steps, args.repeats)
  tokens = args.batch * args.context
  out = {"batch": args.batch, "context": args.context, "width": args.width,
         "depth": args.depth, "devices": jax.device_count(), "backend": jax.default_backend()}
  print(f"LM train step, batch {args.batch} x {args.context} tokens, width {args.width}, "
        f"depth {args.depth}, {jax.default_backend()}:")
  for arm in arms:
    ms = 1e3 * statistics.median(times[arm])
    out[f"{arm}_ms"] = round(ms, 3)
    out[f"{arm}_tokens_s"] = round(tokens / ms * 1e3, 1)
    print(f"  {arm:16s} {ms:8.2f} ms/step  {tokens / ms * 1e3:10.0f} tokens/s  "
          f"(compiled in {built[arm][3]:.1f} s)")
  for kernel in args.kernels.split(","):
    r, lo, hi = paired_ratio(times, f"{kernel}-vanilla", "float")
    out[f"{kernel}_vs_float"] = round(r, 4)
    print(f"  {kernel} vanilla / float: {r:.3f}x (quartiles {lo:.3f}-{hi:.3f}; goal <= 1.10)")
    r, lo, hi = paired_ratio(times, f"{kernel}-ovsw", f"{kernel}-vanilla")
    out[f"{kernel}_ovsw_share"] = round(1 - 1 / r, 4)
    print(f"  {kernel} OvSW's share of its step: {100 * (1 - 1 / r):.2f}% "
          f"(ovsw / vanilla {r:.3f}x, quartiles {lo:.3f}-{hi:.3f}; goal < 2%)")
    for opt in ("ags", "sad"):
      if opt in opts:
        r, lo, hi = paired_ratio(times, f"{kernel}-{opt}", f"{kernel}-vanilla")
        out[f"{kernel}_{opt}_share"] = round(1 - 1 / r, 4)
        print(f"  {kernel} {opt.upper()} alone, share of its step: {100 * (1 - 1 / r):.2f}% "
              f"({opt} / vanilla {r:.3f}x, quartiles {lo:.3f}-{hi:.3f})")
    if args.no_update:
      continue
    upd = update_times(args, kernel)
    out.update({f"{kernel}_update_{k}_ms": round(v, 3) for k, v in upd.items()})
    added = upd["ovsw"] - upd["vanilla"]
    print(f"  {kernel} optimizer update alone: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in upd.items())
          + f"; OvSW adds {added:.2f} ms = "
          f"{100 * added / out[f'{kernel}-ovsw_ms']:.2f}% of its step")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
