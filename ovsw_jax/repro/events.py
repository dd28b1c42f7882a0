"""Reads the scalars a training run logged, and finds the runs under a directory.

`train.train_and_evaluate` appends every scalar it logs, per-layer figures
included, to `metrics.jsonl` in its workdir (`ovsw_jax.trainer.run_log`). A run that
resumed may have logged a step twice: the value written last for a
(tag, step) wins, as TensorBoard shows it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re

import numpy as np
from etils import epath

from ovsw_jax.trainer.workdir import METRICS_FILE

ARMS = ("vanilla", "ags", "sad", "ovsw")
RUN_INFO = "run.json"   # written by `run.py` next to the metrics file
_SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclasses.dataclass
class Run:
  """One training workdir.

  Attributes:
    path: the workdir.
    group: its place in the study (the relative path without the arm and
      seed directories), e.g. 'digits' or 'sweep/delta=0.04,gamma=0.0009'.
    arm: 'vanilla', 'ags', 'sad', 'ovsw', or the directory name if unknown.
    seed: the seed, or 0 if unknown.
    info: the contents of its `run.json` (empty if there is none).
  """
  path: epath.Path
  group: str
  arm: str
  seed: int
  info: dict


# Directory levels `find_runs` descends at most (a symbolic link loop ends there).
MAX_DEPTH = 16


def metrics_file(workdir) -> epath.Path:
  """The JSON-lines metrics file of a run (`workdir.METRICS_FILE`)."""
  return epath.Path(workdir) / METRICS_FILE


def read_scalars(workdir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """All scalars of a run: `{tag: (steps, values)}`, sorted by step, one value per step.

  Read from the run's `metrics.jsonl`; a line cut short by a killed run is skipped.
  """
  by_tag: dict[str, dict[int, float]] = {}
  with metrics_file(workdir).open("r") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      step = int(record.pop("step"))
      record.pop("kind", None)
      for tag, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          by_tag.setdefault(tag, {})[step] = float(value)
  out = {}
  for tag, points in by_tag.items():
    steps = np.array(sorted(points), dtype=np.int64)
    out[tag] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
  return out


def find_runs(root) -> list[Run]:
  """Every training workdir under `root` (a directory with `metrics.jsonl`), sorted.

  Arm and seed come from the run's `run.json` if present, else from the path:
  a directory named like an arm, and one named `seed<k>`. Symbolic links are
  followed, so a run can be shared by two groups (say, a vanilla baseline
  that does not depend on the parameter a group changes).
  """
  root = epath.Path(root)
  runs = []
  for path in _directories(root):
    if not metrics_file(path).is_file():
      continue
    parts = list(path.relative_to(root).parts)
    info = {}
    if (path / RUN_INFO).exists():
      info = json.loads((path / RUN_INFO).read_text())
    arm, seed = info.get("arm"), info.get("seed")
    rest = []
    for part in parts:
      match = _SEED_DIR.match(part)
      if match:
        seed = int(match.group(1)) if seed is None else seed
      elif part in ARMS or part == arm:  # a directory named after the arm (or grid point)
        arm = part if arm is None else arm
      else:
        rest.append(part)
    if arm is None:
      arm = rest.pop() if rest else path.name
    runs.append(Run(path=path, group="/".join(rest), arm=arm,
                    seed=0 if seed is None else int(seed), info=info))
  order = {a: i for i, a in enumerate(ARMS)}
  runs.sort(key=lambda r: (r.group, order.get(r.arm, len(ARMS)), r.arm, r.seed))
  return runs


def _directories(root: epath.Path, depth: int = 0):
  """`root` and the directories below it, sorted, through `epath` (local or object store).

  Checkpoint folders are not entered; local symbolic links are followed.
  """
  yield root
  if depth >= MAX_DEPTH:
    return
  children = sorted((p for p in root.iterdir() if p.name != "checkpoints" and p.is_dir()),
                    key=lambda p: p.name)
  for child in children:
    yield from _directories(child, depth + 1)


def group_runs(runs: list[Run], patterns=None) -> dict[str, list[Run]]:
  """`{group: runs}`, keeping the order of `runs`; only the groups matching one
  of the shell-style `patterns` (e.g. `['digits*']`) if given."""
  out: dict[str, list[Run]] = {}
  for run in runs:
    if patterns and not any(fnmatch.fnmatchcase(run.group, p) for p in patterns):
      continue
    out.setdefault(run.group, []).append(run)
  return out


def layer_names(scalars: dict, prefix: str = "silent_ratio") -> list[str]:
  """The binary layers a run logged (`prefix/<layer>` tags), in network order."""
  names = [t[len(prefix) + 1:] for t in scalars if t.startswith(prefix + "/")]
  return sorted(names, key=natural_key)


def natural_key(name: str):
  """Sort key that orders 'layer2' before 'layer10'."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
