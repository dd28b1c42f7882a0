"""A grid over any config fields: its points, their runs and its report.

An axis is one or more dotted config fields and the values they take
together; the grid is the product of its axes (times the seeds):

  ovsw.delta=0.01,0.03,0.05                      one field, three values
  optimizer/learning_rate=sgd/0.1,adam/1e-3      two fields set together
  arm=vanilla,ovsw                               the config's `:ARG` switch

A point's `ovsw.delta` or `ovsw.dampen_weight` of 0 switches AGS or SAD off,
so a strength axis that starts at 0 includes its own baseline. Every
(point, seed) is a normal training workdir `ROOT/<group>/<point>/seed<k>`
(see `run.train_one`: finished runs are skipped, interrupted ones resume),
whose `run.json` records the point. `collect` reads them back into one row
per point; `markdown` and `plot` draw the row table and one figure.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
from typing import Sequence

from etils import epath
import numpy as np

from ovsw_jax.repro import events, run as run_lib, tables

ARM_KEY = "arm"
# What the report shows per point, mean and std over seeds (those a task has).
METRICS = tables.SUMMARY_COLUMNS


@dataclasses.dataclass(frozen=True)
class Axis:
  keys: tuple[str, ...]
  values: tuple[tuple[object, ...], ...]


def _literal(text: str) -> object:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_axis(spec: str) -> Axis:
  """`'KEY=V1,V2'` or `'KEY1/KEY2=A1/A2,B1/B2'` -> Axis (see module docstring)."""
  keys_text, sep, values_text = spec.partition("=")
  keys = tuple(k.strip() for k in keys_text.split("/") if k.strip())
  if not sep or not keys or not values_text.strip():
    raise ValueError(f"A grid axis is KEY=V1,V2,... or KEY1/KEY2=A1/A2,B1/B2; got {spec!r}.")
  values = []
  for item in values_text.split(","):
    parts = item.split("/")
    if len(parts) != len(keys):
      raise ValueError(f"Axis {spec!r}: value {item!r} has {len(parts)} part(s) for "
                       f"{len(keys)} key(s) {'/'.join(keys)}.")
    values.append(tuple(_literal(p.strip()) for p in parts))
  return Axis(keys, tuple(values))


def points(axes: Sequence[Axis]) -> list[dict[str, object]]:
  """Every combination of the axes' values, as `{dotted key: value}` (first axis slowest)."""
  out = []
  for combo in itertools.product(*(axis.values for axis in axes)):
    point = {}
    for axis, values in zip(axes, combo):
      point.update(zip(axis.keys, values))
    out.append(point)
  return out


def _fmt(value: object) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(point: dict[str, object]) -> str:
  """The point's directory name: `key=value,...` in axis order."""
  return ",".join(f"{k}={_fmt(v)}" for k, v in point.items())


def point_config(point: dict[str, object], *, dataset: str, arm: str, base: dict):
  """The config of one point: `dataset`'s config, the point's arm (or `arm`),
  `base` overrides, then the point's fields; a zero strength turns its transform off."""
  fields = {k: v for k, v in point.items() if k != ARM_KEY}
  config = run_lib.apply_overrides(
      run_lib.load_config(dataset, str(point.get(ARM_KEY, arm))), {**base, **fields})
  if "ovsw.delta" in fields and float(config.ovsw.delta) == 0.0:
    config.ovsw.ags = False
  if "ovsw.dampen_weight" in fields and float(config.ovsw.dampen_weight) == 0.0:
    config.ovsw.sad = False
  return config


def run_grid(workdir, group: str, axes: Sequence[Axis], *, seeds: Sequence[int] = (0,),
             dataset: str = "digits", arm: str = "ovsw", overrides: dict | None = None,
             dry_run: bool = False, shard: tuple[int, int] = (0, 1)) -> epath.Path:
  """Trains every (point, seed) in turn (or, `dry_run`, only prints them); returns the group dir.

  The order is seed-major (every point's first seed, then the second, ...), so a
  grid stopped early has its points at equal seeds. `shard=(i, n)`: only the
  runs whose place in that order is i modulo n, so that n workers (say, one per
  core) share a grid; each run's workdir lock keeps two off one run anyway.
  """
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard {index}/{count}: use i/n with 0 <= i < n, e.g. 0/2 and 1/2.")
  base = {**run_lib.STUDY_OVERRIDES, **(overrides or {})}
  order = [(seed, point) for seed in seeds for point in points(axes)]
  for seed, point in order[index::count]:
    config = point_config(point, dataset=dataset, arm=arm, base=base)
    config.seed = seed
    path = epath.Path(workdir, group, point_name(point), f"seed{seed}")
    if dry_run:
      print(path)
      continue
    delta = float(config.ovsw.delta) if config.ovsw.ags else 0.0
    gamma = float(config.ovsw.dampen_weight) if config.ovsw.sad else 0.0
    info = {"arm": point_name(point), "seed": seed, "dataset": dataset, "group": group,
            "point": point, "delta": delta, "gamma": gamma,
            "overrides": {k: v for k, v in base.items() if not isinstance(v, (list, tuple))}}
    result = run_lib.train_one(config, path, info)
    print(f"[{group}] {point_name(point)} seed {seed}: {run_lib.headline(result)}",
          flush=True)
  return epath.Path(workdir, group)


def collect(group_dir) -> tuple[list[str], list[dict]]:
  """(axis keys, one row per point): the point's values, n, and mean/std of METRICS."""
  by_point: dict[str, tuple[dict, list[dict]]] = {}
  keys: list[str] = []
  for r in events.find_runs(group_dir):
    point = r.info.get("point")
    if point is None:
      continue
    for k in point:
      if k not in keys:
        keys.append(k)
    by_point.setdefault(point_name(point), (point, []))[1].append(tables.summarize_run(r))
  rows = []
  for point, runs in by_point.values():
    row = {k: point.get(k, "") for k in keys}
    row["n"] = len(runs)
    row["epochs"] = runs[0]["final_epoch"]
    for col in METRICS:
      row[f"{col}_mean"], row[f"{col}_std"] = tables.mean_std([x.get(col, math.nan) for x in runs])
    for kind in tables.kind_rows(runs):  # per layer kind: silent ratio
      for stat in ("mean", "std"):
        row[f"silent_ratio/{kind['kind']}_{stat}"] = kind[f"silent_ratio_{stat}"]
    rows.append(row)
  return keys, rows


def kinds(rows: list[dict]) -> list[str]:
  """The layer kinds the rows have a silent ratio for (`tables.layer_kind`)."""
  return list(dict.fromkeys(k[len("silent_ratio/"):-len("_mean")] for r in rows for k in r
                            if k.startswith("silent_ratio/") and k.endswith("_mean")))


def markdown(keys: Sequence[str], rows: list[dict]) -> str:
  """One table row per point (mean ± std over seeds; fractions in %), then, when
  the layers have several kinds, the silent ratio per layer kind."""
  cols = tables.task_columns(rows, METRICS)
  heads = tables.headings(1)
  lines = ["| " + " | ".join(list(keys) + ["seeds"] + [heads[c] for c in cols]) + " |",
           "|---" * (len(keys) + 1 + len(cols)) + "|"]
  for r in rows:
    cells = [_fmt(r[k]) for k in keys] + [str(r["n"])] + [tables.cell(r, c) for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  names = kinds(rows)
  if len(names) > 1:
    lines += ["", "Silent ratio per layer kind (%, mean ± std over seeds):", "",
              "| " + " | ".join(list(keys) + names) + " |",
              "|---" * (len(keys) + len(names)) + "|"]
    for r in rows:
      cells = [_fmt(r[k]) for k in keys] + [
          tables.pct(r.get(f"silent_ratio/{n}_mean", math.nan),
                     r.get(f"silent_ratio/{n}_std", math.nan), 1) for n in names]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot(keys: Sequence[str], rows: list[dict], path, title: str = "") -> epath.Path:
  """Silent ratio, final accuracy (language models: test bits per byte) and peak
  flip ratio against the first axis, one line per combination of the other axes
  (error bars: std over seeds)."""
  # pylint: disable=g-import-not-at-top
  from ovsw_jax.repro import plots
  plt = plots.plt
  x_key, others = keys[0], list(keys[1:])
  xs_all = [r[x_key] for r in rows]
  numeric = _numeric(xs_all)
  categories = list(dict.fromkeys(_fmt(x) for x in xs_all))
  lm = bool(tables.present(rows, ("test_bits_per_byte",)))
  panels = (("silent_ratio", "silent ratio (%)", 100),
            ("test_bits_per_byte", "test bits per byte", 1) if lm else
            ("final_accuracy", "test top-1, final (%)", 100),
            ("peak_step_flip_ratio", "peak flip ratio per step (%)", 100) if lm else
            ("peak_flip_ratio", "peak flip ratio per epoch (%)", 100))
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6 if numeric else 4.4))
  lines: dict[str, list[dict]] = {}
  for r in rows:
    lines.setdefault(", ".join(f"{k}={_fmt(r[k])}" for k in others), []).append(r)
  for i, (label, line) in enumerate(lines.items()):
    line = sorted(line, key=lambda r: r[x_key] if numeric else categories.index(_fmt(r[x_key])))
    x = [r[x_key] if numeric else categories.index(_fmt(r[x_key])) for r in line]
    for ax, (col, _, scale) in zip(axes, panels):
      mean = np.array([r[f"{col}_mean"] for r in line]) * scale
      std = np.nan_to_num(np.array([r[f"{col}_std"] for r in line]) * scale)
      # Categories are not a scale: no line joins them.
      ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, label=label or None,
                  ls="-" if numeric else "none",
                  color=f"C{i}")
  positive = numeric and all(x > 0 for x in xs_all)
  for ax, (_, name, _) in zip(axes, panels):
    ax.set_title(name, fontsize=10)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
    if not numeric:
      ax.set_xticks(range(len(categories)), categories, rotation=35, ha="right", fontsize=8)
    elif positive and max(xs_all) / min(xs_all) > 20:
      ax.set_xscale("log")
  if any(lines):
    axes[0].legend(fontsize=7, loc="best")
  if title:
    fig.suptitle(title, fontsize=10)
  return plots.finish(fig, epath.Path(path))


def write_report(group_dir, out_dir, prefix: str = "grid") -> list[epath.Path]:
  """`<prefix>.csv`, `<prefix>.md` and `<prefix>.png` of the grid in `group_dir`."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  keys, rows = collect(group_dir)
  if not rows:
    raise FileNotFoundError(f"No grid points (runs with a point in run.json) under {group_dir}.")
  tables.write_csv(out_dir / f"{prefix}.csv", rows)
  (out_dir / f"{prefix}.md").write_text(markdown(keys, rows))
  plot(keys, rows, out_dir / f"{prefix}.png",
       title=f"{epath.Path(group_dir).name}: {rows[0]['epochs']:.3g} epochs, "
             f"{'/'.join(sorted({str(r['n']) for r in rows}))} seed(s) per point")
  return [out_dir / f"{prefix}.{ext}" for ext in ("csv", "md", "png")]

