"""Times the data-parallel train step under pmap and under jit, and prints the ratio.

  python -m benchmarks.parallelism --steps=20 --rounds=2

What `config.parallelism=jit` costs or saves against `pmap` for the trainer's
own step (OvSW on, state donated), on 4 host CPU devices:
`XLA_FLAGS=--xla_force_host_platform_device_count=4` is set here unless
XLA_FLAGS is set already (it must be before jax is imported). Two shapes,
random data: the embedded default (the digits ResNet, batch 64 of 8x8x1) and
ResNet-20 on CIFAR shapes (batch 128 of 32x32x3). A timed step is what the
train loop does per step: shard a host batch, run the step, wait for it.

The first call of each arm (trace, compile and one step) is reported apart.
Then the arms alternate, `--steps` steps each, pmap, jit, pmap, jit, ...
(`--rounds` times) in this one process, so a busy machine's drift hits both;
the figures are the median ms/step of each arm over all its timed steps.
"""

import os

if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10_resnet20, default  # noqa: E402
from ovsw_jax.trainer import input_pipeline, parallel, train  # noqa: E402
from ovsw_jax.trainer.tasks import image_classification  # noqa: E402

SHAPES = {  # name: (config module, image shape, global batch)
    "digits": (default, (8, 8, 1), 64),
    "resnet20_cifar": (cifar10_resnet20, (32, 32, 3), 128),
}


def build(shape: str):
  """The per-device train step of `shape`, its initial host state and a host batch."""
  module, image_shape, batch_size = SHAPES[shape]
  config = module.get_config()
  lr = train.create_learning_rate_fn(config, 100)
  task = image_classification.ImageClassification(config, input_pipeline.DatasetInfo(
      shape, num_classes=10, image_shape=image_shape, num_train=batch_size, num_eval=0))
  model = task.create_model(train.AXIS)
  tx = train.create_optimizer(config, lr)
  state = jax.device_get(
      train.create_train_state(jax.random.key(0), model, tx, task.init_inputs()))
  step = functools.partial(train.train_step, task=task, model=model, tx=tx, learning_rate_fn=lr,
                           axis_name=train.AXIS)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size,) + image_shape).astype(np.float32),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)}
  return step, state, batch


class Arm:
  """One scheme's compiled step and the state it carries from call to call."""

  def __init__(self, name: str, step, state, batch):
    self.name, self.batch, self.times = name, batch, []
    self.scheme = parallel.create(name, train.AXIS)
    self.step = self.scheme.compile(step, donate=True)
    self.state = self.scheme.replicate(state)
    t = time.perf_counter()
    self.run()
    self.first_s = time.perf_counter() - t

  def run(self) -> None:
    self.state, m = self.step(self.state, self.scheme.shard(self.batch))
    jax.block_until_ready((self.state, m))

  def time(self, steps: int) -> None:
    for _ in range(steps):
      t = time.perf_counter()
      self.run()
      self.times.append(time.perf_counter() - t)

  @property
  def median_ms(self) -> float:
    return float(np.median(self.times)) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES),
                      help=f"comma-separated, of {', '.join(SHAPES)}")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per arm per round")
  parser.add_argument("--rounds", type=int, default=2, help="pmap-then-jit rounds")
  args = parser.parse_args()
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}")
  for shape in args.shapes.split(","):
    step, state, batch = build(shape)
    arms = [Arm(name, step, state, batch) for name in parallel.CHOICES]
    for _ in range(args.rounds):
      for arm in arms:
        arm.time(args.steps)
    pmap, jit = arms
    for arm in arms:
      print(f"{shape} batch {len(batch['label'])} {arm.name}: first call (compile) "
            f"{arm.first_s:.2f} s, median {arm.median_ms:.1f} ms/step over {len(arm.times)}")
    print(f"{shape}: ratio jit/pmap {jit.median_ms / pmap.median_ms:.3f}")


if __name__ == "__main__":
  main()
