"""A fake `gs://` bucket for tests: what etils.epath and orbax reach through `gs://` URLs.

`install(root)` routes every `gs://BUCKET/KEY` that goes through `etils.epath`
(the trainer's, orbax's metadata, export's and the study's files) to
`ROOT/BUCKET/KEY`, through epath's own tf.io.gfile backend (as on a real
bucket with TensorFlow installed), and points orbax's TensorStore kvstore for
`gs://` (the arrays) at the same folder. Code that bypasses epath (the
built-in `open`, `os.path`, `pathlib`) does not reach the fake bucket: it fails,
or leaves a local folder named `gs:` in the working directory, which the
tests check for.

What stays out: TensorFlow's own C++ `gs://` file system (clu's TensorBoard
writer) cannot be redirected; the tests give TensorBoard a local folder.

`python tests/fake_object_store.py ROOT MODULE ARGS...` runs `python -m MODULE
ARGS...` with the fake installed (for command-line tests).
"""

from __future__ import annotations

import runpy
import sys
from unittest import mock

from etils.epath import backend as backend_lib

PREFIX = "gs://"


class _Gfile:
  """tf.io.gfile with `gs://` paths moved under a local root (and moved back in results)."""

  def __init__(self, gfile, root: str):
    self._g, self._root = gfile, root.rstrip("/")

  def _to(self, path) -> str:
    path = str(path)
    return f"{self._root}/{path[len(PREFIX):]}" if path.startswith(PREFIX) else path

  def _back(self, path) -> str:
    path = str(path)
    return PREFIX + path[len(self._root) + 1:] if path.startswith(self._root + "/") else path

  def GFile(self, path, mode="r"):  # noqa: N802 (tf.io.gfile's name)
    return self._g.GFile(self._to(path), mode)

  def exists(self, path):
    return self._g.exists(self._to(path))

  def isdir(self, path):
    return self._g.isdir(self._to(path))

  def listdir(self, path):
    return self._g.listdir(self._to(path))

  def glob(self, pattern):
    return [self._back(p) for p in self._g.glob(self._to(pattern))]

  def walk(self, top, **kwargs):
    for d, dirs, files in self._g.walk(self._to(top), **kwargs):
      yield self._back(d), dirs, files

  def makedirs(self, path):
    return self._g.makedirs(self._to(path))

  def mkdir(self, path):
    return self._g.mkdir(self._to(path))

  def rmtree(self, path):
    return self._g.rmtree(self._to(path))

  def remove(self, path):
    return self._g.remove(self._to(path))

  def rename(self, src, dst, overwrite=False):
    return self._g.rename(self._to(src), self._to(dst), overwrite=overwrite)

  def copy(self, src, dst, overwrite=False):
    return self._g.copy(self._to(src), self._to(dst), overwrite=overwrite)

  def stat(self, path):
    return self._g.stat(self._to(path))


class _Backend(backend_lib._TfBackend):  # pylint: disable=protected-access
  def __init__(self, root: str):
    self._root = root

  @property
  def gfile(self):
    return _Gfile(self.tf.io.gfile, self._root)


def patches(root: str) -> list:
  """The `mock.patch`es that make `gs://` a folder under `root` (start them, or enter them)."""
  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath
  from orbax.checkpoint._src.path import gcs_utils

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": f"{root}/{bucket}/{key}"}

  return [
      mock.patch.object(backend_lib, "tf_backend", _Backend(root)),
      mock.patch.object(gpath, "_is_tf_installed", lambda: True),
      mock.patch.object(gpath, "_is_zonal_gcs_bucket", lambda bucket: False),
      mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore),
      mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False),
  ]


def install(root: str) -> None:
  """Starts the patches for the rest of the process."""
  for patch in patches(root):
    patch.start()


if __name__ == "__main__":
  install(sys.argv[1])
  sys.argv = [sys.argv[2], *sys.argv[3:]]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
