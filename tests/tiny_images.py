"""A tiny ImageNet-like tfds dataset on disk, in array_record, for the pipeline tests.

Seven random PNG images of various sizes in 'train' and five in 'validation', five
classes, ImageNet's features ('image', 'label'). Its own module, so that data worker
processes find the builder class by name when a data source is sent to them.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


def tiny_image(key: int) -> np.ndarray:
  rng = np.random.default_rng(key)
  return rng.integers(0, 256, (20 + key % 7, 30 - key % 5, 3), dtype=np.uint8)


class OvswTinyImages(tfds.core.GeneratorBasedBuilder):
  """Seven random PNG images of various sizes (5 in validation), 5 classes."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
        'label': tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(7, 0),
            'validation': self._generate_examples(5, 100)}

  def _generate_examples(self, n, offset):
    for i in range(n):
      yield i, {'image': tiny_image(i + offset), 'label': (i + offset) % 5}


def prepare(data_dir: str) -> str:
  """Writes the dataset into `data_dir` (once); returns its tfds name."""
  builder = OvswTinyImages(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare()
  return 'ovsw_tiny_images'


class FailingSource:
  """A source whose record `bad` cannot be read (a damaged shard, a lost object)."""

  def __init__(self, source, bad: int):
    self.source, self.bad = source, bad

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i == self.bad:
      raise OSError(f'record {i} is unreadable (test double)')
    return self.source[i]
