"""Loads the reference vectors of the authors' PyTorch release (../shared/oracle beside the repo).

Tests call `load(name)`; the test is skipped when the oracle directory or the
file is absent (e.g. on a checkout without the shared folder).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

ORACLE_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "oracle"


def load(name: str) -> dict[str, np.ndarray]:
  """The arrays of `ORACLE_DIR / name` (".npz" optional) as a dict of numpy arrays."""
  if not ORACLE_DIR.is_dir():
    pytest.skip(f"oracle directory {ORACLE_DIR} is absent")
  path = ORACLE_DIR / (name if name.endswith(".npz") else name + ".npz")
  if not path.is_file():
    pytest.skip(f"oracle file {path} is absent")
  with np.load(path) as data:
    return {k: np.asarray(data[k]) for k in data.files}
