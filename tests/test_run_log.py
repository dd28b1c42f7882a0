"""What a run shows: the compact console lines, `metrics.jsonl`, and the config in TensorBoard."""

import json
import logging

import numpy as np
import pytest

from helpers import load_config
from ovsw_jax.trainer import run_log, train
from ovsw_jax.repro import events


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_hparams(workdir):
  """The hparams of the run's TensorBoard events (the hparams plugin's session start)."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.plugins.hparams import plugin_data_pb2
  out = {}
  for path in workdir.glob("events.out.tfevents.*"):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "hparams":
          data = plugin_data_pb2.HParamsPluginData.FromString(
              value.metadata.plugin_data.content)
          for name, v in data.session_start_info.hparams.items():
            out[name] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
  return out


def test_flatten_hparams_keeps_nested_fields_as_dotted_keys():
  config = load_config("default", "runlocal")
  config.model_kwargs.widths = (16, 32)
  flat = run_log.flatten_hparams(config.to_dict())
  assert flat["ovsw.delta"] == config.ovsw.delta
  assert flat["model_kwargs.widths"] == "(16, 32)"
  assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
  assert not any(isinstance(v, dict) for v in flat.values())
  assert run_log.flatten_hparams({"a": {"b": {"c": None}}, "d": [1]}) == {
      "a.b.c": "None", "d": "[1]"}


def test_console_line_speed_and_eta_from_the_clock(caplog):
  now = [100.0]
  writer = run_log.ConsoleWriter(num_steps=1000, start_step=200, clock=lambda: now[0])
  now[0] = 110.0  # 100 steps in 10 s: 10 steps/s, 700 steps left: 70 s
  caplog.set_level(logging.INFO)
  writer.write_scalars(300, {"eval_loss": 1.0, "eval_accuracy": 0.5, "epoch": 3.0,
                             "silent_ratio": 0.2, "silent_ratio/layer1/conv1": 0.3,
                             "flip_ratio": 0.1})
  (line,) = [r.getMessage() for r in caplog.records]
  assert line.startswith("eval epoch 3.00 step 300/1000: loss 1.0000, top-1 50.00%")
  assert "silent 20.00%" in line and "flip 10.00%" in line
  assert line.endswith("10.00 steps/s, ETA 0:01:10")
  assert "layer1" not in line


def test_json_lines_append_and_kind(tmp_path):
  path = tmp_path / "m.jsonl"
  writer = run_log.JsonLinesWriter(path)
  writer.write_scalars(2, {"train_loss": np.float32(0.5), "learning_rate": 0.1})
  writer.write_scalars(4, {"eval_accuracy": 0.25, "flip_ratio/a/b": 0.5})
  # Flushed on each write: readable before close.
  assert [r["kind"] for r in read_jsonl(path)] == ["train", "eval"]
  writer.close()
  again = run_log.JsonLinesWriter(path)
  again.write_scalars(6, {"eval_accuracy": 0.75})
  again.close()
  records = read_jsonl(path)
  assert [(r["step"], r["kind"]) for r in records] == [(2, "train"), (4, "eval"), (6, "eval")]
  assert records[1]["flip_ratio/a/b"] == 0.5 and records[0]["train_loss"] == 0.5


@pytest.mark.parametrize("tail,kept,message", [
    ('{"step": 6, "kind": "tra', [2, 4], "cut its torn last line"),
    ('{"step": 6, "kind": "train", "train_loss": 0.25}', [2, 4, 6], "terminated its last line"),
])
def test_a_torn_last_line_is_repaired_before_appending(tmp_path, caplog, tail, kept, message):
  # A run killed mid-write leaves its last line without a newline; the next
  # run's first record must start on a line of its own.
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2, "kind": "train"}\n{"step": 4, "kind": "eval"}\n' + tail)
  caplog.set_level("WARNING")
  writer = run_log.JsonLinesWriter(path)
  writer.write_scalars(8, {"train_loss": 0.5})
  writer.close()
  assert [r["step"] for r in read_jsonl(path)] == kept + [8]  # every line parses
  assert message in caplog.text and str(path) in caplog.text


def test_a_whole_file_is_left_as_it_is(tmp_path):
  path = tmp_path / "metrics.jsonl"
  assert run_log.repair_torn_line(path) is None and not path.exists()
  path.write_text('{"step": 2}\n')
  assert run_log.repair_torn_line(path) is None
  assert path.read_text() == '{"step": 2}\n'
  path.write_text('{"st')  # a torn first line: nothing of it is kept
  assert "cut" in run_log.repair_torn_line(path)
  assert path.read_text() == ""


def test_read_scalars_last_write_wins_and_skips_a_cut_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 2, "kind": "eval", "eval_accuracy": 0.1}\n'
      '{"step": 1, "kind": "train", "train_loss": 3.0}\n'
      '{"step": 2, "kind": "eval", "eval_accuracy": 0.2}\n'
      '{"step": 3, "kind": "ev')
  scalars = events.read_scalars(tmp_path)
  assert scalars["eval_accuracy"][0].tolist() == [2]
  assert scalars["eval_accuracy"][1].tolist() == [0.2]
  assert scalars["train_loss"][1].tolist() == [3.0]
  assert [r.path for r in events.find_runs(tmp_path)] == [tmp_path]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """A 4-step run, then the same workdir continued to 6 steps; the log of each part."""
  workdir = tmp_path_factory.mktemp("run")
  logs = []
  for steps in (4, 6):
    config = load_config("default", "runlocal")
    config.num_train_steps = steps
    handler = _ListHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
      train.train_and_evaluate(config, str(workdir))
    finally:
      root.removeHandler(handler)
      root.setLevel(old_level)
    logs.append(handler.lines)
  return workdir, logs


class _ListHandler(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.mark.slow
def test_metrics_jsonl_has_train_and_eval_lines_with_per_layer_keys(resumed_run):
  workdir, _ = resumed_run
  records = read_jsonl(workdir / "metrics.jsonl")
  # runlocal logs every 2 steps and evaluates at the end of each part.
  assert [(r["step"], r["kind"]) for r in records] == [
      (2, "train"), (4, "train"), (4, "eval"), (6, "train"), (6, "eval")]
  for r in records:
    if r["kind"] == "eval":
      assert any(k.startswith("silent_ratio/") for k in r)
      assert any(k.startswith("flip_ratio/") for k in r)
      assert 0.0 <= r["eval_accuracy"] <= 1.0
    else:
      assert "train_loss" in r and "learning_rate" in r
  scalars = events.read_scalars(workdir)
  assert scalars["eval_accuracy"][0].tolist() == [4, 6]
  assert events.layer_names(scalars)


def test_console_has_one_compact_line_per_evaluation(resumed_run):
  workdir, logs = resumed_run
  eval_records = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "eval"]
  eval_lines = [line for part in logs for line in part if line.startswith("eval ")]
  assert len(eval_lines) == len(eval_records) == 2
  for line, record in zip(eval_lines, eval_records):
    assert f"step {record['step']}/" in line
    assert "steps/s" in line and "ETA" in line and "silent" in line
    assert "/conv" not in line and "ratio/" not in line  # no per-layer figures
  train_lines = [line for part in logs for line in part if line.startswith("train ")]
  assert len(train_lines) == 3 and all("ratio/" not in line for line in train_lines)


def test_tensorboard_hparams_hold_the_nested_config(resumed_run):
  workdir, _ = resumed_run
  hparams = tensorboard_hparams(workdir)
  config = load_config("default", "runlocal")
  assert hparams["ovsw.delta"] == pytest.approx(config.ovsw.delta)
  assert hparams["model"] == config.model
  assert "ovsw.dampen_weight" in hparams
