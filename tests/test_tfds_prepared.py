"""A tfds dataset that is not prepared: every shape gets the instructions, and nothing is created.

Each case builds a data dir in `tmp_path` the way a user's can look (empty,
given through `$TFDS_DATA_DIR` or `config.data_dir`, an interrupted build, an
empty version folder, a damaged or split-less `dataset_info.json`, a missing
split or shard, the wrong file format or version) and asserts that reading it
raises `DatasetNotPreparedError` with the `tfds build` command and what was
found, and that the data dir holds exactly what it held before.
"""

import json
import os

import ml_collections
import pytest
import tensorflow_datasets as tfds

from ovsw_jax.trainer import input_pipeline as ip
from ovsw_jax.trainer.data import sources

from helpers import ROOT, module_command

IMAGENET = ("imagenet2012", "5.1.0")  # the version this tfds reads
CIFAR = ("cifar10", "3.0.2")


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  sources.clear_caches()
  yield
  sources.clear_caches()


def listing(root):
  """Every path under `root`, relative, sorted (folders included)."""
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def write_prepared(data_dir, name, version, splits, *, file_format="array_record",
                   shards=2, make_files=True):
  """A prepared-looking dataset: dataset_info.json and (empty) shard files."""
  version_dir = data_dir / name / version
  version_dir.mkdir(parents=True)
  info = {"name": name, "version": version, "fileFormat": file_format,
          "splits": [{"name": s, "shardLengths": ["3"] * shards, "numBytes": "1",
                      "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}
                     for s in splits]}
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  if make_files:
    for s in splits:
      for i in range(shards):
        (version_dir / f"{name}-{s}.{file_format}-{i:05d}-of-{shards:05d}").write_bytes(b"")
  return version_dir


def assert_not_prepared(read, data_dir, name, *found):
  """`read()` raises the instructions and what was found, and creates nothing in `data_dir`."""
  before = listing(data_dir) if data_dir.exists() else None
  with pytest.raises(ip.DatasetNotPreparedError) as error:
    read()
  message = str(error.value)
  assert f"tfds build {name}" in message, message
  assert str(data_dir) in message, message
  for text in found:
    assert text in message, message
  after = listing(data_dir) if data_dir.exists() else None
  assert after == before, "the check changed the data dir"
  return message


def imagenet_info(data_dir=None):
  config = ml_collections.ConfigDict(dict(dataset="imagenet2012", image_size=24))
  if data_dir is not None:
    config.data_dir = str(data_dir)
  return lambda: ip.get_info(config)


def cifar_info(data_dir=None):
  config = ml_collections.ConfigDict(dict(dataset="cifar10"))
  if data_dir is not None:
    config.data_dir = str(data_dir)
  return lambda: ip.get_info(config)


# ---------------------------------------------------------------------------
# The shapes of "not prepared".


def test_empty_dir_via_tfds_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  message = assert_not_prepared(imagenet_info(), tmp_path, "imagenet2012",
                                "(from $TFDS_DATA_DIR)", "--file_format=array_record",
                                f"{tmp_path / 'imagenet2012'} does not exist")
  assert "KeyError" not in message and "TFRECORD" not in message
  assert_not_prepared(cifar_info(), tmp_path, "cifar10", "(from $TFDS_DATA_DIR)")
  assert listing(tmp_path) == []


def test_empty_dir_via_config_data_dir(tmp_path):
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "(from config.data_dir)", "--manual_dir=MANUAL")
  assert_not_prepared(cifar_info(tmp_path), tmp_path, "cifar10", "download_and_prepare()")
  assert listing(tmp_path) == []


def test_data_dir_that_does_not_exist_is_not_created(tmp_path):
  missing = tmp_path / "nowhere"
  assert_not_prepared(imagenet_info(missing), missing, "imagenet2012",
                      f"the data dir {missing} does not exist")
  assert not missing.exists()


def test_interrupted_build(tmp_path):
  partial = tmp_path / "imagenet2012" / "incomplete.X1Y2_5.1.0"
  partial.mkdir(parents=True)
  (partial / "imagenet2012-train.array_record-00000-of-01024").write_bytes(b"x")
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "incomplete.X1Y2_5.1.0 is left from an interrupted build")


def test_empty_version_folder(tmp_path):
  # What an earlier tfds call can leave behind; tfds itself then blames the TFRECORD format.
  (tmp_path / "imagenet2012" / "5.1.0").mkdir(parents=True)
  message = assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                                "5.1.0 has no dataset_info.json")
  assert "TFRECORD" not in message


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\udcff"])
def test_damaged_dataset_info(tmp_path, text):
  version_dir = tmp_path / "imagenet2012" / "5.1.0"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(text, errors="surrogateescape")
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "dataset_info.json")


@pytest.mark.parametrize("info", [{"name": "imagenet2012", "splits": []},
                                  {"name": "imagenet2012"}])
def test_dataset_info_without_splits(tmp_path, info):
  version_dir = tmp_path / "imagenet2012" / "5.1.0"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "lists no splits")


def test_a_split_is_missing(tmp_path):
  write_prepared(tmp_path, *IMAGENET, ["train"])
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "has no split 'validation' (it lists 'train')")
  write_prepared(tmp_path, *CIFAR, ["train"], file_format="tfrecord")
  assert_not_prepared(lambda: sources.load_tfds_arrays("cifar10", "test", str(tmp_path)),
                      tmp_path, "cifar10", "has no split 'test' (it lists 'train')")


def test_shard_files_are_missing(tmp_path):
  version_dir = write_prepared(tmp_path, *IMAGENET, ["train", "validation"])
  (version_dir / "imagenet2012-validation.array_record-00001-of-00002").unlink()
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "lacks 1 of the 2 files of split 'validation'",
                      "imagenet2012-validation.array_record-00001-of-00002")


def test_imagenet_in_tfrecord_format(tmp_path):
  write_prepared(tmp_path, *IMAGENET, ["train", "validation"], file_format="tfrecord")
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "in the tfrecord format; reading examples by index needs array_record",
                      "--file_format=array_record")


def test_another_version_than_tfds_reads(tmp_path):
  write_prepared(tmp_path, "imagenet2012", "5.0.0", ["train", "validation"])
  assert_not_prepared(imagenet_info(tmp_path), tmp_path, "imagenet2012",
                      "5.1.0 does not exist (found: 5.0.0)")


# ---------------------------------------------------------------------------
# What passes, and the parts.


def test_prepared_looking_dataset_passes_the_check(tmp_path, monkeypatch):
  write_prepared(tmp_path, *IMAGENET, ["train", "validation"])
  for split in ("train", "validation", "train[:10%]+validation"):
    assert sources.check_prepared(tfds, "imagenet2012", split, str(tmp_path),
                                  random_access=True) == str(tmp_path)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert sources.check_prepared(tfds, "imagenet2012", "train", None,
                                random_access=True) == str(tmp_path)
  # Without random access (tfds.load) the format is tfds's business.
  write_prepared(tmp_path, *CIFAR, ["train", "test"], file_format="tfrecord")
  assert sources.check_prepared(tfds, "cifar10", "test", None) == str(tmp_path)


def test_mock_data_is_not_checked(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
  assert not sources.tfds_is_mocked(tfds)
  with tfds.testing.mock_data(num_examples=4):
    assert sources.tfds_is_mocked(tfds)
    info = imagenet_info()()
  assert (info.num_train, info.num_eval) == (4, 4)
  assert not (tmp_path / "empty").exists()


def test_resolve_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert sources.resolve_data_dir(None) == (
      str(tmp_path / "home" / "tensorflow_datasets"), "tfds's default")
  monkeypatch.setenv("TFDS_DATA_DIR", "~/data")
  assert sources.resolve_data_dir(None) == (str(tmp_path / "home" / "data"), "$TFDS_DATA_DIR")
  assert sources.resolve_data_dir(str(tmp_path)) == (str(tmp_path), "config.data_dir")


def test_split_names():
  assert sources.split_names("train") == ["train"]
  assert sources.split_names("train[:10%]+validation[5:]") == ["train", "validation"]


@pytest.mark.slow
def test_cli_with_an_empty_tfds_data_dir(tmp_path, monkeypatch):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  proc = module_command("ovsw_jax.main", [
      f"--config={ROOT}/configs/imagenet_r18.py:runlocal", f"--workdir={tmp_path}/wd"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0, out
  assert "tfds build imagenet2012 --manual_dir=MANUAL" in out
  assert "Traceback" not in out and "KeyError" not in out
  assert listing(data_dir) == []
