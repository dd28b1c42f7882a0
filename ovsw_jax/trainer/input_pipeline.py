"""Input pipelines: batches that are a pure function of (seed, step).

Why this design: the trainer resumes bitwise-exactly after a SIGKILL and runs
on several hosts. So nothing here keeps hidden state that a restart could lose:

* Order. Epoch `e` visits the training examples in the order of the
  permutation `epoch_permutation(seed, e, num_train)`, drawn from
  `np.random.default_rng([1, seed, e])`. The global batch of step `s` is
  slice `s % steps_per_epoch` of epoch `s // steps_per_epoch`'s permutation,
  with `steps_per_epoch = num_train // global_batch_size` (the remainder of
  each epoch is dropped, as `drop_last=True` would).
* Augmentation. Its randomness is keyed by (seed, step, position in the global
  batch): `np.random.default_rng([2, seed, step])` draws the crop offsets and
  flips of the whole global batch at once for digits and CIFAR (row `p` is
  position `p`), `np.random.default_rng([2, seed, step, p])` draws everything
  of example `p` for ImageNet.
* Sharding. Process `i` of `n` yields rows `[i * local, (i + 1) * local)` of the
  global batch (`local = global_batch_size // n`), so the global batch, its
  augmentation included, is the same whatever the number of processes.

Hence `train_iterator(..., start_step=k)` yields exactly what an uninterrupted
iterator yields after `k` batches, and the trainer only has to checkpoint the
step.

Evaluation (`eval_iterator`) is one pass over the evaluation split in stored
order; the last global batch is padded (zeros, label 0) and carries a boolean
`mask`, so every example is counted exactly once across processes.

Datasets (`config.dataset`):

* 'digits' (the embedded default): scikit-learn's 8x8 digits, no download.
  1797 images; a fixed stratified test split of 360 (36 per class, chosen by a
  fixed generator, independent of the run seed) and 1437 training images.
  Pixels are scaled to [0, 1], then normalised by the global mean and std of the
  training split. Training augmentation: a random shift of up to 1 pixel in
  each direction with zero padding. Shape (8, 8, 1).
* 'cifar10' / 'cifar100': tfds, whole splits in memory (train 50000, test
  10000). Training: random crop 32 with 4-pixel zero padding, horizontal flip;
  both: per-channel normalisation with mean (0.491, 0.482, 0.447) and std
  (0.247, 0.243, 0.262), as the authors' release.
* 'imagenet2012': tfds random-access data source (array_record format),
  train 1281167, validation 50000. Training: random resized crop to
  `image_size` with scale (0.08, 1.25) and ratio (3/4, 4/3), horizontal flip,
  PCA lighting noise (std 0.1), normalisation with mean (0.485, 0.456, 0.406)
  and std (0.229, 0.224, 0.225). Evaluation: shorter side resized to
  `round(256 * image_size / 224)`, centre crop `image_size`. With the default
  decoder ('tf', `data.tf_images`) batches hold uint8 pixels of the crop (only
  the crop window is decoded) and each example's lighting offset in
  `rgb_offset`; the device adds it and normalises (`data.device`, from
  `DatasetInfo.pixel_stats`). With 'pil' they hold normalised float32 images.

tfds is always called with `download=False`; an unprepared dataset raises
`DatasetNotPreparedError`, whose message gives the commands that prepare it.

Config fields read (an `ml_collections.ConfigDict`):

* `dataset` (str, required): 'digits', 'cifar10', 'cifar100' or 'imagenet2012'.
* `data_dir` (str or None, default None): tfds data_dir (None: tfds default).
* `image_size` (int, default 224): ImageNet output side.
* `tfds_name` (str, default `config.dataset`): the tfds dataset read for
  'cifar10'/'cifar100'/'imagenet2012', e.g. 'imagenet2012_subset/10pct' or a
  custom builder with the same features ('image', 'label') and splits
  (CIFAR: 'train'/'test'; ImageNet: 'train'/'validation').
* `augment` (bool, default True): training augmentation; False gives the
  evaluation transform on training batches (the order is still shuffled).
* `imagenet_lighting` (str, default 'alexnet'): PCA lighting form, 'alexnet'
  (the standard one), 'release' (the authors' `ColorAugmentation`, whose matrix
  pairs eigenvalues with rows; see `data.augment.lighting_offset`) or 'none'.
* `imagenet_decoder` (str, default 'tf'): 'tf' (crop-window decode in TF's
  threads, uint8 batches) or 'pil' (PIL and NumPy, float32 batches).
* `num_workers` (int or None, default None = min(16, CPUs)): decode threads
  for ImageNet (tf.data map parallelism, or the PIL thread pool).
* `prefetch` (int, default 2): batches computed ahead in a background thread.
  Batches depend only on their step, so prefetching changes no value.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np

from ovsw_jax.trainer.data import augment as aug
from ovsw_jax.trainer.data import sources
from ovsw_jax.trainer.data import tf_images
from ovsw_jax.trainer.data.sources import DatasetNotPreparedError

__all__ = [
    'DATASETS', 'DatasetInfo', 'DatasetNotPreparedError', 'epoch_permutation',
    'eval_iterator', 'get_info', 'global_batch_indices', 'steps_per_epoch',
    'train_iterator',
]

DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012')
_NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000}
_CIFAR_PAD = 4
_DIGITS_PAD = 1

# First entropy word of each random stream, so that the order and the
# augmentation streams never share a generator state.
_ORDER_STREAM = 1
_AUGMENT_STREAM = 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before reading it.

  Attributes:
    name: `config.dataset`.
    num_classes: number of labels.
    image_shape: `(H, W, C)` of the batches' images.
    num_train: examples in the training split.
    num_eval: examples in the evaluation split (test for digits and CIFAR,
      validation for ImageNet).
    pixel_stats: `(mean, std)` per channel when the batches hold uint8 pixels
      that the device normalises (`data.device.model_images`); None when the
      pipeline ships normalised float32 images.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int
  pixel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


# ---------------------------------------------------------------------------
# Order and sharding: pure functions of (seed, step).


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the training examples.

  Why: a permutation drawn from a generator keyed by (seed, epoch) alone can be
  recomputed after a restart, on any host.
  """
  _check_seed(seed)
  if epoch < 0:
    raise ValueError(f'epoch must be >= 0, got {epoch}')
  return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
  """Training steps per epoch: `num_train // global_batch_size` (drop remainder)."""
  if not 0 < global_batch_size <= num_train:
    raise ValueError(
        f'global_batch_size must be in [1, num_train={num_train}], '
        f'got {global_batch_size}')
  return num_train // global_batch_size


def global_batch_indices(num_train: int, global_batch_size: int, step: int,
                         seed: int) -> np.ndarray:
  """Indices of the training examples in the global batch of `step`.

  Why: the single definition of the data order; `train_iterator` uses it (with
  a cache of the current epoch's permutation) and tests compare against it.
  """
  spe = steps_per_epoch(num_train, global_batch_size)
  epoch, k = divmod(step, spe)
  perm = epoch_permutation(seed, epoch, num_train)
  return perm[k * global_batch_size:(k + 1) * global_batch_size]


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'need 0 <= process_index < process_count, got {process_index}, '
        f'{process_count}')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size ({global_batch_size}) must be a positive multiple '
        f'of process_count ({process_count})')
  return global_batch_size // process_count


def _check_seed(seed: int) -> None:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')


# ---------------------------------------------------------------------------
# Datasets.


class _ArrayDataset:
  """Digits or CIFAR: both splits in memory, augmentation vectorised per batch."""

  def __init__(self, info: DatasetInfo, train: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], *, pad: int, flip: bool,
               mean, std, scale: float):
    self.info = info
    self.train_images, self.train_labels = train
    self.test_images, self.test_labels = test
    self.pad, self.flip = pad, flip
    self.mean, self.std, self.scale = mean, std, scale

  def _normalize(self, images):
    return aug.normalize(images, self.mean, self.std, self.scale)

  def train_batch(self, indices, *, seed, step, global_batch_size, positions,
                  augment, pool):
    """Images and labels of the training examples `indices`.

    `positions` are the examples' rows in the global batch: the offsets and
    flips of the whole global batch are drawn, and these rows are used.
    """
    del pool
    images = self.train_images[indices]
    if augment:
      rng = np.random.default_rng([_AUGMENT_STREAM, seed, step])
      offsets = rng.integers(0, 2 * self.pad + 1, size=(global_batch_size, 2))
      images = aug.pad_and_crop(images, offsets[positions], self.pad)
      if self.flip:
        flips = rng.random(global_batch_size) < 0.5
        images = aug.hflip(images, flips[positions])
    return {'image': self._normalize(images),
            'label': self.train_labels[indices].astype(np.int32)}

  def eval_batch(self, indices, *, pool):
    del pool
    return {'image': self._normalize(self.test_images[indices]),
            'label': self.test_labels[indices].astype(np.int32)}


class _SourceDataset:
  """ImageNet: random-access sources; one batch decoded at a time.

  `decoder='tf'` (the default): the host draws each example's crop box, flip
  and lighting offset from its keyed generator (as the PIL transform does) and
  `data.tf_images` decodes the batch in TF's threads, only the crop window,
  into uint8; the lighting offset travels with the batch (`rgb_offset`) and
  the device adds it and normalises. `decoder='pil'`: the whole transform in
  PIL and NumPy, float32 normalised on the host (the earlier pipeline, kept
  for comparison: benchmarks/input_pipeline.py).
  """

  def __init__(self, info: DatasetInfo, train_source, eval_source, *,
               image_size: int, lighting: str, decoder: str = 'tf', workers: int = 1):
    self.info = info
    self.train_source, self.eval_source = train_source, eval_source
    self.image_size, self.lighting = image_size, lighting
    self.decoder, self.workers = decoder, workers

  @staticmethod
  def _records(source, indices):
    # One by one: tfds's batched `__getitems__` measured 1.7x slower per record.
    return [source[int(i)] for i in indices]

  def train_batch(self, indices, *, seed, step, global_batch_size, positions,
                  augment, pool):
    """Decodes and augments examples `indices`, example `p`'s rng keyed by p."""
    del global_batch_size
    if self.decoder == 'pil':
      return self._train_batch_pil(indices, seed=seed, step=step, positions=positions,
                                   augment=augment, pool=pool)
    records = self._records(self.train_source, indices)
    images = [r['image'] for r in records]
    labels = np.asarray([int(r['label']) for r in records], np.int32)
    if not augment:
      return {'image': tf_images.eval_batch(images, self.image_size, self.workers),
              'label': labels, 'rgb_offset': np.zeros((len(images), 3), np.float32)}
    boxes, flips, offsets = [], [], []
    for image, position in zip(images, positions):
      rng = np.random.default_rng([_AUGMENT_STREAM, seed, step, int(position)])
      boxes.append(aug.random_resized_crop_params(rng, *tf_images.encoded_size(image)))
      flips.append(rng.random() < 0.5)
      offsets.append(aug.lighting_offset(rng, form=self.lighting))
    return {'image': tf_images.train_batch(images, boxes, flips, self.image_size,
                                           self.workers),
            'label': labels, 'rgb_offset': np.stack(offsets).astype(np.float32)}

  def _train_batch_pil(self, indices, *, seed, step, positions, augment, pool):

    def one(index, position):
      record = self.train_source[int(index)]
      if augment:
        rng = np.random.default_rng([_AUGMENT_STREAM, seed, step, int(position)])
        image = aug.imagenet_train_transform(
            record['image'], rng, self.image_size, lighting=self.lighting)
      else:
        image = aug.imagenet_eval_transform(record['image'], self.image_size)
      return image, int(record['label'])

    images, labels = _stack(pool.map(one, indices, positions))
    return {'image': images, 'label': labels}

  def eval_batch(self, indices, *, pool):
    if self.decoder == 'pil':
      def one(index):
        record = self.eval_source[int(index)]
        return (aug.imagenet_eval_transform(record['image'], self.image_size),
                int(record['label']))
      images, labels = _stack(pool.map(one, indices))
      return {'image': images, 'label': labels}
    records = self._records(self.eval_source, indices)
    return {'image': tf_images.eval_batch([r['image'] for r in records], self.image_size,
                                          self.workers),
            'label': np.asarray([int(r['label']) for r in records], np.int32)}


def _stack(pairs):
  images, labels = zip(*pairs)
  return np.stack(images).astype(np.float32), np.asarray(labels, np.int32)


def _dataset_name(config) -> str:
  name = str(config.dataset).lower()
  if name not in DATASETS:
    raise ValueError(f'config.dataset must be one of {DATASETS}, got {config.dataset!r}')
  return name


def _build(config):
  """The dataset object of `config` (its arrays and sources are cached)."""
  name = _dataset_name(config)
  data_dir = config.get('data_dir', None)
  data_dir = None if data_dir in (None, '') else os.fspath(data_dir)
  tfds_name = config.get('tfds_name', None) or name
  if name == 'digits':
    split = sources.load_digits_split()
    train = (split['train_images'], split['train_labels'])
    test = (split['test_images'], split['test_labels'])
    info = DatasetInfo(name, 10, (8, 8, 1), len(train[1]), len(test[1]))
    # Global statistics: several border pixels are 0 in every image, so
    # per-pixel std would divide by zero.
    mean = float(train[0].mean())
    std = float(train[0].std())
    return _ArrayDataset(info, train, test, pad=_DIGITS_PAD, flip=False,
                         mean=mean, std=std, scale=1.0)
  if name in ('cifar10', 'cifar100'):
    train = sources.load_tfds_arrays(tfds_name, 'train', data_dir)
    test = sources.load_tfds_arrays(tfds_name, 'test', data_dir)
    info = DatasetInfo(name, _NUM_CLASSES[name], (32, 32, 3), len(train[1]),
                       len(test[1]))
    return _ArrayDataset(info, train, test, pad=_CIFAR_PAD, flip=True,
                         mean=aug.CIFAR_MEAN, std=aug.CIFAR_STD, scale=255.0)
  image_size = int(config.get('image_size', 224))
  lighting = str(config.get('imagenet_lighting', 'alexnet'))
  if lighting not in aug.LIGHTING_FORMS:
    raise ValueError(
        f'config.imagenet_lighting must be one of {aug.LIGHTING_FORMS}, got {lighting!r}')
  decoder = str(config.get('imagenet_decoder', 'tf'))
  if decoder not in ('tf', 'pil'):
    raise ValueError(f"config.imagenet_decoder must be 'tf' or 'pil', got {decoder!r}")
  train_source = sources.open_tfds_source(tfds_name, 'train', data_dir)
  eval_source = sources.open_tfds_source(tfds_name, 'validation', data_dir)
  stats = (aug.IMAGENET_MEAN, aug.IMAGENET_STD) if decoder == 'tf' else None
  info = DatasetInfo(name, _NUM_CLASSES[name], (image_size, image_size, 3),
                     len(train_source), len(eval_source), pixel_stats=stats)
  return _SourceDataset(info, train_source, eval_source, image_size=image_size,
                        lighting=lighting, decoder=decoder, workers=_num_workers(config))


def get_info(config) -> DatasetInfo:
  """Describes `config.dataset`: classes, image shape, split sizes.

  The sizes are those of the data actually found (so that steps per epoch match
  what `train_iterator` reads). For CIFAR this loads the splits into memory
  (cached, so the iterators do not load them again); for ImageNet it opens the
  sources.

  Raises:
    DatasetNotPreparedError: a tfds dataset is not prepared in `data_dir`.
  """
  return _build(config).info


# ---------------------------------------------------------------------------
# Iterators.


def _num_workers(config) -> int:
  workers = config.get('num_workers', None)
  return max(1, int(min(16, os.cpu_count() or 1) if workers is None else workers))


def _run_ahead(make: Callable[[Any], dict], keys: Iterator[Any], depth: int,
               executor) -> Iterator[dict]:
  """Yields `make(key)` for each key, computing up to `depth` keys ahead."""
  if depth <= 0:
    for key in keys:
      yield make(key)
    return
  pending = collections.deque()
  for key in keys:
    pending.append(executor.submit(make, key))
    if len(pending) > depth:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def _generate(make, keys, *, depth: int, workers: int):
  """Yields `make(key, pool)` over `keys`; owns the thread pools.

  Why a separate generator: `train_iterator` and `eval_iterator` are plain
  functions, so that bad arguments and unprepared datasets raise at the call,
  not at the first `next`. The pools live as long as the iteration: closing
  (or dropping) the iterator shuts them down.
  """
  pool = concurrent.futures.ThreadPoolExecutor(workers, 'ovsw-data')
  ahead = concurrent.futures.ThreadPoolExecutor(1, 'ovsw-prefetch')
  try:
    yield from _run_ahead(lambda key: make(key, pool), keys, depth, ahead)
  finally:
    if not sys.is_finalizing():  # At exit, concurrent.futures joins them itself.
      ahead.shutdown(wait=False, cancel_futures=True)
      pool.shutdown(wait=False, cancel_futures=True)


def train_iterator(config, *, global_batch_size: int, start_step: int = 0,
                   seed: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Yields this process's training batches, from `start_step` on, forever.

  Each batch is `{'image': float32 (local, H, W, C) normalised, 'label': int32
  (local,)}` with `local = global_batch_size // process_count`. Batch `s` is a
  pure function of (config, global_batch_size, seed, s): see the module
  docstring. The process's share is rows `[process_index * local,
  (process_index + 1) * local)` of the global batch.

  Raises:
    DatasetNotPreparedError: a tfds dataset is not prepared in `data_dir`.
    ValueError: inconsistent sizes, indices or seed.
  """
  _check_seed(seed)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  local = _local_batch_size(global_batch_size, process_index, process_count)
  dataset = _build(config)
  num_train = dataset.info.num_train
  spe = steps_per_epoch(num_train, global_batch_size)
  augment = bool(config.get('augment', True))
  positions = np.arange(process_index * local, (process_index + 1) * local)
  workers = _num_workers(config)
  depth = int(config.get('prefetch', 2))
  cached = {}  # epoch -> permutation; only the current epoch is kept.

  def make(step, pool):
    epoch, k = divmod(step, spe)
    if epoch not in cached:
      cached.clear()
      cached[epoch] = epoch_permutation(seed, epoch, num_train)
    indices = cached[epoch][k * global_batch_size + positions]
    return dataset.train_batch(
        indices, seed=seed, step=step, global_batch_size=global_batch_size,
        positions=positions, augment=augment, pool=pool)

  def steps():
    step = start_step
    while True:
      yield step
      step += 1

  return _generate(make, steps(), depth=depth, workers=workers)


def eval_iterator(config, *, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Yields this process's share of one pass over the evaluation split.

  Global batch `b` holds examples `[b * global_batch_size, (b + 1) *
  global_batch_size)` in stored order; positions past the end are padding
  (zero images, label 0) with `mask` False. Every batch has the same shape
  (`local = global_batch_size // process_count` rows) and every example appears
  exactly once across all processes, so `sum(metric * mask)` summed over
  processes is exact. Each batch is `{'image', 'label', 'mask'}`.

  Raises:
    DatasetNotPreparedError: a tfds dataset is not prepared in `data_dir`.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  dataset = _build(config)
  info = dataset.info
  num_batches = -(-info.num_eval // global_batch_size)
  offsets = np.arange(process_index * local, (process_index + 1) * local)
  depth = int(config.get('prefetch', 2))

  def make(b, pool):
    positions = b * global_batch_size + offsets
    mask = positions < info.num_eval
    dtype = np.float32 if info.pixel_stats is None else np.uint8
    image = np.zeros((local, *info.image_shape), dtype)
    label = np.zeros((local,), np.int32)
    if mask.any():
      batch = dataset.eval_batch(positions[mask], pool=pool)
      image[mask], label[mask] = batch['image'], batch['label']
    return {'image': image, 'label': label, 'mask': mask}

  return _generate(make, iter(range(num_batches)), depth=depth,
                   workers=_num_workers(config))
