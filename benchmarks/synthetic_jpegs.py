"""A synthetic ImageNet: photo-like JPEGs of ImageNet's size in tfds's array_record format.

Its own module (not the benchmark's `__main__`), so that data worker processes
find the builder class by name when the data source is sent to them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

NUM_IMAGES = 1000  # train split; validation is half of it


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

  VERSION = tfds.core.Version("1.1.0")  # 1.1.0: a validation split half the train's size.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(NUM_IMAGES, 0),
            "validation": self._generate_examples(max(NUM_IMAGES // 2, 1), 10**6)}

  def _generate_examples(self, n, offset):
    for i in range(n):
      # tfds re-encodes decoded arrays; handing it the bytes keeps the JPEG as made.
      yield i, {"image": io.BytesIO(synthetic_jpeg(i + offset)), "label": (i + offset) % 1000}



def builder(data_dir: str, images: int) -> OvswSyntheticJpegs:
  """The builder writing `images` train images (once) into `data_dir`."""
  global NUM_IMAGES
  NUM_IMAGES = images
  out = OvswSyntheticJpegs(data_dir=data_dir, file_format="array_record")
  if not out.is_prepared():
    print(f"Writing {images} synthetic JPEGs to {data_dir} ...", flush=True)
    out.download_and_prepare()
  return out
