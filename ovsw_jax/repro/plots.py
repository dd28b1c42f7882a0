"""The study's figures (PNG) from logged metrics and weight snapshots.

  python -m ovsw_jax.repro.plots --workdir=DIR [--out=DIR/report] [--layers=first,last]
      [--groups=digits,...]

Works on any directory of training workdirs (see `events.find_runs`); for
each group of runs it draws:
  <prefix>hist_<layer>.png  (a) histogram of the initial latent weights of a
      binary layer, all of them and the never-flipped ones overlaid, one panel
      per arm (vanilla and OvSW where present, seed with the lowest number).
      Needs the run's `weights.npz` (or `config.json` and a checkpoint, see
      `snapshot`); runs without are skipped.
  <prefix>curves.png  (b) flip ratio per evaluation interval, silent ratio
      and test accuracy against epoch, every arm (mean over seeds, band min-max).
  <prefix>ovsw_fractions.png  (c) SAD's silent fraction and AGS's scaled
      fraction against step, for the arms that have them.
The prefix is the group's name (see `tables.prefix_of`).
"""

from __future__ import annotations

import io
from typing import Sequence

from etils import epath
from absl import app, flags, logging
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from ovsw_jax.repro import events, snapshot, tables  # pylint: disable=wrong-import-position

COLORS = {"vanilla": "tab:blue", "ags": "tab:green", "sad": "tab:purple", "ovsw": "tab:red"}
LABELS = {"vanilla": "vanilla", "ags": "AGS only", "sad": "SAD only", "ovsw": "OvSW"}
DPI = 100


def save_figure(fig, path) -> epath.Path:
  """Writes `fig` as a PNG to `path` through `epath` (the folder may be on an object store)."""
  path = epath.Path(path)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  path.write_bytes(buf.getvalue())
  return path


def finish(fig, path) -> epath.Path:
  """Lays out, saves (`save_figure`) and closes `fig`; returns the file's path."""
  fig.tight_layout()
  path = save_figure(fig, path)
  plt.close(fig)
  return path


def _color(arm: str, i: int) -> str:
  return COLORS.get(arm, f"C{(i + 4) % 10}")


def _label(arm: str) -> str:
  return LABELS.get(arm, arm)


def choose_layers(names: Sequence[str], spec: str | Sequence[str]) -> list[str]:
  """Picks layers from `names` (network order) by `spec`: 'all', or a comma
  list of names and of 'first' / 'last' (the deepest binary layer, as the
  paper's layer4.conv2 is in ResNet-18)."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  if items == ["all"]:
    return list(names)
  out = []
  for item in (i.strip() for i in items):
    name = names[0] if item == "first" else names[-1] if item == "last" else item
    if name not in names:
      raise ValueError(f"No binary layer {item!r}; have {list(names)}.")
    if name not in out:
      out.append(name)
  return out


def _by_arm(runs: list[events.Run]) -> dict[str, list[events.Run]]:
  out: dict[str, list[events.Run]] = {}
  for run in runs:
    out.setdefault(run.arm, []).append(run)
  return out


def plot_histograms(runs: list[events.Run], out_dir, prefix: str,
                    layers: str | Sequence[str] = "first,last",
                    bins: int = 60) -> list[epath.Path]:
  """(a): per layer, initial latent weights, all vs never flipped, per arm."""
  by_arm = _by_arm(runs)
  arms = [a for a in ("vanilla", "ovsw") if a in by_arm] or list(by_arm)
  snaps = {}
  for arm in arms:
    run = min(by_arm[arm], key=lambda r: r.seed)
    weights = snapshot.load_weights(run.path)
    if weights is None:
      logging.warning("No weights.npz (nor config.json) in %s: no histogram.", run.path)
      continue
    if weights:  # a float twin has no quantized layer to draw
      snaps[arm] = (run, weights)
  if not snaps:
    return []
  common = set.intersection(*(set(w) for _, w in snaps.values()))
  layer_list = sorted(common, key=events.natural_key)
  written = []
  for layer in choose_layers(layer_list, layers):
    fig, axes = plt.subplots(1, len(snaps), figsize=(4.2 * len(snaps), 3.2),
                             sharex=True, sharey=True, squeeze=False)
    w_all = np.concatenate([w[layer]["init"].ravel() for _, w in snaps.values()])
    edges = np.linspace(*np.percentile(w_all, [0.1, 99.9]), bins + 1)
    for ax, (arm, (run, weights)) in zip(axes[0], snaps.items()):
      w0 = weights[layer]["init"].ravel()
      silent = weights[layer]["never_flipped"].ravel()
      ax.hist(w0, bins=edges, color="0.75", label="all weights")
      ax.hist(w0[silent], bins=edges, color=_color(arm, 0), alpha=0.8,
              label=f"never flipped ({100 * silent.mean():.1f}%)")
      ax.set_title(f"{_label(arm)} (seed {run.seed})", fontsize=10)
      ax.set_xlabel("initial latent weight")
      ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel("count")
    fig.suptitle(f"{layer}: weights that never changed level", fontsize=10)
    written.append(finish(fig, epath.Path(out_dir, f"{prefix}hist_{layer.replace('/', '_')}.png")))
  return written


def _curve(runs: list[events.Run], scalars: dict, tag: str, x_tag: str | None):
  """(x, mean, min, max) of `tag` over the runs, on the steps all of them logged."""
  series = [scalars[r.path] for r in runs if tag in scalars[r.path]]
  if not series:
    return None
  steps = series[0][tag][0]
  for s in series[1:]:
    steps = np.intersect1d(steps, s[tag][0])
  if steps.size == 0:
    return None
  values = np.stack([s[tag][1][np.searchsorted(s[tag][0], steps)] for s in series])
  x = steps.astype(float)
  if x_tag is not None and x_tag in series[0]:
    xs, xv = series[0][x_tag]
    x = np.interp(steps, xs, xv)
  return x, values.mean(0), values.min(0), values.max(0)


def _draw(ax, curve, arm: str, i: int, scale: float = 100.0, **kw) -> None:
  if curve is None:
    return
  x, mean, lo, hi = curve
  color = _color(arm, i)
  ax.plot(x, scale * mean, color=color, label=_label(arm), **kw)
  if len(x) > 1 and np.any(hi > lo):
    ax.fill_between(x, scale * lo, scale * hi, color=color, alpha=0.2, lw=0)
  elif len(x) == 1:
    ax.plot(x, scale * mean, "o", color=color)


def plot_curves(runs: list[events.Run], scalars: dict, out_dir, prefix: str,
                layer: str | None = None) -> epath.Path:
  """(b): flip ratio, silent ratio and test accuracy against epoch, every arm.

  The flip ratio is overall (solid) and, if `layer` is given, that layer's
  (dashed), as the paper's Fig. 1c plots one layer.
  """
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  by_arm = _by_arm(runs)
  for i, (arm, arm_runs) in enumerate(by_arm.items()):
    _draw(axes[0], _curve(arm_runs, scalars, "flip_ratio", "epoch"), arm, i)
    if layer:
      curve = _curve(arm_runs, scalars, f"flip_ratio/{layer}", "epoch")
      if curve is not None:
        x, mean = curve[0], curve[1]
        axes[0].plot(x, 100 * mean, color=_color(arm, i), ls="--", lw=1)
    _draw(axes[1], _curve(arm_runs, scalars, "silent_ratio", "epoch"), arm, i)
    _draw(axes[2], _curve(arm_runs, scalars, "eval_accuracy", "epoch"), arm, i)
  rows = [tables.summarize_run(r, scalars[r.path]) for r in runs]
  interval = float(np.nanmedian([r["eval_interval_epochs"] for r in rows]))
  per = "epoch" if interval == 1 else f"{interval:.3g} epochs"
  title = f"flip ratio per {per} (%)"
  if layer:
    title += f"\nsolid: all binary layers, dashed: {layer}"
  axes[0].set_title(title, fontsize=9)
  axes[1].set_title("silent ratio: never flipped since init (%)", fontsize=9)
  axes[2].set_title("test top-1 (%)", fontsize=9)
  accs = [r["final_accuracy"] for r in rows]
  if accs and min(accs) > 0.5:
    axes[2].set_ylim(100 * max(0.0, min(accs) - 0.1), 100.5)
  for ax in axes:
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  axes[2].legend(fontsize=8, loc="lower right")
  return finish(fig, epath.Path(out_dir, f"{prefix}curves.png"))


def plot_step_curves(runs: list[events.Run], scalars: dict, out_dir,
                     prefix: str) -> epath.Path:
  """A run evaluated once (the language model): its per-step flip and oscillation
  ratios (docs/method.md section 11) and training bits per byte, every arm."""
  panels = (("train_step_flip_ratio", "weights that change level, per step (%)", 100.0),
            ("train_step_oscillation_ratio", "... reversing their previous change (%)", 100.0),
            ("train_bits_per_byte", "training bits per byte", 1.0))
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for i, (arm, arm_runs) in enumerate(_by_arm(runs).items()):
    for ax, (tag, _, scale) in zip(axes, panels):
      _draw(ax, _curve(arm_runs, scalars, tag, None), arm, i, scale=scale)
  for ax, (_, title, _) in zip(axes, panels):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[1].set_yscale("log")
  axes[2].legend(fontsize=8, loc="upper right")
  return finish(fig, epath.Path(out_dir, f"{prefix}curves.png"))


def plot_ovsw_fractions(runs: list[events.Run], scalars: dict, out_dir,
                        prefix: str) -> epath.Path | None:
  """(c): SAD's silent fraction and AGS's scaled fraction against step."""
  by_arm = _by_arm(runs)
  tags = (("silent_fraction", "SAD: silent weights (tracker < threshold) (%)"),
          ("scaled_fraction", "AGS: channels whose gradient is scaled up (%)"))
  if not any(tag in scalars[r.path] for r in runs for tag, _ in tags):
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for ax, (tag, title) in zip(axes, tags):
    for i, (arm, arm_runs) in enumerate(by_arm.items()):
      _draw(ax, _curve(arm_runs, scalars, tag, None), arm, i)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc="best")
  return finish(fig, epath.Path(out_dir, f"{prefix}ovsw_fractions.png"))


def write_plots(workdir, out_dir, layers: str | Sequence[str] | None = None,
                groups: Sequence[str] | None = None) -> list[epath.Path]:
  """Draws every figure for every group under `workdir` (or for those matching
  `groups`, shell patterns); returns the files."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  runs = events.find_runs(workdir)
  if not runs:
    raise FileNotFoundError(f"No runs (metrics.jsonl files) under {workdir}.")
  written = []
  for group, group_runs in events.group_runs(runs, groups).items():
    prefix = tables.prefix_of(group)
    scalars = {r.path: events.read_scalars(r.path) for r in group_runs}
    names = events.layer_names(next(iter(scalars.values())))
    spec = layers or "first,last"
    written += plot_histograms(group_runs, out_dir, prefix, spec)
    if any("eval_accuracy" in x for x in scalars.values()):
      written.append(plot_curves(group_runs, scalars, out_dir, prefix,
                                 layer=names[-1] if names else None))
    else:
      written.append(plot_step_curves(group_runs, scalars, out_dir, prefix))
    fractions = plot_ovsw_fractions(group_runs, scalars, out_dir, prefix)
    if fractions is not None:
      written.append(fractions)
  return written


def main(argv):
  del argv
  out = flags.FLAGS.out or str(epath.Path(flags.FLAGS.workdir, "report"))
  for path in write_plots(flags.FLAGS.workdir, out, flags.FLAGS.layers, flags.FLAGS.groups):
    print(path)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A study directory (or one training workdir).")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/report).")
  flags.DEFINE_list("groups", [], "Only these groups (shell patterns; default: all).")
  flags.DEFINE_string("layers", "first,last",
                      "Layers for the histograms: 'all' or names / 'first' / 'last'.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
