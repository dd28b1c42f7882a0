"""`config.parallelism=jit` (jit of shard_map over a device mesh) trains what pmap trains.

Runs under 4 host CPU devices (tests/conftest.py). The two paths run the same
per-device step, but XLA fuses the two programs differently, so they agree
to float32 rounding rather than bit for bit: after 6 steps of the runlocal
config, every differing element is within 2e-7 of its leaf's largest
magnitude (rounding in the last bits of batch statistics and of a few
weights). A run under jit is deterministic: stopped and resumed, it equals the
uninterrupted run bit for bit.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import load_config
from ovsw_jax.trainer import checkpointing, input_pipeline, parallel, train

STEPS = 6


def runlocal(parallelism, num_train_steps=STEPS):
  config = load_config("default", "runlocal")
  config.parallelism = parallelism
  config.num_train_steps = num_train_steps
  config.checkpoint_every_steps = 100  # one checkpoint, at the end
  return config


def final_state(config, workdir):
  manager = checkpointing.create_manager(f"{workdir}/checkpoints")
  return checkpointing.restore_latest(manager, train.setup(config).initial_state)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """`{parallelism: (result, final state)}` of uninterrupted 6-step runs."""
  out = {}
  for parallelism in parallel.CHOICES:
    workdir = tmp_path_factory.mktemp(parallelism)
    config = runlocal(parallelism)
    out[parallelism] = (train.train_and_evaluate(config, str(workdir)),
                        final_state(config, workdir))
  return out


def leaves(state):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}


def assert_close_states(a, b):
  """Equal structure and integer leaves; float leaves to float32 rounding."""
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for key, x in a.items():
    y = b[key]
    assert x.dtype == y.dtype and x.shape == y.shape, key
    if np.issubdtype(x.dtype, np.floating):
      scale = float(np.max(np.abs(x))) if x.size else 0.0
      np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6 * scale, err_msg=key)
    else:
      np.testing.assert_array_equal(y, x, err_msg=key)


@pytest.mark.slow
def test_jit_trains_what_pmap_trains(straight):
  assert jax.device_count() == 4
  (pmap_result, a), (jit_result, b) = straight["pmap"], straight["jit"]
  assert int(a.step) == int(b.step) == STEPS
  names = leaves(b)
  assert any("batch_stats" in k and k.endswith("['var']") for k in names), "no BatchNorm stats"
  assert any(".tracker" in k for k in names), "no SAD tracker in the optimizer state"
  assert any(".prev_signs" in k for k in names), "no packed signs in the optimizer state"
  assert_close_states(a, b)
  assert jit_result["eval_count"] == pmap_result["eval_count"] == (
      input_pipeline.get_info(runlocal("jit")).num_eval)
  for key in ("eval_loss", "eval_accuracy", "silent_ratio", "flip_ratio"):
    np.testing.assert_allclose(jit_result[key], pmap_result[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("first_half", ["jit", "pmap"])
def test_resume_under_jit_continues_the_run(straight, tmp_path, first_half):
  """Stopped at step 3 (under jit, or under pmap), resumed under jit to step 6."""
  train.train_and_evaluate(runlocal(first_half, num_train_steps=3), str(tmp_path))
  result = train.train_and_evaluate(runlocal("jit"), str(tmp_path))
  resumed = final_state(runlocal("jit"), tmp_path)
  jit_result, jit_state = straight["jit"]
  if first_half == "jit":
    for key, x in leaves(jit_state).items():
      np.testing.assert_array_equal(leaves(resumed)[key], x, err_msg=key)
    # (The flip ratio counts since the previous evaluation: the stop at step 3 had one.)
    for key in ("eval_loss", "eval_accuracy", "eval_top5", "silent_ratio"):
      assert result[key] == jit_result[key], key
  else:
    assert_close_states(jit_state, resumed)


def test_jit_layout_replicates_state_shards_batch_and_donates():
  scheme = parallel.create("jit", train.AXIS)
  assert scheme.mesh.axis_names == (train.AXIS,) and scheme.mesh.size == 4
  state = scheme.replicate({"w": np.arange(3, dtype=np.float32)})
  assert state["w"].sharding.spec == P() and state["w"].is_fully_replicated
  batch = scheme.shard({"x": np.arange(8, dtype=np.float32)})
  assert batch["x"].sharding.spec == P(train.AXIS)
  assert [s.data.shape for s in batch["x"].addressable_shards] == [(2,)] * 4

  def step(s, b):  # per device: a shard of 2 rows, the state whole
    assert b["x"].shape == (2,) and s["w"].shape == (3,)
    return {"w": s["w"] + jax.lax.pmean(b["x"].sum(), train.AXIS)}
  new = scheme.compile(step, donate=True)(state, batch)
  np.testing.assert_array_equal(np.asarray(new["w"]), np.arange(3) + 7.0)  # 28 / 4
  assert new["w"].sharding.spec == P() and state["w"].is_deleted()
  assert scheme.unreplicate(new) is new
  with pytest.raises(ValueError, match="A batch of 6 does not split over 4 local devices"):
    scheme.shard({"x": np.zeros(6)})


def test_invalid_parallelism_names_the_field_and_the_choices(tmp_path):
  config = runlocal("pjit")
  with pytest.raises(ValueError, match=r"config.parallelism='pjit' is invalid: use one of "
                                       r"'pmap', 'jit'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
