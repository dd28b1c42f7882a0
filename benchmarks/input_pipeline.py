"""ImageNet input pipeline throughput: the crop-window TF decoder vs the PIL one.

  python -m benchmarks.input_pipeline [--images=1000] [--batch=128] [--batches=12]
      [--workers=2] [--data_dir=DIR]

Makes (once, in `--data_dir`, default a folder under /tmp) a synthetic data set
of ImageNet-sized JPEGs (about 500 x 375, quality 90, photo-like content) in
array_record through tfds, as a prepared ImageNet is, then runs the project's
own `train_iterator` and `eval_iterator` with `imagenet_decoder=pil` and
`=tf`, alternating (pil, tf, pil, tf), and prints for each: images/s, CPU-ms
per image (all threads of the process, from getrusage), and the ratios.

The host-side Python part of the tf decoder (record reads, header parsing,
the keyed random draws) holds the GIL; its time per image bounds one process
at `1 / python_s_per_image` images/s, printed as the single-process ceiling.
The projection to a 64-core host is `64 / CPU-s per image`, capped by that
ceiling times the processes you run (one per accelerator, as the launch
scripts do).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import resource
import statistics
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ovsw_jax.trainer import input_pipeline as ip
from ovsw_jax.trainer.data import augment as aug
from ovsw_jax.trainer.data import sources, tf_images

NUM_IMAGES = 1000


def synthetic_jpeg(key: int) -> bytes:
  """A photo-like JPEG: smooth colour fields, edges and sensor noise, ~500 x 375."""
  rng = np.random.default_rng(key)
  h, w = int(rng.integers(333, 420)), int(rng.integers(450, 560))
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  image = np.zeros((h, w, 3), np.float32)
  for c in range(3):
    fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
    image[..., c] = 128 + 80 * np.sin(fx * xx + fy * yy + phase)
  for _ in range(6):  # blobs with edges
    cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(20, 120)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    image[inside] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 12, image.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


class OvswSyntheticJpegs(tfds.core.GeneratorBasedBuilder):
  """Synthetic ImageNet-sized JPEGs with ImageNet's features (image, label)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(NUM_IMAGES, 0),
            "validation": self._generate_examples(max(NUM_IMAGES // 4, 1), 10**6)}

  def _generate_examples(self, n, offset):
    for i in range(n):
      # tfds re-encodes decoded arrays; handing it the bytes keeps the JPEG as made.
      yield i, {"image": io.BytesIO(synthetic_jpeg(i + offset)), "label": (i + offset) % 1000}


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def run_train(config, batch: int, batches: int) -> tuple[float, float]:
  """(images/s, CPU-ms per image) of `batches` training batches after one warm-up batch."""
  it = ip.train_iterator(config, global_batch_size=batch, seed=0)
  next(it)
  wall, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  it.close()
  n = batch * batches
  return n / wall, 1e3 * cpu / n


def run_eval(config, batch: int) -> tuple[float, float]:
  """(images/s, CPU-ms per image) of a pass over the validation split, after a warm-up pass."""
  for _ in ip.eval_iterator(config, global_batch_size=batch):
    pass
  it = ip.eval_iterator(config, global_batch_size=batch)
  wall, cpu, n = time.perf_counter(), cpu_seconds(), 0
  for b in it:
    n += int(b["mask"].sum())
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  return n / wall, 1e3 * cpu / max(n, 1)


def python_seconds_per_image(config, batch: int, batches: int) -> float:
  """The GIL-held host part of the tf decoder: reads, headers and random draws."""
  dataset = ip._build(config)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  start = time.thread_time()  # this thread's CPU: what it holds the GIL for
  for step in range(batches):
    indices = rng.integers(0, dataset.info.num_train, batch)
    records = dataset._records(dataset.train_source, indices)  # pylint: disable=protected-access
    for p, record in enumerate(records):
      r = np.random.default_rng([2, 0, step, p])
      aug.random_resized_crop_params(r, *tf_images.encoded_size(record["image"]))
      r.random()
      aug.lighting_offset(r)
  return (time.thread_time() - start) / (batch * batches)


def main():
  global NUM_IMAGES
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "ovsw_synthetic_jpegs"))
  args = parser.parse_args()
  NUM_IMAGES = args.images
  builder = OvswSyntheticJpegs(data_dir=args.data_dir, file_format="array_record")
  if not builder.is_prepared():
    print(f"Writing {args.images} synthetic JPEGs to {args.data_dir} ...", flush=True)
    builder.download_and_prepare()
  files = list(pathlib.Path(args.data_dir).rglob("*array_record*"))
  size = sum(f.stat().st_size for f in files) / max(builder.info.splits["train"].num_examples
                                                    + builder.info.splits["validation"]
                                                    .num_examples, 1)
  print(f"{builder.info.splits['train'].num_examples} train images, mean record "
        f"{size / 1024:.0f} KiB; batch {args.batch}, {args.workers} workers, "
        f"{os.cpu_count()} CPUs")

  def config(decoder):
    return ml_collections.ConfigDict(dict(
        dataset="imagenet2012", tfds_name="ovsw_synthetic_jpegs", data_dir=args.data_dir,
        image_size=224, num_workers=args.workers, prefetch=2, imagenet_decoder=decoder))

  results = {("train", d): [] for d in ("pil", "tf")}
  results.update({("eval", d): [] for d in ("pil", "tf")})
  for _ in range(args.repeats):
    for decoder in ("pil", "tf"):
      sources.clear_caches()
      results[("train", decoder)].append(run_train(config(decoder), args.batch, args.batches))
      results[("eval", decoder)].append(run_eval(config(decoder), args.batch))
  python_s = python_seconds_per_image(config("tf"), args.batch, 4)

  print("\n| pipeline | decoder | images/s | CPU-ms per image |\n|---|---|---|---|")
  medians = {}
  for (kind, decoder), runs in results.items():
    rate = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    medians[(kind, decoder)] = (rate, cpu)
    print(f"| {kind} | {decoder} | {rate:.0f} | {cpu:.2f} |")
  for kind in ("train", "eval"):
    (rate_p, cpu_p), (rate_t, cpu_t) = medians[(kind, "pil")], medians[(kind, "tf")]
    print(f"{kind}: tf / pil images/s {rate_t / rate_p:.2f}x, CPU per image "
          f"{cpu_p / cpu_t:.2f}x less")
  ceiling = 1.0 / python_s
  cpu_t = medians[("train", "tf")][1] / 1e3
  print(f"tf decoder, host Python per image {1e6 * python_s:.0f} us: one process tops out "
        f"near {ceiling:,.0f} images/s")
  print(f"projected 64-core host (CPU-bound, no other load): {64 / cpu_t:,.0f} images/s "
        f"(needs >= {max(1, int(np.ceil(64 / cpu_t / ceiling)))} processes)")


if __name__ == "__main__":
  main()
