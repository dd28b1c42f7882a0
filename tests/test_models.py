"""The paper's models (docs/method.md §6): sizes, binary masks, shapes and inits.

Parameter counts are checked against the release's numbers,
counted on abstract shapes (`jax.eval_shape`), so the big models never run.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovsw_jax.layers import LATENT_KERNEL
from ovsw_jax.models import (MODELS, PReLU, VGGSmall, avgpool_zeropad_shortcut,
                             get_model, hardtanh)
from ovsw_jax.optim.chain import binary_weight_mask

CIFAR, IMAGENET = 32, 224

# XLA's CPU optimisation passes dominate these tests' run time (many small
# programs, each run once); turning them down changes no result.
_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


@functools.lru_cache(maxsize=None)
def _abstract_variables(name, num_classes, image_size):
  """Shapes of the model's variables, without allocating or running anything."""
  model = get_model(name, num_classes)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat(tree):
  """`{'a/b/leaf': value}` of a nested dict."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _size(shape):
  return int(np.prod(shape, dtype=np.int64))


def _init(model, x):
  """Real initial variables. The 'rbg' key only keeps XLA's CPU compile short
  (threefry-based inits of a whole model take many seconds to compile)."""
  init = _jit(functools.partial(model.init, train=False))
  return init(jax.random.key(0, impl="rbg"), x)


# The release's counts (docs/method.md §6): (model, classes, input size,
# trainable params, binary convs, binary weights).
RELEASE_COUNTS = [
    ("resnet20", 10, CIFAR, 269_850, 18, 267_264),
    ("resnet18_cifar", 10, CIFAR, 11_174_986, 19, 11_157_504),
    ("vgg_small", 10, CIFAR, 4_660_618, 5, 4_571_136),
    ("resnet18", 1000, IMAGENET, 11_690_536, 16, 10_985_472),
    ("resnet34", 1000, IMAGENET, 21_798_696, 32, 21_086_208),
]


@pytest.mark.parametrize("name,classes,size,total,n_binary,binary", RELEASE_COUNTS)
def test_parameter_counts_match_release(name, classes, size, total, n_binary, binary):
  params = _abstract_variables(name, classes, size)["params"]
  flat, mask = _flat(params), _flat(binary_weight_mask(params))
  assert sum(_size(v.shape) for v in flat.values()) == total
  assert sum(mask.values()) == n_binary
  assert sum(_size(flat[k].shape) for k, m in mask.items() if m) == binary
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_resnet20_count_by_formula():
  """ResNet-20's size from its description alone (docs/method.md §6)."""
  classes, widths, blocks = 10, (16, 32, 64), 3
  conv = lambda k, cin, cout: k * k * cin * cout
  bn = lambda c: 2 * c
  binary, full = 0, conv(3, 3, widths[0]) + bn(widths[0])   # stem
  cin = widths[0]
  for width in widths:
    for _ in range(blocks):
      binary += conv(3, cin, width) + conv(3, width, width)
      full += 2 * bn(width)          # option-A shortcuts have no parameters
      cin = width
  full += bn(widths[-1]) + widths[-1] * classes + classes   # head BN, dense
  params = _flat(_abstract_variables("resnet20", classes, CIFAR)["params"])
  mask = _flat(binary_weight_mask(_abstract_variables("resnet20", classes, CIFAR)["params"]))
  assert sum(_size(v.shape) for v in params.values()) == binary + full
  assert sum(_size(params[k].shape) for k, m in mask.items() if m) == binary


def _block_convs(stage_sizes, convs=("conv1", "conv2")):
  return {f"layer{i + 1}_{j}/{c}/{LATENT_KERNEL}"
          for i, n in enumerate(stage_sizes) for j in range(n) for c in convs}


# The latent kernels that must be binary, from the architecture description.
EXPECTED_BINARY = {
    "resnet20": _block_convs((3, 3, 3)),
    "resnet18_cifar": _block_convs((2, 2, 2, 2)) | {
        f"layer{i}_0/shortcut/conv/{LATENT_KERNEL}" for i in (2, 3, 4)},
    "vgg_small": {f"conv{i}/{LATENT_KERNEL}" for i in range(1, 6)},
    "resnet18": _block_convs((2, 2, 2, 2)),
    "resnet34": _block_convs((3, 4, 6, 3)),
}


@pytest.mark.parametrize("name,classes,size", [t[:3] for t in RELEASE_COUNTS])
def test_binary_mask_is_exactly_the_binary_convs(name, classes, size):
  params = _abstract_variables(name, classes, size)["params"]
  mask = _flat(binary_weight_mask(params))
  assert {k for k, m in mask.items() if m} == EXPECTED_BINARY[name]
  # Everything else is full precision: stem, classifier, BN, FP shortcuts.
  for key in ("conv1/kernel", "bn1/scale", "bn2/bias", "conv0/kernel", "fc/kernel",
              "fc/bias", "linear/kernel", "layer2_0/downsample/conv/kernel",
              "layer2_0/downsample/bn/scale", "nonlinear5/negative_slope"):
    if key in mask:
      assert not mask[key], key
  assert any(k in mask for k in ("conv1/kernel", "conv0/kernel"))


def test_layer_shapes_follow_the_release():
  r20 = _flat(_abstract_variables("resnet20", 10, CIFAR)["params"])
  assert r20[f"layer2_0/conv1/{LATENT_KERNEL}"].shape == (3, 3, 16, 32)
  assert r20["conv1/kernel"].shape == (3, 3, 3, 16)
  assert r20["linear/kernel"].shape == (64, 10)
  # Option-A shortcut: the downsampling block has only its convs and BNs.
  assert {k.split("/")[1] for k in r20 if k.startswith("layer2_0/")} == {
      "conv1", "bn1", "conv2", "bn2"}
  r18c = _flat(_abstract_variables("resnet18_cifar", 10, CIFAR)["params"])
  assert r18c[f"layer2_0/shortcut/conv/{LATENT_KERNEL}"].shape == (1, 1, 64, 128)
  assert r18c["fc/kernel"].shape == (1, 1, 512, 10) and r18c["fc/bias"].shape == (10,)
  assert "conv1/bias" not in r18c
  r18 = _flat(_abstract_variables("resnet18", 1000, IMAGENET)["params"])
  assert r18["conv1/kernel"].shape == (7, 7, 3, 64)
  assert r18["layer4_0/downsample/conv/kernel"].shape == (1, 1, 256, 512)
  assert "layer1_0/downsample/conv/kernel" not in r18
  vgg = _flat(_abstract_variables("vgg_small", 10, CIFAR)["params"])
  assert vgg["fc/kernel"].shape == (8192, 10)
  assert vgg["nonlinear5/negative_slope"].shape == (512,)


def test_registry():
  assert set(MODELS) == {"resnet20", "resnet18_cifar", "vgg_small", "resnet18",
                         "resnet34", "tiny", "tiny_imagenet", "transformer_lm"}
  model = get_model("resnet20", 100, dtype=jnp.bfloat16, bn_axis_name="batch")
  assert (model.num_classes, model.dtype, model.bn_axis_name) == (100, jnp.bfloat16, "batch")
  with pytest.raises(ValueError, match="resnet20.*tiny_imagenet|tiny_imagenet.*resnet20"):
    get_model("resnet50", 10)


# Small models that really run: (model, input size). The ImageNet-style one
# gets BatchNorm scales of 1 here: with the release's 1e-8 its logits start
# around 1e-6 and say little (1e-8 is checked in its own test below).
TINY = {
    "tiny": (lambda **kw: get_model("tiny", 10, **kw), 16),
    "tiny_imagenet": (lambda **kw: get_model(
        "tiny_imagenet", 10, bn_scale_init=nn.initializers.ones, **kw), 32),
    "tiny_vgg": (lambda **kw: VGGSmall(10, widths=(8, 8, 16), **kw), 16),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_case(request):
  make, size = TINY[request.param]
  model = make()
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  return make, model, x, _init(model, x)


@pytest.mark.slow
def test_tiny_train_and_eval(tiny_case):
  _, model, x, variables = tiny_case
  train = _jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  evaluate = _jit(lambda v, x: model.apply(v, x, train=False))
  logits, updates = train(variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Training mode moves every running statistic away from its init.
  old = _flat(variables["batch_stats"])
  new = _flat(updates["batch_stats"])
  assert old.keys() == new.keys() and old
  for k in old:
    assert not np.allclose(old[k], new[k]), k
  eval_logits = evaluate(variables, x)
  assert eval_logits.shape == (4, 10) and eval_logits.dtype == jnp.float32
  # Eval uses running statistics: an example's logits ignore the rest of the
  # batch, while training-mode BatchNorm's do not.
  other = x.at[1:].set(3 * x[1:] + 1)
  np.testing.assert_allclose(evaluate(variables, other)[0], eval_logits[0],
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(train(variables, other)[0][0], logits[0], atol=1e-4)


@pytest.mark.slow
def test_tiny_bfloat16(tiny_case):
  """bfloat16 compute, float32 parameters, float32 logits (documented)."""
  make, _, x, variables = tiny_case
  model = make(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
  logits, state = _jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=True))(variables, x)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state["batch_stats"]))
  outputs = _flat(state["intermediates"])
  body = [k for k in outputs if "conv" in k or "/bn" in k or k.startswith("bn")]
  assert body and all(outputs[k][0].dtype == jnp.bfloat16 for k in body), {
      k: outputs[k][0].dtype for k in body}


def test_binary_conv_init_is_kaiming_fan_in():
  # ResNet-20's third stage alone: 3x3x64x64 binary kernels.
  model = get_model("resnet20", 10, widths=(64,), blocks_per_stage=1)
  params = _init(model, jnp.zeros((1, 8, 8, 3)))["params"]
  w = np.asarray(params["layer1_0"]["conv2"][LATENT_KERNEL])
  np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.03)
  assert abs(w.mean()) < 0.05 * w.std()


@pytest.mark.slow
def test_vgg_init():
  # Narrow widths keep it quick; unequal c_in and c_out tell fan-out from fan-in.
  model = VGGSmall(10, widths=(64, 128, 32))
  params = _init(model, jnp.zeros((1, 32, 32, 3)))["params"]
  # normal(0, sqrt(2 / (k * k * c_out))) for binary and full-precision convs.
  for name, c_out, rtol in (("conv2", 128, 0.02), ("conv4", 32, 0.03),
                            ("conv0", 64, 0.06)):
    kernel = params[name][LATENT_KERNEL if name != "conv0" else "kernel"]
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * c_out)), rtol=rtol,
                               err_msg=name)
  # The classifier: normal(0, 0.01), zero bias (the release's init).
  np.testing.assert_allclose(np.std(params["fc"]["kernel"]), 0.01, rtol=0.05)
  assert not np.any(params["fc"]["bias"])
  np.testing.assert_array_equal(params["nonlinear5"]["negative_slope"], 0.25)
  np.testing.assert_array_equal(params["bn3"]["scale"], 1.0)


@pytest.mark.slow
def test_imagenet_batchnorm_scales_start_at_1e8():
  model = get_model("tiny_imagenet", 10)   # the ImageNet ResNet, 1 block a stage
  params = _init(model, jnp.zeros((1, 32, 32, 3)))["params"]
  flat = _flat(params)
  scales = {k: v for k, v in flat.items() if k.endswith("/scale") and k != "bn2/scale"}
  # stem bn1, 2 per block, 1 per downsample (stages 2-4).
  assert len(scales) == 1 + 2 * 4 + 3
  for k, v in scales.items():
    np.testing.assert_array_equal(v, np.float32(1e-8), err_msg=k)
  for k, v in flat.items():
    if "bn" in k and k.endswith("/bias"):
      assert not np.any(v), k
  # The head's BatchNorm1d is outside the release's BatchNorm2d loop.
  np.testing.assert_array_equal(flat["bn2/scale"], 1.0)


@pytest.mark.slow
def test_hardtanh_has_torch_gradient():
  x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
  np.testing.assert_array_equal(hardtanh(x), [-1, -1, -0.5, 0, 0.5, 1, 1])
  np.testing.assert_array_equal(jax.grad(lambda x: hardtanh(x).sum())(x),
                                [0, 0, 1, 1, 1, 0, 0])
  assert hardtanh(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_prelu_is_per_channel():
  x = jnp.array([[-2.0, 3.0, 0.0], [1.0, -1.0, -4.0]])
  layer = PReLU()
  params = layer.init(jax.random.key(0), x)
  slope = jnp.array([0.1, 0.2, 0.3])
  y, vjp = jax.vjp(lambda s, x: layer.apply({"params": {"negative_slope": s}}, x), slope, x)
  np.testing.assert_allclose(y, [[-0.2, 3.0, 0.0], [1.0, -0.2, -1.2]], rtol=1e-6)
  dslope, dx = vjp(jnp.ones_like(x))
  np.testing.assert_allclose(dslope, [-2.0, -1.0, -4.0], rtol=1e-6)
  np.testing.assert_allclose(dx, [[0.1, 1.0, 0.3], [1.0, 0.2, 0.3]], rtol=1e-6)
  assert params["params"]["negative_slope"].shape == (3,)


def test_option_a_shortcut():
  x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  y = np.asarray(avgpool_zeropad_shortcut(jnp.asarray(x), 7, 2))
  pooled = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  assert y.shape == (2, 2, 2, 7)
  np.testing.assert_allclose(y[..., 2:5], pooled, rtol=1e-6)
  assert not np.any(y[..., :2]) and not np.any(y[..., 5:])
  np.testing.assert_array_equal(avgpool_zeropad_shortcut(jnp.asarray(x), 3, 1), x)


@pytest.mark.slow
def test_bn_axis_name_averages_statistics_across_devices():
  """With `bn_axis_name`, a pmapped step sees the statistics of the whole batch."""
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets XLA_FLAGS)")
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  single = get_model("tiny", 10)
  variables = _init(single, x)
  logits, updates = _jit(lambda v, x: single.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, x)
  shared = get_model("tiny", 10, bn_axis_name="batch")
  step = jax.pmap(
      lambda v, x: shared.apply(v, x, train=True, mutable=["batch_stats"]),
      axis_name="batch", in_axes=(None, 0), devices=jax.local_devices()[:2])
  p_logits, p_updates = step(variables, x.reshape(2, 2, *x.shape[1:]))
  np.testing.assert_allclose(p_logits.reshape(4, 10), logits, rtol=1e-4, atol=1e-4)
  for k, v in _flat(updates["batch_stats"]).items():
    got = _flat(p_updates["batch_stats"])[k]
    np.testing.assert_allclose(got[0], v, rtol=1e-4, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(got[1], v, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("kernel,levels", [("ternary", {-1, 0, 1}),
                                           ("midrise2_absmean", {-2, -1, 0, 1})])
def test_resnet20_with_ternary_or_2bit_kernels_keeps_its_parameters_and_changes_only_levels(
    kernel, levels):
  from ovsw_jax import layers, quantizers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  binary = MODELS["resnet20"](num_classes=10, widths=(8, 16), blocks_per_stage=1)
  kbit = MODELS["resnet20"](num_classes=10, widths=(8, 16), blocks_per_stage=1,
                            kernel_quantizer=kernel)
  vb = binary.init(jax.random.PRNGKey(0), x, train=False)
  vk = kbit.init(jax.random.PRNGKey(0), x, train=False)
  # Same parameter tree and initial values (the same Kaiming init under the same paths).
  assert jax.tree_util.tree_structure(vb) == jax.tree_util.tree_structure(vk)
  for a, b in zip(jax.tree.leaves(vb), jax.tree.leaves(vk)):
    np.testing.assert_array_equal(a, b)
  found = layers.kernel_quantizers(kbit, x, train=False)
  assert sorted(found) == sorted(layers.kernel_quantizers(binary, x, train=False))
  assert all(q == quantizers.get(kernel) for q in found.values())
  seen = set()
  for path, q in found.items():
    node = vk["params"]
    for part in path.split("/"):
      node = node[part]
    seen |= set(np.unique(np.asarray(q.levels(node))).tolist())
  assert seen == levels
  # A block conv computes QuantConv's convolution of the 1-bit input with the k-bit kernel.
  w = vk["params"]["layer1_0"]["conv1"][LATENT_KERNEL]
  h = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 8))
  want = jax.lax.conv_general_dilated(
      jnp.where(h >= 0, 1.0, -1.0) * (h != 0), quantizers.get(kernel)(w), (1, 1),
      ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  from ovsw_jax.models.common import block_conv  # pylint: disable=g-import-not-at-top

  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return block_conv(8, kernel, name="conv1")(x, True)

  got = One().apply({"params": {"conv1": {LATENT_KERNEL: w}}}, h)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  out_b = binary.apply(vb, x, train=False)
  out_k = kbit.apply(vk, x, train=False)
  assert out_k.shape == out_b.shape and not np.allclose(out_k, out_b)
