"""Entry point: `python -m ovsw_jax.main --config=configs/imagenet_r18.py --workdir=DIR`.

`--config` is an ml_collections config file (any field overridable as
`--config.field=value`); without it the embedded default (`configs/default.py`,
binary ResNet on scikit-learn's 8x8 digits) runs. The run resumes from the
newest checkpoint in `--workdir`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _default_config() -> str:
  """The path of `configs/default.py`: the checkout's, else the installed package's.

  A wheel carries `configs/` as `ovsw_jax.configs`. The config files import
  their shared fields as `configs.common`; where no top-level `configs` package
  is importable (an install without a checkout), that name is bound to the
  packaged copy.
  """
  package = pathlib.Path(__file__).resolve().parent
  checkout = package.parent / "configs" / "default.py"
  if checkout.is_file():
    return str(checkout)
  if importlib.util.find_spec("configs") is None:
    sys.modules["configs"] = importlib.import_module("ovsw_jax.configs")
  return str(package / "configs" / "default.py")


_DEFAULT_CONFIG = _default_config()

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def _quiet_orbax_info() -> None:
  """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings stay."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

  logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _quiet_orbax_info()
  # Imported here so `--help` stays fast and TF never grabs an accelerator.
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  if FLAGS.config.distributed_init:
    jax.distributed.initialize()
  from ovsw_jax import input_pipeline, train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except input_pipeline.DatasetNotPreparedError as e:
    sys.exit(f"error: {e}")
  if result:
    logging.info("Final: %s", {k: v for k, v in result.items() if "/" not in k})


if __name__ == "__main__":
  app.run(main)
