"""Every config file loads (with each `:arg`), builds its model, passes the config checks and
fits the usual device counts."""

import jax
import jax.numpy as jnp
import pytest

from helpers import CONFIG_DIR, load_config
from ovsw_jax import models
from ovsw_jax.trainer import config_checks
from ovsw_jax.optim import binary_weight_mask

CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py")
                      if p.name not in ("__init__.py", "common.py"))
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


def test_there_is_a_config_per_paper_setting():
  names = {p.stem for p in CONFIG_FILES}
  for ds in ("cifar10", "cifar100"):
    for m in ("resnet20", "resnet18", "vgg_small"):
      assert f"{ds}_{m}" in names
  assert {"imagenet_r18", "imagenet_r34", "default"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_and_builds_model(path):
  config = load_config(path)
  assert config.model in models.MODELS
  assert path.read_text().lstrip().startswith('"""'), "each config needs a docstring"
  doc = path.read_text().split('"""')[1]
  assert "python -m ovsw_jax.main" in doc and "Expected" in doc
  if config.task == "language_model":  # bytes and a BOS token in, a logit per token out
    inputs, num_classes = jnp.zeros((1, config.model_kwargs.context), jnp.int32), 257
  else:
    size = config.image_size if config.dataset == "imagenet2012" else {"digits": 8}.get(
        config.dataset, 32)
    channels = 1 if config.dataset == "digits" else 3
    inputs = jnp.zeros((1, size, size, channels))
    num_classes = NUM_CLASSES[config.dataset]
  model = models.get_model(config.model, num_classes=num_classes, **dict(config.model_kwargs))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, train=False))
  mask = binary_weight_mask(variables["params"])
  assert any(jax.tree.leaves(mask)), "a BNN config must have binary kernels"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_args(path):
  vanilla = load_config(path, "vanilla")
  assert not vanilla.ovsw.ags and not vanilla.ovsw.sad
  ags = load_config(path, "ags")
  assert ags.ovsw.ags and not ags.ovsw.sad
  smoke = load_config(path, "runlocal,sad")
  assert smoke.num_train_steps > 0 and smoke.ovsw.sad and not smoke.ovsw.ags
  with pytest.raises(ValueError, match="Unknown config arg"):
    load_config(path, "vanila")


def test_recipes_follow_the_release():
  r18 = load_config(CONFIG_DIR / "imagenet_r18.py")
  assert (r18.batch_size, r18.num_epochs, r18.warmup_epochs) == (512, 200, 5)
  assert (r18.weight_decay, r18.wd_exclude_1d) == (1e-4, True)
  assert (r18.ovsw.delta, r18.ovsw.dampen_weight) == (0.01, 2e-5)
  assert load_config(CONFIG_DIR / "imagenet_r34.py").warmup_epochs == 0
  c = load_config(CONFIG_DIR / "cifar10_resnet20.py")
  assert (c.batch_size, c.num_epochs, c.learning_rate) == (256, 600, 0.1)
  assert (c.weight_decay, c.wd_exclude_1d) == (5e-4, False)
  assert (c.ovsw.delta, c.ovsw.dampen_weight) == (0.04, 9e-4)
  assert (c.ovsw.track_momentum, c.ovsw.track_threshold) == (0.999, 1e-4)


# Device counts of usual machines (8 GPUs, a v3-8, a v4-32 = 16 chips, a v5e-32, a pod
# slice), each with several process counts (one per host, one per GPU, ...).
DEVICE_COUNTS = (1, 8, 16, 32, 256)
DEFAULT_DEVICE_COUNTS = (1, 2, 4, 8, 16, 32)
# The CPU-sized configs (a few minutes on 2 cores): the device counts their batch fits.
SMALL_DEVICE_COUNTS = {"default": DEFAULT_DEVICE_COUNTS, "lm_stdlib": (1, 2, 4, 8, 16)}


def layouts(device_counts):
  return [(d, p) for d in device_counts for p in (1, 2, 4, 8, 32, 64, 256) if p <= d and not d % p]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_passes_the_checks_on_the_usual_device_counts(path):
  config = load_config(path)
  config_checks.check_values(config)
  for arg in ("vanilla", "ags", "sad", "runlocal"):
    config_checks.check_values(load_config(path, arg))
  counts = SMALL_DEVICE_COUNTS.get(path.stem, DEVICE_COUNTS)
  for devices, processes in layouts(counts):
    layout = config_checks.check(config, devices, processes)
    assert layout.batch_size == config.batch_size  # the recipe's batch, never changed
    assert layout.per_device * devices == config.batch_size
    assert (config.batch_size // processes) % (devices // processes) == 0
    eval_batch = layout.eval_batch_size
    assert eval_batch % devices == 0
    assert config.eval_batch_size <= eval_batch < config.eval_batch_size + devices
    assert layout.eval_rounded == (eval_batch != config.eval_batch_size)
  # More devices than the train batch has examples: no layout, the clear error.
  with pytest.raises(config_checks.ConfigError, match=r"config\.batch_size=\d+ \(the global "
                     r"train batch\) does not split over the 1024 devices"):
    config_checks.check(config, 1024, 128)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_float32_configs_compute_float32_matmuls(path):
  """TPUs and recent GPUs would otherwise run float32 convolutions as bf16 passes or TF32."""
  assert load_config(path).matmul_precision == "highest"


def test_the_default_config_takes_a_kernel_word():
  binary = load_config(CONFIG_DIR / "default.py", "binary,ovsw")
  assert "kernel_quantizer" not in binary.model_kwargs  # the release's convs, the record unchanged
  ternary = load_config(CONFIG_DIR / "default.py", "ternary,vanilla")
  assert ternary.model_kwargs.kernel_quantizer == "ternary" and not ternary.ovsw.sad
  smoke = load_config(CONFIG_DIR / "default.py", "runlocal,2bit")
  assert smoke.model == "tiny" and smoke.model_kwargs.kernel_quantizer == "midrise2_absmean"
  with pytest.raises(ValueError, match="'ternary', '2bit'"):
    load_config(CONFIG_DIR / "default.py", "3bit")
