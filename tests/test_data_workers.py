"""ImageNet's data worker processes (`data.loader`, grain): same batches, errors, exits.

On the tiny array_record dataset of `tiny_images`. Every batch is compared bitwise with
the one this process makes itself (`data_workers=0`): the worker count, the process's
rows of the global batch, the step a run resumes from and the evaluation passes kept
between evaluations change no value.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from helpers import ROOT, assert_batch_equal, take
from ovsw_jax.trainer import input_pipeline as ip
from ovsw_jax.trainer.data import loader, sources
import tiny_images

pytestmark = pytest.mark.slow  # starts worker processes (an interpreter and TensorFlow each)


@pytest.fixture(autouse=True)
def _fresh_caches():
  sources.clear_caches()
  yield
  sources.clear_caches()


def _config(data_dir, **kwargs):
  return ml_collections.ConfigDict(dict(
      dataset='imagenet2012', tfds_name=tiny_images.prepare(str(data_dir)),
      data_dir=str(data_dir), image_size=16, **kwargs))


def test_workers_make_the_batches_this_process_makes(tmp_path):
  """TensorFlow decoding in two workers; then, with PIL decoding (workers start faster
  without TensorFlow), one worker making the second process's rows from step 2, and
  evaluation passes over kept workers."""
  def here(decoder):
    config = _config(tmp_path, data_workers=0, imagenet_decoder=decoder)
    return (take(ip.train_iterator(config, global_batch_size=4, seed=4), 5),  # 1 step/epoch
            list(ip.eval_iterator(config, global_batch_size=4)))
  (train_tf, _), (train_pil, evals) = here('tf'), here('pil')
  two = _config(tmp_path, data_workers=2)
  for ours, theirs in zip(train_tf, take(ip.train_iterator(two, global_batch_size=4, seed=4),
                                          5)):
    assert_batch_equal(ours, theirs)
  rows = take(ip.train_iterator(_config(tmp_path, data_workers=1, imagenet_decoder='pil'),
                                 global_batch_size=4, seed=4, start_step=2, process_index=1,
                                 process_count=2), 3)
  for ours, theirs in zip(train_pil[2:], rows):
    assert_batch_equal({k: v[2:] for k, v in ours.items()}, theirs)
  # Passes over kept workers; a pass left midway (its workers stop), then a whole one.
  passes = ip.eval_passes(_config(tmp_path, data_workers=2, imagenet_decoder='pil'),
                          global_batch_size=4)
  try:
    for _ in range(2):
      got = list(passes())
      assert len(got) == len(evals) == 2
      for ours, theirs in zip(evals, got):
        assert_batch_equal(ours, theirs)
    first = passes()
    assert_batch_equal(evals[0], next(first))
    first.close()
    for ours, theirs in zip(evals, passes()):
      assert_batch_equal(ours, theirs)
  finally:
    passes.close()


def test_a_worker_error_reaches_the_training_process(tmp_path):
  dataset = ip._build(_config(tmp_path, data_workers=1, imagenet_decoder='pil'))  # pylint: disable=protected-access
  # A record of step 1's batch that step 0's batch does not hold.
  bad = int(np.setdiff1d(ip.global_batch_indices(7, 4, 1, 0),
                         ip.global_batch_indices(7, 4, 0, 0))[0])
  dataset.batches.train_source = tiny_images.FailingSource(dataset.batches.train_source, bad)
  make = ip._TrainBatch(dataset, seed=0, global_batch_size=4, positions=np.arange(4),  # pylint: disable=protected-access
                        augment=True)
  batches = loader.iterate(make, 0, 3, workers=1, prefetch=1)
  try:
    next(batches)
    with pytest.raises(OSError, match=f'record {bad} is unreadable'):
      next(batches)
  finally:
    batches.close()


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat') as f:
    return f.read().rsplit(')', 1)[1].split()[0] != 'Z'


def test_workers_ignore_stop_signals_and_exit_with_the_training_process(tmp_path):
  """SIGTERM is the training process's to handle (it saves, then stops its workers); a
  training process killed outright takes its workers with it."""
  tiny_images.prepare(str(tmp_path))
  script = textwrap.dedent(f'''
      import os, sys, time
      import ml_collections
      from ovsw_jax.trainer import input_pipeline as ip
      if __name__ == '__main__':
        config = ml_collections.ConfigDict(dict(
            dataset='imagenet2012', tfds_name='ovsw_tiny_images', data_dir={str(tmp_path)!r},
            image_size=16, data_workers=1, imagenet_decoder='pil'))
        batches = ip.train_iterator(config, global_batch_size=4)
        next(batches)
        print('ready', flush=True)
        time.sleep(600)
      ''')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / 'tests')]))
  proc = subprocess.Popen(['timeout', '-k', '5', '300', sys.executable, '-c', script],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  try:
    assert proc.stdout.readline().strip() == 'ready'
    python = int(subprocess.check_output(['pgrep', '-P', str(proc.pid)]).split()[0])
    workers = [int(p) for p in subprocess.check_output(['pgrep', '-P', str(python), '-f',
                                                        'multiprocessing.spawn']).split()]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGTERM)
    os.kill(workers[0], signal.SIGINT)
    time.sleep(1.0)
    assert _alive(workers[0]), 'a worker died of a stop signal'
    os.kill(python, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(workers[0]) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not _alive(workers[0]), 'a worker outlived the training process'
  finally:
    proc.kill()
    proc.wait()
