"""Results tables of a study: per run, per arm (mean ± std over seeds), per layer.

  python -m ovsw_jax.repro.tables --workdir=DIR [--out=DIR/report] [--groups=digits,...]

For each group of runs under `--workdir` (see `events.find_runs`) it writes
`<prefix>runs.csv` (one row per run), `<prefix>summary.csv` (one row per
arm), `<prefix>layers.csv` (arm x layer) and `<prefix>summary.md`, where the
prefix is the group's name (empty for a single ungrouped study).

Columns (fractions in [0, 1]; the Markdown shows percentages):
  final_accuracy  test top-1 at the end of training;
  best_accuracy   the best evaluated test top-1 (what the release reports);
  silent_ratio    fraction of binary weights never flipped since init, at the end;
  peak_flip_ratio largest flip ratio over one evaluation interval
                  (`eval_interval_epochs`; 1 in `run.py` studies: per epoch);
  sad_silent_fraction / ags_scaled_fraction  SAD's and AGS's last logged
                  fractions (empty where the arm has no such transform).
Std is the sample standard deviation over seeds (NaN with one seed).
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Sequence

from etils import epath
from absl import app, flags
import numpy as np

from ovsw_jax.repro import events

RUN_COLUMNS = ("final_accuracy", "best_accuracy", "silent_ratio", "peak_flip_ratio",
               "peak_flip_epoch", "sad_silent_fraction", "ags_scaled_fraction")
SUMMARY_COLUMNS = ("final_accuracy", "best_accuracy", "silent_ratio", "peak_flip_ratio",
                   "sad_silent_fraction", "ags_scaled_fraction")


def _last(scalars, tag):
  return float(scalars[tag][1][-1]) if tag in scalars else math.nan


def summarize_run(run: events.Run, scalars: dict | None = None) -> dict:
  """The table's numbers for one run, plus `silent_ratio/<layer>` and
  `peak_flip_ratio/<layer>` for every binary layer."""
  s = events.read_scalars(run.path) if scalars is None else scalars
  row = {"group": run.group, "arm": run.arm, "seed": run.seed}
  if "eval_accuracy" not in s:
    raise ValueError(f"{run.path} has no evaluation logged (did the run finish one?).")
  acc = s["eval_accuracy"][1]
  row["final_accuracy"] = float(acc[-1])
  row["best_accuracy"] = float(acc.max())
  row["silent_ratio"] = _last(s, "silent_ratio")
  epochs = s["epoch"][1] if "epoch" in s else np.arange(1, len(acc) + 1, dtype=float)
  row["final_epoch"] = float(epochs[-1])
  row["eval_interval_epochs"] = (float(np.median(np.diff(np.concatenate([[0.0], epochs]))))
                                 if len(epochs) else math.nan)
  if "flip_ratio" in s:
    flips = s["flip_ratio"][1]
    i = int(np.argmax(flips))
    row["peak_flip_ratio"] = float(flips[i])
    row["peak_flip_epoch"] = float(epochs[i]) if i < len(epochs) else math.nan
  else:
    row["peak_flip_ratio"] = row["peak_flip_epoch"] = math.nan
  row["sad_silent_fraction"] = _last(s, "silent_fraction")
  row["ags_scaled_fraction"] = _last(s, "scaled_fraction")
  for layer in events.layer_names(s):
    row[f"silent_ratio/{layer}"] = _last(s, f"silent_ratio/{layer}")
    if f"flip_ratio/{layer}" in s:
      row[f"peak_flip_ratio/{layer}"] = float(np.max(s[f"flip_ratio/{layer}"][1]))
  return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (ddof=1) of the finite values; NaN where undefined."""
  v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def aggregate(rows: list[dict], columns: Sequence[str]) -> list[dict]:
  """One row per arm (in the order of `rows`): `n`, `<col>_mean`, `<col>_std`."""
  arms: dict[str, list[dict]] = {}
  for row in rows:
    arms.setdefault(row["arm"], []).append(row)
  out = []
  for arm, group in arms.items():
    agg = {"group": group[0]["group"], "arm": arm, "n": len(group),
           "seeds": " ".join(str(r["seed"]) for r in group)}
    for col in columns:
      agg[f"{col}_mean"], agg[f"{col}_std"] = mean_std([r.get(col, math.nan) for r in group])
    out.append(agg)
  return out


def layer_rows(rows: list[dict]) -> list[dict]:
  """Arm x layer: silent ratio and peak flip ratio, mean and std over seeds."""
  layers = []
  for row in rows:
    for key in row:
      if key.startswith("silent_ratio/") and key[13:] not in layers:
        layers.append(key[13:])
  out = []
  for agg_arm in aggregate(rows, ()):
    arm_rows = [r for r in rows if r["arm"] == agg_arm["arm"]]
    for layer in layers:
      entry = {"group": agg_arm["group"], "arm": agg_arm["arm"], "layer": layer,
               "n": agg_arm["n"]}
      for col in ("silent_ratio", "peak_flip_ratio"):
        entry[f"{col}_mean"], entry[f"{col}_std"] = mean_std(
            [r.get(f"{col}/{layer}", math.nan) for r in arm_rows])
      out.append(entry)
  return out


def write_csv(path, rows: list[dict]) -> None:
  """Rows as CSV; the columns are the union of the rows' keys, first-seen order."""
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  f = io.StringIO(newline="")
  writer = csv.DictWriter(f, fieldnames=columns, restval="")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
  epath.Path(path).write_text(f.getvalue())  # the folder may be on an object store


def pct(mean: float, std: float = math.nan, digits: int = 2) -> str:
  """'97.50 ± 0.31' (percent) ; '–' for NaN."""
  if math.isnan(mean):
    return "–"
  text = f"{100 * mean:.{digits}f}"
  return text if math.isnan(std) else f"{text} ± {100 * std:.{digits}f}"


def markdown_summary(summary: list[dict], layers: list[dict], interval: float) -> str:
  """The arm table and the per-layer silent-ratio table, in Markdown."""
  per = "epoch" if interval == 1 else f"{interval:.3g} epochs"
  lines = [
      f"| arm | seeds | test top-1, final (%) | test top-1, best (%) | silent ratio (%) "
      f"| peak flip ratio per {per} (%) | SAD silent fraction, end (%) "
      f"| AGS scaled fraction, end (%) |",
      "|---|---|---|---|---|---|---|---|"]
  for r in summary:
    lines.append(
        f"| {r['arm']} | {r['n']} | {pct(r['final_accuracy_mean'], r['final_accuracy_std'])} "
        f"| {pct(r['best_accuracy_mean'], r['best_accuracy_std'])} "
        f"| {pct(r['silent_ratio_mean'], r['silent_ratio_std'], 1)} "
        f"| {pct(r['peak_flip_ratio_mean'], r['peak_flip_ratio_std'])} "
        f"| {pct(r['sad_silent_fraction_mean'], r['sad_silent_fraction_std'], 1)} "
        f"| {pct(r['ags_scaled_fraction_mean'], r['ags_scaled_fraction_std'], 1)} |")
  arms = [r["arm"] for r in summary]
  names = []
  for r in layers:
    if r["layer"] not in names:
      names.append(r["layer"])
  if names:
    lines += ["", "Silent ratio per binary layer (%, mean ± std over seeds):", "",
              "| layer | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for name in names:
      cells = []
      for arm in arms:
        match = [r for r in layers if r["arm"] == arm and r["layer"] == name]
        cells.append(pct(match[0]["silent_ratio_mean"], match[0]["silent_ratio_std"], 1)
                     if match else "–")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def prefix_of(group: str) -> str:
  """A file-name prefix for a group ('' for the unnamed one)."""
  return re.sub(r"[^A-Za-z0-9.=_-]+", "_", group) + "_" if group else ""


def write_tables(workdir, out_dir, groups: Sequence[str] | None = None
                 ) -> list[epath.Path]:
  """Writes the tables of every group under `workdir` (or of those matching
  `groups`, shell patterns) into `out_dir`; returns the files."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  runs = events.find_runs(workdir)
  if not runs:
    raise FileNotFoundError(f"No runs (metrics.jsonl files) under {workdir}.")
  for group, group_runs in events.group_runs(runs, groups).items():
    rows = [summarize_run(run) for run in group_runs]
    summary = aggregate(rows, SUMMARY_COLUMNS)
    layers = layer_rows(rows)
    prefix = prefix_of(group)
    files = {f"{prefix}runs.csv": rows, f"{prefix}summary.csv": summary,
             f"{prefix}layers.csv": layers}
    for name, table in files.items():
      write_csv(out_dir / name, table)
      written.append(out_dir / name)
    interval = float(np.nanmedian([r["eval_interval_epochs"] for r in rows]))
    md = out_dir / f"{prefix}summary.md"
    md.write_text(markdown_summary(summary, layers, interval))
    written.append(md)
  return written


def main(argv):
  del argv
  out = flags.FLAGS.out or str(epath.Path(flags.FLAGS.workdir, "report"))
  for path in write_tables(flags.FLAGS.workdir, out, flags.FLAGS.groups):
    print(path)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A study directory (or one training workdir).")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/report).")
  flags.DEFINE_list("groups", [], "Only these groups (shell patterns; default: all).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
