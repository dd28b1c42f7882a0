"""Export a trained run to its deployable binary network, or evaluate an export.

  python -m ovsw_jax.export --workdir=DIR --out=FILE [--config=FILE[:ARG]]
      Reads the run's config (DIR/config.json, or --config like ovsw_jax.main),
      restores the newest checkpoint in DIR/checkpoints, writes FILE, prints the
      cost summary and the test-split top-1 of the export next to the float
      simulation, with their agreement.
  python -m ovsw_jax.export --evaluate=FILE --config=FILE[:ARG]
      Top-1 of an exported network on the config's test split.

Bad input (no workdir, no checkpoint, a file that is not a readable export)
ends with a one-line `error: ...`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from ovsw_jax.trainer.workdir import CONFIG_FILE  # the run config the trainer records

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir to export (its checkpoints/).")
flags.DEFINE_string("out", None, "Path of the exported file to write.")
flags.DEFINE_string("evaluate", None, "Exported file to evaluate (needs --config).")
flags.DEFINE_enum("backend", "auto", ["auto", "int8", "xnor", "float32"],
                  "Binary conv arithmetic of the exported network.")
config_flags.DEFINE_config_file(
    "config", None, "Run config, when the workdir has no config.json.", lock_config=False)


class UsageError(Exception):
  """Bad command-line input; its message is printed as one line."""


def _config_of_workdir(workdir: str):
  """--config if given, else the workdir's recorded config (checked before heavy imports).

  A missing or damaged `config.json` is stood in for by the config saved in
  the newest checkpoint (`checkpointing.saved_config`), when there is one.
  """
  if not epath.Path(workdir).is_dir():
    raise UsageError(f"workdir {workdir} does not exist.")
  if FLAGS.config is not None:
    return FLAGS.config
  path = epath.Path(workdir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    problem = (f"{workdir} has no {CONFIG_FILE}" if not path.exists()
               else f"{path} is not a readable config ({e})")
  saved = _saved_config(workdir)
  if saved is None:
    raise UsageError(f"{problem}, and no checkpoint carries the run's config: give it with "
                     "--config=FILE[:ARG] (as given to ovsw_jax.main).")
  logging.warning("%s: using the config saved in the newest checkpoint.", problem)
  return ml_collections.ConfigDict(saved)


def _saved_config(workdir: str) -> dict | None:
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return None
  from ovsw_jax.trainer import checkpointing  # pylint: disable=g-import-not-at-top
  manager = checkpointing.create_manager(str(ckpt_dir))
  try:
    return checkpointing.saved_config(manager)
  finally:
    manager.close()


def _check_checkpoints(workdir: str) -> epath.Path:
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
    raise UsageError(f"no checkpoint in {ckpt_dir}: train first with "
                     f"`python -m ovsw_jax.main --workdir={workdir}`.")
  return ckpt_dir


def _restore(config, ckpt_dir: epath.Path):
  """The run's data info and train state from the newest restorable checkpoint."""
  from ovsw_jax.trainer import checkpointing, train  # pylint: disable=g-import-not-at-top
  setup = train.setup(config)
  manager = checkpointing.create_manager(str(ckpt_dir))
  state = checkpointing.restore_latest(manager, setup.initial_state)
  manager.close()
  if state is None:
    raise UsageError(f"no checkpoint in {ckpt_dir} could be restored for model "
                     f"{config.model!r}: is --config the run's config?")
  return setup.task.info, state


def _config_subset(config) -> dict:
  keys = ("dataset", "model", "image_size", "half_precision", "seed", "num_epochs",
          "num_train_steps")
  return {k: config.get(k) for k in keys if k in config}


def export_run(workdir: str, out: str) -> None:
  config = _config_of_workdir(workdir)
  ckpt_dir = _check_checkpoints(workdir)
  from ovsw_jax import export, summary  # pylint: disable=g-import-not-at-top
  from ovsw_jax.export import evaluation  # pylint: disable=g-import-not-at-top
  info, state = _restore(config, ckpt_dir)
  net = export.export_network(
      config.model, info.num_classes, state.params, state.batch_stats, info.image_shape,
      model_kwargs=dict(config.get("model_kwargs", {}) or {}), config=_config_subset(config))
  size = export.save(net, out)
  print(f"wrote {out}: {size:,} bytes ({FLAGS.backend} binary convs)\n")
  cost = summary.summarize(net.model(), info.image_shape)
  print(summary.format_totals(cost) + "\n")
  model = net.model()
  simulate = lambda x: export.simulate(model, state.params, state.batch_stats, x)
  result = evaluation.evaluate(config, {"exported": export.predictor(net, FLAGS.backend),
                                        "simulation": simulate})
  print(f"test split ({int(result['count'])} images): exported top-1 "
        f"{result['top1/exported']:.4f}, float simulation top-1 {result['top1/simulation']:.4f}, "
        f"agreement {result['agreement']:.4f}, max |logit diff| {result['max_abs_diff']:.2e}")


def evaluate_file(path: str) -> None:
  if FLAGS.config is None:
    raise UsageError("--evaluate needs --config=FILE[:ARG] for the test split.")
  if not epath.Path(path).is_file():
    raise UsageError(f"{path} does not exist or is not a file; give the path of an export.")
  from ovsw_jax import export  # pylint: disable=g-import-not-at-top
  from ovsw_jax.trainer import input_pipeline
  from ovsw_jax.export import evaluation  # pylint: disable=g-import-not-at-top
  net = export.load(path)
  info = input_pipeline.get_info(FLAGS.config)
  header = net.header
  if list(info.image_shape) != header["image_shape"] or info.num_classes != header["num_classes"]:
    raise UsageError(
        f"{path} takes {tuple(header['image_shape'])} images with {header['num_classes']} "
        f"classes, the config's data set has {tuple(info.image_shape)} and {info.num_classes}: "
        "give the config of the exported run.")
  result = evaluation.evaluate(FLAGS.config, {"exported": export.predictor(net, FLAGS.backend)})
  print(f"{path} ({header['model']}): test split ({int(result['count'])} images) "
        f"top-1 {result['top1/exported']:.4f}")


def _run() -> None:
  if FLAGS.evaluate:
    evaluate_file(FLAGS.evaluate)
  elif FLAGS.workdir and FLAGS.out:
    export_run(FLAGS.workdir, FLAGS.out)
  else:
    raise UsageError("give --workdir=DIR --out=FILE, or --evaluate=FILE --config=...")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  from ovsw_jax.export import ExportError  # pylint: disable=g-import-not-at-top
  try:
    _run()
  except (UsageError, ExportError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  except Exception as e:  # pylint: disable=broad-except
    from ovsw_jax.trainer import input_pipeline  # pylint: disable=g-import-not-at-top
    if isinstance(e, input_pipeline.DatasetNotPreparedError):
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
