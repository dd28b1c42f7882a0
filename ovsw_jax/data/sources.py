"""Where the examples come from: digits, CIFAR and ImageNet.

* `load_digits_split`: scikit-learn's bundled 8x8 digits (no download), with a
  fixed stratified test split that does not depend on any training seed.
* `load_tfds_arrays`: a whole CIFAR split in memory as uint8 NumPy arrays,
  read with `tfds.load(..., download=False)` (tfrecord, the default format of
  `tfds build`), so any example can be picked by index.
* `open_tfds_source`: ImageNet through `tfds.data_source(..., download=False)`
  (random access; needs the array_record format), so the step-keyed order works
  without loading 1.28M images.

tfds is never allowed to download: offline, its default `download=True` retries
the network for minutes. A missing dataset raises `DatasetNotPreparedError`
with the commands that prepare it. TensorFlow and tfds are imported lazily, so
the digits path never imports them.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

# ---------------------------------------------------------------------------
# Errors.


class DatasetNotPreparedError(RuntimeError):
  """A tfds dataset is not prepared in the data_dir; the message says how."""


_DEFAULT_DIR_HINT = '$TFDS_DATA_DIR or ~/tensorflow_datasets (tfds default)'


def prepare_instructions(name: str, data_dir: str | None, *,
                         random_access: bool = False) -> str:
  """Returns the commands that prepare dataset `name` into `data_dir`.

  Why: tfds is called with `download=False` (offline it would retry for
  minutes), so the user must prepare the data once, on a machine with
  internet for CIFAR, or from the ILSVRC2012 tars for ImageNet.
  `random_access` datasets (read with `tfds.data_source`) must be built in the
  array_record format.
  """
  where = data_dir or _DEFAULT_DIR_HINT
  target = data_dir or 'DIR'
  use = f'and pass --config.data_dir={target}.'
  if random_access:
    head = (f'Dataset {name!r} is not prepared in array_record format in {where}. '
            'The pipeline reads its examples by index (tfds.data_source), which '
            'needs --file_format=array_record.\n')
    if name.startswith('imagenet'):
      return head + (
          'ImageNet cannot be downloaded by tfds. Download '
          'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) '
          'into a folder MANUAL, then run\n'
          f'  tfds build {name} --manual_dir=MANUAL --data_dir={target} '
          f'--file_format=array_record\n{use}')
    return head + (f'Run\n  tfds build {name} --data_dir={target} '
                   f'--file_format=array_record\n{use}')
  return (
      f'Dataset {name!r} is not prepared in {where}.\n'
      'On a machine with internet, run\n'
      f'  python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{target}').download_and_prepare()\"\n"
      f'or\n  tfds build {name} --data_dir={target}\n'
      f'then copy {target} to this machine if needed {use}')


def _not_prepared(name: str, data_dir: str | None, cause: BaseException | str,
                  *, random_access: bool = False):
  if isinstance(cause, BaseException):
    cause = f'{type(cause).__name__}: {str(cause).strip()[:500]}'
  return DatasetNotPreparedError(
      f'{prepare_instructions(name, data_dir, random_access=random_access)}\n'
      f'(tfds said: {cause})')


# Exceptions tfds raises, with download=False, when the data is not there:
# AssertionError ("could not find data in ...") from tfds.load/as_dataset,
# NotImplementedError from tfds.data_source when the folder is empty or holds
# tfrecord files (random access needs array_record), FileNotFoundError from
# partially present folders.
_NOT_PREPARED_ERRORS = (AssertionError, NotImplementedError, FileNotFoundError)


# ---------------------------------------------------------------------------
# TensorFlow set-up.

_TF_LOCK = threading.Lock()
_TF_READY = False


def import_tfds():
  """Imports tensorflow_datasets with TensorFlow kept off the accelerators.

  Why: tf.data only reads files here; if TensorFlow saw the GPUs it would
  reserve their memory, which JAX needs.
  """
  global _TF_READY
  with _TF_LOCK:
    if not _TF_READY:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        tf.config.set_visible_devices([], 'GPU')
        tf.config.set_visible_devices([], 'TPU')
      except (RuntimeError, ValueError):
        pass  # Already initialised (or no such device type): nothing to hide.
      _TF_READY = True
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


# ---------------------------------------------------------------------------
# Digits.

DIGITS_TEST_PER_CLASS = 36  # 10 classes -> 360 test, 1437 train examples.
DIGITS_SPLIT_SEED = 20240705  # Fixed: the split never depends on the run seed.


@functools.lru_cache(maxsize=1)
def load_digits_split():
  """Returns the fixed digits split, images on the [0, 1] scale.

  Why: a dataset that ships with scikit-learn lets every test and smoke run
  train and evaluate with no download. The test split takes
  `DIGITS_TEST_PER_CLASS` (36) examples of each of the 10 classes, chosen by a
  fixed generator, so it is stratified and identical for every run; the
  remaining 1437 examples are the training split. Indices are kept in
  ascending order within each split.

  Returns:
    A dict with `train_images`, `test_images` (float32 `(N, 8, 8, 1)`, values
    in [0, 1]), `train_labels`, `test_labels` (int32), `train_index`,
    `test_index` (positions in `sklearn.datasets.load_digits()`).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = (digits.images.astype(np.float32) / 16.0)[..., None]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  test = []
  for k in np.unique(labels):
    members = np.flatnonzero(labels == k)
    test.append(rng.permutation(members)[:DIGITS_TEST_PER_CLASS])
  test_index = np.sort(np.concatenate(test))
  train_index = np.setdiff1d(np.arange(len(labels)), test_index)
  return dict(
      train_images=images[train_index], train_labels=labels[train_index],
      test_images=images[test_index], test_labels=labels[test_index],
      train_index=train_index, test_index=test_index)


# ---------------------------------------------------------------------------
# tfds.


@functools.lru_cache(maxsize=4)
def load_tfds_arrays(name: str, split: str, data_dir: str | None):
  """Reads a whole tfds split into memory: (uint8 images, int32 labels).

  Why: CIFAR is small (180 MB for the train split), and in memory any example
  can be taken by index, so the batch of a step is a pure function of the step.
  Files are read in their stored order (`shuffle_files=False`). Results are
  cached per (name, split, data_dir); `clear_caches` empties the cache.

  Raises:
    DatasetNotPreparedError: the split is not prepared in `data_dir`.
  """
  tfds = import_tfds()
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False,
                   shuffle_files=False, as_supervised=True)
  except _NOT_PREPARED_ERRORS as e:
    raise _not_prepared(name, data_dir, e) from e
  images, labels = [], []
  # A fixed batch size, not batch_size=-1: under tfds.testing.mock_data the
  # number of examples is unknown and batch_size=-1 aborts the process.
  for image, label in tfds.as_numpy(ds.batch(8192)):
    images.append(np.asarray(image, np.uint8))
    labels.append(np.asarray(label, np.int32))
  if not images:
    raise _not_prepared(name, data_dir, f'split {split!r} is empty')
  images = np.concatenate(images)
  labels = np.concatenate(labels)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


@functools.lru_cache(maxsize=4)
def open_tfds_source(name: str, split: str, data_dir: str | None):
  """Opens a random-access tfds data source whose images stay encoded.

  Why: ImageNet does not fit in memory; `tfds.data_source` reads any example
  by index from array_record files. Images are returned as JPEG bytes
  (`SkipDecoding`) and decoded by PIL in the pipeline's threads, so decoding
  is the same on every host whether or not OpenCV is installed.

  Raises:
    DatasetNotPreparedError: the split is not prepared (in array_record format)
      in `data_dir`.
  """
  tfds = import_tfds()
  try:
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False,
        decoders={'image': tfds.decode.SkipDecoding()})
    num = len(source)
  except _NOT_PREPARED_ERRORS as e:
    raise _not_prepared(name, data_dir, e, random_access=True) from e
  if num == 0:
    raise _not_prepared(name, data_dir, f'split {split!r} is empty',
                        random_access=True)
  return source


def clear_caches() -> None:
  """Forgets the in-memory splits and open sources (tests, or to free memory)."""
  load_tfds_arrays.cache_clear()
  open_tfds_source.cache_clear()
