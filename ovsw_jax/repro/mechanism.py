"""The silent-weight mechanism on a synthetic task: do silent weights follow the update's
dependence on the weight's magnitude?

  python -m ovsw_jax.repro.mechanism [--out=DIR] [--seeds=3] [--steps=2000]

The paper's explanation of silent weights (section 3): with a straight-through
sign, the gradient of a latent weight does not depend on its magnitude (the
release's binary layer sees only `sign(w)` and a per-channel scale that is
itself invariant to rescaling the channel), so a weight far from zero needs
proportionally more steps to change sign, and many never do. Two checks:

1. Gradient independence, numerically (`gradient_independence`): rescaling an
   output channel of the latent kernel by any positive factor leaves the loss
   gradient bit-for-bit unchanged, and across a channel's weights the
   gradient's magnitude is uncorrelated with the weight's.
2. The mechanism (`simulate`): a student binary linear layer (the release's:
   `x @ (ste_sign(W) * channel_scale(W))`) learns a binary teacher's outputs
   from fresh Gaussian inputs each step (MSE, SGD with momentum). About half of
   the student's initial signs disagree with the teacher's, so those weights
   must flip to learn. The arms differ only in how the update depends on
   magnitude: `p=0` is the release's gradient; `p=0.5` and `p=1` multiply each
   weight's gradient by `(|w| / mean_o |w|) ** p`, and `p=1, floor` by
   `max(|w| / mean_o |w|, 1)`, each renormalised to mean 1 per output channel
   so the channel's mean step size is unchanged (the control: only the
   distribution of the steps over magnitudes changes); `p=0, lr x4` takes 4x
   larger steps instead (BitNet's remedy); `ags`, `sad` and `ovsw` are the
   library's transforms in front of the same SGD. Measured: the share of
   weights that never flipped, overall and per quintile of the initial
   magnitude (relative to the channel's mean), the share of the initially
   wrong signs that never flipped (the weights that had to), sign agreement
   with the teacher, the mean step, and the correlation of |g| with |w| at the end.

Writes `mechanism.csv` (one row per arm and seed), `mechanism.md` (mean ± std
over seeds) and `mechanism.png` (never-flipped share per magnitude quintile).
Seconds per run on a CPU core.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ovsw_jax import quantizers
from ovsw_jax.optim import add_sad_penalty, scale_by_ags

# The task and recipe (`simulate`'s defaults): 256 inputs, 32 outputs (8,192
# weights), 64 fresh examples a step, SGD lr 0.01 momentum 0.9: a budget at which
# about half of the weights that must flip have not (a short run, as the paper's
# silent weights are a budget effect).
D_IN, D_OUT, BATCH, LR, MOMENTUM = 256, 32, 64, 0.01, 0.9
QUINTILES = 5


def binary_linear(w: jax.Array, x: jax.Array) -> jax.Array:
  """The release's binary layer on a dense kernel, `x @ (ste_sign(w) * alpha(w))`,
  divided by `sqrt(fan_in)` (the normalisation a BatchNorm after it would do)."""
  return x @ (quantizers.ste_sign(w) * quantizers.channel_scale(w)) / math.sqrt(w.shape[0])


def loss_fn(w: jax.Array, x: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean squared error against the teacher's outputs (a binary layer of the same form)."""
  return jnp.mean((binary_linear(w, x) - binary_linear(teacher, x)) ** 2)


def scale_by_magnitude(power: float, floor: bool = False) -> optax.GradientTransformation:
  """`g <- g * m / mean_o(m)` with `m = r ** power`, `r = |w| / mean_o |w|`, per output channel.

  The controlled dependence of the update on the weight's magnitude; power 0 is
  the identity. `floor`: `r = max(|w| / mean_o |w|, 1)`, so weights below the
  channel's mean magnitude keep a common step and only larger ones get larger
  steps (without it a weight's step vanishes as it nears zero, where it would
  flip). The renormalisation keeps each channel's mean multiplier at 1.
  """
  def update(updates, state, params):
    a = jnp.abs(params)
    r = a / jnp.maximum(a.mean(0, keepdims=True), 1e-12)
    m = (jnp.maximum(r, 1.0) if floor else r) ** power
    return updates * m / m.mean(0, keepdims=True), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def arms(delta: float = 0.04, gamma: float = 9e-4) -> dict[str, optax.GradientTransformation]:
  """The arms: the release's gradient, two magnitude-dependent ones, and AGS/SAD/OvSW."""
  sgd = optax.sgd(LR, momentum=MOMENTUM)
  sad = functools.partial(add_sad_penalty, gamma, 0.99, 1e-3)
  return {"p=0": sgd,
          "p=0, lr x4": optax.sgd(4 * LR, momentum=MOMENTUM),
          "p=0.5": optax.chain(scale_by_magnitude(0.5), sgd),
          "p=1": optax.chain(scale_by_magnitude(1.0), sgd),
          "p=1, floor": optax.chain(scale_by_magnitude(1.0, floor=True), sgd),
          "ags": optax.chain(scale_by_ags(delta), sgd),
          "sad": optax.chain(sad(), sgd),
          "ovsw": optax.chain(scale_by_ags(delta), sad(), sgd)}


def problem(seed: int, d_in: int = D_IN, d_out: int = D_OUT):
  """(initial student kernel, teacher kernel, key for the batches) of `seed`.

  Both are Kaiming-normal (fan-in) latent kernels of the same binary layer, so
  the student can match the teacher exactly by taking its signs.
  """
  k_w, k_t, k_x = jax.random.split(jax.random.PRNGKey(seed), 3)
  w0 = jax.random.normal(k_w, (d_in, d_out)) * math.sqrt(2.0 / d_in)
  teacher = jax.random.normal(k_t, (d_in, d_out)) * math.sqrt(2.0 / d_in)
  return w0, teacher, k_x


def batch(key: jax.Array, step: int | jax.Array, d_in: int = D_IN, size: int = BATCH):
  """The inputs of `step`: a pure function of (key, step)."""
  return jax.random.normal(jax.random.fold_in(key, step), (size, d_in))


@functools.partial(jax.jit, static_argnames=("tx", "steps", "size"))
def _train(w0, teacher, key, tx, steps: int, size: int):
  def step(carry, t):
    w, opt_state, ever = carry
    x = batch(key, t, w0.shape[0], size)
    g = jax.grad(loss_fn)(w, x, teacher)
    updates, opt_state = tx.update(g, opt_state, w)
    w = optax.apply_updates(w, updates)
    ever = ever | (jnp.sign(w) != jnp.sign(w0))
    return (w, opt_state, ever), jnp.mean(jnp.abs(updates))
  init = (w0, tx.init(w0), jnp.zeros(w0.shape, bool))
  (w, _, ever), steps_taken = jax.lax.scan(step, init, jnp.arange(steps))
  x = batch(key, steps, w0.shape[0], 4096)  # held out: a step index no training batch used
  g = jax.grad(loss_fn)(w, x, teacher)
  return w, ever, loss_fn(w, x, teacher), g, jnp.mean(steps_taken)


def simulate(arm: str, seed: int, *, steps: int = 2000, size: int = BATCH,
             d_in: int = D_IN, d_out: int = D_OUT,
             transforms: dict | None = None) -> dict[str, object]:
  """Trains the student of `seed` with `arm`'s transform for `steps`; returns its figures.

  Keys: `silent_ratio`, `silent_by_quintile` (never-flipped share per quintile
  of `|w0| / mean_o |w0|`, smallest first), `wrong_stuck` (of the weights whose
  initial sign disagreed with the teacher's: the share that never flipped),
  `agreement` (final signs equal to the teacher's), `loss` (held-out MSE),
  `mean_step` (the mean |update| of a weight per step, over the run),
  `grad_weight_corr` (Pearson correlation of |g| and |w| over the weights at the
  end, each channel's values divided by their mean first), and the arrays
  `w0`, `w`, `ever_flipped`, `teacher`.
  """
  tx = (transforms or arms())[arm]
  w0, teacher, key = problem(seed, d_in, d_out)
  w, ever, loss, g, mean_step = _train(w0, teacher, key, tx, steps, size)
  w0, w, ever, teacher, g = map(np.asarray, (w0, w, ever, teacher, g))
  rel = np.abs(w0) / np.abs(w0).mean(0, keepdims=True)
  edges = np.quantile(rel, np.linspace(0, 1, QUINTILES + 1))
  which = np.clip(np.searchsorted(edges, rel, side="right") - 1, 0, QUINTILES - 1)
  wrong = np.sign(w0) != np.sign(teacher)
  return {"arm": arm, "seed": seed, "steps": steps,
          "silent_ratio": float((~ever).mean()),
          "silent_by_quintile": [float((~ever)[which == q].mean()) for q in range(QUINTILES)],
          "wrong_stuck": float((~ever)[wrong].mean()),
          "agreement": float((np.sign(w) == np.sign(teacher)).mean()),
          "loss": float(loss),
          "mean_step": float(mean_step),
          "grad_weight_corr": magnitude_correlation(g, w),
          "w0": w0, "w": w, "ever_flipped": ever, "teacher": teacher}


def magnitude_correlation(g: np.ndarray, w: np.ndarray) -> float:
  """Pearson correlation of |g| and |w| over the weights, each divided by its output
  channel's mean first (channels whose gradient is all zero left out; NaN if all are)."""
  ga, wa = np.abs(g), np.abs(w)
  keep = (ga.mean(0) > 0) & (wa.mean(0) > 0)
  if not keep.any():
    return math.nan
  ga, wa = ga[:, keep] / ga[:, keep].mean(0), wa[:, keep] / wa[:, keep].mean(0)
  return float(np.corrcoef(ga.ravel(), wa.ravel())[0, 1])


def gradient_independence(seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT) -> dict:
  """The release's gradient does not see magnitudes: two numbers (see the module docstring).

  `max_abs_diff`: the largest difference between the loss gradients at `W` and
  at `W * c` (c > 0, one factor per output channel, from 0.1 to 10);
  `grad_weight_corr`: the correlation of |g| and |w| (each divided by its
  channel's mean) at a random `W`.
  """
  w, teacher, key = problem(seed, d_in, d_out)
  c = jnp.exp(jax.random.uniform(jax.random.PRNGKey(seed + 1), (1, d_out),
                                 minval=math.log(0.1), maxval=math.log(10.0)))
  x = batch(key, 0, d_in, 4096)
  g = np.asarray(jax.jit(jax.grad(loss_fn))(w, x, teacher))
  g_scaled = np.asarray(jax.jit(jax.grad(loss_fn))(w * c, x, teacher))
  return {"max_abs_diff": float(np.max(np.abs(g - g_scaled))),
          "max_abs_grad": float(np.max(np.abs(g))),
          "grad_weight_corr": magnitude_correlation(g, np.asarray(w))}


SUMMARY = ("silent_ratio", "wrong_stuck", "agreement", "loss", "mean_step",
           "grad_weight_corr")


def summarize(results: list[dict]) -> list[dict]:
  """Mean and sample std over seeds per arm (first-seen order), quintiles included."""
  out = []
  for arm in dict.fromkeys(r["arm"] for r in results):
    rows = [r for r in results if r["arm"] == arm]
    entry = {"arm": arm, "n": len(rows)}
    cols = {c: [r[c] for r in rows] for c in SUMMARY}
    for q in range(QUINTILES):
      cols[f"silent_q{q + 1}"] = [r["silent_by_quintile"][q] for r in rows]
    for col, values in cols.items():
      v = np.asarray(values, np.float64)
      entry[f"{col}_mean"] = float(v.mean())
      entry[f"{col}_std"] = float(v.std(ddof=1)) if v.size > 1 else math.nan
    out.append(entry)
  return out


def markdown(summary: list[dict], independence: dict) -> str:
  """The arm table and the gradient-independence figures."""
  def pm(r, col, scale=100.0, digits=1):
    mean, std = r[f"{col}_mean"] * scale, r[f"{col}_std"] * scale
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
  heads = (["arm", "seeds", "never flipped (%)"] +
           [f"q{q + 1}" for q in range(QUINTILES)] +
           ["wrong and never flipped (%)", "signs = teacher's (%)", "held-out MSE (x1e3)",
            "mean step (x1e4)", "corr(abs g, abs w)"])
  lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
  for r in summary:
    cells = [r["arm"], str(r["n"]), pm(r, "silent_ratio")]
    cells += [pm(r, f"silent_q{q + 1}") for q in range(QUINTILES)]
    cells += [pm(r, "wrong_stuck"), pm(r, "agreement"), pm(r, "loss", 1e3, 1),
              pm(r, "mean_step", 1e4, 2), pm(r, "grad_weight_corr", 1.0, 3)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Gradient independence (release's layer): rescaling each output channel by "
            f"0.1-10x changes the gradient by at most {independence['max_abs_diff']:.3g} "
            f"(largest gradient entry {independence['max_abs_grad']:.3g}); "
            f"corr(|g|, |w|) at a random kernel {independence['grad_weight_corr']:.3f}."]
  return "\n".join(lines) + "\n"


def plot(summary: list[dict], path) -> None:
  """Never-flipped share against the initial-magnitude quintile, one line per arm."""
  from ovsw_jax.repro import plots  # pylint: disable=g-import-not-at-top
  plt = plots.plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  x = np.arange(1, QUINTILES + 1)
  for i, r in enumerate(summary):
    mean = np.array([r[f"silent_q{q}_mean"] for q in x]) * 100
    std = np.nan_to_num(np.array([r[f"silent_q{q}_std"] for q in x]) * 100)
    ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, label=r["arm"], color=f"C{i}")
  ax.set_xlabel("quintile of initial |w| / channel mean (1: smallest)")
  ax.set_ylabel("never flipped (%)")
  ax.set_xticks(x)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.finish(fig, path)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from ovsw_jax.repro import tables  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  out = epath.Path(f.out)
  out.mkdir(parents=True, exist_ok=True)
  transforms = arms(f.delta, f.gamma)
  results = [simulate(arm, seed, steps=f.steps, transforms=transforms)
             for seed in range(f.seeds) for arm in transforms]
  summary = summarize(results)
  independence = gradient_independence()
  tables.write_csv(out / "mechanism.csv", [
      {k: v for k, v in r.items() if not isinstance(v, (np.ndarray, list))} |
      {f"silent_q{q + 1}": v for q, v in enumerate(r["silent_by_quintile"])} for r in results])
  (out / "mechanism.md").write_text(markdown(summary, independence))
  plot(summary, out / "mechanism.png")
  print((out / "mechanism.md").read_text())


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", "mechanism", "Output directory.")
  flags.DEFINE_integer("seeds", 3, "Seeds (0, 1, ...).")
  flags.DEFINE_integer("steps", 2000, "Training steps per run.")
  flags.DEFINE_float("delta", 0.04, "AGS's delta in the ags and ovsw arms.")
  flags.DEFINE_float("gamma", 9e-4, "SAD's gamma in the sad and ovsw arms.")
  app.run(main)
