"""Results tables of a study: per run, per arm (mean ± std over seeds), per layer.

  python -m ovsw_jax.repro.tables --workdir=DIR [--out=DIR/report] [--groups=digits,...]

For each group of runs under `--workdir` (see `events.find_runs`) it writes
`<prefix>runs.csv` (one row per run), `<prefix>summary.csv` (one row per
arm), `<prefix>layers.csv` (arm x layer), `<prefix>kinds.csv` (arm x layer
kind) and `<prefix>summary.md`, where the prefix is the group's name (empty for
a single ungrouped study).

Columns (fractions in [0, 1]; the Markdown shows percentages):
  final_accuracy  test top-1 at the end of training (image tasks);
  best_accuracy   the best evaluated test top-1 (what the release reports);
  test_bits_per_byte / val_bits_per_byte  the last evaluation's exact test and
                  validation bits per byte (the language model; not a fraction);
  silent_ratio    fraction of binary weights never flipped since init, at the end;
  peak_flip_ratio largest flip ratio over one evaluation interval
                  (`eval_interval_epochs`; 1 in `run.py` studies: per epoch);
  peak_step_flip_ratio  largest logged per-step flip ratio (mean over a log
                  interval): the peak when a run evaluates only at its end;
  oscillation_per_flip  logged oscillations over logged flips (runs with
                  `track_oscillation`; docs/method.md section 11);
  sad_silent_fraction / ags_scaled_fraction  SAD's and AGS's last logged
                  fractions (empty where the arm has no such transform).
Std is the sample standard deviation over seeds (NaN with one seed).
Per layer kind (`<prefix>kinds.csv`): a layer's name with its indices taken
out (`block_1/attn/q` -> `block/attn/q`), the layers of a kind averaged.
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

RUN_COLUMNS = ("final_accuracy", "best_accuracy", "test_bits_per_byte", "val_bits_per_byte",
               "silent_ratio", "peak_flip_ratio", "peak_flip_epoch", "peak_step_flip_ratio",
               "oscillation_per_flip", "sad_silent_fraction", "ags_scaled_fraction")
SUMMARY_COLUMNS = tuple(c for c in RUN_COLUMNS if c != "peak_flip_epoch")
# Columns that are not fractions (the Markdown shows them as they are, not in %).
ABSOLUTE_COLUMNS = ("test_bits_per_byte", "val_bits_per_byte", "oscillation_per_flip")


def _last(scalars, tag):
  return float(scalars[tag][1][-1]) if tag in scalars else math.nan


def summarize_run(run: events.Run, scalars: dict | None = None) -> dict:
  """The table's numbers for one run, plus `silent_ratio/<layer>` and
  `peak_flip_ratio/<layer>` for every binary layer."""
  s = events.read_scalars(run.path) if scalars is None else scalars
  row = {"group": run.group, "arm": run.arm, "seed": run.seed}
  if "eval_accuracy" in s:
    evals = s["eval_accuracy"][1]
    row["final_accuracy"] = float(evals[-1])
    row["best_accuracy"] = float(evals.max())
  elif "eval_test_bits_per_byte" in s:
    evals = s["eval_test_bits_per_byte"][1]
    row["test_bits_per_byte"] = float(evals[-1])
    row["val_bits_per_byte"] = _last(s, "eval_bits_per_byte")
  else:
    raise ValueError(f"{run.path} has no evaluation logged (eval_accuracy or "
                     f"eval_test_bits_per_byte; did the run finish one?).")
  # A run with no quantized layer (a float twin) logs a silent ratio of 0 over no
  # weights: not a figure.
  tracked = bool(events.layer_names(s))
  row["silent_ratio"] = _last(s, "silent_ratio") if tracked else math.nan
  epochs = s["epoch"][1] if "epoch" in s else np.arange(1, len(evals) + 1, dtype=float)
  row["final_epoch"] = float(epochs[-1])
  row["eval_interval_epochs"] = (float(np.median(np.diff(np.concatenate([[0.0], epochs]))))
                                 if len(epochs) else math.nan)
  if "flip_ratio" in s and tracked:
    flips = s["flip_ratio"][1]
    i = int(np.argmax(flips))
    row["peak_flip_ratio"] = float(flips[i])
    row["peak_flip_epoch"] = float(epochs[i]) if i < len(epochs) else math.nan
  else:
    row["peak_flip_ratio"] = row["peak_flip_epoch"] = math.nan
  row["peak_step_flip_ratio"] = (float(np.max(s["train_step_flip_ratio"][1]))
                                 if "train_step_flip_ratio" in s and tracked else math.nan)
  row["oscillation_per_flip"] = _oscillation_per_flip(s) if tracked else math.nan
  row["sad_silent_fraction"] = _last(s, "silent_fraction")
  row["ags_scaled_fraction"] = _last(s, "scaled_fraction")
  for layer in events.layer_names(s):
    row[f"silent_ratio/{layer}"] = _last(s, f"silent_ratio/{layer}")
    if f"flip_ratio/{layer}" in s:
      row[f"peak_flip_ratio/{layer}"] = float(np.max(s[f"flip_ratio/{layer}"][1]))
  return row


def _oscillation_per_flip(s: dict) -> float:
  """Logged oscillations over logged flips (the same log steps), NaN if not tracked."""
  if "train_step_oscillation_ratio" not in s or "train_step_flip_ratio" not in s:
    return math.nan
  osc_steps, osc = s["train_step_oscillation_ratio"]
  flip_steps, flips = s["train_step_flip_ratio"]
  both = np.intersect1d(osc_steps, flip_steps)
  total = flips[np.isin(flip_steps, both)].sum()
  return float(osc[np.isin(osc_steps, both)].sum() / total) if total > 0 else math.nan


def layer_kind(layer: str) -> str:
  """A layer's kind: its name without indices (`block_1/attn/q` -> `block/attn/q`)."""
  return re.sub(r"_?\d+", "", layer)


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


def kind_rows(rows: list[dict]) -> list[dict]:
  """Arm x layer kind (`layer_kind`): silent ratio, mean and std over seeds of each
  run's mean over the layers of that kind (the same as weighting by weights when
  the layers of a kind have one shape, as a transformer's blocks do)."""
  kinds: dict[str, list[str]] = {}
  for row in rows:
    for key in row:
      if key.startswith("silent_ratio/"):
        layers = kinds.setdefault(layer_kind(key[13:]), [])
        if key[13:] not in layers:
          layers.append(key[13:])
  out = []
  for agg_arm in aggregate(rows, ()):
    arm_rows = [r for r in rows if r["arm"] == agg_arm["arm"]]
    for kind, layers in kinds.items():
      per_run = [np.nanmean([r.get(f"silent_ratio/{x}", math.nan) for x in layers])
                 if any(f"silent_ratio/{x}" in r for x in layers) else math.nan
                 for r in arm_rows]
      entry = {"group": agg_arm["group"], "arm": agg_arm["arm"], "kind": kind,
               "layers": len(layers), "n": agg_arm["n"]}
      entry["silent_ratio_mean"], entry["silent_ratio_std"] = mean_std(per_run)
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


def number(mean: float, std: float = math.nan, digits: int = 4) -> str:
  """'2.4481 ± 0.0037' (as is, not in percent); '–' for NaN."""
  if math.isnan(mean):
    return "–"
  text = f"{mean:.{digits}f}"
  return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def cell(row: dict, col: str) -> str:
  """`row`'s `<col>_mean ± <col>_std`, in percent unless `col` is in ABSOLUTE_COLUMNS."""
  mean, std = row[f"{col}_mean"], row[f"{col}_std"]
  if col in ABSOLUTE_COLUMNS:
    return number(mean, std, 2 if col == "oscillation_per_flip" else 4)
  return pct(mean, std, 1 if col in ("silent_ratio", "sad_silent_fraction",
                                     "ags_scaled_fraction") else 2)


def headings(interval: float) -> dict[str, str]:
  """The Markdown heading of each summary column."""
  per = "epoch" if interval == 1 else f"{interval:.3g} epochs"
  return {"final_accuracy": "test top-1, final (%)", "best_accuracy": "test top-1, best (%)",
          "test_bits_per_byte": "test bits/byte", "val_bits_per_byte": "validation bits/byte",
          "silent_ratio": "silent ratio (%)", "peak_flip_ratio": f"peak flip ratio per {per} (%)",
          "peak_step_flip_ratio": "peak flip ratio per step (%)",
          "oscillation_per_flip": "oscillations / flips",
          "sad_silent_fraction": "SAD silent fraction, end (%)",
          "ags_scaled_fraction": "AGS scaled fraction, end (%)"}


def present(rows: list[dict], columns: Sequence[str]) -> list[str]:
  """The columns with a value in at least one row (others are another task's)."""
  return [c for c in columns
          if any(not math.isnan(r.get(f"{c}_mean", math.nan)) for r in rows)]


def task_columns(rows: list[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> list[str]:
  """The `columns` the rows' task has (accuracy for images, bits per byte for the
  language model), with one peak flip ratio: per evaluation interval for image
  tasks, per step for language models (evaluated once, their per-interval peak is
  the whole run's)."""
  lm = bool(present(rows, ("test_bits_per_byte",)))
  drop = "peak_flip_ratio" if lm else "peak_step_flip_ratio"
  return [c for c in present(rows, columns) if c != drop]


def markdown_summary(summary: list[dict], layers: list[dict], interval: float,
                     kinds: list[dict] = ()) -> str:
  """The arm table (`task_columns`) and the silent-ratio tables per layer and per
  layer kind, in Markdown."""
  columns = task_columns(summary)
  names = headings(interval)
  lines = ["| arm | seeds | " + " | ".join(names[c] for c in columns) + " |",
           "|---" * (len(columns) + 2) + "|"]
  for r in summary:
    lines.append(f"| {r['arm']} | {r['n']} | " + " | ".join(cell(r, c) for c in columns) + " |")
  arms = [r["arm"] for r in summary]
  for title, table, key in (("binary layer", layers, "layer"), ("layer kind", kinds, "kind")):
    keys = list(dict.fromkeys(r[key] for r in table))
    if not keys or (key == "kind" and len(keys) == len(dict.fromkeys(r["layer"] for r in layers))):
      continue  # a kind table adds nothing when every layer is its own kind
    lines += ["", f"Silent ratio per {title} (%, mean ± std over seeds):", "",
              f"| {key} | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for name in keys:
      cells = []
      for arm in arms:
        match = [r for r in table if r["arm"] == arm and r[key] == name]
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
    kinds = kind_rows(rows)
    prefix = prefix_of(group)
    files = {f"{prefix}runs.csv": rows, f"{prefix}summary.csv": summary,
             f"{prefix}layers.csv": layers, f"{prefix}kinds.csv": kinds}
    for name, table in files.items():
      write_csv(out_dir / name, table)
      written.append(out_dir / name)
    interval = float(np.nanmedian([r["eval_interval_epochs"] for r in rows]))
    md = out_dir / f"{prefix}summary.md"
    md.write_text(markdown_summary(summary, layers, interval, kinds))
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
