"""Batches made by a function of their key, computed ahead by grain.

`iterate(make, start, stop, workers=..., prefetch=...)` yields `make(k)` for
`k` in `range(start, stop)`, in order, each batch whole. Where it is made:

* `workers=0`: in this process, `prefetch` batches ahead in one grain thread
  (digits and CIFAR, whose batches are vectorised NumPy, and ImageNet when asked).
* `workers=W >= 1`: in W worker processes (grain's `mp_prefetch`, started with
  `spawn`). Worker `w` makes keys `start + w`, `start + w + W`, ... and grain
  hands them back in key order through shared memory (/dev/shm), so this
  process runs no Python per image: it receives finished arrays. Each worker
  keeps one finished batch waiting, so about 2W batches exist at a time.

`Passes` repeats a finite range (an evaluation every epoch) over one set of
workers, which wait between passes instead of being started again.

Since a batch is a pure function of its key, neither W nor `prefetch` changes
a value: which process made a batch, and when, is all they decide.

Worker processes (`_init_worker`):

* get `worker_env` in their environment before anything of theirs runs (the
  pipelines set TensorFlow's thread counts there, and hide GPUs from it);
* ignore SIGINT and SIGTERM: a stop signal is the training process's to
  handle (it saves a checkpoint, then closes the iterator, which stops the
  workers); a worker killed by the signal first would make the last steps
  fail instead of saving;
* exit when the training process is gone (killed with SIGKILL, it cannot stop
  them): a daemon thread checks the parent every second.

Close the iterator (`.close()`, or drop it) to stop the workers; an error in a
worker is raised here, with the worker's traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

_PARENT_POLL_S = 1.0
# Keys past any run's end: an endless sequence of batches.
ENDLESS = 2**62


def _grain(workers: int):
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  # grain 0.2.18 reads one of its absl flags without a guard when a worker
  # process starts (google/grain#1355, fixed after that release): a program
  # that never parsed absl flags (tests, notebooks, benchmarks) would fail.
  # Their default values are what such a program means.
  if workers and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return grain


def _exit_with_parent(parent: int) -> None:
  while True:
    time.sleep(_PARENT_POLL_S)
    if os.getppid() != parent:
      os._exit(0)  # pylint: disable=protected-access


def _init_worker(env: Mapping[str, str], index: int, count: int) -> None:
  """Runs first in each worker process (see the module docstring)."""
  del index, count
  os.environ.update(env)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                   name='ovsw-parent-watch').start()


SHARED_MEMORY = '/dev/shm'
# Batches of one iterator in shared memory at a time, per worker: one waiting
# in its queue, one being written.
BATCHES_PER_WORKER = 2


def check_shared_memory(batch_bytes: int, workers: int, path: str = SHARED_MEMORY) -> None:
  """Raises `ValueError` when `path` has no room for `workers`' batches (see the module).

  Why: a container's /dev/shm is 64 MB unless told otherwise (docker), and a
  worker that cannot place its batch there fails with a bare "No space left
  on device" from inside grain. Nothing is checked where `path` does not exist.
  """
  if workers <= 0:
    return
  try:
    stat = os.statvfs(path)
  except OSError:
    return
  free = stat.f_bavail * stat.f_frsize
  need = BATCHES_PER_WORKER * workers * batch_bytes
  if free < need:
    raise ValueError(
        f'{path} has {free / 2**20:,.0f} MiB free, and {workers} data workers keep about '
        f'{need / 2**20:,.0f} MiB of batches there ({BATCHES_PER_WORKER} of '
        f'{batch_bytes / 2**20:,.1f} MiB each). Give it more room (docker run --shm-size=, '
        'a Kubernetes memory-backed emptyDir at /dev/shm), or set fewer '
        '--config.data_workers (0 makes the batches in the training process).')


def _check(workers: int, prefetch: int) -> None:
  if workers < 0 or prefetch < 0:
    raise ValueError(f'workers and prefetch must be >= 0, got {workers}, {prefetch}')


def dataset(make: Callable[[int], Any], start: int, stop: int, *, workers: int,
            prefetch: int, worker_env: Mapping[str, str] | None = None):
  """The grain `IterDataset` of `make(k)` for `k` in `range(start, stop)` (see module)."""
  _check(workers, prefetch)
  grain = _grain(workers)
  ds = grain.MapDataset.range(start, stop).map(make)
  if workers == 0:
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                                prefetch_buffer_size=max(prefetch, 1)))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  return ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1),
      worker_init_fn=functools.partial(_init_worker, dict(worker_env or {})))


def iterate(make: Callable[[int], Any], start: int, stop: int, *, workers: int,
            prefetch: int, worker_env: Mapping[str, str] | None = None) -> Iterator[Any]:
  """Yields `make(k)` for `k` in `range(start, stop)` (see the module docstring).

  Arguments are checked here; the workers start at the first `next`.
  """
  return _run(dataset(make, start, stop, workers=workers, prefetch=prefetch,
                      worker_env=worker_env))


def _run(ds) -> Iterator[Any]:
  it = iter(ds)
  try:
    yield from it
  finally:
    it.close()


class _Cycle:
  """Key `k` -> `make(k % num)`: endless repetitions of one pass (picklable)."""

  def __init__(self, make: Callable[[int], Any], num: int):
    self.make, self.num = make, num

  def __call__(self, k: int) -> Any:
    return self.make(k % self.num)


class Passes:
  """Passes over `make(k)`, `k` in `range(num)`, each `passes()` an iterator of one.

  Why: starting worker processes costs seconds (an interpreter and
  TensorFlow each); an evaluation every epoch would pay that every time. With
  `workers >= 1` the workers start at the first pass and make the endless
  sequence pass 0, pass 1, ... (`make(k % num)`); each `passes()` takes the
  next `num` batches. Between passes each worker holds the next pass's first
  batches, done (about 2W batches), and waits: the next pass starts at once.
  A pass left unfinished (its iterator closed early) stops the workers; the
  next pass starts new ones. With `workers=0` each pass is a plain `iterate`.
  `close()` stops the workers.
  """

  def __init__(self, make: Callable[[int], Any], num: int, *, workers: int, prefetch: int,
               worker_env: Mapping[str, str] | None = None):
    self._make, self._num = make, num
    self._options = dict(workers=workers, prefetch=prefetch, worker_env=worker_env)
    _check(workers, prefetch)
    self._it = None

  def __call__(self) -> Iterator[Any]:
    if self._options['workers'] == 0:
      return iterate(self._make, 0, self._num, **self._options)
    return self._one_pass()

  def _one_pass(self) -> Iterator[Any]:
    if self._it is None:
      self._it = iter(dataset(_Cycle(self._make, self._num), 0, ENDLESS, **self._options))
    given = 0
    try:
      while given < self._num:
        item = next(self._it)
        given += 1
        yield item
    finally:
      if given < self._num:
        self.close()

  def close(self) -> None:
    if self._it is not None:
      it, self._it = self._it, None
      it.close()
