"""Training memory per binary weight, measured from the state pytrees.

  python -m ovsw_jax.repro.memory [--out=DIR]

The paper counts training memory in multiples of Psi, the parameter count.
This module builds each setting's real `TrainState` (shapes only, through
`jax.eval_shape`) and sums the bytes of every leaf that belongs to a binary
weight (a leaf whose path ends with a latent kernel's path), by part:

  latent      the float latent weights themselves;
  optimizer   the base optimizer's moments (SGD's momentum; Adam's mu and nu);
  ovsw        OvSW's state: SAD's tracker and previous signs (AGS keeps none);
  flips       the trainer's flip history (a measurement, not needed to train).

"release" replaces OvSW's state by what the authors' release keeps per binary
weight (the whole previous weight and the tracker, both float32), built as a
pytree of the same binary leaves and measured the same way; everything else
is the same optimizer. Rows cover SGD (the paper's) and Adam.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
import numpy as np

from ovsw_jax.optim.chain import binary_weight_mask
from ovsw_jax.optim.ags import ScaleByAgsState
from ovsw_jax.optim.sad import AddSadPenaltyState

# (name, config module, dataset info (num_classes, image shape) or None to read it)
SETTINGS = (("digits ResNet (default)", "default", None),
            ("ImageNet ResNet-18", "imagenet_r18", (1000, (224, 224, 3))))
PARTS = ("latent", "optimizer", "ovsw", "flips")


def _nbytes(leaf) -> int:
  return int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


def binary_paths(params: Any) -> list[str]:
  """Key paths (as strings) of the binary latent kernels in a params tree."""
  mask = binary_weight_mask(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(mask)
  return [jax.tree_util.keystr(path) for path, is_binary in flat if is_binary]


def binary_leaves(tree: Any, paths: list[str], *,
                  skip: Callable[[Any], bool] | None = None) -> list[Any]:
  """The array leaves of `tree` whose key path ends with one of `paths`.

  Optimizer states hold per-weight leaves under the parameter's own path
  (after prefixes such as the chain's index or the state's field name), so a
  suffix match finds a binary weight's leaves in any of the trees. Subtrees
  for which `skip` is true are left out whole.
  """
  return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=skip)[0]
          if hasattr(leaf, "shape") and not (skip and skip(leaf))
          and any(jax.tree_util.keystr(path).endswith(p) for p in paths)]


def bytes_on(tree: Any, paths: list[str]) -> int:
  """Bytes of the leaves of `tree` whose path ends with one of `paths`."""
  return sum(_nbytes(leaf) for leaf in binary_leaves(tree, paths))


def _is_ovsw(state) -> bool:
  return isinstance(state, (ScaleByAgsState, AddSadPenaltyState))


def abstract_state(config, info: tuple[int, tuple[int, ...]] | None = None):
  """The `TrainState` of `config`, as shapes and dtypes (nothing allocated)."""
  # pylint: disable=g-import-not-at-top
  from ovsw_jax.trainer import input_pipeline, train
  from ovsw_jax.trainer.tasks import image_classification
  data = None
  if info is not None:
    num_classes, image_shape = info
    data = input_pipeline.DatasetInfo(config.dataset, num_classes=num_classes,
                                      image_shape=tuple(image_shape), num_train=0, num_eval=0)
  task = image_classification.ImageClassification(config, data)
  model = task.create_model(train.AXIS)
  tx = train.create_optimizer(config, lambda step: 0.1)
  return jax.eval_shape(
      lambda key: train.create_train_state(key, model, tx, task.init_inputs()),
      jax.random.key(0))


def measure(state) -> dict[str, float]:
  """Bytes per binary weight of each part (see module docstring), ours and the release's."""
  paths = binary_paths(state.params)
  binary = binary_leaves(state.params, paths)
  n = sum(int(np.prod(leaf.shape)) for leaf in binary)
  # OvSW's states may sit inside optax wrappers (masked, chain): split by type.
  flat = jax.tree_util.tree_flatten_with_path(state.opt_state, is_leaf=_is_ovsw)[0]
  ovsw = [leaf for _, leaf in flat if _is_ovsw(leaf)]
  moments = binary_leaves(state.opt_state, paths, skip=_is_ovsw)
  out = {"binary_weights": n,
         "latent": sum(_nbytes(leaf) for leaf in binary) / n,
         "optimizer": sum(_nbytes(leaf) for leaf in moments) / n,
         "ovsw": bytes_on(ovsw, paths) / n,
         "flips": bytes_on(state.flips, paths) / n}
  # The release's per-weight OvSW state: float32 previous weight + float32 tracker.
  release = {"prev_weight": [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in binary],
             "tracker": [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in binary]}
  out["ovsw_release"] = sum(_nbytes(x) for x in jax.tree.leaves(release)) / n
  out["train_total"] = out["latent"] + out["optimizer"] + out["ovsw"]
  out["train_total_release"] = out["latent"] + out["optimizer"] + out["ovsw_release"]
  return out


def table(rows: list[dict]) -> str:
  lines = ["| setting | optimizer | binary weights | latent | optimizer moments | OvSW (ours) "
           "| OvSW (release) | total (ours) | total (release) | flip history |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['setting']} | {r['optimizer_name']} | {r['binary_weights']:,} | "
        f"{r['latent']:.2f} | {r['optimizer']:.2f} | {r['ovsw']:.2f} | {r['ovsw_release']:.2f} "
        f"| {r['train_total']:.2f} | {r['train_total_release']:.2f} | {r['flips']:.2f} |")
  return "\n".join(lines) + "\n"


def _config(module: str):
  """`configs/<module>.py`'s OvSW config (the repository's configs, as `run` loads them)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from ovsw_jax.repro import run as run_lib  # pylint: disable=g-import-not-at-top
  run_lib.load_config("digits", "ovsw")  # puts the repository's configs on the path
  return importlib.import_module(f"configs.{module}").get_config("ovsw")


def measure_all() -> list[dict]:
  rows = []
  for setting, module, info in SETTINGS:
    for optimizer in ("sgd", "adam"):
      config = _config(module)
      config.optimizer = optimizer
      rows.append({"setting": setting, "optimizer_name": optimizer,
                   **measure(abstract_state(config, info))})
  return rows


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ovsw_jax.repro import tables
  rows = measure_all()
  text = ("Bytes per binary weight (`python -m ovsw_jax.repro.memory`); total = latent + "
          "optimizer + OvSW.\n\n" + table(rows))
  print(text)
  out = flags.FLAGS.out
  if out:
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    tables.write_csv(epath.Path(out, "memory.csv"), rows)
    epath.Path(out, "memory.md").write_text(text)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", None, "Directory for memory.csv and memory.md.")
  app.run(main)
