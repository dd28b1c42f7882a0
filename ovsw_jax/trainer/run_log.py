"""What a user sees of a run: a compact console line, TensorBoard, and `metrics.jsonl`.

The trainer writes its scalars through one clu `MetricWriter` made by
`create_writer`, which forwards every write to:

- TensorBoard (process 0): every scalar, per-layer figures included, and the
  whole config as hparams (`flatten_hparams`: dotted keys such as `ovsw.delta`).
- `WORKDIR/metrics.jsonl` (process 0): one JSON object per write,
  `{"step": N, "kind": "train" | "eval", ...scalars}`, appended (a resumed run
  continues the file) and flushed at once (a killed run keeps its lines). A
  last line torn by a crash mid-write is repaired first (`repair_torn_line`),
  so the next record starts on a line of its own. Written through
  `etils.epath`: the workdir may be on an object store (`gs://...`). The
  reproduction study (`ovsw_jax.repro.events`) reads this file.
- the log (every process): one short line per write (`train_line`,
  `eval_line`) with the overall figures, steps/s and ETA; per-layer keys
  (those with a "/") stay out of it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

from clu import metric_writers
from etils import epath

from ovsw_jax.trainer.workdir import METRICS_FILE, write_atomically


def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`config` (nested mappings) as one flat dict with dotted keys, for TensorBoard's hparams.

  TensorBoard takes only bool, int, float and str values: anything else
  (a tuple of widths, a list, None) is given as its `str`.

  >>> flatten_hparams({'lr': 0.1, 'ovsw': {'delta': 0.04}, 'widths': (16, 32), 'x': None})
  {'lr': 0.1, 'ovsw.delta': 0.04, 'widths': '(16, 32)', 'x': 'None'}
  """
  out: dict[str, Any] = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_hparams(value, prefix=name + "."))
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:
      out[name] = str(value)
  return out


def kind_of(scalars: Mapping[str, Any]) -> str:
  """'eval' for an evaluation's summary (it has `eval_*` keys), else 'train'."""
  return "eval" if any(k.startswith("eval_") for k in scalars) else "train"


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def _speed(step: int, num_steps: int, steps_per_sec: float | None) -> str:
  if not steps_per_sec:
    return "- steps/s, ETA ?"
  return f"{steps_per_sec:.2f} steps/s, ETA {_duration((num_steps - step) / steps_per_sec)}"


def _percent(scalars: Mapping[str, Any], key: str) -> str:
  return f"{100 * float(scalars[key]):.2f}%" if key in scalars else "-"


def _headline(scalars: Mapping[str, Any], prefix: str) -> str:
  """The task's main figure: top-1 for classifiers, bits per byte for language models."""
  bpb = f"{prefix}_bits_per_byte"
  if f"{prefix}_accuracy" not in scalars and bpb in scalars:
    test = f"{prefix}_test_bits_per_byte"
    extra = f" (test {float(scalars[test]):.4f})" if test in scalars else ""
    return f"bits/byte {float(scalars[bpb]):.4f}{extra}"
  return f"top-1 {_percent(scalars, f'{prefix}_accuracy')}"


def eval_line(step: int, num_steps: int, scalars: Mapping[str, Any],
              steps_per_sec: float | None) -> str:
  """The console line of one evaluation: epoch, step, loss, top-1, silent and flip ratio, speed.

  A language model shows bits per byte (validation, then test) instead of top-1.

  >>> print(eval_line(50, 100, {'epoch': 1.0, 'eval_loss': 0.5, 'eval_accuracy': 0.9,
  ...                           'silent_ratio': 0.25, 'flip_ratio': 0.01}, 10.0))
  eval epoch 1.00 step 50/100: loss 0.5000, top-1 90.00%, silent 25.00%, flip 1.00%
  | 10.00 steps/s, ETA 0:00:05
  """
  loss = f"{float(scalars['eval_loss']):.4f}" if "eval_loss" in scalars else "-"
  epoch = f"epoch {float(scalars['epoch']):.2f} " if "epoch" in scalars else ""
  return (f"eval {epoch}step {step}/{num_steps}: loss {loss}, "
          f"{_headline(scalars, 'eval')}, "
          f"silent {_percent(scalars, 'silent_ratio')}, flip {_percent(scalars, 'flip_ratio')}"
          f" | {_speed(step, num_steps, steps_per_sec)}")


def train_line(step: int, num_steps: int, scalars: Mapping[str, Any],
               steps_per_sec: float | None) -> str:
  """The console line of one train-log write: loss, top-1 and learning rate since the last one.

  >>> train_line(10, 100, {'train_loss': 1.5, 'train_accuracy': 0.5, 'learning_rate': 0.1}, None)
  'train step 10/100: loss 1.5000, top-1 50.00%, lr 0.1 | - steps/s, ETA ?'
  """
  loss = f"{float(scalars['train_loss']):.4f}" if "train_loss" in scalars else "-"
  lr = f"{float(scalars['learning_rate']):.4g}" if "learning_rate" in scalars else "-"
  return (f"train step {step}/{num_steps}: loss {loss}, "
          f"{_headline(scalars, 'train')}, lr {lr}"
          f" | {_speed(step, num_steps, steps_per_sec)}")


class _ScalarsOnly(metric_writers.MetricWriter):
  """A writer that takes scalars only: every other kind of write is ignored."""

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


class ConsoleWriter(_ScalarsOnly):
  """Logs one compact line per `write_scalars` (INFO), with steps/s and ETA.

  Speed is measured from the writer's creation (the start of this process's
  training, compilation included) at `start_step`; `clock` is injectable for tests.
  """

  def __init__(self, num_steps: int, start_step: int = 0,
               clock: Callable[[], float] = time.monotonic):
    self._num_steps = num_steps
    self._start = (start_step, clock())
    self._clock = clock

  def steps_per_sec(self, step: int) -> float | None:
    """Steps per second since the start, or None before any step or time has passed."""
    start_step, start_time = self._start
    elapsed = self._clock() - start_time
    return (step - start_step) / elapsed if step > start_step and elapsed > 0 else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    line = eval_line if kind_of(scalars) == "eval" else train_line
    logging.info("%s", line(step, self._num_steps, scalars, self.steps_per_sec(step)))


def _json_value(value: Any) -> Any:
  """A scalar as a JSON number (numpy and JAX scalars included); ints stay ints."""
  return value if isinstance(value, (bool, int, str)) else float(value)


def repair_torn_line(path: str | os.PathLike) -> str | None:
  """Ends a JSON-lines file on a whole line; returns what was done (also logged), or None.

  A last line without its newline (the writer was killed mid-write) is
  terminated if it is a whole record, else cut off; appending to it as it is
  would glue the next record to the fragment and lose both to every reader.
  """
  path = epath.Path(path)
  if not path.exists():
    return None
  data = path.read_bytes()
  if not data or data.endswith(b"\n"):
    return None
  head, newline, tail = data.rpartition(b"\n")
  try:
    whole = isinstance(json.loads(tail), dict)
  except ValueError:
    whole = False
  if whole:
    write_atomically(path, data + b"\n")
    done = f"terminated its last line (a whole record without its newline, {len(tail)} bytes)"
  else:
    write_atomically(path, head + newline)
    done = f"cut its torn last line ({len(tail)} bytes, not a whole record)"
  logging.warning("%s ended mid-line (a write was interrupted): %s.", path, done)
  return done


class JsonLinesWriter(_ScalarsOnly):
  """Appends each `write_scalars` to a JSON-lines file, flushed at once.

  One object per write: `{"step": N, "kind": "train" | "eval", ...scalars}`
  (`kind_of`). Everything but scalars is ignored. The file is opened through
  `etils.epath` (local or object store) after `repair_torn_line`. On an object
  store each flush uploads the whole file again (objects cannot be appended to).
  """

  def __init__(self, path: str | os.PathLike):
    path = epath.Path(path)
    repair_torn_line(path)
    self._stack = contextlib.ExitStack()
    # epath's open is a context manager on object stores: the stack keeps it open.
    self._file = self._stack.enter_context(path.open("a"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "kind": kind_of(scalars)}
    record.update({k: _json_value(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def flush(self):
    self._file.flush()

  def close(self):
    self._stack.close()


class RunWriter(metric_writers.MultiWriter):
  """The trainer's writer (see the module docstring).

  Attributes:
    tensorboard: the TensorBoard writer alone (None off process 0), for clu's
      `ReportProgress`, whose steps/s and uptime go to TensorBoard only.
  """

  def __init__(self, writers, tensorboard: metric_writers.MetricWriter | None):
    super().__init__(writers)
    self.tensorboard = tensorboard

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the config, nested fields included (`flatten_hparams`)."""
    super().write_hparams(flatten_hparams(hparams))


def create_writer(workdir: str, *, num_steps: int, start_step: int,
                  is_main: bool) -> RunWriter:
  """The writer of a run in `workdir` that trains up to `num_steps` from `start_step`.

  Console lines on every process; TensorBoard and `METRICS_FILE` on the main one.
  """
  writers: list[metric_writers.MetricWriter] = [ConsoleWriter(num_steps, start_step)]
  tensorboard = None
  if is_main:
    tensorboard = metric_writers.SummaryWriter(workdir)
    writers += [tensorboard, JsonLinesWriter(epath.Path(workdir) / METRICS_FILE)]
  return RunWriter(writers, tensorboard)
