"""The workdir's lock lease and config record (`ovsw_jax.trainer.workdir`), as units: no training.

The lease runs on an injected clock, so expiry is tested without waiting for it.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import load_config
from ovsw_jax.trainer import workdir


class Clock:
  def __init__(self, now=1_000_000.0):
    self.now = now

  def __call__(self):
    return self.now


def held(path, clock, host, wait=False, **kwargs):
  lock = workdir.WorkdirLock(str(path), lease_s=60, clock=clock, host=host, wait=wait, **kwargs)
  lock.acquire()
  return lock


def owner_of(path):
  return json.loads((path / workdir.LOCK_FILE).read_text())


def test_another_host_takes_over_only_after_the_lease_ran_out(tmp_path, caplog):
  clock = Clock()
  first = held(tmp_path, clock, "node-a", pid=os.getpid())
  clock.now += 59  # not renewed, but its lease still runs: refused
  with pytest.raises(workdir.WorkdirLockedError, match="node-a") as e:
    held(tmp_path, clock, "node-b")
  assert "expires in 1 s" in str(e.value) and "delete" in str(e.value)
  clock.now += 2
  caplog.set_level("WARNING")
  second = held(tmp_path, clock, "node-b")
  assert owner_of(tmp_path)["host"] == "node-b"
  assert "not renewed for 61 s" in caplog.text
  # The first owner finds out at its next renewal, and leaves the new lock alone.
  assert not first.renew() and first.lost
  assert "taken over" in caplog.text
  first.release()
  assert owner_of(tmp_path)["host"] == "node-b"
  second.release()
  assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_a_renewed_lock_is_never_taken_over(tmp_path):
  clock = Clock()
  first = held(tmp_path, clock, "node-a")
  for _ in range(5):  # renewed every 40 s over 200 s: always within its 60 s lease
    clock.now += 40
    assert first.renew()
    with pytest.raises(workdir.WorkdirLockedError, match="renewed 0 s ago"):
      held(tmp_path, clock, "node-b")
  assert owner_of(tmp_path)["renewed"] == clock.now
  first.release()


def test_the_renewal_thread_keeps_a_short_lease_alive(tmp_path):
  with workdir.lock(str(tmp_path), lease_s=0.4) as lease:  # renewed every 0.1 s
    renewed = owner_of(tmp_path)["renewed"]
    time.sleep(0.6)  # longer than the lease
    assert owner_of(tmp_path)["renewed"] > renewed
    with pytest.raises(workdir.WorkdirLockedError):  # watched, and seen renewed
      held(tmp_path, time.time, "node-b", wait=True)
    assert not lease.lost
  assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_a_start_on_another_host_waits_for_the_lease_to_run_out(tmp_path, caplog):
  # A requeue on another node right after its owner was killed: no one renews
  # the lock any more, so the start waits out the lease and takes it over.
  clock = Clock()
  held(tmp_path, clock, "node-a")
  clock.now += 20
  naps = []

  def sleep(seconds):
    naps.append(seconds)
    clock.now += seconds
  caplog.set_level("WARNING")
  held(tmp_path, clock, "node-b", wait=True, sleep=sleep)
  assert owner_of(tmp_path)["host"] == "node-b"
  poll = 60 * workdir.RENEW_FRACTION / 4
  assert 40 < sum(naps) <= 40 + poll and set(naps) == {poll}
  assert "waiting up to its lease" in caplog.text and "Taking over" in caplog.text


def test_a_start_on_another_host_stops_when_the_lock_is_renewed(tmp_path):
  clock = Clock()
  first = held(tmp_path, clock, "node-a")
  naps = []

  def sleep(seconds):  # the owner renews during the third nap
    naps.append(seconds)
    clock.now += seconds
    if len(naps) == 3:
      first.renew()
  with pytest.raises(workdir.WorkdirLockedError, match="node-a"):
    held(tmp_path, clock, "node-b", wait=True, sleep=sleep)
  assert len(naps) == 3 and owner_of(tmp_path)["host"] == "node-a"


def test_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  clock = Clock()
  held(tmp_path, clock, "node-a", pid=dead.pid)
  with pytest.raises(workdir.WorkdirLockedError):  # another host: waits for the lease
    held(tmp_path, clock, "node-b")
  held(tmp_path, clock, "node-a")  # same host, process gone: at once
  assert owner_of(tmp_path)["pid"] == os.getpid()


def test_unreadable_and_old_format_locks_count_from_their_modification_time(tmp_path):
  path = tmp_path / workdir.LOCK_FILE
  path.write_text('{"pid": 12')  # cut short
  with pytest.raises(workdir.WorkdirLockedError, match="unreadable"):
    held(tmp_path, time.time, "node-b")
  os.utime(path, (time.time() - 120, time.time() - 120))
  held(tmp_path, time.time, "node-b").release()
  # A lock of a version without leases, from another host.
  path.write_text(json.dumps({"pid": 1, "host": "node-a", "started": "earlier"}))
  with pytest.raises(workdir.WorkdirLockedError, match="node-a"):
    held(tmp_path, time.time, "node-b")
  os.utime(path, (time.time() - 120, time.time() - 120))
  held(tmp_path, time.time, "node-b").release()


def test_a_bad_lease_length_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="lease_s"):
    workdir.WorkdirLock(str(tmp_path), lease_s=0)


# ------------------------------------------------------------- config.json


@pytest.fixture
def config():
  return load_config("default", "runlocal")


def damage(path):
  record = path / workdir.CONFIG_FILE
  record.write_text(record.read_text()[:40])  # truncated mid-write


def test_a_damaged_record_with_no_checkpoint_config_stops(tmp_path, config):
  workdir.check_config(str(tmp_path), config, has_checkpoint=False)
  damage(tmp_path)
  with pytest.raises(workdir.ConfigRecordDamagedError, match="damaged") as e:
    workdir.check_config(str(tmp_path), config, has_checkpoint=True,
                         checkpoint_config=lambda: None)
  assert "--allow_config_change" in str(e.value) and "new --workdir" in str(e.value)
  assert isinstance(e.value, workdir.ConfigMismatchError)  # main.py prints it alone
  workdir.check_config(str(tmp_path), config, has_checkpoint=True, allow_change=True,
                       checkpoint_config=lambda: None)
  recorded = json.loads((tmp_path / workdir.CONFIG_FILE).read_text())
  assert recorded == workdir.config_record(config)  # written again


def test_a_damaged_record_is_checked_against_the_checkpoint_config(tmp_path, config, caplog):
  saved = workdir.config_record(config)
  workdir.check_config(str(tmp_path), config, has_checkpoint=False)
  damage(tmp_path)
  config.seed = 7
  with pytest.raises(workdir.ConfigMismatchError, match="seed: 0 -> 7") as e:
    workdir.check_config(str(tmp_path), config, has_checkpoint=True,
                         checkpoint_config=lambda: saved)
  assert "saved in the newest checkpoint" in str(e.value)
  config.seed = 0
  caplog.set_level("WARNING")
  workdir.check_config(str(tmp_path), config, has_checkpoint=True,
                       checkpoint_config=lambda: saved)
  assert "comparing the config with the one saved in the newest checkpoint" in caplog.text


def test_a_missing_record_falls_back_to_the_checkpoint_config(tmp_path, config):
  saved = workdir.config_record(config)
  config.optimizer = "adam"
  with pytest.raises(workdir.ConfigMismatchError, match="optimizer"):
    workdir.check_config(str(tmp_path), config, has_checkpoint=True,
                         checkpoint_config=lambda: saved)
  assert not (tmp_path / workdir.CONFIG_FILE).exists()  # nothing written on a stop


def test_a_damaged_record_without_checkpoints_is_replaced(tmp_path, config):
  workdir.check_config(str(tmp_path), config, has_checkpoint=False)
  damage(tmp_path)
  workdir.check_config(str(tmp_path), config, has_checkpoint=False,
                       checkpoint_config=lambda: pytest.fail("no checkpoint to ask"))
  assert json.loads((tmp_path / workdir.CONFIG_FILE).read_text())["seed"] == config.seed
