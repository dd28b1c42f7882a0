"""The sweep entry point: train a grid over any config fields, then report it.

  python -m ovsw_jax.repro.sweep --workdir=DIR --group=NAME
      [--grid=KEY=V1,V2,... ...] [--seeds=1] [--epochs=40] [--arm=ovsw]
      [--dataset=digits] [--set=KEY=VALUE ...] [--dry_run] [--report_only] [--out=DIR]
      [--shard=I/N]

Each `--grid` is one axis (see `grid.parse_axis`): `ovsw.delta=0.01,0.05`,
linked fields `optimizer/learning_rate=sgd/0.1,adam/1e-3`, or the arm
`arm=vanilla,ovsw`; the runs are the product of the axes and `--seeds`.
Without `--grid` it is OvSW's two strengths, delta (AGS, the paper's lambda)
x dampen_weight (SAD, the paper's gamma), from `--deltas` and `--gammas`; a
value of 0 turns that transform off, so the first row is SAD only, the first
column AGS only and the corner the vanilla BNN.

Every (point, seed) is a training workdir `DIR/<group>/<point>/seed<k>`
(finished points are skipped, interrupted ones resume, so the command can be
rerun), trained seed-major (every point's seed 0 first). `--shard=I/N` trains
every N-th run from the I-th: N such workers share the grid (then
`--report_only`); on a small CPU host one worker per core with
`XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'`
and `taskset` trains small models faster in all than one worker on every core.
`--set` applies to every point before the point's own fields.
Writes to `--out` (default `DIR/<group>/report`): `grid.csv`, `grid.md` and
`grid.png` (one row per point, mean and std over seeds; metrics against the
first axis), the per-point curves and tables of `run.write_report`, and for
a delta x gamma grid `sweep.csv`, `sweep.md` and `sweep_heatmap.png`.
`--epochs` shortens the schedule to fit a CPU budget; the cosine schedule is
stretched to it, so a point's numbers compare with the others of the sweep,
not with full-length runs.
"""

from __future__ import annotations

import math
from typing import Sequence

from etils import epath
from absl import app, flags, logging
import numpy as np

from ovsw_jax.repro import events, grid, run as run_lib, snapshot, tables

DELTAS = (0.0, 0.04, 0.12, 0.36)
GAMMAS = (0.0, 9e-4, 9e-3, 9e-2)


def arm_of(delta: float, gamma: float) -> str:
  """Which transforms a grid point uses (a zero strength turns one off)."""
  return {(False, False): "vanilla", (True, False): "ags", (False, True): "sad",
          (True, True): "ovsw"}[(delta > 0, gamma > 0)]


def strength_axes(deltas: Sequence[float], gammas: Sequence[float]) -> list[grid.Axis]:
  """The delta x dampen_weight grid as two axes."""
  return [grid.Axis(("ovsw.delta",), tuple((float(d),) for d in deltas)),
          grid.Axis(("ovsw.dampen_weight",), tuple((float(g),) for g in gammas))]


def run_sweep(workdir, *, deltas: Sequence[float] = DELTAS, gammas: Sequence[float] = GAMMAS,
              epochs: float | None = 40, seeds: Sequence[int] = (0,), group: str = "sweep",
              dataset: str = "digits", overrides: dict | None = None,
              report: bool = True) -> epath.Path:
  """Trains every (delta, gamma, seed) in turn; returns the sweep's directory."""
  base = dict(overrides or {})
  if epochs:
    base = {"num_epochs": epochs, **base}
  sweep_dir = grid.run_grid(workdir, group, strength_axes(deltas, gammas), seeds=seeds,
                            dataset=dataset, overrides=base)
  if report:
    write_report(sweep_dir, sweep_dir / "report")
  return sweep_dir


def point_of(run: events.Run) -> tuple[float, float] | None:
  """A run's effective (delta, gamma): from its run.json, else from its
  config.json (0 for a transform that is off); None if neither says."""
  if "delta" in run.info and "gamma" in run.info:
    return float(run.info["delta"]), float(run.info["gamma"])
  config = snapshot.load_config(run.path)
  if config is None:
    return None
  ovsw = config.ovsw
  return (float(ovsw.delta) if ovsw.ags else 0.0,
          float(ovsw.dampen_weight) if ovsw.sad else 0.0)


def collect(sweep_dir) -> list[dict]:
  """One row per grid point: delta, gamma, n and mean/std of the table's columns.

  Any runs with a known (delta, gamma) (see `point_of`) make a grid, so the
  four arms of a `run.py` study make a 2 x 2 one.
  """
  points: dict[tuple[float, float], list[dict]] = {}
  for r in events.find_runs(sweep_dir):
    point = point_of(r)
    if point is None:
      logging.warning("%s has no delta/gamma (run.json or config.json): skipped.", r.path)
      continue
    points.setdefault(point, []).append(tables.summarize_run(r))
  out = []
  for (delta, gamma), rows in sorted(points.items()):
    entry = {"delta": delta, "gamma": gamma, "arm": arm_of(delta, gamma), "n": len(rows),
             "epochs": rows[0]["final_epoch"]}
    for col in ("final_accuracy", "best_accuracy", "silent_ratio", "peak_flip_ratio"):
      entry[f"{col}_mean"], entry[f"{col}_std"] = tables.mean_std([r[col] for r in rows])
    out.append(entry)
  return out


def _grid(rows: list[dict], key: str):
  deltas = sorted({r["delta"] for r in rows})
  gammas = sorted({r["gamma"] for r in rows})
  grid = np.full((len(deltas), len(gammas)), np.nan)
  for r in rows:
    grid[deltas.index(r["delta"]), gammas.index(r["gamma"])] = r[key]
  return deltas, gammas, grid


def markdown(rows: list[dict]) -> str:
  """Grids (rows: delta, columns: gamma) of silent ratio, accuracy and peak flip ratio."""
  n = sorted({r["n"] for r in rows})
  epochs = sorted({r["epochs"] for r in rows})
  parts = [f"{len(rows)} points, {'/'.join(map(str, n))} seed(s) each, "
           f"{'/'.join(f'{e:.3g}' for e in epochs)} epochs; delta = 0 is AGS off, "
           "gamma = 0 is SAD off. Values in %, mean over seeds.", ""]
  for key, title, digits in (("silent_ratio_mean", "Silent ratio (never flipped)", 1),
                             ("final_accuracy_mean", "Test top-1, final", 2),
                             ("peak_flip_ratio_mean", "Peak flip ratio per epoch", 2)):
    deltas, gammas, grid = _grid(rows, key)
    parts += [f"{title}:", "", "| delta \\ gamma | " + " | ".join(f"{g:g}" for g in gammas)
              + " |", "|---" * (len(gammas) + 1) + "|"]
    for i, d in enumerate(deltas):
      parts.append(f"| {d:g} | " + " | ".join(tables.pct(v, digits=digits)
                                              for v in grid[i]) + " |")
    parts.append("")
  return "\n".join(parts)


def plot_heatmap(rows: list[dict], path) -> epath.Path:
  """Heat maps over (delta, gamma): silent ratio, final test accuracy and peak
  per-epoch flip ratio."""
  # pylint: disable=g-import-not-at-top
  from ovsw_jax.repro import plots
  plt = plots.plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
  for ax, (key, title, cmap) in zip(axes, (
      ("silent_ratio_mean", "silent ratio (%)", "viridis"),
      ("final_accuracy_mean", "test top-1, final (%)", "magma"),
      ("peak_flip_ratio_mean", "peak flip ratio per epoch (%)", "cividis"))):
    deltas, gammas, grid = _grid(rows, key)
    image = ax.imshow(100 * grid, cmap=cmap, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.9)
    ax.set_xticks(range(len(gammas)), [f"{g:g}" for g in gammas])
    ax.set_yticks(range(len(deltas)), [f"{d:g}" for d in deltas])
    ax.set_xlabel("dampen_weight (gamma, SAD)")
    ax.set_ylabel("delta (lambda, AGS)")
    ax.set_title(title, fontsize=10)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(deltas)):
      for j in range(len(gammas)):
        if math.isfinite(grid[i, j]):
          ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                  color="white" if grid[i, j] < middle else "black")
  return plots.finish(fig, path)


def write_report(sweep_dir, out_dir) -> list[epath.Path]:
  """`sweep.csv`, `sweep.md` and `sweep_heatmap.png` of the sweep in `sweep_dir`."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = collect(sweep_dir)
  if not rows:
    raise FileNotFoundError(f"No sweep points under {sweep_dir}.")
  tables.write_csv(out_dir / "sweep.csv", rows)
  (out_dir / "sweep.md").write_text(markdown(rows))
  plot_heatmap(rows, out_dir / "sweep_heatmap.png")
  return [out_dir / "sweep.csv", out_dir / "sweep.md", out_dir / "sweep_heatmap.png"]


def report_grid(group_dir, out_dir) -> list[epath.Path]:
  """Every report of a grid: its table and figure, per-point curves, and the
  delta x gamma heat map when those are its axes."""
  keys, _ = grid.collect(group_dir)
  written = grid.write_report(group_dir, out_dir)
  run_lib.write_report(group_dir, out_dir, layers="last")
  if sorted(keys) == ["ovsw.dampen_weight", "ovsw.delta"]:
    written += write_report(group_dir, out_dir)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  group_dir = epath.Path(f.workdir, f.group)
  if not f.report_only:
    if f.grid:
      axes = [grid.parse_axis(spec) for spec in f.grid]
    else:
      axes = strength_axes([float(x) for x in f.deltas], [float(x) for x in f.gammas])
    overrides = run_lib.parse_overrides(f.set)
    if f.epochs:
      overrides = {"num_epochs": f.epochs, **overrides}
    index, _, count = f.shard.partition("/")
    try:
      shard = (int(index), int(count))
    except ValueError:
      shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
      raise app.UsageError(f"--shard={f.shard!r}: use I/N with 0 <= I < N, e.g. --shard=0/2 "
                           "and --shard=1/2 for two workers.")
    grid.run_grid(f.workdir, f.group, axes, seeds=range(f.seeds), dataset=f.dataset,
                  arm=f.arm, overrides=overrides, dry_run=f.dry_run, shard=shard)
    if f.dry_run or shard[1] > 1:
      return  # a shard's worker leaves the report to a --report_only run after all
  for path in report_grid(group_dir, f.out or group_dir / "report"):
    print(path)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Root directory of the runs.")
  flags.DEFINE_string("group", "sweep", "Subdirectory of this sweep's runs.")
  flags.DEFINE_multi_string("grid", [], "An axis KEY=V1,V2 or K1/K2=A1/A2,B1/B2 (repeatable).")
  flags.DEFINE_list("deltas", [f"{d:g}" for d in DELTAS], "Without --grid: AGS deltas (0: off).")
  flags.DEFINE_list("gammas", [f"{g:g}" for g in GAMMAS],
                    "Without --grid: SAD dampen_weights (0: off).")
  flags.DEFINE_float("epochs", 40, "Epochs per point (0: the config's).")
  flags.DEFINE_integer("seeds", 1, "Seeds per point (0, 1, ...).")
  flags.DEFINE_string("arm", "ovsw", "Config switch of points without an arm axis.")
  flags.DEFINE_enum("dataset", "digits", sorted(run_lib.CONFIG_MODULES), "Data set and config.")
  flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE for every point (repeatable).")
  flags.DEFINE_bool("dry_run", False, "Print the runs' directories and stop.")
  flags.DEFINE_string("shard", "0/1", "I/N: train only the I-th of every N runs (N workers, "
                      "e.g. one per core; then --report_only).")
  flags.DEFINE_bool("report_only", False, "Only (re)write the report of finished points.")
  flags.DEFINE_string("out", None, "Report directory (default: WORKDIR/GROUP/report).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
