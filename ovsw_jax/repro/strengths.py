"""OvSW's strengths for another run length, from the summed learning rate.

  python -m ovsw_jax.repro.strengths [--dataset=digits] [--reference_set=KEY=VALUE ...]
      [--reference_dataset=NAME] [--exponent=0.5] --set=KEY=VALUE ...

Both transforms act once per step and their effect scales with the step
size: AGS moves a channel by about `lr * delta * ||w||` per step, SAD shrinks a
silent weight by `lr * gamma` of itself per step (docs/method.md). What they
do over a run therefore grows with `S = sum_t lr_t`, the summed learning rate
of the schedule. The rule: a run of another length (or schedule, batch size,
data set size) gets the reference's effect on the silent ratio when

  delta = delta_ref * (S_ref / S) ** p      gamma = gamma_ref * (S_ref / S) ** p

with p = 0.5, measured (docs/results.md, section 6.6): the silent ratio of an
80-epoch reference (45.4%) was held at 47.8% and 41.8% by 40- and 160-epoch
runs with p = 0.5, where fixed strengths (p = 0) gave 60.0% and 28.0% and
p = 1 (strength times summed learning rate constant) over-corrected to 33.1%
and 54.0%. A square root is what a random walk gives: the scaled steps point
where noisy gradients point, so a weight's net travel grows like the square
root of the summed step sizes, not like their sum.

The reference is the data set's config (`--reference_set` changes it, e.g. to
the strengths scaled for this data set); the target is the reference with
`--set` applied. With `--reference_dataset` the reference is that data set's
config and the target `--dataset`'s (with `--set`): a first guess for a new
task from a measured one, e.g. the language model from the digits default.
It prints both sums, the ratio and the two `--config.ovsw` flags to use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# See the module docstring: 0.5 keeps strength x sqrt(summed learning rate)
# constant (measured best of 0, 0.5 and 1); 1 keeps strength x summed learning rate.
EXPONENT = 0.5


def steps_per_epoch(config) -> int:
  """As the trainer counts them: training examples // global batch size."""
  from ovsw_jax.trainer import tasks  # pylint: disable=g-import-not-at-top
  return max(tasks.create(config).num_train // config.batch_size, 1)


def summed_learning_rate(config, steps_per_epoch_: int | None = None) -> float:
  """`sum_t lr_t` over the run's steps, from the trainer's own schedule."""
  # pylint: disable=g-import-not-at-top
  from ovsw_jax.trainer import train
  from ovsw_jax.trainer.optimizer import create_learning_rate_fn
  spe = steps_per_epoch(config) if steps_per_epoch_ is None else steps_per_epoch_
  num_steps = train._num_steps(config, spe)  # pylint: disable=protected-access
  schedule = create_learning_rate_fn(config, spe)
  lrs = jax.vmap(schedule)(jnp.arange(num_steps))
  return float(np.sum(np.asarray(lrs, np.float64)))


def matched_strengths(config, reference, *, exponent: float = EXPONENT,
                      steps_per_epoch_: int | None = None,
                      reference_steps_per_epoch: int | None = None) -> dict[str, float]:
  """delta and dampen_weight for `config`: the reference's times `(S_ref / S) ** exponent`."""
  s = summed_learning_rate(config, steps_per_epoch_)
  s_ref = summed_learning_rate(reference, reference_steps_per_epoch)
  if not (s > 0 and math.isfinite(s)):
    raise ValueError(f"The run's summed learning rate is {s}: no strength can match it.")
  ratio = (s_ref / s) ** exponent
  return {"summed_lr": s, "reference_summed_lr": s_ref, "ratio": ratio,
          "delta": float(reference.ovsw.delta) * ratio,
          "dampen_weight": float(reference.ovsw.dampen_weight) * ratio}


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ovsw_jax.repro import run as run_lib
  f = flags.FLAGS
  reference = run_lib.apply_overrides(
      run_lib.load_config(f.reference_dataset or f.dataset, "ovsw"),
      run_lib.parse_overrides(f.reference_set))
  base = run_lib.load_config(f.dataset, "ovsw") if f.reference_dataset else reference
  target = run_lib.apply_overrides(base, run_lib.parse_overrides(f.set))
  m = matched_strengths(target, reference, exponent=f.exponent)
  print(f"reference: delta {reference.ovsw.delta:g}, dampen_weight "
        f"{reference.ovsw.dampen_weight:g}, summed learning rate {m['reference_summed_lr']:.4g}")
  print(f"this run:  summed learning rate {m['summed_lr']:.4g} "
        f"({m['summed_lr'] / m['reference_summed_lr']:.3g}x the reference)")
  print(f"use: --config.ovsw.delta={m['delta']:.3g} --config.ovsw.dampen_weight="
        f"{m['dampen_weight']:.3g}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ovsw_jax.repro import run as _run
  flags.DEFINE_enum("dataset", "digits", sorted(_run.CONFIG_MODULES), "Data set and config.")
  flags.DEFINE_string("reference_dataset", None, "The reference's data set and config, if "
                      "not --dataset's (e.g. digits for a first language-model run).")
  flags.DEFINE_multi_string("reference_set", [], "Override of the reference config KEY=VALUE.")
  flags.DEFINE_multi_string("set", [], "Override of the target run KEY=VALUE, e.g. num_epochs=160.")
  flags.DEFINE_float("exponent", EXPONENT, "Strengths scale as (S_ref / S) ** exponent.")
  app.run(main)
