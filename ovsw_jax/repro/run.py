"""Trains the four arms of the silent-weight study over several seeds, then tabulates and plots.

  python -m ovsw_jax.repro.run --workdir=DIR [--seeds=3]
      [--dataset=digits|cifar10|lm_stdlib] [--arms=vanilla,ags,sad,ovsw]
      [--group=NAME] [--set=ovsw.delta=0.1 ...]

Arms (paper Fig. 1 and its ablation): vanilla BNN (AGS and SAD off), AGS
only, SAD only, OvSW (both), each with the same model, data and recipe.
'digits' is the embedded default (`configs/default.py`); 'cifar10' is the
release's ResNet-20 recipe (`configs/cifar10_resnet20.py`) and needs a tfds
data set prepared in `--set=data_dir=...`; 'lm_stdlib' is the language model
on the running Python's standard library (`configs/lm_stdlib.py`). An arm is
the config's `:ARG` with `+` for its commas (`binary+ovsw` is
`configs/lm_stdlib.py:binary,ovsw`). `--set` overrides any config field.

Every run is a training workdir `DIR/<group>/<arm>/seed<k>` (group defaults
to the data set's name) holding `metrics.jsonl`, TensorBoard events, checkpoints, `run.json`,
`config.json`, `result.json` (final metrics) and `weights.npz` (see
`snapshot`). A run whose `result.json` exists is skipped, and an interrupted
one resumes from its checkpoint, so the command can simply be rerun.
The study evaluates every epoch, so the logged flip ratio is the per-epoch
one of the paper's Fig. 1c. Tables and figures go to `DIR/<group>/report`.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import sys
import time
from typing import Iterable, Sequence

from etils import epath
from absl import app, flags, logging
import ml_collections

_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_MODULES = {"digits": "default", "cifar10": "cifar10_resnet20", "lm_stdlib": "lm_stdlib"}
# What the study changes in every config: an eval (and flip-ratio interval)
# per epoch, dense logging of SAD's and AGS's fractions, one kept checkpoint.
STUDY_OVERRIDES = {"eval_every_epochs": 1, "log_every_steps": 10, "keep_checkpoints": 1}

FLAGS = flags.FLAGS


def load_config(dataset: str, arm: str) -> ml_collections.ConfigDict:
  """The config of `dataset` (see CONFIG_MODULES) with the `arm` switch applied
  (`+` separates the words of a config argument: `binary+ovsw`)."""
  if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
  if dataset not in CONFIG_MODULES:
    raise ValueError(f"dataset must be one of {sorted(CONFIG_MODULES)}, got {dataset!r}")
  module = importlib.import_module(f"configs.{CONFIG_MODULES[dataset]}")
  return module.get_config(arm.replace("+", ","))


def parse_overrides(items: Iterable[str]) -> dict[str, object]:
  """`['ovsw.delta=0.1', 'model=tiny']` -> `{'ovsw.delta': 0.1, 'model': 'tiny'}`."""
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"An override is KEY=VALUE, got {item!r}.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    out[key.strip()] = value
  return out


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, object]) -> ml_collections.ConfigDict:
  """Sets dotted `overrides` on a copy of `config` (unknown fields are an error)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"No config field {key!r}.")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif (isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float)
          and value.is_integer()):
      value = int(value)
    node[leaf] = value
  return config


def run_dir(workdir, group: str, arm: str, seed: int) -> epath.Path:
  """Where the run of (group, arm, seed) lives."""
  return epath.Path(workdir, group, arm, f"seed{seed}")


def train_one(config: ml_collections.ConfigDict, path, info: dict) -> dict:
  """Trains `config` in `path` (resuming), writes result.json and weights.npz.

  Returns the final metrics. Skips the training if result.json exists.
  """
  # pylint: disable=g-import-not-at-top
  from ovsw_jax.trainer import tasks, train
  from ovsw_jax.repro import snapshot
  path = epath.Path(path)
  result_file = path / "result.json"
  if result_file.exists():
    return json.loads(result_file.read_text())
  _ = tasks.create(config).num_train  # a missing data set fails here, before any file
  path.mkdir(parents=True, exist_ok=True)
  (path / "run.json").write_text(json.dumps(info, indent=1))
  start = time.time()
  result = train.train_and_evaluate(config, str(path))
  result["train_seconds"] = time.time() - start
  snapshot.export_weights(config, path)
  result_file.write_text(json.dumps(result, indent=1))
  return result


def headline(result: dict) -> str:
  """A finished run's main figures for the console: accuracy or bits per byte, silent ratio."""
  if "eval_accuracy" in result:
    main = f"test accuracy {result['eval_accuracy']:.4f}"
  else:
    main = f"test bits/byte {result['eval_test_bits_per_byte']:.4f}"
  return (f"{main}, silent ratio {result.get('silent_ratio', float('nan')):.4f} "
          f"({result.get('train_seconds', 0.0):.0f} s)")


def run_study(workdir, *, dataset: str = "digits", arms: Sequence[str] = (
    "vanilla", "ags", "sad", "ovsw"), seeds: Sequence[int] = (0, 1, 2),
              group: str | None = None, overrides: dict | None = None,
              report: bool = True) -> epath.Path:
  """Trains every (arm, seed) in turn; returns the group's directory.

  `overrides` (dotted config fields) apply after the study's own
  (`STUDY_OVERRIDES`) to every arm, e.g. `{'num_epochs': 40}`.
  """
  group = group or dataset
  overrides = {**STUDY_OVERRIDES, **(overrides or {})}
  for arm in arms:
    for seed in seeds:
      config = apply_overrides(load_config(dataset, arm), {**overrides, "seed": seed})
      path = run_dir(workdir, group, arm, seed)
      info = {"arm": arm, "seed": seed, "dataset": dataset, "group": group,
              "overrides": {k: v for k, v in overrides.items()
                            if not isinstance(v, (list, tuple))}}
      result = train_one(config, path, info)
      print(f"[{group}] {arm} seed {seed}: {headline(result)}", flush=True)
  group_dir = epath.Path(workdir, group)
  if report:
    write_report(group_dir)
  return group_dir


def write_report(group_dir, out_dir=None, layers=None) -> epath.Path:
  """Tables and figures of the runs under `group_dir`, into `out_dir` (default
  `group_dir/report`)."""
  # pylint: disable=g-import-not-at-top
  from ovsw_jax.repro import plots, tables
  out_dir = epath.Path(out_dir or epath.Path(group_dir, "report"))
  tables.write_tables(group_dir, out_dir)
  plots.write_plots(group_dir, out_dir, layers=layers)
  print(f"Tables and figures in {out_dir}", flush=True)
  return out_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # clu logs every scalar at INFO
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  from ovsw_jax.trainer import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    run_study(FLAGS.workdir, dataset=FLAGS.dataset, arms=FLAGS.arms,
              seeds=range(FLAGS.seeds), group=FLAGS.group,
              overrides=parse_overrides(FLAGS.set), report=FLAGS.report)
  except input_pipeline.DatasetNotPreparedError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Root directory of the study's runs.")
  flags.DEFINE_enum("dataset", "digits", sorted(CONFIG_MODULES), "Data set and its config.")
  flags.DEFINE_integer("seeds", 3, "Seeds per arm (0, 1, ...).")
  flags.DEFINE_list("arms", ["vanilla", "ags", "sad", "ovsw"], "Arms to train.")
  flags.DEFINE_string("group", None, "Subdirectory of the runs (default: the data set).")
  flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE (repeatable), "
                            "e.g. --set=num_epochs=40 --set=ovsw.dampen_weight=0.01.")
  flags.DEFINE_bool("report", True, "Write tables and figures when done.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
