"""The language-model task: the standard-library corpus, exact bits per byte, the quantized
transformer, oscillations, and a run that trains, resumes bitwise and refuses other data."""

import hashlib
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fake_stdlib, final_state, load_config, signalled_after
from ovsw_jax import metrics, quantizers
from ovsw_jax.models import transformer
from ovsw_jax.optim import binary_weight_mask
from ovsw_jax.trainer import checkpointing, parallel, preemption, train, workdir
from ovsw_jax.trainer.data import stdlib_text
from ovsw_jax.trainer.tasks import language_model


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
  return fake_stdlib(tmp_path_factory.mktemp("Lib"))


def _bucket(name):
  return int(hashlib.sha256(name.encode()).hexdigest(), 16) >> 224  # the first 4 bytes


def test_corpus_is_the_top_level_sources_in_name_order_split_by_a_hash_of_the_name(lib):
  corpus = stdlib_text.build(lib, python_version="3.11.7")
  expected = {"train": [], "validation": [], "test": []}
  for i in range(40):
    name = f"mod{i:02d}.py"
    bucket = _bucket(name) % 10
    expected["validation" if bucket == 0 else "test" if bucket == 1 else "train"].append(name)
  assert {k: list(v) for k, v in corpus.files.items()} == expected
  assert all(expected.values())  # every split has files: the fixture is a real test
  for split in stdlib_text.SPLITS:  # BOS + the bytes of each file, in order
    stream = [256]
    for k, name in enumerate(expected[split]):
      stream += list((lib / name).read_bytes()) + ([256] if k + 1 < len(expected[split]) else [])
    np.testing.assert_array_equal(corpus.split(split), stream)
    assert corpus.num_bytes(split) == sum((lib / n).stat().st_size for n in expected[split])
  digest = hashlib.sha256()
  for i in range(40):
    data = (lib / f"mod{i:02d}.py").read_bytes()
    digest.update(f"mod{i:02d}.py".encode() + b"\0" + len(data).to_bytes(8, "big") + data)
  assert corpus.sha256 == digest.hexdigest()
  assert corpus.record()["python_version"] == "3.11.7"


def test_the_checksum_follows_the_data(tmp_path):
  a = fake_stdlib(tmp_path / "a")
  before = stdlib_text.build(a).sha256
  (a / "mod03.py").write_text((a / "mod03.py").read_text() + "# edited\n")
  assert stdlib_text.build(a).sha256 != before
  (a / "zz_new.py").write_text("y = 2\n")
  (a / "mod03.py").unlink()
  assert stdlib_text.build(a).sha256 not in (before,)
  with pytest.raises(FileNotFoundError, match="No Python sources"):
    stdlib_text.build(tmp_path / "empty")


def test_this_interpreters_corpus_is_its_stdlib():
  files = stdlib_text.corpus_files()
  names = [p.name for p in files]
  assert names == sorted(names) and "os.py" in names and "functools.py" in names
  assert not any(n.startswith("test") for n in names)
  assert all(p.parent == stdlib_text.stdlib_dir() for p in files)


@pytest.mark.parametrize("n", [1, 2, 17, 64, 65])
def test_evaluation_windows_predict_every_byte_once(n):
  rng = np.random.default_rng(n)
  stream = rng.integers(0, 256, n).astype(np.int32)
  stream[0] = stdlib_text.BOS
  if n > 10:
    stream[7] = stdlib_text.BOS  # a second file starts at 7
  w = language_model.eval_windows(stream, 16)
  real = w["weights"] > 0
  # The targets with weight 1 are exactly the stream's bytes after position 0, in order.
  np.testing.assert_array_equal(w["targets"][real], [t for t in stream[1:] if t != 256])
  np.testing.assert_array_equal(w["inputs"].reshape(-1)[:n - 1], stream[:-1])
  assert w["inputs"].shape[1] == 16


def _unigram_state(model, task, bias):
  """A model whose every logit is the head's bias: all other parameters zero."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), task.init_inputs())["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  params["head"]["bias"] = jnp.asarray(bias, jnp.float32)
  return train.TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
                          opt_state=(), flips=(), rng=jnp.zeros(2, jnp.uint32))


def lm_config(corpus_dir, arg="ternary,ovsw"):
  config = load_config("lm_stdlib", arg + ",runlocal")
  config.corpus_dir = str(corpus_dir)
  config.model_kwargs.width, config.model_kwargs.context = 16, 8
  return config


def test_bits_per_byte_are_exact_against_numpy(lib):
  """A context-free model: bits per byte follow from each split's byte counts alone."""
  config = lm_config(lib)
  config.eval_batch_size = 12  # the last batch padded
  task = language_model.LanguageModel(config)
  bias = np.random.default_rng(0).normal(size=stdlib_text.VOCAB_SIZE)
  model = task.create_model(None)
  state = _unigram_state(model, task, bias)
  logp = bias - np.log(np.sum(np.exp(bias)))
  scheme = parallel.create("pmap", train.AXIS)
  step = scheme.compile(lambda s, b: train.eval_step(s, b, task=task, model=model))
  out = train.evaluate(step, scheme.replicate(state), task, 12, scheme)
  for split, key in (("validation", "eval_bits_per_byte"), ("test", "eval_test_bits_per_byte")):
    data = b"".join((lib / n).read_bytes() for n in task.corpus.files[split])
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=257)
    expected = -np.sum(counts * logp) / len(data) / math.log(2)
    np.testing.assert_allclose(out[key], expected, rtol=1e-5)
  assert out["eval_count"] == task.corpus.num_bytes("validation")
  assert out["eval_test_count"] == task.corpus.num_bytes("test")
  np.testing.assert_allclose(out["eval_loss"], out["eval_bits_per_byte"] * math.log(2), rtol=1e-6)


def test_train_batches_are_a_pure_function_of_seed_and_step_split_over_processes(lib):
  task = language_model.LanguageModel(lm_config(lib))
  kw = dict(global_batch_size=8, seed=3, process_count=1, process_index=0)
  whole = [next(task.train_batches(start_step=s, **kw)) for s in (5, 6)]
  it = task.train_batches(start_step=5, **kw)
  np.testing.assert_array_equal(next(it)["inputs"], whole[0]["inputs"])
  np.testing.assert_array_equal(next(it)["targets"], whole[1]["targets"])
  halves = [next(task.train_batches(start_step=5, **{**kw, "process_count": 2,
                                                     "process_index": i})) for i in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), whole[0]["inputs"])
  b = whole[0]
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # shifted by one
  np.testing.assert_array_equal(b["weights"], b["targets"] != stdlib_text.BOS)


def test_the_transformer_is_causal_and_its_linears_are_quantized():
  model = transformer.TransformerLM(num_classes=257, width=16, depth=2, num_heads=2, context=8)
  tokens = jnp.arange(8)[None] % 257
  params = model.init(jax.random.key(0), tokens)["params"]
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens.at[0, 5].set(99))
  np.testing.assert_array_equal(a[0, :5], b[0, :5])  # earlier positions see no later token
  assert not np.array_equal(a[0, 5:], b[0, 5:])
  mask = binary_weight_mask(params)
  tracked = sorted("/".join(str(k.key) for k in path)
                   for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m)
  assert tracked == sorted(f"block_{i}/{part}/latent_kernel" for i in range(2)
                           for part in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up",
                                        "mlp/down"))
  twin = transformer.TransformerLM(num_classes=257, width=16, depth=2, num_heads=2, context=8,
                                   kernel_quantizer=None, input_quantizer=None)
  twin_params = twin.init(jax.random.key(0), tokens)["params"]
  assert not any(jax.tree.leaves(binary_weight_mask(twin_params)))
  shapes = lambda p: sorted(x.shape for x in jax.tree.leaves(p))  # noqa: E731
  assert shapes(twin_params) == shapes(params)
  with pytest.raises(ValueError, match="context"):
    model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))


def test_scaled_sign_is_sign_times_mean_magnitude_with_an_identity_gradient():
  w = jnp.array([[0.5, -2.0], [0.0, 1.5]])
  q = quantizers.get("scaled_sign")
  np.testing.assert_allclose(q(w), np.sign(np.asarray(w)) * 1.0)  # mean|w| = 1.0
  np.testing.assert_array_equal(q.levels(w), [[1, -1], [0, 1]])
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(q(x) * 3.0))(w), np.full((2, 2), 3.0))
  per_channel = quantizers.ScaledSign(axis=-1)
  np.testing.assert_allclose(per_channel(w), np.sign(np.asarray(w)) * [[0.25, 1.75]])
  assert isinstance(q, quantizers.Sign)  # tracked by its sign, as binary kernels are


def _oscillations_numpy(levels):
  """Per step, how many entries changed level opposite to their previous change."""
  last = np.zeros(levels.shape[1], int)
  out = []
  for a, b in zip(levels[:-1], levels[1:]):
    d = np.sign(b - a)
    out.append(int(np.sum((d != 0) & (d == -last))))
    last = np.where(d != 0, d, last)
  return out


@pytest.mark.parametrize("quantizer", ["sign", "ternary"])
def test_oscillations_are_reversals_of_the_previous_level_change(quantizer):
  rng = np.random.default_rng(1)
  walk = np.cumsum(rng.normal(0, 0.4, (12, 2, 3)), axis=0) + rng.normal(0, 0.3, (1, 2, 3))
  params = {"latent_kernel": jnp.asarray(walk[0], jnp.float32)}
  mask = {"latent_kernel": True}
  levels = None if quantizer == "sign" else {"latent_kernel": quantizer}
  q = quantizers.get(quantizer)
  flips = metrics.init_flip_state(params, mask, levels, oscillation=True)
  step = jax.jit(lambda f, a, b: metrics.oscillation_step(f, a, b, mask, levels))
  got, seen = [], []
  for t in range(1, len(walk)):
    new = {"latent_kernel": jnp.asarray(walk[t], jnp.float32)}
    flips, fraction = step(flips, params, new)
    got.append(round(float(fraction) * 6))
    seen.append(np.asarray(q.levels(params["latent_kernel"])).ravel())
    params = new
  seen.append(np.asarray(q.levels(params["latent_kernel"])).ravel())
  expected = _oscillations_numpy(np.stack(seen).astype(int))
  assert got == expected and sum(expected) > 0
  with pytest.raises(ValueError, match="oscillation=True"):
    metrics.oscillation_step(metrics.init_flip_state(params, mask, levels), params, params,
                             mask, levels)


def test_config_words_choose_the_kernels():
  for word, kernel, inputs in (("ternary", "ternary", "int8"), ("binary", "scaled_sign", "int8"),
                               ("float", None, None)):
    c = load_config("lm_stdlib", f"{word},vanilla")
    assert (c.model_kwargs.kernel_quantizer, c.model_kwargs.input_quantizer) == (kernel, inputs)
    assert not c.ovsw.ags and not c.ovsw.sad
  with pytest.raises(ValueError, match="'quaternary'.*ternary.*ovsw"):
    load_config("lm_stdlib", "quaternary")


@pytest.mark.slow
def test_lm_trains_resumes_bitwise_and_refuses_other_data(lib, tmp_path, monkeypatch):
  config = lm_config(lib)
  config.num_train_steps = 6
  config.checkpoint_every_steps = 100
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert {"eval_bits_per_byte", "eval_test_bits_per_byte", "silent_ratio",
          "flip_ratio"} <= set(straight)
  assert any(k.startswith("silent_ratio/block_0/attn/q") for k in straight)
  record = workdir.read_record(tmp_path / "straight" / "config.json")[0]
  assert record["data"]["corpus_sha256"] == stdlib_text.build(lib).sha256
  log = (tmp_path / "straight" / "metrics.jsonl").read_text()
  assert "train_step_oscillation_ratio" in log and "train_bits_per_byte" in log

  lm = language_model.LanguageModel
  monkeypatch.setattr(lm, "train_batches", signalled_after(lm.train_batches, 3, signal.SIGTERM))
  with preemption.handling(preemption.ALWAYS), pytest.raises(preemption.Preempted) as stop:
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.undo()
  assert 1 <= stop.value.step < 6
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed == straight
  a, b = (final_state(config, tmp_path / d) for d in ("straight", "resumed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Other data under the same config (another Python's stdlib): refused, nothing trained.
  other = fake_stdlib(tmp_path / "other")
  (other / "mod05.py").write_text("changed = True\n")
  config.corpus_dir = str(other)
  config.num_train_steps = 8
  with pytest.raises(workdir.ConfigMismatchError,
                     match=r"data.corpus_sha256.*data.python_version='\d"):
    train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert checkpointing.create_manager(
      f"{tmp_path / 'straight'}/checkpoints").all_steps() == [6]
