"""Times one train step, vanilla BNN vs AGS+SAD, and prints the ratio.

  python -m benchmarks.train_step --model=resnet20 --batch=64 --steps=20

What OvSW costs on top of the same step (AGS's per-channel norms, SAD's
tracker and packed signs, the flip metrics are in both arms). Both arms run in
one process on the same inputs, so the ratio is the figure to read.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ovsw_jax import models, train


def time_arm(arm: str, args) -> float:
  config = common.apply_arg(common.base_config(), arm)
  lr = train.create_learning_rate_fn(config, 100)
  model = models.get_model(args.model, num_classes=10)
  tx = train.create_optimizer(config, lr)
  shape = (args.size, args.size, 3)
  state = train.create_train_state(jax.random.key(0), model, tx, shape)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   learning_rate_fn=lr, num_classes=10, axis_name=None),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  state, m = step(state, batch)  # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  vanilla = time_arm("vanilla", args)
  ovsw = time_arm("ovsw", args)
  print(f"{args.model} batch {args.batch} on {jax.devices()[0].platform}: "
        f"vanilla {vanilla * 1e3:.1f} ms/step, OvSW {ovsw * 1e3:.1f} ms/step, "
        f"ratio OvSW/vanilla {ovsw / vanilla:.3f}")


if __name__ == "__main__":
  main()
