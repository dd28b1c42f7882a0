"""Faults that must never lose or mix up a run's work (one test per case).

Each test starts from a copy of a short trained workdir (runlocal: tiny model,
checkpoints at steps 2 and 4) and asserts on the outcome, the message, and
that no checkpoint of the earlier run is deleted.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, load_config, xla_flags
from ovsw_jax.trainer import checkpointing, train, workdir


def runlocal(**fields):
  config = load_config("default", "runlocal")
  config.keep_checkpoints = 5
  config.eval_every_epochs = 1000  # evaluate at the last step only
  for key, value in fields.items():
    target = config
    *parents, leaf = key.split("__")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp("trained") / "wd"
  train.train_and_evaluate(runlocal(), str(path))
  return path


@pytest.fixture
def run_dir(trained, tmp_path):
  path = tmp_path / "wd"
  shutil.copytree(trained, path)
  return path


def steps_on_disk(path):
  return sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())


def listing(path):
  return sorted(str(p.relative_to(path)) for p in (path / "checkpoints").rglob("*"))


# 1. An incompatible config stops; a compatible change passes.
@pytest.mark.slow
@pytest.mark.parametrize("change,field", [
    (dict(optimizer="adam"), "optimizer"),
    (dict(model_kwargs__widths=(8, 8)), "model_kwargs.widths"),
    (dict(ovsw__sad=False), "ovsw.sad"),
    (dict(batch_size=16), "batch_size"),
    (dict(seed=1), "seed"),
])
def test_resume_with_an_incompatible_config_stops_and_deletes_nothing(run_dir, change, field):
  before = listing(run_dir)
  with pytest.raises(workdir.ConfigMismatchError, match=field) as e:
    train.train_and_evaluate(runlocal(num_train_steps=8, **change), str(run_dir))
  assert "new --workdir" in str(e.value) and "--allow_config_change" in str(e.value)
  assert listing(run_dir) == before


@pytest.mark.slow
def test_a_lower_learning_rate_and_a_longer_run_resume(run_dir, caplog):
  caplog.set_level("INFO")
  result = train.train_and_evaluate(runlocal(num_train_steps=6, learning_rate=0.01),
                                    str(run_dir))
  assert np.isfinite(result["eval_loss"])
  assert steps_on_disk(run_dir) == [2, 4, 6]
  assert "learning_rate: 0.1 -> 0.01" in caplog.text
  recorded = json.loads((run_dir / workdir.CONFIG_FILE).read_text())
  assert recorded["learning_rate"] == 0.01 and recorded["num_train_steps"] == 6


@pytest.mark.slow
def test_allow_config_change_continues(run_dir):
  result = train.train_and_evaluate(runlocal(num_train_steps=6, seed=3), str(run_dir),
                                    allow_config_change=True)
  assert np.isfinite(result["eval_loss"]) and steps_on_disk(run_dir) == [2, 4, 6]


@pytest.mark.slow
def test_a_record_from_before_a_field_existed_resumes(run_dir, caplog):
  # A workdir written by an older version lacks fields declared since: they
  # are taken as they are now, with a warning; a real change still stops.
  path = run_dir / workdir.CONFIG_FILE
  recorded = json.loads(path.read_text())
  del recorded["nesterov"], recorded["imagenet_decoder"]
  path.write_text(json.dumps(recorded))
  caplog.set_level("WARNING")
  result = train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  assert np.isfinite(result["eval_loss"]) and steps_on_disk(run_dir) == [2, 4, 6]
  assert "nesterov=False" in caplog.text and "imagenet_decoder='tf'" in caplog.text
  recorded = json.loads(path.read_text())
  del recorded["nesterov"]
  path.write_text(json.dumps(recorded))
  with pytest.raises(workdir.ConfigMismatchError, match="optimizer"):
    train.train_and_evaluate(runlocal(num_train_steps=8, optimizer="adam"), str(run_dir))


def test_a_checkpoint_of_another_state_is_an_error_not_a_restart(run_dir):
  # The config check would stop it first (the record, else the config saved in
  # the checkpoints): allowed past it, the checkpoint itself still refuses.
  (run_dir / workdir.CONFIG_FILE).unlink()
  with pytest.raises(checkpointing.CheckpointMismatchError, match="another state"):
    train.train_and_evaluate(runlocal(num_train_steps=8, model_kwargs__widths=(8, 8)),
                             str(run_dir), allow_config_change=True)
  assert steps_on_disk(run_dir) == [2, 4]


# 2. Foreign entries in checkpoints/ are ignored, named, and left alone.
@pytest.mark.slow
def test_foreign_entries_do_not_break_restore_or_save(run_dir, caplog):
  ckpt = run_dir / "checkpoints"
  (ckpt / "99").mkdir()
  (ckpt / "98").mkdir()
  (ckpt / "98" / "notes.txt").write_text("mine")
  shutil.copytree(ckpt / "4", ckpt / "97")
  shutil.rmtree(ckpt / "97" / "default")
  (ckpt / "README").write_text("not a step")
  caplog.set_level("INFO")
  train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  assert "Resumed from step 4" in caplog.text
  assert "Ignoring" in caplog.text and "99" in caplog.text
  assert (ckpt / "6").is_dir() and (ckpt / "98" / "notes.txt").read_text() == "mine"
  assert (ckpt / "99").is_dir() and (ckpt / "README").exists()


# 3. A diverged state is never checkpointed.
@pytest.mark.slow
def test_non_finite_state_is_never_saved(tmp_path):
  path = tmp_path / "wd"
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(runlocal(num_train_steps=40, learning_rate=1e8,
                                      warmup_epochs=0, checkpoint_every_steps=1), str(path))
  message = str(e.value)
  assert "step" in message and "--config.learning_rate" in message
  manager = checkpointing.create_manager(str(path / "checkpoints"))
  target = train.setup(runlocal()).initial_state
  for step in manager.all_steps():
    state = checkpointing.restore(manager, step, target)
    assert not train.nonfinite_leaves(state), f"checkpoint {step} holds NaN/Inf"
  saved = manager.all_steps()
  if saved:
    assert f"last finite checkpoint is step {max(saved)}" in message or "saved" in message
  else:
    assert "no checkpoint was written yet" in message or "nothing of that step" in message


def test_nonfinite_leaves_names_the_tensors():
  tree = {"a": np.ones(3, np.float32), "b": {"c": np.array([1.0, np.nan])},
          "i": np.array([1, 2])}
  assert train.nonfinite_leaves(tree) == ["['b']['c']"]


@pytest.mark.slow
def test_a_damaged_record_is_checked_against_the_config_in_the_checkpoints(run_dir, caplog):
  # A truncated config.json no longer lets a changed seed train on over the run:
  # the config saved in the newest checkpoint stands in for it.
  before = listing(run_dir)
  path = run_dir / workdir.CONFIG_FILE
  path.write_text(path.read_text()[:100])
  with pytest.raises(workdir.ConfigMismatchError, match="seed: 0 -> 1") as e:
    train.train_and_evaluate(runlocal(num_train_steps=8, seed=1), str(run_dir))
  assert "saved in the newest checkpoint" in str(e.value)
  assert listing(run_dir) == before
  caplog.set_level("WARNING")
  result = train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  assert np.isfinite(result["eval_loss"]) and steps_on_disk(run_dir) == [2, 4, 6]
  assert "is damaged: not valid JSON" in caplog.text
  assert json.loads(path.read_text())["num_train_steps"] == 6  # recorded again


# 4. One run per workdir.
def test_a_second_run_on_a_held_workdir_stops_at_once(run_dir):
  before = listing(run_dir)
  with workdir.lock(str(run_dir)):
    with pytest.raises(workdir.WorkdirLockedError, match="Another run is training"):
      train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  assert listing(run_dir) == before
  assert not (run_dir / workdir.LOCK_FILE).exists()  # released on exit


@pytest.mark.slow
def test_a_stale_lock_is_taken_over(run_dir):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (run_dir / workdir.LOCK_FILE).write_text(json.dumps(
      {"pid": dead.pid, "host": os.uname().nodename, "started": "earlier"}))
  train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  assert steps_on_disk(run_dir) == [2, 4, 6]


@pytest.mark.slow
def test_a_lock_of_another_host_is_taken_over_once_its_lease_expired(run_dir, caplog):
  (run_dir / workdir.LOCK_FILE).write_text(json.dumps(
      {"pid": 1, "host": "requeued-from", "token": "t", "started": "earlier",
       "renewed": time.time() - 3600, "lease_s": 60}))
  caplog.set_level("WARNING")
  train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  assert steps_on_disk(run_dir) == [2, 4, 6]
  assert "Taking over the lock" in caplog.text and "requeued-from" in caplog.text
  assert not (run_dir / workdir.LOCK_FILE).exists()


def test_a_renewed_lock_of_another_host_stops_the_run(run_dir):
  other = workdir.WorkdirLock(str(run_dir), lease_s=1.0, host="other-node", pid=1)
  other.acquire()
  other.start_renewal()  # every 0.25 s: the start sees it renewed within a lease
  try:
    with pytest.raises(workdir.WorkdirLockedError, match="other-node"):
      train.train_and_evaluate(runlocal(num_train_steps=6), str(run_dir))
  finally:
    other.release()
  assert steps_on_disk(run_dir) == [2, 4]


# 5. + 10. A damaged newest checkpoint is moved aside and its step saved again.
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["zero-filled", "flipped bytes"])
def test_damaged_checkpoint_is_moved_aside_and_replaced(run_dir, damage, caplog):
  data = [p for p in (run_dir / "checkpoints" / "4").rglob("*") if p.is_file()
          and p.parent.name == "d"]
  assert data
  for f in data:
    raw = bytearray(f.read_bytes())
    if damage == "zero-filled":
      raw = bytearray(len(raw))
    else:  # flip bytes in the middle of the array data: still parses
      for i in range(len(raw) // 3, min(len(raw) // 3 + 4000, len(raw))):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))
  caplog.set_level("INFO")
  train.train_and_evaluate(runlocal(), str(run_dir))
  assert "Resumed from step 2" in caplog.text
  assert (run_dir / "checkpoints" / "4.damaged").is_dir()
  assert steps_on_disk(run_dir) == [2, 4]  # step 4 trained and saved again
  # ... and the new step 4 restores (its digest matches).
  manager = checkpointing.create_manager(str(run_dir / "checkpoints"))
  restored = checkpointing.restore(manager, 4, train.setup(runlocal()).initial_state)
  assert int(restored.step) == 4


def test_digest_mismatch_is_detected(run_dir):
  manager = checkpointing.create_manager(str(run_dir / "checkpoints"))
  target = train.setup(runlocal()).initial_state
  state = checkpointing.restore(manager, 4, target)
  assert checkpointing.state_digest(state) == manager.metadata(4).custom_metadata[
      checkpointing.DIGEST_KEY]
  bias = state.params["linear"]["bias"].copy()
  bias[0] += 1.0
  state.params["linear"]["bias"] = bias
  assert checkpointing.state_digest(state) != manager.metadata(4).custom_metadata[
      checkpointing.DIGEST_KEY]


# 6. keep_checkpoints=0 would keep nothing.
def test_keep_no_checkpoints_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints"):
    train.train_and_evaluate(runlocal(keep_checkpoints=0), str(tmp_path / "wd"))


# 7. + 10. The command line: short messages, meaningful exit codes.
def cli(args, cwd, extra_env=None, preexec_fn=None, timeout=300):
  # This process's devices: the runs compile to the programs `trained` compiled here.
  env = dict(os.environ, XLA_FLAGS=xla_flags(),
             PYTHONPATH=str(ROOT), **(extra_env or {}))
  proc = subprocess.run(["timeout", "-k", "10", str(timeout), sys.executable, "-m",
                         "ovsw_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, preexec_fn=preexec_fn)
  return proc.returncode, proc.stdout + proc.stderr


RUNLOCAL = [f"--config={ROOT}/configs/default.py:runlocal", "--config.keep_checkpoints=5",
            "--config.eval_every_epochs=1000"]


@pytest.mark.slow
def test_cli_config_mismatch_is_one_message_and_exit_1(run_dir, tmp_path):
  rc, out = cli(RUNLOCAL + [f"--workdir={run_dir}", "--config.optimizer=adam"], tmp_path)
  assert rc == 1
  assert "error: The workdir" in out and "optimizer: 'sgd' -> 'adam'" in out
  assert "Traceback" not in out
  rc, out = cli(RUNLOCAL + [f"--workdir={run_dir}", "--config.optimizer=adam", "--verbose"],
                tmp_path)
  assert rc == 1 and "Traceback" in out  # the traceback on request


@pytest.mark.slow
def test_cli_fallback_from_a_zero_filled_checkpoint_is_quiet(run_dir, tmp_path):
  for f in (run_dir / "checkpoints" / "4").rglob("*"):
    if f.is_file():
      f.write_bytes(bytes(f.stat().st_size))
  rc, out = cli(RUNLOCAL + [f"--workdir={run_dir}"], tmp_path)
  assert rc == 0, out[-3000:]
  assert "Resumed from step 2" in out and "4.damaged" in out
  assert "Traceback" not in out
  assert len(out.splitlines()) < 200, f"{len(out.splitlines())} lines of output"


def _small_files():
  # A full disk, as a process sees it: writes past 64 KiB fail with EFBIG.
  import resource  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
def test_cli_failed_save_is_one_paragraph(tmp_path):
  # (A checkpoint's metadata file alone is larger than 64 KiB; TensorBoard's is not.)
  rc, out = cli(RUNLOCAL + [f"--workdir={tmp_path / 'wd'}"], tmp_path,
                preexec_fn=_small_files)
  assert rc == 1, out[-3000:]
  assert "error: Saving" in out and "failed" in out
  assert "Traceback" not in out
  assert len(out.splitlines()) < 200, f"{len(out.splitlines())} lines of output"
