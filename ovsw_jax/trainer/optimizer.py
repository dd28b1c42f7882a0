"""The trainer's optimizer from a config: schedule and chain (docs/method.md §4, §7).

The glue between `ml_collections` configs and the Optax transforms of
`ovsw_jax.optim`, which stay free of config and layer libraries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ovsw_jax.optim import (
    HyperparameterError, add_sad_penalty, binary_weight_mask, scale_by_ags)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> optax.Schedule:
  """The release's schedule: linear warm-up, then cosine (docs/method.md §7).

  `config.lr_schedule`:
    - 'epoch_cosine' (the release): the rate changes once per epoch `e`:
      `lr0 * (e + 1) / W` while `e < W`, then
      `0.5 * (1 + cos(pi * (e - W) / (E - W))) * lr0 + 1e-5`.
    - 'step_cosine': `optax.warmup_cosine_decay_schedule` per step, ending at
      the run's end: `num_train_steps` where set (> 0), else `num_epochs`.
    - 'constant'.
  """
  lr0 = config.learning_rate
  epochs = config.num_epochs
  warmup = config.warmup_epochs
  if config.lr_schedule == "constant":
    return optax.constant_schedule(lr0)
  if config.lr_schedule == "step_cosine":
    steps = config.get("num_train_steps", -1)
    total = max(int(steps if steps > 0 else epochs * steps_per_epoch), 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr0, warmup_steps=int(warmup * steps_per_epoch),
        decay_steps=total, end_value=config.get("end_learning_rate", 1e-5))
  if config.lr_schedule != "epoch_cosine":
    raise ValueError(f"lr_schedule={config.lr_schedule!r}: use 'epoch_cosine', "
                     "'step_cosine' or 'constant'.")
  cosine = optax.cosine_decay_schedule(lr0, decay_steps=max(epochs - warmup, 1))
  per_epoch = lambda e: cosine(e) + 1e-5
  if warmup > 0:
    # lr0 * (e + 1) / W for e in [0, W).
    ramp = optax.linear_schedule(lr0 / warmup, lr0 * (warmup + 1) / warmup, warmup)
    per_epoch = optax.join_schedules([ramp, per_epoch], boundaries=[warmup])
  return lambda step: per_epoch(jnp.asarray(step) // steps_per_epoch)


def _weight_decay_mask(params, exclude_1d: bool):
  return jax.tree.map(lambda p: not (exclude_1d and p.ndim <= 1), params)


def ovsw_transforms(oc: ml_collections.ConfigDict,
                    levels: Any = None) -> list[optax.GradientTransformation]:
  """AGS and SAD as `config.ovsw` asks (none, one or both), on binary kernels only.

  `levels`: the kernels' quantizers (`train.model_levels`; None: signs), and
  `config.ovsw.toward` (default 'zero') SAD's target (`add_sad_penalty`).

  Why: a bad value (`--config.ovsw.delta=nan`, a negative `dampen_weight`, a
  `track_momentum` of 1) must stop the run before training with a message that
  names the config field and how to set it, not train with NaN updates.

  Raises:
    ValueError: a hyperparameter of `config.ovsw` is out of range.
  """
  parts = []
  try:
    if oc.ags:
      parts.append(scale_by_ags(oc.delta, mask=binary_weight_mask))
    if oc.sad:
      parts.append(add_sad_penalty(oc.dampen_weight, oc.track_momentum,
                                   oc.track_threshold, mask=binary_weight_mask,
                                   levels=levels, toward=oc.get("toward", "zero")))
  except HyperparameterError as e:
    raise ValueError(
        f"config.ovsw.{e.argument} is invalid: {e} Fix it in the config file or "
        f"on the command line (--config.ovsw.{e.argument}=VALUE).") from e
  return parts


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule,
                     levels: Any = None) -> optax.GradientTransformation:
  """loss gradient -> AGS -> SAD -> weight decay -> base optimizer (docs/method.md §4).

  AGS and SAD act on the latent kernels of binary layers only
  (`binary_weight_mask`); each can be switched off (`config.ovsw.ags`,
  `config.ovsw.sad`; both off is the vanilla BNN). Weight decay is added to
  the gradient as in torch's SGD, skipping 1-D parameters (BatchNorm, biases,
  PReLU) when `config.wd_exclude_1d`.
  """
  parts = ovsw_transforms(config.ovsw, levels)
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(
        config.weight_decay,
        mask=lambda p: _weight_decay_mask(p, config.wd_exclude_1d)))
  name = config.optimizer
  if name == "sgd":
    parts.append(optax.sgd(learning_rate_fn, momentum=config.momentum,
                           nesterov=config.get("nesterov", False)))
  elif name == "adam":
    parts.append(optax.adam(learning_rate_fn))
  elif name == "adamw":
    # Decoupled decay lives in adamw itself; `weight_decay` above is the L2 form.
    parts.append(optax.adamw(learning_rate_fn, weight_decay=config.get("adamw_decay", 1e-4)))
  else:
    raise ValueError(f"optimizer={name!r}: use 'sgd', 'adam' or 'adamw'.")
  return optax.chain(*parts)
