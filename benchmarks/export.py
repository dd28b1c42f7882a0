"""The exported network's speed and size against the float simulation.

  python -m benchmarks.export [--repeats=10]

1. One ResNet-18-sized binary 3x3 conv (batch 32, 14x14x256 -> 256): the float
   simulation (`layers.xnor_conv`, inference) against the export's backends
   (auto, int8 with int32 accumulation, XOR + popcount, float32), each
   including the sign of its input and the per-channel scale.
2. The whole ResNet-20 (batch 128, 32x32x3): the trained model's jitted
   `apply` against the exported network's predictor.
3. File sizes: the export of a random-init ResNet-18 (ImageNet) and ResNet-20
   against their float32 parameters and BatchNorm statistics in one msgpack
   file (`flax.serialization.to_bytes`).
Every pair is timed in one process on the same inputs: read the ratios.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from ovsw_jax import export, layers, models, quantizers
from ovsw_jax.export import infer


def median_seconds(calls: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each `name: (fn, args)`, timed round-robin.

  Interleaving the candidates spreads a shared machine's load changes over
  all of them alike, so their ratios stay meaningful.
  """
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))  # compile
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def random_variables(model, shape, seed=0):
  """Random weights and BatchNorm statistics (numpy, no init compile)."""
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, x.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  return variables["params"], variables["batch_stats"]


def bench_conv(repeats: int) -> dict[str, float]:
  n, hw, c = 32, 14, 256
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
  simulation = jax.jit(lambda x, w: layers.xnor_conv(x, w, padding=1, training=False))
  kernel = jnp.asarray(np.sign(np.asarray(w)), jnp.int8)
  alpha = quantizers.channel_scale(w)

  def exported(conv, x, kernel, alpha):
    acc = conv(jnp.sign(x).astype(jnp.int8), kernel, (1, 1), [(1, 1), (1, 1)])
    return acc.astype(jnp.float32) * alpha

  want = np.asarray(simulation(x, w))
  calls = {"simulation": (simulation, (x, w))}
  for backend in infer.BACKENDS:
    fn = jax.jit(functools.partial(exported, infer.choose_conv(backend, c, False)))
    np.testing.assert_allclose(np.asarray(fn(x, kernel, alpha)), want, rtol=1e-5, atol=1e-4)
    calls[backend] = (fn, (x, kernel, alpha))
  return {k: n / v for k, v in median_seconds(calls, repeats).items()}  # images per second


def bench_resnet20(repeats: int) -> dict[str, float]:
  shape, batch = (32, 32, 3), 128
  model = models.get_model("resnet20", num_classes=10)
  params, stats = random_variables(model, shape)
  net = export.export_network("resnet20", 10, params, stats, shape)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(batch,) + shape), jnp.float32)
  simulation = lambda x: export.simulate(model, params, stats, x)
  want = np.asarray(simulation(images))
  calls = {"simulation": (simulation, (images,))}
  for backend in infer.BACKENDS:
    predict = export.predictor(net, backend)
    np.testing.assert_array_equal(np.asarray(predict(images)).argmax(-1), want.argmax(-1))
    calls[backend] = (predict, (images,))
  return {k: batch / v for k, v in median_seconds(calls, repeats).items()}


def file_sizes(name: str, classes: int, shape) -> tuple[int, int]:
  model = models.get_model(name, num_classes=classes)
  params, stats = random_variables(model, shape)
  net = export.export_network(name, classes, params, stats, shape)
  float_bytes = len(serialization.to_bytes({"params": params, "batch_stats": stats}))
  return len(net.to_bytes()), float_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
  conv = bench_conv(args.repeats)
  print("binary 3x3 conv, batch 32, 14x14x256 -> 256 (images/s):")
  for k, v in conv.items():
    print(f"  {k:10s} {v:10.1f}   x{v / conv['simulation']:.2f} vs simulation")
  net = bench_resnet20(args.repeats)
  print("ResNet-20, batch 128, 32x32x3 (images/s):")
  for k, v in net.items():
    print(f"  {k:10s} {v:10.1f}   x{v / net['simulation']:.2f} vs simulation")
  for name, classes, shape in (("resnet20", 10, (32, 32, 3)), ("resnet18", 1000, (224, 224, 3))):
    exported, floats = file_sizes(name, classes, shape)
    print(f"{name}: export {exported / 1e6:.3f} MB, float32 params + BN stats "
          f"{floats / 1e6:.3f} MB, {floats / exported:.1f}x smaller")


if __name__ == "__main__":
  main()
