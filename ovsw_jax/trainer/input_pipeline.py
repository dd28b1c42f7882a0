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
  `round(256 * image_size / 224)`, centre crop `image_size`. Batches hold
  uint8 pixels and each example's lighting offset in `rgb_offset`; the device
  adds it and normalises (`data.device`, from `DatasetInfo.pixel_stats`).
  `data.imagenet` makes each batch whole (concurrent record reads, parsing,
  the draws, the decode), in `data_workers` worker processes (`data.loader`,
  grain), so the training process runs no Python per image.

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
* `imagenet_decoder` (str, default 'tf'): 'tf' (crop-window decode in
  TensorFlow's threads) or 'pil' (the release's PIL operations); both uint8.
* `data_workers` (int or None, default None = the CPUs of this process, at
  most one per `WORKER_MEMORY` of available memory; `data_threads`):
  ImageNet's worker processes; 0 makes batches in this process.
* `decode_threads` (int or None, default None = CPUs / workers, all CPUs
  with 0 workers): TensorFlow decode threads per worker.
* `read_threads` (int or None, default None = 64 for an object store's
  data dir (gs://...), 1 for a local one): records of a batch requested at
  once (a remote store's latency is paid per round).
* `prefetch` (int, default 2): batches computed ahead (in a thread, or done
  and waiting in each worker's queue). Batches depend only on their step, so
  neither prefetching nor the workers change a value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import numpy as np

from ovsw_jax.trainer.data import augment as aug
from ovsw_jax.trainer.data import imagenet
from ovsw_jax.trainer.data import loader
from ovsw_jax.trainer.data import sources
from ovsw_jax.trainer.data.sources import DatasetNotPreparedError

__all__ = [
    'DATASETS', 'DatasetInfo', 'DatasetNotPreparedError', 'data_threads', 'epoch_permutation',
    'eval_iterator', 'eval_passes', 'get_info', 'global_batch_indices', 'host_cpus',
    'steps_per_epoch', 'train_iterator',
]

DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012')
_NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000}
_CIFAR_PAD = 4
_DIGITS_PAD = 1

# First entropy word of each random stream, so that the order and the
# augmentation streams never share a generator state.
_ORDER_STREAM = 1
_AUGMENT_STREAM = imagenet.AUGMENT_STREAM
# Records of an ImageNet batch requested at once from an object store by default
# (`read_threads`): a batch of 128 arrives in two round trips.
READ_THREADS_REMOTE = 64
# Memory the default worker count budgets a data worker: one with TensorFlow
# holds 0.40-0.45 GiB of its own; the training and the evaluation pipeline
# each have their workers, and the training process needs the rest. So the
# workers of one pipeline take at most a quarter of the available memory.
WORKER_MEMORY = 4 * 0.5 * 2**30


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
  """Digits or CIFAR: both splits in memory, augmentation vectorised per batch.

  Made in this process (`workers = 0`): a batch costs a few vectorised NumPy
  operations, less than shipping it from another process.
  """
  workers = 0
  worker_env = None

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

  def train_batch(self, indices, *, seed, step, global_batch_size, positions, augment):
    """Images and labels of the training examples `indices`.

    `positions` are the examples' rows in the global batch: the offsets and
    flips of the whole global batch are drawn, and these rows are used.
    """
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

  def eval_batch(self, indices):
    return {'image': self._normalize(self.test_images[indices]),
            'label': self.test_labels[indices].astype(np.int32)}


def _dataset_name(config) -> str:
  name = str(config.dataset).lower()
  if name not in DATASETS:
    raise ValueError(f'config.dataset must be one of {DATASETS}, got {config.dataset!r}')
  return name


@dataclasses.dataclass
class _SourceDataset:
  """ImageNet: `data.imagenet` makes each batch whole, in `workers` processes."""
  info: DatasetInfo
  batches: imagenet.ImageNetBatches
  workers: int
  worker_env: dict

  def train_batch(self, indices, *, seed, step, global_batch_size, positions, augment):
    del global_batch_size  # Each example draws from its own generator.
    return self.batches.train(indices, seed=seed, step=step, positions=positions,
                              augment=augment)

  def eval_batch(self, indices):
    return self.batches.eval(indices)


def cgroup_cpu_limit(root: str = '/sys/fs/cgroup') -> float | None:
  """The CPUs a container's CPU quota allows, or None when it sets none.

  cgroup v2's `cpu.max` ("quota period", or "max ..."), else v1's
  `cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us` (-1: none), as a container
  sees its own cgroup at `root`.
  """
  def read(name):
    with open(os.path.join(root, name)) as f:
      return f.read().split()
  try:
    quota, period = read('cpu.max')[:2]
    return None if quota == 'max' else int(quota) / int(period)
  except (OSError, ValueError):
    pass
  try:
    quota, period = int(read('cpu/cpu.cfs_quota_us')[0]), int(read('cpu/cpu.cfs_period_us')[0])
    return quota / period if quota > 0 and period > 0 else None
  except (OSError, ValueError, IndexError):
    return None


def memory_available(cgroup_root: str = '/sys/fs/cgroup',
                     meminfo: str = '/proc/meminfo') -> int | None:
  """Bytes this process may still allocate: the host's `MemAvailable`, capped by
  its container's memory limit less what the container uses (cgroup v2
  `memory.max`, v1 `memory/memory.limit_in_bytes`); None if unknown."""
  out = []
  try:
    with open(meminfo) as f:
      out += [int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:')]
  except (OSError, ValueError, IndexError):
    pass
  for limit, usage in (('memory.max', 'memory.current'),
                       ('memory/memory.limit_in_bytes', 'memory/memory.usage_in_bytes')):
    try:
      with open(os.path.join(cgroup_root, limit)) as f:
        cap = f.read().strip()
      with open(os.path.join(cgroup_root, usage)) as f:
        used = int(f.read().strip())
    except (OSError, ValueError):
      continue
    if cap != 'max' and int(cap) < 2**60:  # v1 writes "unlimited" as a huge number
      out.append(max(int(cap) - used, 0))
    break
  return min(out) if out else None


def host_cpus(cgroup_root: str = '/sys/fs/cgroup') -> int:
  """The CPUs this process may use: its affinity mask (a SLURM task's share),
  capped by its container's CPU quota (a Kubernetes pod's `limits.cpu` leaves
  the affinity mask at the whole node's CPUs)."""
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    cpus = os.cpu_count() or 1
  limit = cgroup_cpu_limit(cgroup_root)
  return cpus if limit is None else max(1, min(cpus, math.ceil(limit)))


def data_threads(config, cpus: int | None = None,
                 memory: float | None = None) -> tuple[int, int, int]:
  """`(data_workers, decode_threads, read_threads)` of `config`, for ImageNet.

  A field left None takes its default: one worker process a CPU (`cpus`,
  default `host_cpus()`), as many as `memory` bytes (default
  `memory_available()`) hold at `WORKER_MEMORY` each; decode threads sharing
  the CPUs among the workers (all of them when `data_workers=0`, decoding in
  this process); reads of a
  batch `READ_THREADS_REMOTE` at a time when the data dir is an object store
  (a URL such as gs://, where every read is a round trip of tens of ms), one
  at a time on a local disk (a read there takes about 0.05 ms of CPU, and
  handing each to a thread of a pool cost as much again: 3% more CPU per
  image, docs/performance.md section 1).
  """
  cpus = host_cpus() if cpus is None else cpus
  workers = config.get('data_workers', None)
  if workers is None:
    memory = memory_available() if memory is None else memory
    workers = cpus if memory is None else max(1, min(cpus, int(memory // WORKER_MEMORY)))
  workers = int(workers)
  decode = config.get('decode_threads', None)
  decode = max(1, cpus // max(workers, 1)) if decode is None else int(decode)
  read = config.get('read_threads', None)
  if read is None:
    data_dir, _ = sources.resolve_data_dir(config.get('data_dir', None) or None)
    read = READ_THREADS_REMOTE if '://' in data_dir else 1
  return workers, decode, int(read)


def _worker_env(decode_threads: int) -> dict:
  """What a data worker's environment needs before TensorFlow starts in it."""
  return {
      # TensorFlow's own pools: by default each worker would start two pools
      # the size of the host, thousands of threads on a large host.
      'TF_NUM_INTEROP_THREADS': str(decode_threads),
      'TF_NUM_INTRAOP_THREADS': str(decode_threads),
      # A GPU build of TensorFlow must not take accelerator memory in a worker.
      'CUDA_VISIBLE_DEVICES': '',
  }


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
  if decoder not in imagenet.DECODERS:
    raise ValueError(f"config.imagenet_decoder must be 'tf' or 'pil', got {decoder!r}")
  workers, decode, read = data_threads(config)
  train_source = sources.open_tfds_source(tfds_name, 'train', data_dir)
  eval_source = sources.open_tfds_source(tfds_name, 'validation', data_dir)
  info = DatasetInfo(name, _NUM_CLASSES[name], (image_size, image_size, 3),
                     len(train_source), len(eval_source),
                     pixel_stats=(aug.IMAGENET_MEAN, aug.IMAGENET_STD))
  batches = imagenet.ImageNetBatches(train_source, eval_source, image_size, lighting=lighting,
                                     decoder=decoder, read_threads=read, decode_threads=decode)
  return _SourceDataset(info, batches, workers, _worker_env(decode))


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


class _TrainBatch:
  """Step -> this process's rows of that step's global batch (runs in data workers)."""

  def __init__(self, dataset, *, seed: int, global_batch_size: int, positions: np.ndarray,
               augment: bool):
    self.dataset, self.seed, self.augment = dataset, seed, augment
    self.global_batch_size, self.positions = global_batch_size, positions
    self.steps_per_epoch = steps_per_epoch(dataset.info.num_train, global_batch_size)
    self._epoch = (None, None)  # (epoch, its permutation): only the current one is kept.

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_epoch'] = (None, None)  # Recomputed where it is needed, not shipped.
    return state

  def __call__(self, step: int) -> dict:
    epoch, k = divmod(int(step), self.steps_per_epoch)
    if self._epoch[0] != epoch:
      self._epoch = (epoch, epoch_permutation(self.seed, epoch, self.dataset.info.num_train))
    indices = self._epoch[1][k * self.global_batch_size + self.positions]
    return self.dataset.train_batch(
        indices, seed=self.seed, step=int(step), global_batch_size=self.global_batch_size,
        positions=self.positions, augment=self.augment)


@dataclasses.dataclass
class _EvalBatch:
  """Batch number -> this process's rows of that padded evaluation batch."""
  dataset: Any
  global_batch_size: int
  offsets: np.ndarray

  def __call__(self, b: int) -> dict:
    info = self.dataset.info
    positions = int(b) * self.global_batch_size + self.offsets
    mask = positions < info.num_eval
    dtype = np.float32 if info.pixel_stats is None else np.uint8
    image = np.zeros((len(positions), *info.image_shape), dtype)
    label = np.zeros((len(positions),), np.int32)
    if mask.any():
      batch = self.dataset.eval_batch(positions[mask])
      image[mask], label[mask] = batch['image'], batch['label']
    return {'image': image, 'label': label, 'mask': mask}


def _batch_bytes(info: DatasetInfo, rows: int) -> int:
  """Bytes of a batch of `rows` images (uint8 when normalised on the device)."""
  per_value = 1 if info.pixel_stats is not None else 4
  return rows * (int(np.prod(info.image_shape)) * per_value + 64)  # + label, offset, mask


def _prefetch(config) -> int:
  return int(config.get('prefetch', 2))


def train_iterator(config, *, global_batch_size: int, start_step: int = 0,
                   seed: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Yields this process's training batches, from `start_step` on, forever.

  Each batch is `{'image', 'label'}` (`label` int32 `(local,)`; ImageNet adds
  `rgb_offset`) with `local = global_batch_size // process_count` rows. Batch
  `s` is a pure function of (config, global_batch_size, seed, s): see the
  module docstring. The process's share is rows `[process_index * local,
  (process_index + 1) * local)` of the global batch. Close the iterator to
  stop its data workers.

  Raises:
    DatasetNotPreparedError: a tfds dataset is not prepared in `data_dir`.
    ValueError: inconsistent sizes, indices or seed.
  """
  _check_seed(seed)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  local = _local_batch_size(global_batch_size, process_index, process_count)
  dataset = _build(config)
  make = _TrainBatch(dataset, seed=seed, global_batch_size=global_batch_size,
                     positions=np.arange(process_index * local, (process_index + 1) * local),
                     augment=bool(config.get('augment', True)))
  loader.check_shared_memory(_batch_bytes(dataset.info, local), dataset.workers)
  return loader.iterate(make, start_step, loader.ENDLESS, workers=dataset.workers,
                        prefetch=_prefetch(config), worker_env=dataset.worker_env)


def eval_passes(config, *, global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> loader.Passes:
  """Passes over the evaluation split: each `passes()` yields one (see `eval_iterator`).

  ImageNet's data workers are started at the first pass and kept for the next
  ones (a run evaluates every epoch); `passes.close()` stops them.

  Raises:
    DatasetNotPreparedError: a tfds dataset is not prepared in `data_dir`.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  dataset = _build(config)
  num_batches = -(-dataset.info.num_eval // global_batch_size)
  make = _EvalBatch(dataset, global_batch_size,
                    np.arange(process_index * local, (process_index + 1) * local))
  loader.check_shared_memory(_batch_bytes(dataset.info, local), dataset.workers)
  return loader.Passes(make, num_batches, workers=dataset.workers,
                       prefetch=_prefetch(config), worker_env=dataset.worker_env)


def eval_iterator(config, *, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Yields this process's share of one pass over the evaluation split.

  Global batch `b` holds examples `[b * global_batch_size, (b + 1) *
  global_batch_size)` in stored order; positions past the end are padding
  (zero images, label 0) with `mask` False. Every batch has the same shape
  (`local = global_batch_size // process_count` rows) and every example appears
  exactly once across all processes, so `sum(metric * mask)` summed over
  processes is exact. Each batch is `{'image', 'label', 'mask'}`. For
  repeated passes, `eval_passes` keeps the data workers between them.

  Raises:
    DatasetNotPreparedError: a tfds dataset is not prepared in `data_dir`.
  """
  passes = eval_passes(config, global_batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count)
  return _one_pass(passes)


def _one_pass(passes: loader.Passes) -> Iterator[dict]:
  try:
    yield from passes()
  finally:
    passes.close()
