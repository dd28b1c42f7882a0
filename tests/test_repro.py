"""The reproduction study's commands on a tiny study: each arm (vanilla, AGS
only, SAD only, OvSW) trained for 2 steps with the tiny model, then the
tables, figures and sweep report made from its workdir, and their contents
checked. About 45 s on 2 CPU cores, mostly compiling the four train steps."""

import csv
import json
import math

import numpy as np
import pytest

from ovsw_jax.repro import events, plots, run, snapshot, sweep, tables

ARMS = ("vanilla", "ags", "sad", "ovsw")
TINY = {"num_train_steps": 2, "model": "tiny", "model_kwargs": {}, "batch_size": 8,
        "eval_batch_size": 120, "log_every_steps": 1, "checkpoint_every_steps": 2}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  group_dir = run.run_study(root, arms=ARMS, seeds=[0], overrides=TINY, report=False)
  return root, group_dir


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_overrides_parse_and_apply():
  parsed = run.parse_overrides(["ovsw.delta=0.1", "model=tiny", "num_epochs=40.0"])
  assert parsed == {"ovsw.delta": 0.1, "model": "tiny", "num_epochs": 40.0}
  config = run.apply_overrides(run.load_config("digits", "vanilla"), parsed)
  assert config.ovsw.delta == 0.1 and config.num_epochs == 40 and not config.ovsw.ags
  with pytest.raises(KeyError):
    run.apply_overrides(config, {"ovsw.no_such_field": 1})


def test_runs_are_found_with_their_files(study):
  root, group_dir = study
  found = events.find_runs(root)
  assert [(r.group, r.arm, r.seed) for r in found] == [("digits", a, 0) for a in ARMS]
  for r in found:
    assert json.loads((r.path / "result.json").read_text())["eval_count"] == 360
    scalars = events.read_scalars(r.path)
    assert scalars["train_loss"][0].tolist() == [1, 2]
    assert events.layer_names(scalars)
    weights = snapshot.load_weights(r.path)
    layer = events.layer_names(scalars)[-1]
    silent = weights[layer]["never_flipped"]
    assert silent.shape == weights[layer]["init"].shape == weights[layer]["final"].shape
    assert math.isclose(silent.mean(), scalars[f"silent_ratio/{layer}"][1][-1], rel_tol=1e-5)
  # A finished run is not trained again.
  again = run.train_one(None, group_dir / "ovsw" / "seed0", {})
  assert again["eval_count"] == 360


def test_tables(study, tmp_path):
  _, group_dir = study
  written = tables.write_tables(group_dir, tmp_path)
  assert {p.name for p in written} == {"runs.csv", "summary.csv", "layers.csv", "summary.md"}
  summary = read_csv(tmp_path / "summary.csv")
  assert [r["arm"] for r in summary] == list(ARMS)
  for row in summary:
    assert row["n"] == "1"
    for col in ("final_accuracy", "best_accuracy", "silent_ratio", "peak_flip_ratio"):
      assert 0.0 <= float(row[f"{col}_mean"]) <= 1.0
      assert math.isnan(float(row[f"{col}_std"]))  # one seed: no std
  by_arm = {r["arm"]: r for r in summary}
  assert math.isnan(float(by_arm["vanilla"]["sad_silent_fraction_mean"]))
  assert 0.0 <= float(by_arm["ovsw"]["sad_silent_fraction_mean"]) <= 1.0
  assert 0.0 <= float(by_arm["ovsw"]["ags_scaled_fraction_mean"]) <= 1.0
  runs = read_csv(tmp_path / "runs.csv")
  layer_cols = [c for c in runs[0] if c.startswith("silent_ratio/")]
  assert layer_cols and all(0.0 <= float(r[c]) <= 1.0 for r in runs for c in layer_cols)
  layers = read_csv(tmp_path / "layers.csv")
  assert len(layers) == len(ARMS) * len(layer_cols)
  md = (tmp_path / "summary.md").read_text()
  assert md.count("\n| ovsw |") == 1 and "silent ratio" in md


def test_plots(study, tmp_path):
  root, _ = study
  written = plots.write_plots(root, tmp_path, layers="first,last")
  names = {p.name for p in written}
  assert "digits_curves.png" in names and "digits_ovsw_fractions.png" in names
  assert sum(n.startswith("digits_hist_") for n in names) == 2
  for path in written:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_sweep_report_on_the_arms(study, tmp_path):
  _, group_dir = study
  sweep.write_report(group_dir, tmp_path)
  rows = read_csv(tmp_path / "sweep.csv")
  points = {(float(r["delta"]), float(r["gamma"])): r["arm"] for r in rows}
  assert points == {(0.0, 0.0): "vanilla", (0.04, 0.0): "ags", (0.0, 9e-4): "sad",
                    (0.04, 9e-4): "ovsw"}
  assert all(0.0 <= float(r["silent_ratio_mean"]) <= 1.0 for r in rows)
  assert "| 0.04 |" in (tmp_path / "sweep.md").read_text()
  assert (tmp_path / "sweep_heatmap.png").stat().st_size > 5000


def test_choose_layers():
  names = ["a/conv1", "a/conv2", "b/conv1"]
  assert plots.choose_layers(names, "first,last") == ["a/conv1", "b/conv1"]
  assert plots.choose_layers(names, "all") == names
  with pytest.raises(ValueError):
    plots.choose_layers(names, "nope")
  assert np.isnan(tables.mean_std([0.5])[1])
