"""Reproduction of the paper's silent-weight study (Xiang et al., 2024, Fig. 1).

Modules:
  run      trains the vanilla / AGS / SAD / OvSW arms over several seeds.
  sweep    trains OvSW over a grid of (delta, dampen_weight).
  events   reads the scalars a run logged (its `metrics.jsonl`).
  snapshot exports initial latent weights and never-flipped masks of a run.
  tables   results tables (Markdown and CSV) from a study directory.
  plots    the figures (PNG) from a study directory.

A study directory holds one training workdir per run, laid out as
`<group>/<arm>/seed<k>/` (see `run.run_dir`); the readers discover runs by
their `metrics.jsonl`, so any directory of `ovsw_jax.main` workdirs also works.
"""
