"""The exported binary network: exact against the float simulation, file format, CLI.

References are independent of the code under test: the float simulation is
the trained model's own `apply` (the code that trained it), convolutions are
checked against a numpy loop, BatchNorm folding against Flax's BatchNorm.
"""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from ovsw_jax import export, models
from ovsw_jax.trainer import checkpointing, input_pipeline, train
from ovsw_jax.export import build, format as fmt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained_run(digits_run):
  """A small binary ResNet trained briefly on the embedded digits (config.json recorded)."""
  config, workdir, result = digits_run
  assert result["eval_accuracy"] > 0.2  # it learned something (chance: 0.1)
  setup = train.setup(config)
  manager = checkpointing.create_manager(str(workdir / "checkpoints"))
  state = checkpointing.restore_latest(manager, setup.initial_state)
  manager.close()
  return config, workdir, setup.task.info, state


@pytest.fixture(scope="module")
def trained_export(trained_run):
  config, _, info, state = trained_run
  return export.export_network(config.model, info.num_classes, state.params, state.batch_stats,
                               info.image_shape, model_kwargs=config.model_kwargs.to_dict())


def random_variables(model, shape, seed=0):
  """Random weights with non-trivial BatchNorm (scales, biases, means, variances all drawn).

  Shapes come from an abstract init (no compile); values from numpy.
  """
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      values = rng.uniform(0.3, 3.0, x.shape)
    elif "bn" in name and "'scale'" in name:
      values = rng.normal(0.0, 1.0, x.shape)
    elif "bn" in name:  # mean, bias
      values = rng.normal(0.0, 0.5, x.shape)
    else:
      values = rng.normal(0.0, 1.0 / np.sqrt(max(np.prod(x.shape[:-1]), 1)), x.shape)
    return np.asarray(values, np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  return variables["params"], variables["batch_stats"]


def numpy_conv(x, w, stride, pad):
  """Direct NHWC x HWIO convolution with `pad` zeros on every side (int64)."""
  x = np.pad(x.astype(np.int64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _, co = w.shape
  n, h, wd, _ = x.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((n, ho, wo, co), np.int64)
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.tensordot(patch, w.astype(np.int64), axes=([1, 2, 3], [0, 1, 2]))
  return out


# ------------------------------------------------ exact against the simulation


@pytest.mark.slow
def test_trained_export_matches_simulation_on_every_digits_test_image(trained_run, trained_export):
  config, _, _, state = trained_run
  model = trained_export.model()
  predict = export.predictor(trained_export)
  seen = 0
  for batch in input_pipeline.eval_iterator(config, global_batch_size=120):
    mask = batch["mask"]
    got = np.asarray(predict(batch["image"]))[mask]
    want = np.asarray(export.simulate(model, state.params, state.batch_stats,
                                      batch["image"]))[mask]
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    seen += int(mask.sum())
  assert seen == input_pipeline.get_info(config).num_eval


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,shape", [
    ("tiny", {}, (8, 8, 1)),
    ("tiny_imagenet", {}, (32, 32, 3)),
    ("resnet18_cifar", {"widths": (8, 16, 16, 32), "stage_sizes": (1, 1, 1, 1)}, (16, 16, 3)),
    ("vgg_small", {"widths": (8, 16, 32)}, (16, 16, 3)),
])
def test_every_model_family_matches_simulation(name, kwargs, shape):
  """Binary shortcuts (CIFAR ResNet-18), fp shortcuts (ImageNet), pooling before BN (VGG)."""
  model = models.get_model(name, num_classes=10, **kwargs)
  params, stats = random_variables(model, shape)
  net = export.export_network(name, 10, params, stats, shape, model_kwargs=kwargs)
  images = jax.random.normal(jax.random.key(1), (32,) + shape)
  want = np.asarray(export.simulate(model, params, stats, images))
  for backend in ("auto", "int8"):  # auto: xnor up to 32 channels, int8 above
    got = np.asarray(export.predictor(net, backend)(images))
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_zero_latent_weights_get_a_zero_plane_and_stay_exact():
  shape = (8, 8, 1)
  model = models.get_model("tiny", num_classes=10)
  params, stats = random_variables(model, shape, seed=3)
  kernel = params["layer2_0"]["conv2"]["latent_kernel"]
  zeroed = kernel.copy()
  zeroed[0, :, :, 0] = 0.0  # sign(0) = 0 in the simulation
  params["layer2_0"]["conv2"]["latent_kernel"] = zeroed
  net = export.export_network("tiny", 10, params, stats, shape)
  binary = net.payload["binary"]
  assert "zeros" in binary["layer2_0/conv2"]
  assert "zeros" not in binary["layer1_0/conv1"]  # no zero, one bit per weight
  np.testing.assert_array_equal(build.unpack_kernel(binary["layer2_0/conv2"]),
                                np.sign(np.asarray(zeroed)).astype(np.int8))
  images = jax.random.normal(jax.random.key(2), (16,) + shape)
  want = export.simulate(model, params, stats, images)
  for backend in ("int8", "xnor"):  # "xnor" runs that layer in int8
    np.testing.assert_allclose(export.predictor(net, backend)(images), want,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- the pieces


@pytest.mark.slow
@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (2, 0)])
def test_conv_backends_equal_a_numpy_loop(stride, pad):
  rng = np.random.default_rng(stride * 10 + pad)
  kh = 1 if pad == 0 else 3
  w = rng.choice(np.array([-1, 1], np.int8), size=(kh, kh, 40, 6))  # 40: not a multiple of 32
  x = rng.choice(np.array([-1, 1], np.int8), size=(2, 7, 7, 40))
  x[:, 0, :, :3] = 0  # zero activations (sign(0) = 0) add nothing
  want = numpy_conv(x, w, stride, pad)
  padding = [(pad, pad), (pad, pad)]
  for conv in (export.int8_conv, export.xnor_popcount_conv):
    got = conv(jnp.asarray(x), jnp.asarray(w), (stride, stride), padding)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_pack_unpack_round_trip_uses_one_bit_per_weight():
  w = np.random.default_rng(0).normal(size=(3, 3, 5, 7)).astype(np.float32)
  entry = export.pack_kernel(w)
  assert entry["bits"].dtype == np.uint8 and entry["bits"].size == -(-w.size // 8)
  np.testing.assert_array_equal(export.unpack_kernel(entry), np.sign(w).astype(np.int8))


def test_fold_batch_norm_equals_flax_batch_norm():
  rng = np.random.default_rng(0)
  c = 6
  params = {"scale": rng.normal(size=c).astype(np.float32),
            "bias": rng.normal(size=c).astype(np.float32)}
  stats = {"mean": rng.normal(size=c).astype(np.float32),
           "var": rng.uniform(0.1, 2, size=c).astype(np.float32)}
  alpha = rng.uniform(0.5, 1.0, size=c).astype(np.float32)
  acc = rng.integers(-50, 50, size=(4, c)).astype(np.float32)
  want = models.BatchNorm(use_running_average=True).apply(
      {"params": params, "batch_stats": stats}, acc * alpha)
  folded = export.fold_batch_norm(params, stats, 1e-5, alpha)
  np.testing.assert_allclose(acc * folded["scale"] + folded["shift"], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ the file


@pytest.mark.slow
def test_save_load_round_trip(trained_run, trained_export, tmp_path):
  path = tmp_path / "net.ovsw"
  size = export.save(trained_export, path)
  assert size == path.stat().st_size
  loaded = export.load(path)
  assert loaded.header["format"] == export.FORMAT_NAME
  assert loaded.header["version"] == export.FORMAT_VERSION
  assert loaded.header["image_shape"] == [8, 8, 1]
  jax.tree.map(np.testing.assert_array_equal, loaded.payload, trained_export.payload)
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  np.testing.assert_array_equal(export.predictor(loaded)(images),
                                export.predictor(trained_export)(images))


def _outer(net):
  return serialization.msgpack_restore(net.to_bytes())


def test_truncated_file_is_rejected(trained_export, tmp_path):
  data = trained_export.to_bytes()
  path = tmp_path / "cut.ovsw"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(export.ExportError, match="truncated or corrupted"):
    export.load(path)


def test_corrupted_bytes_are_rejected(trained_export):
  data = bytearray(trained_export.to_bytes())
  data[-100] ^= 0xFF  # inside the payload's arrays: still valid msgpack
  with pytest.raises(export.ExportError, match="sha256"):
    export.from_bytes(bytes(data))


def test_other_version_and_other_files_are_rejected(trained_export, tmp_path):
  outer = _outer(trained_export)
  outer["header"]["version"] = fmt.FORMAT_VERSION + 1
  with pytest.raises(export.ExportError, match="version"):
    export.from_bytes(serialization.msgpack_serialize(outer))
  outer["header"]["format"] = "something-else"
  with pytest.raises(export.ExportError, match="format"):
    export.from_bytes(serialization.msgpack_serialize(outer))
  with pytest.raises(export.ExportError, match="not an ovsw-bnn file"):
    export.from_bytes(serialization.msgpack_serialize({"a": 1}))
  with pytest.raises(export.ExportError, match="does not exist"):
    export.load(tmp_path / "missing.ovsw")


def _with_header(net, **changes):
  return export.ExportedNetwork(dict(net.header, **changes), net.payload)


def test_shape_mismatches_are_rejected(trained_export):
  wider = _with_header(trained_export, model_kwargs={"widths": [32, 64], "blocks_per_stage": 1})
  with pytest.raises(export.ExportError, match="re-export"):
    export.from_bytes(wider.to_bytes())
  payload = jax.tree.map(lambda x: x, trained_export.payload)
  payload["float"]["linear"]["kernel"] = payload["float"]["linear"]["kernel"][:, :5]
  with pytest.raises(export.ExportError,
                     match=r"float parameter linear/kernel has shape \(32, 5\)"):
    export.from_bytes(export.ExportedNetwork(trained_export.header, payload).to_bytes())
  payload = jax.tree.map(lambda x: x, trained_export.payload)
  payload["affine"]["bn1"]["scale"] = payload["affine"]["bn1"]["scale"].astype(np.float64)
  with pytest.raises(export.ExportError, match="bn1 scale .* dtype float64"):
    export.from_bytes(export.ExportedNetwork(trained_export.header, payload).to_bytes())
  payload = jax.tree.map(lambda x: x, trained_export.payload)
  del payload["binary"]["layer1_0/conv2"]
  with pytest.raises(export.ExportError, match="layer1_0/conv2 is missing"):
    export.from_bytes(export.ExportedNetwork(trained_export.header, payload).to_bytes())


# ------------------------------------------------------------- the CLI


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ovsw_jax.export", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_exports_and_evaluates(trained_run, tmp_path):
  _, workdir, _, _ = trained_run
  out = tmp_path / "net.ovsw"
  run = _cli(f"--workdir={workdir}", f"--out={out}")
  assert run.returncode == 0, run.stderr
  assert out.is_file()
  assert "agreement 1.0000" in run.stdout and "OPs = BOPs/64 + FLOPs" in run.stdout
  run = _cli(f"--evaluate={out}", "--config=configs/default.py",
             "--config.model_kwargs.widths=(16,32)", "--config.model_kwargs.blocks_per_stage=1")
  assert run.returncode == 0, run.stderr
  assert "top-1" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("make_args,message", [
    (lambda d: [f"--workdir={d}/nope", f"--out={d}/x.ovsw"], "does not exist"),
    (lambda d: [f"--workdir={d}", f"--out={d}/x.ovsw"], "config.json"),
    (lambda d: [f"--workdir={d}", f"--out={d}/x.ovsw", "--config=configs/default.py"],
     "no checkpoint"),
    (lambda d: [f"--evaluate={d}/junk.ovsw", "--config=configs/default.py"],
     "not a readable ovsw-bnn file"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, make_args, message):
  (tmp_path / "junk.ovsw").write_bytes(b"\x00not an export")
  run = _cli(*make_args(tmp_path))
  assert run.returncode != 0
  assert "Traceback" not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, run.stderr
