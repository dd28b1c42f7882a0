"""Entry point: `python -m ovsw_jax.main --config=configs/imagenet_r18.py --workdir=DIR`.

`--config` is an ml_collections config file (any field overridable as
`--config.field=value`); without it the embedded default (`configs/default.py`,
binary ResNet on scikit-learn's 8x8 digits) runs. The run resumes from the
newest checkpoint in `--workdir`.

Several processes (one per host, or per group of GPUs): give every process
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (process 0
serves the coordinator at HOST:PORT); each drives every accelerator it sees
unless `--local_device_ids` names some. On a TPU pod
`--config.distributed_init=True` alone is enough: jax finds the workers, and
each drives all of its chips. Under SLURM `--config.distributed_init=True`
finds the processes too, but jax then gives each process only the GPU
numbered `SLURM_LOCALID`: pass the GPUs each task drives as
`--local_device_ids`, numbered as the task sees them (0..k-1 for the k GPUs
of its `CUDA_VISIBLE_DEVICES`). `launch/gpu_multinode.sh` works them out for
one task per node, several tasks per node and per-task GPU binding
(`--gpus-per-task`); `launch/tpu_pod.sh` runs a pod. See `launch/`.

Each process of a multi-process run trains in a child of a thin supervising
parent (`supervisor`), which turns a peer's death into a clear message.

Signals (see `preemption`): SIGTERM, SIGINT (Ctrl-C) and those named by
`--preemption_signals` (e.g. `USR1`, for SLURM's `--signal=USR1@120`) save
the current state and stop, during an evaluation too; a second SIGINT stops
at once, without saving. SIGQUIT (`kill -QUIT PID`, Ctrl-\\) prints every
thread's stack (what a stuck run waits for) and the run goes on.

Exit status: 0 finished; 75 (`preemption.EXIT_PREEMPTED`) stopped on SIGTERM
or a `--preemption_signals` signal after checkpointing (start the same command
again to resume); 130 the same after SIGINT; 1 an error (configuration, data,
workdir and checkpoint errors print their message alone; `--verbose` adds the
traceback); 2 a command-line usage error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ovsw_jax.trainer import preemption, supervisor

def _default_config() -> str:
  """The path of `configs/default.py`: the checkout's, else the installed package's.

  A wheel carries `configs/` as `ovsw_jax.configs`. The config files import
  their shared fields as `configs.common`; where no top-level `configs` package
  is importable (an install without a checkout), that name is bound to the
  packaged copy.
  """
  package = pathlib.Path(__file__).resolve().parents[1]  # ovsw_jax/
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
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0's coordination service (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("local_device_ids", None,
                    "Comma-separated accelerator numbers this process drives, e.g. 0,1,2,3 "
                    "(default: jax decides; under SLURM that is one GPU per process).")
flags.DEFINE_integer("heartbeat_timeout_s", 60,
                     "Seconds without a peer's heartbeat after which the other processes "
                     "stop with an error (a dead host).")
flags.DEFINE_integer("join_timeout_s", 300,
                     "Seconds every process waits for all processes of a multi-process run "
                     "to join; then it stops, naming the processes that did not.")
flags.DEFINE_bool("allow_config_change", False,
                  "Continue the workdir's run although the config changed in a field that "
                  "alters the run (see ovsw_jax/trainer/workdir.py).")
flags.DEFINE_string("preemption_signals", "",
                    "Comma-separated signals that, besides TERM and INT, make the run save and "
                    "stop like a preemption (exit 75), e.g. USR1 for SLURM's --signal=USR1@120. "
                    "Choices: " + ",".join(s.name[3:] for s in preemption.OPTIONAL) + ".")
flags.DEFINE_bool("verbose", False, "Print tracebacks of errors (normally the message only).")
flags.mark_flags_as_required(["workdir"])


def _quiet_orbax() -> None:
  """Keeps orbax's log to what a user reads: no per-save INFO, one line per problem.

  Orbax logs dozens of INFO lines per checkpoint, and its background threads
  log every failure with a traceback (thousands of lines for a full disk); the
  trainer reports such failures itself, in one paragraph.
  """
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class _Filter(std_logging.Filter):
    def filter(self, record):
      # asyncio reports orbax's failed read tasks ("Task exception was never retrieved").
      if "/orbax/" not in record.pathname and record.name != "asyncio":
        return True
      if record.levelno < std_logging.WARNING:
        return False
      if record.exc_info and not FLAGS.verbose:
        record.exc_info, record.exc_text = None, None
        record.msg, record.args = str(record.getMessage()).splitlines()[0][:300], ()
      return True

  logging.get_absl_handler().addFilter(_Filter())


def _start_processes(config) -> None:
  from ovsw_jax.trainer import multihost  # pylint: disable=g-import-not-at-top
  multihost.initialize(
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      local_device_ids=multihost.parse_device_ids(FLAGS.local_device_ids),
      heartbeat_timeout_s=FLAGS.heartbeat_timeout_s, join_timeout_s=FLAGS.join_timeout_s,
      auto=bool(config.distributed_init))
  multihost.log_layout()
  # Before anything is built or written: every process runs process 0's config
  # on the same data (the task's data record: the language model's corpus).
  import ovsw_jax  # pylint: disable=g-import-not-at-top
  from ovsw_jax.trainer import tasks, workdir  # pylint: disable=g-import-not-at-top
  data = tasks.create(config).data_record()
  multihost.check_agreement(workdir.config_record(config, data), ovsw_jax.__version__,
                            timeout_s=FLAGS.join_timeout_s)


def _user_errors() -> tuple[type[BaseException], ...]:
  """Errors whose message says what is wrong and what to do: printed without traceback."""
  from ovsw_jax.trainer import checkpointing, input_pipeline, train, workdir  # pylint: disable=g-import-not-at-top
  return (input_pipeline.DatasetNotPreparedError, ValueError, train.NonFiniteLossError,
          workdir.WorkdirLockedError, checkpointing.CheckpointMismatchError,
          checkpointing.CheckpointSaveError, OSError)


def _check_values_early(config) -> None:
  """The trainer's first check (a task that exists, every value in range), before the
  trainer's imports (TensorFlow's alone takes 7 s): a bad value is one `error:` line at once.

  Single-process runs only: the processes of a multi-process run join first, so
  that a config that differs between them is named as such (`multihost`).
  """
  from ovsw_jax.trainer import config_checks, tasks  # pylint: disable=g-import-not-at-top
  try:
    tasks.task_class(config.get("task", tasks.DEFAULT))
    config_checks.check_values(config)
  except config_checks.ConfigError as e:
    if FLAGS.verbose:
      raise
    sys.exit(f"error: {e}")


def _multi_process_requested() -> bool:
  return bool(FLAGS.config.distributed_init) or (FLAGS.num_processes or 1) > 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    sys.exit(f"error: --workdir={FLAGS.workdir} is a file, not a directory: give a new or "
             "existing directory.")
  try:
    stop_signals = preemption.parse_signals(FLAGS.preemption_signals)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if _multi_process_requested() and not supervisor.is_child():
    # A peer's death aborts this process from C++; the parent says what happened.
    sys.exit(supervisor.run_child(sys.argv[1:], process_id=FLAGS.process_id,
                                  workdir=FLAGS.workdir, stop_signals=stop_signals))
  # From here to the process's end: stop signals ask for a save, SIGQUIT
  # prints every thread's stack (what a stuck run is waiting for).
  preemption.install(stop_signals)
  preemption.install_stack_dump()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _quiet_orbax()
  if not _multi_process_requested():
    _check_values_early(FLAGS.config)
  # Imported here so `--help` stays fast and TF never grabs an accelerator.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  from ovsw_jax.trainer import train  # pylint: disable=g-import-not-at-top
  try:
    _start_processes(FLAGS.config)
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                      allow_config_change=FLAGS.allow_config_change)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_status)
  except _user_errors() as e:
    if FLAGS.verbose:
      raise
    sys.exit(f"error: {e}")
  if result:
    logging.info("Final: %s", {k: v for k, v in result.items() if "/" not in k})


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with two more errors as one `error:` line: a config file's
  own (an unknown `:ARG` word; ml_collections hands it over inside the text of a
  traceback, the file's error on its last line), and an override of a field the
  config does not have (an AttributeError out of ml_collections)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "Error whilst parsing config file" in str(e) and lines:
      sys.exit(f"error: --config: {lines[-1]}")
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"  # absl's own message
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except AttributeError as e:
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    name = str(e).strip("\"'")  # AttributeError(KeyError('name'))
    sys.exit(f"error: the config has no field '{name}' (overrides given: {', '.join(given)}); "
             "configs/common.py lists every field.")


def run() -> None:
  """Parses the command line and trains (`python -m ovsw_jax.main`)."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except SyntaxError as e:
    if FLAGS.is_parsed():  # raised by the run, not while absl loaded the --config file
      raise
    sys.exit(f"error: the config file {e.filename} does not parse: line {e.lineno}: {e.msg}. "
             "Fix the file and start again.")


if __name__ == "__main__":
  run()
