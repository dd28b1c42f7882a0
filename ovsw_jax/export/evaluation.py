"""Top-1 of the exported network next to the float simulation, on a test split."""

from __future__ import annotations

from typing import Callable, Mapping

import ml_collections
import numpy as np

from ovsw_jax.trainer import input_pipeline
from ovsw_jax.trainer.data import device

Predict = Callable[[np.ndarray], np.ndarray]


def evaluate(config: ml_collections.ConfigDict,
             predictors: Mapping[str, Predict]) -> dict[str, float]:
  """One exact pass over `config`'s evaluation split with every predictor.

  Returns `top1/<name>` for each predictor, `count`, and, with two or more
  predictors, `agreement` (fraction of images where all give the same
  argmax) and `max_abs_diff` (largest logit difference to the first one).
  """
  correct = {name: 0 for name in predictors}
  count, agree, max_diff = 0, 0, 0.0
  stats = input_pipeline.get_info(config).pixel_stats
  for batch in input_pipeline.eval_iterator(
      config, global_batch_size=config.eval_batch_size, process_index=0, process_count=1):
    mask = np.asarray(batch["mask"], bool)
    labels = np.asarray(batch["label"])[mask]
    images = np.asarray(device.model_images(batch, stats))
    logits = {name: np.asarray(fn(images))[mask] for name, fn in predictors.items()}
    preds = {name: x.argmax(-1) for name, x in logits.items()}
    for name, p in preds.items():
      correct[name] += int(np.sum(p == labels))
    first = next(iter(logits.values()))
    agree += int(np.sum(np.all([p == preds[next(iter(preds))] for p in preds.values()], axis=0)))
    max_diff = max([max_diff] + [float(np.max(np.abs(x - first), initial=0.0))
                                 for x in logits.values()])
    count += int(mask.sum())
  out = {f"top1/{name}": c / max(count, 1) for name, c in correct.items()}
  out["count"] = float(count)
  if len(predictors) > 1:
    out["agreement"] = agree / max(count, 1)
    out["max_abs_diff"] = max_diff
  return out
