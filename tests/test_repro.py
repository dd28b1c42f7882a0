"""The reproduction study's commands on a tiny study: each arm (vanilla, AGS
only, SAD only, OvSW) trained for 2 steps with the tiny model, then the
tables, figures and sweep report made from its workdir, and their contents
checked. About 45 s on 2 CPU cores, mostly compiling the four train steps."""

import csv
import json
import math
import pathlib

import numpy as np
import pytest

from helpers import fake_stdlib
from ovsw_jax.repro import events, grid, memory, plots, run, snapshot, strengths, sweep, tables

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


@pytest.mark.slow
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
  assert {p.name for p in written} == {"runs.csv", "summary.csv", "layers.csv", "kinds.csv",
                                          "summary.md"}
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


@pytest.mark.slow
def test_plots(study, tmp_path):
  root, _ = study
  written = plots.write_plots(root, tmp_path, layers="first,last")
  names = {p.name for p in written}
  assert "digits_curves.png" in names and "digits_ovsw_fractions.png" in names
  assert sum(n.startswith("digits_hist_") for n in names) == 2
  for path in written:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


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


# ---------------------------------------------------------------------------
# The generic sweep (grid), memory per binary weight, strengths by summed lr.


def test_grid_axes_parse_and_expand():
  a = grid.parse_axis("ovsw.delta=0,0.05")
  b = grid.parse_axis("optimizer/learning_rate=sgd/0.1,adam/1e-3")
  assert a.keys == ("ovsw.delta",) and a.values == ((0,), (0.05,))
  assert b.values == (("sgd", 0.1), ("adam", 0.001))
  points = grid.points([a, b])
  assert len(points) == 4 and points[1] == {"ovsw.delta": 0, "optimizer": "adam",
                                            "learning_rate": 0.001}
  assert grid.point_name(points[1]) == "ovsw.delta=0,optimizer=adam,learning_rate=0.001"
  for bad in ("ovsw.delta", "a/b=1,2/3", "=1,2"):
    with pytest.raises(ValueError):
      grid.parse_axis(bad)


def test_grid_point_config_zero_strength_turns_the_transform_off():
  c = grid.point_config({"ovsw.delta": 0, "ovsw.dampen_weight": 9e-3}, dataset="digits",
                        arm="ovsw", base={})
  assert not c.ovsw.ags and c.ovsw.sad and c.ovsw.dampen_weight == 9e-3
  c = grid.point_config({"arm": "vanilla", "optimizer": "adam"}, dataset="digits",
                        arm="ovsw", base={"num_epochs": 3})
  assert not c.ovsw.ags and not c.ovsw.sad and c.optimizer == "adam" and c.num_epochs == 3
  with pytest.raises(KeyError):
    grid.point_config({"no_such_field": 1}, dataset="digits", arm="ovsw", base={})


@pytest.mark.slow
def test_grid_runs_report_and_resume(tmp_path):
  axes = [grid.parse_axis("optimizer/learning_rate=sgd/0.1,adam/1e-3")]
  # An epath.Path (the study may live on an object store): pathlib's rglob and stat below.
  group_dir = pathlib.Path(grid.run_grid(tmp_path, "g", axes, seeds=[0], overrides=TINY))
  assert sorted(p.name for p in group_dir.iterdir()) == [
      "optimizer=adam,learning_rate=0.001", "optimizer=sgd,learning_rate=0.1"]
  written = sweep.report_grid(group_dir, tmp_path / "report")
  rows = read_csv(tmp_path / "report" / "grid.csv")
  assert {(r["optimizer"], float(r["learning_rate"])) for r in rows} == {
      ("sgd", 0.1), ("adam", 1e-3)}
  for r in rows:
    assert r["n"] == "1" and 0.0 <= float(r["silent_ratio_mean"]) <= 1.0
    assert 0.0 <= float(r["final_accuracy_mean"]) <= 1.0
  assert "| optimizer | learning_rate | seeds |" in (tmp_path / "report" / "grid.md").read_text()
  assert (tmp_path / "report" / "grid.png").stat().st_size > 5000
  assert (tmp_path / "report" / "curves.png").exists()
  assert not any(p.name.startswith("sweep") for p in written)  # no delta x gamma heat map
  # Rerun: every point is finished, nothing trains again.
  before = {p: p.stat().st_mtime for p in group_dir.rglob("result.json")}
  assert len(before) == 2
  grid.run_grid(tmp_path, "g", axes, seeds=[0], overrides=TINY)
  assert before == {p: p.stat().st_mtime for p in group_dir.rglob("result.json")}


def test_grid_order_is_seed_major_and_shards_split_it(capsys):
  axes = [grid.parse_axis("arm=vanilla,ovsw")]
  grid.run_grid("root", "g", axes, seeds=[0, 1], dry_run=True)
  every = capsys.readouterr().out.split()
  assert [p.split("/")[-2:] for p in every] == [
      ["arm=vanilla", "seed0"], ["arm=ovsw", "seed0"], ["arm=vanilla", "seed1"],
      ["arm=ovsw", "seed1"]]
  shards = []
  for i in range(3):
    grid.run_grid("root", "g", axes, seeds=[0, 1], dry_run=True, shard=(i, 3))
    shards.append(capsys.readouterr().out.split())
  assert sorted(sum(shards, [])) == sorted(every) and shards[0] == [every[0], every[3]]
  with pytest.raises(ValueError, match="shard 2/2"):
    grid.run_grid("root", "g", axes, dry_run=True, shard=(2, 2))


def write_lm_run(path, arm, seed, test_bpb, flips, oscillations, silent):
  """A language-model run's files as the trainer and the grid write them (by hand)."""
  path.mkdir(parents=True)
  lines = [{"step": 100 * (i + 1), "kind": "train", "train_step_flip_ratio": f,
            "train_step_oscillation_ratio": o} for i, (f, o) in enumerate(zip(flips, oscillations))]
  lines.append({"step": 100 * len(flips), "kind": "eval", "eval_bits_per_byte": test_bpb + 0.01,
                "eval_test_bits_per_byte": test_bpb, "epoch": 0.4,
                "silent_ratio": float(np.mean(list(silent.values()))) if silent else 0.0,
                **{f"silent_ratio/{k}": v for k, v in silent.items()}})
  (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  (path / "run.json").write_text(json.dumps({"arm": arm, "seed": seed, "point": {"arm": arm}}))


def test_language_model_tables_read_bits_per_byte_oscillations_and_layer_kinds(tmp_path):
  rng = np.random.default_rng(0)
  layers = [f"block_{b}/{k}" for b in range(2) for k in ("attn/q", "mlp/up")]
  runs = []
  for arm in ("a", "b"):
    for seed in range(2):
      flips, osc = rng.uniform(0.01, 0.1, 5), rng.uniform(0.0, 0.01, 5)
      silent = dict(zip(layers, rng.uniform(0.3, 0.7, len(layers))))
      bpb = float(rng.uniform(2.3, 2.5))
      write_lm_run(tmp_path / "g" / arm / f"seed{seed}", arm, seed, bpb, flips, osc, silent)
      runs.append((arm, bpb, flips, osc, silent))
  tables.write_tables(tmp_path, tmp_path / "out")
  got = {(r["arm"], r["seed"]): r for r in read_csv(tmp_path / "out" / "g_runs.csv")}
  for i, (arm, bpb, flips, osc, _) in enumerate(runs):
    row = got[(arm, str(i % 2))]
    assert float(row["test_bits_per_byte"]) == pytest.approx(bpb, rel=1e-5)
    assert float(row["val_bits_per_byte"]) == pytest.approx(bpb + 0.01, rel=1e-5)
    assert float(row["oscillation_per_flip"]) == pytest.approx(osc.sum() / flips.sum(), rel=1e-5)
    assert float(row["peak_step_flip_ratio"]) == pytest.approx(flips.max(), rel=1e-5)
  kinds = read_csv(tmp_path / "out" / "g_kinds.csv")
  assert {(r["arm"], r["kind"]) for r in kinds} == {
      (a, k) for a in ("a", "b") for k in ("block/attn/q", "block/mlp/up")}
  for r in kinds:  # a run's kind: the mean of its blocks' layers; then mean and std over seeds
    per_run = [np.mean([s[x] for x in layers if tables.layer_kind(x) == r["kind"]])
               for a, _, _, _, s in runs if a == r["arm"]]
    assert float(r["silent_ratio_mean"]) == pytest.approx(np.mean(per_run), rel=1e-5)
    assert float(r["silent_ratio_std"]) == pytest.approx(np.std(per_run, ddof=1), rel=1e-4)
  # A float twin (no quantized layer) logs a silent ratio of 0 over no weights: not a figure.
  write_lm_run(tmp_path / "g" / "float" / "seed0", "float", 0, 2.36, [0.0], [0.0], {})
  tables.write_tables(tmp_path, tmp_path / "out")
  twin = [r for r in read_csv(tmp_path / "out" / "g_runs.csv") if r["arm"] == "float"][0]
  assert float(twin["test_bits_per_byte"]) == pytest.approx(2.36)
  assert all(math.isnan(float(twin[c])) for c in (
      "silent_ratio", "peak_step_flip_ratio", "oscillation_per_flip"))
  md = (tmp_path / "out" / "g_summary.md").read_text()
  assert "test bits/byte" in md and "oscillations / flips" in md and "top-1" not in md
  assert "per layer kind" in md and "| block/mlp/up |" in md
  keys, rows = grid.collect(tmp_path / "g")
  assert keys == ["arm"] and [r["n"] for r in rows] == [2, 2, 1]
  table = grid.markdown(keys, rows)
  assert "test bits/byte" in table and "peak flip ratio per step" in table
  assert "block/attn/q" in table and "per epoch" not in table


@pytest.mark.slow
def test_a_language_model_grid_point_trains_through_the_study_tools(tmp_path):
  axes = [grid.parse_axis("arm=ternary+vanilla+runlocal,binary+ovsw+runlocal")]
  small = {"log_every_steps": 2, "corpus_dir": str(fake_stdlib(tmp_path / "Lib")),
           "model_kwargs.width": 16, "model_kwargs.context": 8}
  group_dir = grid.run_grid(tmp_path, "lm", axes, dataset="lm_stdlib", shard=(1, 2),
                            overrides=small)
  # Only the second run (shard 1 of 2) trained; its weights were snapshotted.
  assert [p.name for p in pathlib.Path(group_dir).iterdir()] == ["arm=binary+ovsw+runlocal"]
  run_dir = pathlib.Path(group_dir, "arm=binary+ovsw+runlocal", "seed0")
  result = json.loads((run_dir / "result.json").read_text())
  assert result["eval_test_count"] > 0 and 0 < result["eval_test_bits_per_byte"] < 9
  config = snapshot.load_config(run_dir)
  assert config.model_kwargs.kernel_quantizer == "scaled_sign" and config.ovsw.sad
  weights = snapshot.load_weights(run_dir)
  assert sorted(weights) == sorted(
      n[len("silent_ratio/"):] for n in events.read_scalars(run_dir) if "silent_ratio/" in n)
  sweep.report_grid(group_dir, tmp_path / "report")
  assert "| binary+ovsw+runlocal | 1 |" in (tmp_path / "report" / "grid.md").read_text()
  assert (tmp_path / "report" / "curves.png").stat().st_size > 5000


def test_memory_per_binary_weight_from_the_state():
  config = run.load_config("digits", "ovsw")
  f32 = np.dtype(np.float32).itemsize
  for optimizer, moments in (("sgd", 1), ("adam", 2)):
    config.optimizer = optimizer
    m = memory.measure(memory.abstract_state(config))
    # Counted from the model's conv shapes, independently of the mask code.
    assert m["binary_weights"] > 100_000
    assert m["latent"] == f32 and m["optimizer"] == moments * f32
    # SAD: a float32 tracker and 2 bits of packed sign per weight; the release:
    # a float32 previous weight and a float32 tracker. (Ours also holds a
    # float32 silent fraction per layer and pads each layer's packed signs.)
    assert m["ovsw"] == pytest.approx(f32 + 2 / 8, rel=1e-3)
    assert m["ovsw_release"] == 2 * f32
  config.ovsw.sad = False  # AGS alone keeps no per-weight state
  assert memory.measure(memory.abstract_state(config))["ovsw"] < 1e-3  # a scalar per layer


@pytest.mark.slow
def test_summed_learning_rate_and_matched_strengths():
  config = run.load_config("digits", "ovsw")
  spe, epochs, warmup, lr0 = 22, int(config.num_epochs), int(config.warmup_epochs), 0.1
  # The release's per-epoch schedule, summed by hand.
  per_epoch = [lr0 * (e + 1) / warmup if e < warmup else
               0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) * lr0 + 1e-5
               for e in range(epochs)]
  assert strengths.summed_learning_rate(config, spe) == pytest.approx(spe * sum(per_epoch),
                                                                      rel=1e-5)
  longer = run.apply_overrides(config, {"num_epochs": 2 * epochs, "lr_schedule": "constant"})
  short = run.apply_overrides(config, {"lr_schedule": "constant"})
  assert strengths.summed_learning_rate(longer, spe) == pytest.approx(2 * epochs * spe * lr0)
  m = strengths.matched_strengths(longer, short, exponent=1.0, steps_per_epoch_=spe,
                                  reference_steps_per_epoch=spe)
  assert m["delta"] == pytest.approx(config.ovsw.delta / 2)
  assert m["dampen_weight"] == pytest.approx(config.ovsw.dampen_weight / 2)
  m = strengths.matched_strengths(longer, short, steps_per_epoch_=spe,
                                  reference_steps_per_epoch=spe)
  assert m["delta"] == pytest.approx(config.ovsw.delta / math.sqrt(2))
