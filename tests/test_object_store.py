"""The trainer, export and the study's readers on an object store (`gs://`), and a scan
that keeps every workdir file behind `etils.epath`.

The bucket is `fake_object_store`: `gs://` URLs reach a local folder only
through epath (and orbax's TensorStore), never through the built-in `open`,
`os.path` or `pathlib`; the working directory is checked to stay empty (a
`gs:` folder there is the sign of a path that bypassed epath).
"""

import ast
import contextlib
import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from clu import metric_writers
from etils import epath

import fake_object_store
from helpers import ROOT, load_config
from ovsw_jax import export
from ovsw_jax.trainer import checkpointing, train, workdir
from ovsw_jax.repro import events, plots, snapshot, tables

BUCKET = "gs://bucket"
RUN = f"{BUCKET}/study/digits/ovsw/seed0"


def small_config(steps):
  config = load_config("default", "runlocal")
  config.num_train_steps = steps
  config.checkpoint_every_steps = 2
  return config


@contextlib.contextmanager
def object_store(root: pathlib.Path, cwd: pathlib.Path, tensorboard: pathlib.Path):
  """The fake bucket under `root`; TensorBoard (TF's own gs://) goes to a local folder."""
  cwd.mkdir(parents=True, exist_ok=True)
  local_tensorboard = functools.partial(metric_writers.SummaryWriter, str(tensorboard))
  with contextlib.ExitStack() as stack:
    for patch in fake_object_store.patches(str(root)):
      stack.enter_context(patch)
    stack.enter_context(pytest.MonkeyPatch.context()).setattr(
        metric_writers, "SummaryWriter", lambda logdir: local_tensorboard())
    stack.enter_context(contextlib.chdir(cwd))
    yield
  leftovers = sorted(p.name for p in cwd.iterdir())
  assert not leftovers, f"local files written for gs:// paths: {leftovers}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A run trained 2 steps on the bucket, then resumed to 4 over a torn metrics line."""
  base = tmp_path_factory.mktemp("store")
  root, cwd, tb = base / "objects", base / "cwd", base / "tb"
  root.mkdir()
  with object_store(root, cwd, tb):
    first = train.train_and_evaluate(small_config(2), RUN)
    assert np.isfinite(first["eval_loss"])
    metrics = epath.Path(RUN) / workdir.METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"step": 3, "kind": "tra')  # a torn write
    second = train.train_and_evaluate(small_config(4), RUN)
  return base, second


@pytest.fixture
def bucket(store):
  base, _ = store
  with object_store(base / "objects", base / "cwd", base / "tb"):
    yield base / "objects" / "bucket"


@pytest.mark.slow
def test_trainer_writes_and_resumes_its_run_on_the_object_store(store, bucket):
  _, result = store
  assert np.isfinite(result["eval_loss"])
  run = epath.Path(RUN)
  local = bucket / "study/digits/ovsw/seed0"
  assert sorted(p.name for p in (local / "checkpoints").iterdir()) == ["2", "4"]
  assert all(checkpointing.is_complete(run / "checkpoints" / s) for s in ("2", "4"))
  assert not (run / workdir.LOCK_FILE).exists()  # released at the end
  recorded = json.loads((run / workdir.CONFIG_FILE).read_text())
  assert recorded["num_train_steps"] == 4
  lines = (run / workdir.METRICS_FILE).read_text().splitlines()
  records = [json.loads(line) for line in lines]  # the torn line was cut, none is glued
  assert [(r["step"], r["kind"]) for r in records if r["kind"] == "train"] == [
      (2, "train"), (4, "train")]
  manager = checkpointing.create_manager(f"{RUN}/checkpoints")
  saved = checkpointing.saved_config(manager)
  assert saved == workdir.config_record(small_config(4))
  state = checkpointing.restore_latest(manager, train.setup(small_config(4)).initial_state)
  assert int(state.step) == 4


@pytest.mark.slow
def test_study_readers_and_reports_on_the_object_store(bucket):
  (run,) = events.find_runs(f"{BUCKET}/study")
  assert (run.group, run.arm, run.seed) == ("digits", "ovsw", 0)
  scalars = events.read_scalars(run.path)
  assert list(scalars["train_loss"][0]) == [2, 4]
  config = snapshot.load_config(run.path)
  assert config.num_train_steps == 4
  snapshot.export_weights(config, run.path)
  weights = snapshot.load_weights(run.path)
  assert weights and all(w["init"].shape == w["final"].shape for w in weights.values())
  written = tables.write_tables(f"{BUCKET}/study", f"{BUCKET}/report")
  written += plots.write_plots(f"{BUCKET}/study", f"{BUCKET}/report", layers="last")
  assert written and all(str(p).startswith(f"{BUCKET}/report/") for p in written)
  assert all((bucket / "report" / p.name).stat().st_size > 0 for p in written)
  assert (bucket / "report" / "digits_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_workdir_lock_on_the_object_store(bucket):
  clock = [1000.0]
  path = f"{BUCKET}/locked"
  owner = workdir.WorkdirLock(path, lease_s=60, clock=lambda: clock[0], host="node-a")
  owner.acquire()
  assert (bucket / "locked" / workdir.LOCK_FILE).is_file()
  other = workdir.WorkdirLock(path, lease_s=60, clock=lambda: clock[0], host="node-b",
                              wait=False)
  clock[0] += 30
  with pytest.raises(workdir.WorkdirLockedError, match="node-a"):
    other.acquire()
  clock[0] += 31
  other.acquire()
  assert not owner.renew() and owner.lost
  owner.release()  # not its lock any more: left alone
  assert json.loads((bucket / "locked" / workdir.LOCK_FILE).read_text())["host"] == "node-b"
  other.release()
  assert not (bucket / "locked" / workdir.LOCK_FILE).exists()


@pytest.mark.slow
def test_export_cli_on_the_object_store(store, bucket):
  base, _ = store
  out = f"{BUCKET}/net.ovsw"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "fake_object_store.py"), str(base / "objects"),
       "ovsw_jax.export", f"--workdir={RUN}", f"--out={out}"],
      cwd=base / "cwd", env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "agreement 1.0000" in proc.stdout
  assert (bucket / "net.ovsw").is_file()
  net = export.load(out)
  assert net.header["model"] == "tiny"


# ------------------------------------------------------------- the scan

# The modules that read or write workdir, checkpoint, export and report paths.
SCANNED = ["ovsw_jax/trainer/train.py", "ovsw_jax/trainer/workdir.py",
           "ovsw_jax/trainer/run_log.py", "ovsw_jax/trainer/checkpointing.py",
           "ovsw_jax/export/*.py", "ovsw_jax/repro/*.py"]
# Calls that reach only the local disk: `open`, os.path, os' file functions, shutil, pathlib.
OS_FILE_CALLS = {"makedirs", "mkdir", "replace", "rename", "remove", "unlink", "walk",
                 "listdir", "scandir", "rmdir", "stat"}
# (file, call) pairs allowed, each on a path checked to be local first.
ALLOWED = {
    ("ovsw_jax/trainer/checkpointing.py", "os.path.abspath"),  # orbax wants absolute local paths
}


def _dotted(node: ast.AST) -> str:
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return node.id if isinstance(node, ast.Name) else "?"


def _in_memory(arg: ast.AST) -> bool:
  """A buffer: `buf`, `f`, or an `io.BytesIO(...)` call."""
  return ((isinstance(arg, ast.Name) and arg.id in ("buf", "f"))
          or (isinstance(arg, ast.Call) and _dotted(arg.func).endswith("BytesIO")))


def local_only_calls(source: str) -> list[str]:
  """`line: call` for each call in `source` that bypasses etils.epath."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func)
    first = node.args[0] if node.args else None
    bad = (name == "open"
           or name.startswith(("os.path.", "shutil."))
           or (name.startswith("os.") and name[3:] in OS_FILE_CALLS)
           or (name.startswith("pathlib.")
               and not (isinstance(first, ast.Name) and first.id == "__file__"))
           or ((name.endswith(".savefig") or name in ("np.save", "np.savez",
                                                      "np.savez_compressed", "np.load"))
               and not (first is not None and _in_memory(first))))
    if bad:
      found.append(f"{node.lineno}: {name}")
  return found


def test_the_scan_finds_each_kind_of_local_only_call():
  source = ("open(p)\nos.path.join(w, 'x')\nos.makedirs(w)\npathlib.Path(w)\n"
            "fig.savefig(path)\nnp.load(path)\nshutil.rmtree(w)\n"
            "pathlib.Path(__file__)\nfig.savefig(buf)\nnp.load(io.BytesIO(data))\n"
            "epath.Path(w).open('a')\n")
  assert [c.split(": ")[1] for c in local_only_calls(source)] == [
      "open", "os.path.join", "os.makedirs", "pathlib.Path", "fig.savefig", "np.load",
      "shutil.rmtree"]


def test_no_workdir_file_bypasses_epath():
  files = sorted({p for pattern in SCANNED for p in ROOT.glob(pattern)})
  assert len(files) > 15
  found = []
  for path in files:
    name = str(path.relative_to(ROOT))
    for call in local_only_calls(path.read_text()):
      if (name, call.split(": ")[1]) not in ALLOWED:
        found.append(f"{name}:{call}")
  assert not found, f"use etils.epath for these (the workdir may be gs://...): {found}"
