"""A byte-level text corpus that ships with every Python: its own standard library's sources.

The language-model task (`tasks.language_model`) trains on the `.py` files
directly in the running interpreter's `Lib` folder (`sysconfig`'s "stdlib"
path; subfolders such as `test/`, `asyncio/` or `json/` are left out, and
so is any file named `test*.py`), read in sorted file-name order. Each file
goes to one split by a hash of its name (`split_of`: SHA-256, 1 in 10
validation, 1 in 10 test), so a file never straddles two splits and the
assignment is the same on every machine and Python version.

Tokens are bytes (0..255) plus `BOS` (256), which starts every file: a
split is the concatenation of `[BOS] + bytes(file)` over its files.
Predicting every token after the first predicts every byte of the split
exactly once (a BOS is never a target that counts), so bits per byte are
the summed negative log2-likelihood of the bytes over their number.

`Corpus.sha256` digests the names and contents of every file in order: it
differs exactly when the data differ (another Python version, a patched
stdlib). The trainer records it with the Python version in the run's
`config.json` and refuses to resume on other data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import platform
import sysconfig

import numpy as np

BOS = 256
VOCAB_SIZE = 257
SPLITS = ("train", "validation", "test")


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard library folder (`Lib`)."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def corpus_files(lib_dir: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """The corpus's files: `lib_dir/*.py` (not subfolders), tests excluded, by name.

  Raises `FileNotFoundError` naming the folder when it holds none (an
  interpreter installed without its sources).
  """
  folder = pathlib.Path(lib_dir) if lib_dir is not None else stdlib_dir()
  files = sorted((p for p in folder.glob("*.py")
                  if p.is_file() and not p.name.startswith("test")), key=lambda p: p.name)
  if not files:
    raise FileNotFoundError(
        f"No Python sources in {folder}: the language-model corpus is the standard library's "
        "top-level .py files. Use an interpreter installed with its sources (python.org, "
        "pyenv, conda and Debian's python3 all have them).")
  return files


def split_of(name: str) -> str:
  """'validation' or 'test' for 1 file name in 10 each, else 'train' (by SHA-256 of the name)."""
  bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 10
  return {0: "validation", 1: "test"}.get(bucket, "train")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The three splits as token streams (int32; `BOS` opens every file) and their provenance."""
  train: np.ndarray
  validation: np.ndarray
  test: np.ndarray
  files: dict[str, tuple[str, ...]]  # split -> file names, in order
  sha256: str
  python_version: str

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS:
      raise ValueError(f"split {name!r} is unknown: use one of {SPLITS}.")
    return getattr(self, name)

  def num_bytes(self, name: str) -> int:
    """The bytes of a split (its tokens less one BOS per file): what bits per byte divide by."""
    return int(self.split(name).size) - len(self.files[name])

  def record(self) -> dict[str, object]:
    """What the run's config record keeps of the data, checked on resume."""
    return {"corpus_sha256": self.sha256, "python_version": self.python_version,
            **{f"{s}_bytes": self.num_bytes(s) for s in SPLITS}}


def build(lib_dir: str | pathlib.Path | None = None,
          python_version: str | None = None) -> Corpus:
  """Reads the corpus (`corpus_files`) into its splits: the same files give the same arrays."""
  digest = hashlib.sha256()
  parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  names: dict[str, list[str]] = {s: [] for s in SPLITS}
  bos = np.array([BOS], np.int32)
  for path in corpus_files(lib_dir):
    data = path.read_bytes()
    digest.update(path.name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    split = split_of(path.name)
    parts[split] += [bos, np.frombuffer(data, np.uint8).astype(np.int32)]
    names[split].append(path.name)
  for split in SPLITS:
    if not names[split]:
      raise ValueError(f"The corpus's {split} split is empty ({lib_dir}): it needs more files.")
  return Corpus(**{s: np.concatenate(parts[s]) for s in SPLITS},
                files={s: tuple(names[s]) for s in SPLITS}, sha256=digest.hexdigest(),
                python_version=python_version or platform.python_version())


@functools.lru_cache(maxsize=4)
def load(lib_dir: str | None = None) -> Corpus:
  """`build(lib_dir)`, read once per process."""
  return build(lib_dir)
