"""The optimizer built from a config: what each part acts on (docs/method.md §4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ovsw_jax as ow
from configs import common
from ovsw_jax import models
from ovsw_jax.optim import binary_weight_mask
from ovsw_jax.trainer.optimizer import create_optimizer

from helpers import ROOT, module_command


def params_and_grads():
  model = models.get_model("tiny", num_classes=10)
  # Under jit: one compilation instead of one per initialiser op and shape.
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)), train=False))
  params = init(jax.random.key(0))["params"]
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  return params, grads


def one_update(config):
  params, grads = params_and_grads()
  tx = create_optimizer(config, optax.constant_schedule(1.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  return params, grads, updates


def flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
@pytest.mark.parametrize("exclude_1d", [False, True])
def test_weight_decay_and_ovsw_targets(exclude_1d):
  c = common.base_config()
  c.momentum, c.weight_decay, c.wd_exclude_1d = 0.0, 0.1, exclude_1d
  c.ovsw.ags = c.ovsw.sad = False
  params, grads, updates = one_update(c)
  for key, u in flat(updates).items():
    p, g = flat(params)[key], flat(grads)[key]
    decayed = not (exclude_1d and p.ndim == 1)
    expected = -(g + 0.1 * p) if decayed else -g  # SGD with lr 1, no momentum
    np.testing.assert_allclose(np.asarray(u), np.asarray(expected), rtol=1e-6, atol=1e-9,
                               err_msg=key)


@pytest.mark.slow
def test_ovsw_touches_binary_kernels_only():
  c = common.base_config()
  c.momentum, c.weight_decay = 0.0, 0.0
  c.ovsw.delta, c.ovsw.dampen_weight = 0.5, 1e-2
  params, grads, updates = one_update(c)
  mask = flat(binary_weight_mask(params))
  assert any(mask.values())
  for key, u in flat(updates).items():
    if mask[key]:
      assert not np.allclose(np.asarray(u), -np.asarray(flat(grads)[key])), key
    else:
      np.testing.assert_array_equal(np.asarray(u), -np.asarray(flat(grads)[key]), err_msg=key)


def test_vanilla_has_no_ovsw_state_and_unknown_optimizer_fails():
  c = common.apply_arg(common.base_config(), "vanilla")
  params, _ = params_and_grads()
  state = create_optimizer(c, optax.constant_schedule(0.1)).init(params)
  assert optax.tree.get(state, "tracker") is None
  c.optimizer = "lamb"
  with pytest.raises(ValueError, match="optimizer='lamb'"):
    create_optimizer(c, optax.constant_schedule(0.1))


@pytest.mark.parametrize("field, value", [
    ("delta", float("nan")), ("delta", float("inf")), ("dampen_weight", float("nan")),
    ("dampen_weight", -1e-3), ("track_momentum", 1.0), ("track_threshold", float("nan"))])
def test_bad_ovsw_config_names_the_field_and_the_flag(field, value):
  c = common.base_config()
  setattr(c.ovsw, field, value)
  with pytest.raises(ValueError) as error:
    create_optimizer(c, optax.constant_schedule(0.1))
  message = str(error.value)
  assert message.startswith(f"config.ovsw.{field} is invalid: ")
  assert f"{field}={value}" in message and f"--config.ovsw.{field}=VALUE" in message


@pytest.mark.slow
def test_cli_reports_a_nan_delta_without_a_traceback(tmp_path):
  proc = module_command("ovsw_jax.main", [
      f"--config={ROOT}/configs/default.py", f"--workdir={tmp_path}/wd",
      "--config.ovsw.delta=nan"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0, out
  assert "config.ovsw.delta is invalid" in out and "delta=nan is not a finite number" in out
  assert "Traceback" not in out


class _QuantNet(nn.Module):
  """A model whose kernels are not all signs: the trainer must track their levels."""

  @nn.compact
  def __call__(self, x, train=True):
    x = ow.QuantDense(8, kernel_quantizer="uniform4", name="four")(x.reshape(x.shape[0], -1))
    return ow.QuantDense(10, name="sign")(x)


def test_the_trainer_gives_sad_each_kernels_levels_and_signs_stay_the_default():
  from ovsw_jax.trainer import train  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 8, 8, 3))
  assert train.model_levels(models.get_model("tiny", num_classes=10), x) is None  # all signs
  model = _QuantNet()
  levels = train.model_levels(model, x)
  assert levels == {"four/latent_kernel": ow.quantizers.Uniform(4),
                    "sign/latent_kernel": ow.quantizers.Sign()}
  c = common.base_config()
  tx = create_optimizer(c, optax.constant_schedule(0.1), levels=levels)
  state = jax.jit(lambda key: train.create_train_state(key, model, tx, x, levels))(
      jax.random.key(0))  # one compilation (the trainer's own is eager, for its rounding)
  prev = flat(optax.tree.get(state.opt_state, "prev_signs"))
  assert {k: v.shape[0] for k, v in prev.items()} == {
      "['four']['latent_kernel']": 4, "['sign']['latent_kernel']": 2}
  assert {k: v.shape[0] for k, v in flat(state.flips.init_signs).items()} == {
      "['four']['latent_kernel']": 4, "['sign']['latent_kernel']": 2}
  c.ovsw.toward = "middle"
  with pytest.raises(ValueError, match=r"config\.ovsw\.toward is invalid.*toward='middle'"):
    create_optimizer(c, optax.constant_schedule(0.1), levels=levels)
