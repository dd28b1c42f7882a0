"""ImageNet batches, each made whole by one call: what a data worker process runs.

`ImageNetBatches.train(indices, ...)` and `.eval(indices)` take the dataset
indices of one batch and return its arrays. Everything per image happens
inside the call: the records are requested concurrently (`read_threads`
threads, each `source[i]`; a remote store answers them in parallel), each
record is parsed (tfds), each JPEG header read, each example's random draws
made, and the batch decoded (`decode_threads` threads of TensorFlow's, or PIL).
`data.loader` runs these calls in worker processes, so the training process
only receives finished uint8 batches.

The random draws are those of the release's transform, keyed as before:
example `p` of the global batch of `step` draws, from
`np.random.default_rng([2, seed, step, p])`, its crop box
(`augment.random_resized_crop_params`, scale (0.08, 1.25)), its flip, then its
three lighting normals (`augment.lighting_offset`). Batches hold uint8 pixels
and each example's lighting offset (`rgb_offset`); the device adds it and
normalises (`data.device`).

Two decoders (`config.imagenet_decoder`):

* 'tf' (default): `data.tf_images`, only the crop window of a JPEG decoded,
  a plain bilinear resize.
* 'pil': PIL, the release's own operations (a full decode, the crop, PIL's
  bilinear resize, which antialiases), in uint8 (`augment.crop_resize`,
  `augment.eval_pixels`): the pixels of the release's transform before
  lighting and normalisation, exactly.

An instance is pickled into each worker process; its thread pool is made
there on first use and never pickled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Sequence

import numpy as np

from ovsw_jax.trainer.data import augment as aug
from ovsw_jax.trainer.data import tf_images

DECODERS = ('tf', 'pil')
AUGMENT_STREAM = 2  # First entropy word of the augmentation generators (input_pipeline).


def draws(seed: int, step: int, positions: Sequence[int], sizes: Sequence[tuple[int, int]],
          lighting: str):
  """Each example's crop box, flip and lighting offset, from its keyed generator.

  `positions` are the examples' rows in the global batch, `sizes` their
  (height, width). Returns `(boxes (N, 4) int32 of (top, left, h, w), flips (N,)
  bool, offsets (N, 3) float32)`.
  """
  boxes, flips, offsets = [], [], []
  for position, (height, width) in zip(positions, sizes):
    rng = np.random.default_rng([AUGMENT_STREAM, seed, step, int(position)])
    boxes.append(aug.random_resized_crop_params(rng, height, width))
    flips.append(rng.random() < 0.5)
    offsets.append(aug.lighting_offset(rng, form=lighting))
  return (np.asarray(boxes, np.int32).reshape(-1, 4), np.asarray(flips, bool),
          np.asarray(offsets, np.float32).reshape(-1, 3))


@dataclasses.dataclass
class ImageNetBatches:
  """Reads, augments and decodes ImageNet batches (see the module docstring).

  Attributes:
    train_source, eval_source: random-access sources (`source[i]` is a dict
      with encoded 'image' bytes, or a uint8 array, and 'label').
    image_size: output side.
    lighting: `augment.LIGHTING_FORMS`.
    decoder: 'tf' or 'pil'.
    read_threads: records of a batch requested at once.
    decode_threads: TensorFlow's decode threads per call ('tf').
  """
  train_source: Any
  eval_source: Any
  image_size: int
  lighting: str = 'alexnet'
  decoder: str = 'tf'
  read_threads: int = 1
  decode_threads: int = 1
  _pool: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

  def __post_init__(self):
    if self.decoder not in DECODERS:
      raise ValueError(f'decoder must be one of {DECODERS}, got {self.decoder!r}')

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_pool'] = None  # Threads do not cross processes: made again on first use.
    return state

  def records(self, source, indices) -> list:
    """`source[i]` for each index, requested concurrently, in order."""
    indices = [int(i) for i in indices]
    if self.read_threads <= 1 or len(indices) <= 1:
      return [source[i] for i in indices]
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads, 'ovsw-read')
    return list(self._pool.map(source.__getitem__, indices))

  def train(self, indices, *, seed: int, step: int, positions, augment: bool = True) -> dict:
    """`{'image': uint8 (N, S, S, 3), 'label': int32 (N,), 'rgb_offset': float32 (N, 3)}`.

    `positions` are the examples' rows in the global batch (their keys).
    `augment=False` gives the evaluation transform and no lighting.
    """
    records = self.records(self.train_source, indices)
    images = [r['image'] for r in records]
    labels = np.asarray([int(r['label']) for r in records], np.int32)
    if not augment:
      return {'image': self._eval_pixels(images), 'label': labels,
              'rgb_offset': np.zeros((len(images), 3), np.float32)}
    sizes = [tf_images.encoded_size(image) for image in images]
    boxes, flips, offsets = draws(seed, step, positions, sizes, self.lighting)
    if self.decoder == 'tf':
      pixels = tf_images.train_batch(images, boxes, flips, self.image_size,
                                     self.decode_threads)
    else:
      pixels = np.stack([aug.crop_resize(x, b, self.image_size, f)
                         for x, b, f in zip(images, boxes, flips)])
    return {'image': pixels, 'label': labels, 'rgb_offset': offsets}

  def eval(self, indices) -> dict:
    """`{'image': uint8 (N, S, S, 3), 'label': int32 (N,)}`: shorter side, centre crop."""
    records = self.records(self.eval_source, indices)
    return {'image': self._eval_pixels([r['image'] for r in records]),
            'label': np.asarray([int(r['label']) for r in records], np.int32)}

  def _eval_pixels(self, images) -> np.ndarray:
    if self.decoder == 'tf':
      return tf_images.eval_batch(images, self.image_size, self.decode_threads)
    return np.stack([aug.eval_pixels(x, self.image_size) for x in images])
