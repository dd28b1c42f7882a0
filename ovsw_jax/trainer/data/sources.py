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
with the commands that prepare it. Before tfds is asked for a split,
`check_prepared` looks for the prepared files itself (`dataset_info.json`
listing the split, its shard files, the array_record format where random
access needs it), because tfds's own failures on a missing or partial dataset
are raw tracebacks that blame the wrong thing (an empty folder reads as "in
TFRECORD format", an empty `TFDS_DATA_DIR` as `KeyError: splits is empty`). The
check only reads: it never creates folders in the user's data dir. TensorFlow
and tfds are imported lazily, so the digits path never imports them.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import threading

import numpy as np

# ---------------------------------------------------------------------------
# Errors.


class DatasetNotPreparedError(RuntimeError):
  """A tfds dataset is not prepared in the data_dir; the message says how."""


_DEFAULT_DIR_HINT = '$TFDS_DATA_DIR or ~/tensorflow_datasets (tfds default)'


def prepare_instructions(name: str, data_dir: str | None, *,
                         random_access: bool = False, origin: str | None = None) -> str:
  """Returns the commands that prepare dataset `name` into `data_dir`.

  Why: tfds is called with `download=False` (offline it would retry for
  minutes), so the user must prepare the data once, on a machine with
  internet for CIFAR, or from the ILSVRC2012 tars for ImageNet.
  `random_access` datasets (read with `tfds.data_source`) must be built in the
  array_record format. `origin` says where `data_dir` came from (see
  `resolve_data_dir`).
  """
  where = data_dir or _DEFAULT_DIR_HINT
  if data_dir and origin:
    where = f'{data_dir} (from {origin})'
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
                  *, random_access: bool = False, origin: str | None = None):
  """The error for a dataset that is not there: the instructions, then what was wrong.

  `cause` is tfds's exception, or a string saying what `check_prepared` found.
  """
  if isinstance(cause, BaseException):
    cause = f'tfds said: {type(cause).__name__}: {str(cause).strip()[:500]}'
  else:
    cause = f'found: {cause}'
  text = prepare_instructions(name, data_dir, random_access=random_access, origin=origin)
  return DatasetNotPreparedError(f'{text}\n({cause})')


# Exceptions tfds raises, with download=False, when the data is not there:
# AssertionError ("could not find data in ...") from tfds.load/as_dataset,
# NotImplementedError from tfds.data_source when the folder is empty or holds
# tfrecord files (random access needs array_record), FileNotFoundError from
# partially present folders, KeyError ("splits is empty") from a dataset with
# no splits. `check_prepared` catches these shapes first; this is the backstop.
_NOT_PREPARED_ERRORS = (AssertionError, NotImplementedError, FileNotFoundError, KeyError)


# ---------------------------------------------------------------------------
# Is a tfds dataset prepared? Read-only checks of the data dir.

# Formats `tfds.data_source` reads by index.
RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')
_VERSION = re.compile(r'^\d+\.\d+\.\d+$')
_DEFAULT_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


def resolve_data_dir(data_dir: str | None) -> tuple[str, str]:
  """The data dir tfds reads, and where it came from: (path, origin).

  As tfds decides: `data_dir` when given (`config.data_dir`), else
  `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`. The result is passed to tfds
  explicitly, so the check and the read look at the same folder even if
  `TFDS_DATA_DIR` changed after tfds was imported (tfds reads it once).
  """
  if data_dir:
    return os.path.expanduser(os.fspath(data_dir)), 'config.data_dir'
  env = os.environ.get('TFDS_DATA_DIR')
  if env:
    return os.path.expanduser(env), '$TFDS_DATA_DIR'
  return os.path.join(os.path.expanduser('~'), 'tensorflow_datasets'), "tfds's default"


def parse_tfds_name(name: str) -> tuple[str, str | None, str | None] | None:
  """Splits `name[/config][:version]` into (name, config, version).

  Returns None for names this module does not check itself (a namespace such
  as `huggingface:x`, or keyword arguments); tfds then reports on its own.

  >>> parse_tfds_name('imagenet2012')
  ('imagenet2012', None, None)
  >>> parse_tfds_name('imagenet2012_subset/10pct:5.0.0')
  ('imagenet2012_subset', '10pct', '5.0.0')
  >>> parse_tfds_name('huggingface:mnist') is None
  True
  """
  base, version = name, None
  if ':' in name:
    base, version = name.rsplit(':', 1)
    if not _VERSION.match(version):
      return None
  parts = base.split('/')
  if len(parts) > 2 or not all(re.fullmatch(r'[\w.-]+', p) for p in parts):
    return None
  return parts[0], (parts[1] if len(parts) == 2 else None), version


def split_names(split: str) -> list[str]:
  """The split names a split expression reads: 'train[:10%]+test' -> ['train', 'test']."""
  return [part.split('[', 1)[0].strip() for part in split.split('+')]


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split('.'))


def _shard_files(info: dict, split: dict, builder: str, file_format: str) -> list[str] | None:
  """The file names of one split's shards, from its `dataset_info.json` entry.

  None when the entry does not say (no shard lengths, or a template with
  fields other than tfds's four): the files are then not checked.
  """
  lengths = split.get('shardLengths')
  if not lengths:
    return None
  n = len(lengths)
  template = split.get('filepathTemplate') or _DEFAULT_TEMPLATE
  names = []
  for i in range(n):
    fname = (template.replace('{DATASET}', info.get('name') or builder)
             .replace('{SPLIT}', split.get('name', ''))
             .replace('{FILEFORMAT}', file_format)
             .replace('{SHARD_X_OF_Y}', f'{i:05d}-of-{n:05d}'))
    if '{' in fname:
      return None
    names.append(fname)
  return names


def find_problem(data_dir: str, builder: str, config: str | None, version: str | None,
                 splits: list[str], *, random_access: bool) -> str | None:
  """What keeps the dataset from being read, or None if it looks prepared.

  Reads only: `<data_dir>/<builder>[/<config>]/<version>/dataset_info.json`
  must be valid JSON listing every split in `splits`, the splits' shard files
  (as the JSON names them) must exist, and a `random_access` dataset must be
  in a format `tfds.data_source` reads (array_record). `version` None takes
  the newest version folder present. Pure apart from reading the folder.
  """
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    return f'the data dir {root} does not exist'
  dataset_dir = root / builder / config if config else root / builder
  if not dataset_dir.is_dir():
    return f'{dataset_dir} does not exist'
  entries = sorted(p.name for p in dataset_dir.iterdir())
  versions = sorted((e for e in entries if _VERSION.match(e) and (dataset_dir / e).is_dir()),
                    key=_version_key)
  incomplete = [e for e in entries if 'incomplete' in e]
  interrupted = (f'; {", ".join(incomplete)} is left from an interrupted build'
                 if incomplete else '')
  if version is None:
    if not versions:
      return f'{dataset_dir} holds no version folder{interrupted}'
    version = versions[-1]
  version_dir = dataset_dir / version
  if not version_dir.is_dir():
    found = f' (found: {", ".join(versions)})' if versions else ''
    return f'{version_dir} does not exist{found}{interrupted}'
  info_path = version_dir / 'dataset_info.json'
  if not info_path.is_file():
    return (f'{version_dir} has no dataset_info.json: an empty or partial folder, '
            f'not a finished build{interrupted}')
  try:
    info = json.loads(info_path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    return f'{info_path} cannot be read as JSON ({type(e).__name__}: {e})'
  if not isinstance(info, dict):
    return f'{info_path} is not a tfds dataset_info.json (not a JSON object)'
  listed = info.get('splits')
  if not isinstance(listed, list) or not listed:
    return f'{info_path} lists no splits: the build did not finish'
  by_name = {sp.get('name'): sp for sp in listed if isinstance(sp, dict)}
  missing = [sp for sp in splits if sp not in by_name]
  if missing:
    return (f'{info_path} has no split {", ".join(map(repr, missing))} '
            f'(it lists {", ".join(map(repr, sorted(map(str, by_name))))})')
  file_format = info.get('fileFormat') or 'tfrecord'
  if random_access and file_format not in RANDOM_ACCESS_FORMATS:
    return (f'{version_dir} is in the {file_format} format; reading examples by '
            'index needs array_record')
  for sp in splits:
    files = _shard_files(info, by_name[sp], builder, file_format)
    absent = [f for f in files or () if not (version_dir / f).is_file()]
    if absent:
      return (f'{version_dir} lacks {len(absent)} of the {len(files)} files of split '
              f'{sp!r} (first: {absent[0]}): a partial copy or build')
  return None


def tfds_is_mocked(tfds) -> bool:
  """True when tfds's dataset builder is patched, as `tfds.testing.mock_data` does.

  Under the mock, tfds serves generated examples whatever the data dir holds,
  so the file checks do not apply. Detected by where the builder's methods
  come from: tfds's own are defined in `tensorflow_datasets.core`.
  """
  cls = tfds.core.DatasetBuilder
  for attr in ('__init__', 'as_dataset', 'as_data_source', 'download_and_prepare'):
    module = getattr(getattr(cls, attr, None), '__module__', None) or ''
    if not module.startswith('tensorflow_datasets.core'):
      return True
  return False


def _registered_version(tfds, builder: str, config: str | None) -> str | None:
  """The version tfds reads for a dataset defined in code, or None for other names.

  Looks the builder class up in tfds's registry (no files are touched);
  a config of its own version wins over the class's.
  """
  try:
    cls = tfds.builder_cls(builder)
  except Exception:  # pylint: disable=broad-except  # Not in the registry: read-only files.
    return None
  configs = getattr(cls, 'BUILDER_CONFIGS', None) or []
  if configs:
    wanted = config or getattr(cls, 'DEFAULT_BUILDER_CONFIG_NAME', None) or configs[0].name
    for c in configs:
      if c.name == wanted and getattr(c, 'version', None):
        return str(c.version)
  version = getattr(cls, 'VERSION', None)
  return str(version) if version else None


def check_prepared(tfds, name: str, split: str, data_dir: str | None, *,
                   random_access: bool = False) -> str | None:
  """Raises `DatasetNotPreparedError` unless `split` of `name` is prepared; returns the data dir.

  Why: asked for a dataset that is not there, tfds fails with tracebacks that
  point elsewhere, and some of its calls leave empty folders behind. This
  looks at the files first (`find_problem`), without creating anything.
  Skipped (returning `data_dir` as given) under `tfds.testing.mock_data`,
  for remote data dirs (`gs://...`) and for names `parse_tfds_name` does not
  parse; tfds's own errors are then mapped to the same error.

  Returns:
    The data dir to pass to tfds (`resolve_data_dir`), or `data_dir` when the
    check was skipped.
  """
  if tfds_is_mocked(tfds) or (data_dir and '://' in str(data_dir)):
    return data_dir
  resolved, origin = resolve_data_dir(data_dir)
  parsed = parse_tfds_name(name)
  if parsed is None or '://' in resolved:
    return data_dir
  builder, config, version = parsed
  if version is None:
    version = _registered_version(tfds, builder, config)
  problem = find_problem(resolved, builder, config, version, split_names(split),
                         random_access=random_access)
  if problem:
    raise _not_prepared(name, resolved, problem, random_access=random_access, origin=origin)
  return resolved


# ---------------------------------------------------------------------------
# TensorFlow set-up.

_TF_LOCK = threading.Lock()
_TF_READY = False


def import_tensorflow():
  """Imports TensorFlow with it kept off the accelerators; returns the module.

  Why: tf.data only reads and decodes here; if TensorFlow saw the GPUs it
  would reserve their memory, which JAX needs.
  """
  global _TF_READY
  with _TF_LOCK:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not _TF_READY:
      try:
        tf.config.set_visible_devices([], 'GPU')
        tf.config.set_visible_devices([], 'TPU')
      except (RuntimeError, ValueError):
        pass  # Already initialised (or no such device type): nothing to hide.
      _TF_READY = True
  return tf


def import_tfds():
  """Imports tensorflow_datasets, TensorFlow first (`import_tensorflow`)."""
  import_tensorflow()
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
  data_dir = check_prepared(tfds, name, split, data_dir)
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
  data_dir = check_prepared(tfds, name, split, data_dir, random_access=True)
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
