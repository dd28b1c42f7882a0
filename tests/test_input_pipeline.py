"""Tests of `ovsw_jax.trainer.input_pipeline`: order, resume, sharding, eval, augmentation.

CIFAR and ImageNet run on `tfds.testing.mock_data` (its default policy, which
falls back to `MockPolicy.USE_CODE` when no metadata is in the data_dir). It
mocks both `tfds.load` and `tfds.data_source` (random access); with
`SkipDecoding` the mocked data source returns encoded image bytes, like the real
one. `batch_size=-1` must not be used under it (the example count is unknown and
the process aborts), which is why the pipeline reads splits in fixed batches.
One test also builds a tiny real array_record dataset with a custom builder, to
exercise `tfds.data_source` on real files and threads without mocks.
"""

import io
import os
import threading
import time
import types

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from ovsw_jax.trainer import input_pipeline as ip
from ovsw_jax.trainer.data import augment as aug
from ovsw_jax.trainer.data import device
from ovsw_jax.trainer.data import imagenet
from ovsw_jax.trainer.data import tf_images
from ovsw_jax.trainer.data import sources
from helpers import assert_batch_equal, take
import tiny_images

MOCK_EXAMPLES = 20  # With global batch 8: 2 steps per epoch, 3 eval batches.


@pytest.fixture(autouse=True)
def _fresh_caches():
  sources.clear_caches()
  yield
  sources.clear_caches()


def _config(dataset, **kwargs):
  return ml_collections.ConfigDict(dict(dataset=dataset, **kwargs))


@pytest.fixture(params=['digits', 'cifar10', 'imagenet2012'])
def any_config(request, tmp_path):
  """A config per pipeline family; tfds ones inside `mock_data`."""
  name = request.param
  if name == 'digits':
    yield _config('digits')
    return
  extra = {'image_size': 24} if name == 'imagenet2012' else {}
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    # ImageNet in this process (data_workers=0): tests/test_data_workers.py covers the
    # worker processes.
    yield _config(name, data_dir=str(tmp_path), data_workers=0, decode_threads=2, **extra)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert_batch_equal(x, y)


# ---------------------------------------------------------------------------
# Digits split.


def test_digits_split_is_fixed_disjoint_stratified():
  split = sources.load_digits_split()
  train, test = split['train_index'], split['test_index']
  assert len(train) == 1437 and len(test) == 360
  assert not np.intersect1d(train, test).size
  np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
  np.testing.assert_array_equal(np.bincount(split['test_labels']), [36] * 10)
  assert split['train_images'].shape == (1437, 8, 8, 1)
  assert 0.0 <= split['train_images'].min() and split['train_images'].max() <= 1.0
  # Pinned, so that a change of the split (which would make results
  # incomparable across versions) fails here.
  assert test[:8].tolist() == [2, 12, 13, 15, 20, 21, 24, 26]
  assert int(test.sum()) == 323280
  sources.load_digits_split.cache_clear()
  again = sources.load_digits_split()
  np.testing.assert_array_equal(again['test_index'], test)
  info = ip.get_info(_config('digits'))
  assert info == ip.DatasetInfo('digits', 10, (8, 8, 1), 1437, 360)


def test_digits_normalised_by_train_statistics():
  config = _config('digits', augment=False)
  gb = 479  # 1437 = 3 * 479: one epoch covers the whole training split.
  batches = take(ip.train_iterator(config, global_batch_size=gb), 3)
  images = np.concatenate([b['image'] for b in batches])
  assert images.shape == (1437, 8, 8, 1) and images.dtype == np.float32
  assert abs(images.mean()) < 1e-4 and abs(images.std() - 1) < 1e-4
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(np.sort(labels),
                                np.sort(sources.load_digits_split()['train_labels']))


def test_digits_shift_is_at_most_one_pixel():
  split = sources.load_digits_split()
  config = _config('digits')
  step = 5
  batch = take(ip.train_iterator(config, global_batch_size=64, start_step=step,
                                  seed=3), 1)[0]
  idx = ip.global_batch_indices(1437, 64, step, 3)
  mean, std = split['train_images'].mean(), split['train_images'].std()
  raw = batch['image'] * std + mean  # Back to [0, 1].
  shifted = 0
  for k, i in enumerate(idx):
    img = split['train_images'][i]
    candidates = aug.pad_and_crop(np.repeat(img[None], 9, 0),
                                  np.array([(a, b) for a in range(3) for b in range(3)]), 1)
    errs = np.abs(candidates - raw[k]).max(axis=(1, 2, 3))
    assert errs.min() < 1e-5, k
    shifted += errs[4] > 1e-5
  assert shifted > 0  # Some examples were actually shifted.


# ---------------------------------------------------------------------------
# All pipelines: shapes, resume, seeds, sharding, evaluation.


def test_shapes_dtypes_ranges(any_config):
  info = ip.get_info(any_config)
  batch = take(ip.train_iterator(any_config, global_batch_size=8), 1)[0]
  assert batch['image'].shape == (8, *info.image_shape)
  assert batch['label'].dtype == np.int32
  assert np.all((batch['label'] >= 0) & (batch['label'] < info.num_classes))
  if info.pixel_stats is not None:  # uint8 pixels, normalised on the device
    assert batch['image'].dtype == np.uint8 and batch['rgb_offset'].shape == (8, 3)
    assert np.abs(batch['rgb_offset']).max() < 0.2  # 0.1-std lighting, on [0, 1] pixels
    images = np.asarray(device.model_images(batch, info.pixel_stats))
  else:
    assert batch['image'].dtype == np.float32
    images = batch['image']
  # Normalised: [0, 1] pixels map into [-mean/std, (1-mean)/std] ⊂ [-2.2, 6].
  assert -2.4 < images.min() and images.max() < 6.0
  assert np.isfinite(images).all()


def test_resume_is_bitwise_identical(any_config):
  k = 3  # Crosses an epoch boundary for the mocked datasets (2 steps/epoch).
  full = take(ip.train_iterator(any_config, global_batch_size=8, seed=7), k + 3)
  resumed = take(ip.train_iterator(any_config, global_batch_size=8, seed=7,
                                    start_step=k), 3)
  _assert_batches_equal(full[k:], resumed)


def _with(config, **kwargs):
  new = ml_collections.ConfigDict(config.to_dict())
  new.update(kwargs)
  return new


def test_prefetch_changes_nothing(any_config):
  eager = take(ip.train_iterator(_with(any_config, prefetch=0),
                                  global_batch_size=8, seed=1), 3)
  ahead = take(ip.train_iterator(_with(any_config, prefetch=3),
                                  global_batch_size=8, seed=1), 3)
  _assert_batches_equal(eager, ahead)


def test_two_processes_concatenate_to_the_global_batch(any_config):
  one = take(ip.train_iterator(any_config, global_batch_size=8, seed=2), 3)
  parts = [take(ip.train_iterator(any_config, global_batch_size=8, seed=2,
                                   process_index=i, process_count=2), 3)
           for i in range(2)]
  joined = [{k: np.concatenate([parts[0][s][k], parts[1][s][k]]) for k in one[s]}
            for s in range(3)]
  _assert_batches_equal(one, joined)


def test_eval_covers_every_example_once(any_config):
  info = ip.get_info(any_config)
  gb = 8 if info.name != 'digits' else 100
  single = list(ip.eval_iterator(any_config, global_batch_size=gb))
  assert len(single) == -(-info.num_eval // gb)
  assert all(b['image'].shape == (gb, *info.image_shape) for b in single)
  mask = np.concatenate([b['mask'] for b in single])
  assert mask.dtype == bool and mask.sum() == info.num_eval
  assert mask[:info.num_eval].all() and not mask[info.num_eval:].any()
  # Two processes: the same examples, each exactly once.
  parts = [list(ip.eval_iterator(any_config, global_batch_size=gb,
                                 process_index=i, process_count=2))
           for i in range(2)]
  joined = [{k: np.concatenate([p0[k], p1[k]]) for k in p0}
            for p0, p1 in zip(*parts)]
  _assert_batches_equal(single, joined)
  if info.name == 'digits':
    labels = np.concatenate([b['label'][b['mask']] for b in single])
    np.testing.assert_array_equal(labels, sources.load_digits_split()['test_labels'])


def test_order_is_a_permutation_per_epoch_and_depends_on_seed():
  n, gb = 1437, 100
  spe = ip.steps_per_epoch(n, gb)
  epoch0 = np.concatenate([ip.global_batch_indices(n, gb, s, 0) for s in range(spe)])
  assert len(np.unique(epoch0)) == spe * gb
  epoch1 = np.concatenate([ip.global_batch_indices(n, gb, s, 0)
                           for s in range(spe, 2 * spe)])
  assert not np.array_equal(epoch0, epoch1)
  other_seed = np.concatenate([ip.global_batch_indices(n, gb, s, 1) for s in range(spe)])
  assert not np.array_equal(epoch0, other_seed)
  a = take(ip.train_iterator(_config('digits'), global_batch_size=gb, seed=0), 1)[0]
  b = take(ip.train_iterator(_config('digits'), global_batch_size=gb, seed=1), 1)[0]
  assert not np.array_equal(a['label'], b['label'])


def test_bad_arguments_raise_at_the_call():
  config = _config('digits')
  with pytest.raises(ValueError):
    ip.train_iterator(config, global_batch_size=9, process_count=2)
  with pytest.raises(ValueError):
    ip.train_iterator(config, global_batch_size=8, seed=-1)
  with pytest.raises(ValueError):
    ip.train_iterator(config, global_batch_size=8, process_index=2, process_count=2)
  with pytest.raises(ValueError):
    ip.train_iterator(config, global_batch_size=2000)
  with pytest.raises(ValueError):
    ip.get_info(_config('mnist'))


# ---------------------------------------------------------------------------
# Augmentation on hand-made images.


def test_pad_and_crop_and_flip_on_a_hand_made_image():
  img = np.arange(1, 32 * 32 * 3 + 1, dtype=np.int32).reshape(1, 32, 32, 3)
  same = aug.pad_and_crop(img, np.array([[4, 4]]), 4)
  np.testing.assert_array_equal(same, img)
  shifted = aug.pad_and_crop(img, np.array([[0, 0]]), 4)
  np.testing.assert_array_equal(shifted[0, 4:, 4:], img[0, :-4, :-4])
  assert not shifted[0, :4].any() and not shifted[0, :, :4].any()
  corner = aug.pad_and_crop(img, np.array([[8, 2]]), 4)
  np.testing.assert_array_equal(corner[0, :-4, 2:], img[0, 4:, :-2])
  assert not corner[0, -4:].any() and not corner[0, :, :2].any()
  flipped = aug.hflip(np.concatenate([img, img]), np.array([True, False]))
  np.testing.assert_array_equal(flipped[0, :, 0], img[0, :, -1])
  np.testing.assert_array_equal(flipped[0], img[0, :, ::-1])
  np.testing.assert_array_equal(flipped[1], img[0])
  with pytest.raises(ValueError):
    aug.pad_and_crop(img, np.array([[9, 0]]), 4)


def test_cifar_train_batch_is_a_crop_and_flip_of_its_example(tmp_path):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    config = _config('cifar10', data_dir=str(tmp_path))
    batch = take(ip.train_iterator(config, global_batch_size=8, start_step=1,
                                    seed=5), 1)[0]
    raw, labels = sources.load_tfds_arrays('cifar10', 'train', str(tmp_path))
  idx = ip.global_batch_indices(MOCK_EXAMPLES, 8, 1, 5)
  np.testing.assert_array_equal(batch['label'], labels[idx])
  offsets = np.array([(a, b) for a in range(9) for b in range(9)])
  used = set()
  for k, i in enumerate(idx):
    crops = aug.pad_and_crop(np.repeat(raw[i][None], 81, 0), offsets, 4)
    candidates = np.concatenate([crops, crops[:, :, ::-1]])
    candidates = aug.normalize(candidates, aug.CIFAR_MEAN, aug.CIFAR_STD)
    match = np.flatnonzero((candidates == batch['image'][k]).all(axis=(1, 2, 3)))
    assert match.size, k
    used.add(int(match[0]))
  assert len(used) > 1  # Not all examples got the same transform.
  # Evaluation is normalisation only.
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    first = next(ip.eval_iterator(config, global_batch_size=8))
    test_raw, _ = sources.load_tfds_arrays('cifar10', 'test', str(tmp_path))
  np.testing.assert_array_equal(
      first['image'], aug.normalize(test_raw[:8], aug.CIFAR_MEAN, aug.CIFAR_STD))


def test_random_resized_crop_params_stay_inside_and_follow_the_ranges():
  rng = np.random.default_rng(0)
  fractions, ratios = [], []
  for _ in range(300):
    top, left, h, w = aug.random_resized_crop_params(rng, 120, 200)
    assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 200
    fractions.append(h * w / (120 * 200))
    ratios.append(w / h)
  assert 0.07 < min(fractions) and max(fractions) <= 1.0
  # Large boxes occur: at most 120 x 160 (ratio 4/3) fits, 0.8 of the area.
  assert max(fractions) > 0.75
  assert 0.7 < min(ratios) and max(ratios) < 1.4
  # A very wide image falls back to a central crop clamped to ratio 4/3.
  box = aug.random_resized_crop_params(np.random.default_rng(0), 10, 1000,
                                       scale=(5.0, 6.0))
  assert box == (0, (1000 - 13) // 2, 10, 13)


def test_lighting_forms():
  draws = np.stack([aug.lighting_offset(np.random.default_rng(i)) for i in range(4000)])
  expected_cov = aug.IMAGENET_EIGVEC @ np.diag((0.1 * aug.IMAGENET_EIGVAL) ** 2) \
      @ aug.IMAGENET_EIGVEC.T
  np.testing.assert_allclose(np.cov(draws.T), expected_cov, atol=2e-5)
  # 'release' is the authors' ColorAugmentation, transcribed from their code.
  release_vec = np.array([[0.4009, 0.7192, -0.5675], [-0.8140, -0.0045, -0.5808],
                          [0.4203, -0.6948, -0.5836]])
  alpha = np.random.default_rng(11).standard_normal(3) * 0.1
  np.testing.assert_allclose(
      aug.lighting_offset(np.random.default_rng(11), form='release'),
      (aug.IMAGENET_EIGVAL * alpha) @ release_vec, rtol=1e-6)
  assert not aug.lighting_offset(np.random.default_rng(11), form='none').any()


def test_imagenet_transforms_on_a_hand_made_image():
  # Left half red, right half blue, 300 x 400 (H x W).
  img = np.zeros((300, 400, 3), np.uint8)
  img[:, :200, 0] = 255
  img[:, 200:, 2] = 255
  out = aug.imagenet_eval_transform(img, 224)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  # Resize 300x400 -> 256x341, centre crop 224: columns 58..282 of 341, the
  # colour boundary at 170.5 -> column ~112 of the crop.
  pixels = out * np.float32(aug.IMAGENET_STD) + np.float32(aug.IMAGENET_MEAN)
  np.testing.assert_allclose(pixels[:, :100], np.broadcast_to([1, 0, 0], (224, 100, 3)),
                             atol=1e-5)
  np.testing.assert_allclose(pixels[:, 125:], np.broadcast_to([0, 0, 1], (224, 99, 3)),
                             atol=1e-5)
  # Training transform: deterministic given the rng; a flip shows up as red on
  # the right, and lighting offsets are constant per channel.
  outs = [aug.imagenet_train_transform(img, np.random.default_rng(s), 32,
                                       scale=(1.0, 1.0), lighting='none')
          for s in range(8)]
  again = aug.imagenet_train_transform(img, np.random.default_rng(0), 32,
                                       scale=(1.0, 1.0), lighting='none')
  np.testing.assert_array_equal(outs[0], again)
  left_red = [o[:, 0, 0].mean() > o[:, -1, 0].mean() for o in outs]
  assert any(left_red) and not all(left_red)
  lit = aug.imagenet_train_transform(img, np.random.default_rng(0), 32,
                                     scale=(1.0, 1.0), lighting='alexnet')
  diff = (lit - outs[0]) * np.float32(aug.IMAGENET_STD)
  np.testing.assert_allclose(diff, np.broadcast_to(diff[0, 0], diff.shape), atol=1e-5)
  assert np.abs(diff[0, 0]).max() > 0


# ---------------------------------------------------------------------------
# Unprepared datasets and a real array_record dataset.


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_unprepared_dataset_raises_quickly_with_instructions(name, tmp_path):
  start = time.monotonic()
  with pytest.raises(ip.DatasetNotPreparedError) as error:
    ip.get_info(_config(name, data_dir=str(tmp_path)))
  assert time.monotonic() - start < 10  # No network retries.
  message = str(error.value)
  assert str(tmp_path) in message and f'tfds build {name}' in message
  if name == 'imagenet2012':
    assert '--manual_dir' in message and '--file_format=array_record' in message
    assert 'ILSVRC2012_img_train.tar' in message
  else:
    assert 'download_and_prepare()' in message


def _pil_eval_pixels(image, size):
  """The release's eval transform before normalisation, in PIL (the reference)."""
  img = aug.decode_rgb(image)
  img = aug.center_crop(aug.resize_shorter_side(img, int(round(256 * size / 224))), size)
  return np.asarray(img, np.uint8)


def test_real_array_record_dataset(tmp_path):
  data_dir = str(tmp_path)
  config = _config('imagenet2012', tfds_name=tiny_images.prepare(data_dir), data_dir=data_dir,
                   image_size=16, data_workers=0, decode_threads=3)
  info = ip.get_info(config)
  assert (info.num_train, info.num_eval, info.image_shape) == (7, 5, (16, 16, 3))
  full = take(ip.train_iterator(config, global_batch_size=2, seed=4), 5)
  resumed = take(ip.train_iterator(config, global_batch_size=2, seed=4,
                                    start_step=4), 1)
  _assert_batches_equal(full[4:], resumed)
  # The decode threads do not change a batch.
  config.decode_threads = 1
  _assert_batches_equal(full, take(ip.train_iterator(config, global_batch_size=2, seed=4), 5))
  evals = list(ip.eval_iterator(config, global_batch_size=4, process_index=1,
                                process_count=2))
  assert [b['mask'].tolist() for b in evals] == [[True, True], [False, False]]
  # Eval images are the release's transform (PIL, the reference) of the stored
  # lossless images, up to the resize's rounding: match each to the nearest
  # reference, since tfds shuffles examples when it writes them.
  expected = [(_pil_eval_pixels(tiny_images.tiny_image(k), 16).astype(int), k % 5)
              for k in range(100, 105)]
  for image, label in zip(evals[0]['image'], evals[0]['label']):
    errors = [np.abs(image.astype(int) - ref).mean() for ref, _ in expected]
    best = int(np.argmin(errors))
    assert errors[best] < 3.0 and expected[best][1] == label, errors


def test_imagenet_examples_get_their_own_randomness():
  """Identical images at different batch positions get different crops."""
  img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  records = [{'image': img, 'label': 3}] * 6
  batches = imagenet.ImageNetBatches(records, records, 16, read_threads=3, decode_threads=2)
  positions = np.arange(6)
  batch = batches.train(np.zeros(6, int), seed=0, step=0, positions=positions)
  later = batches.train(np.zeros(6, int), seed=0, step=1, positions=positions)
  plain = batches.train(np.zeros(2, int), seed=0, step=0, positions=positions[:2],
                        augment=False)
  assert batch['label'].tolist() == [3] * 6
  assert len({batch['image'][k].tobytes() for k in range(6)}) == 6
  assert len({batch['rgb_offset'][k].tobytes() for k in range(6)}) == 6
  assert not np.array_equal(batch['image'], later['image'])
  reference = _pil_eval_pixels(img, 16).astype(int)
  assert np.abs(plain['image'][0].astype(int) - reference).mean() < 3.0


def _smooth_jpeg():
  """A smooth JPEG, so that JPEG blocks and interpolation differ little."""
  yy, xx = np.mgrid[0:90, 0:120]
  img = np.stack([(yy * 2) % 256, (xx * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(img).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _release_pairs(decoder, lighting, n=4):
  """The pipeline's training images (device-normalised) and the release's PIL transform
  of the same example from the same keyed generator."""
  data = _smooth_jpeg()
  records = [{'image': data, 'label': 1}] * n
  batches = imagenet.ImageNetBatches(records, records, 32, lighting=lighting, decoder=decoder,
                                     decode_threads=2)
  batch = batches.train(np.zeros(n, int), seed=7, step=3, positions=np.arange(n))
  ours = np.asarray(device.model_images(batch, (aug.IMAGENET_MEAN, aug.IMAGENET_STD)))
  for p in range(n):
    rng = np.random.default_rng([2, 7, 3, p])  # the pipeline's key for this example
    yield ours[p], aug.imagenet_train_transform(data, rng, 32, lighting=lighting)


@pytest.mark.parametrize('lighting', ['alexnet', 'none'])
def test_tf_decode_plus_device_normalisation_is_the_release_transform(lighting):
  """The crop-window decode (TF) and the device's normalisation together give
  what the PIL transform gives from the same keyed generator: same crop box,
  flip and lighting, pixels equal up to the resize's interpolation."""
  for ours, reference in _release_pairs('tf', lighting):
    # One pixel level is 1/255/0.225 = 0.017 after normalisation.
    assert np.abs(ours - reference).mean() < 0.06
    assert np.abs(ours - reference[:, ::-1]).mean() > np.abs(ours - reference).mean()


def test_pil_decoder_is_the_release_transform_exactly():
  """decoder='pil' ships the release's uint8 pixels: after the device's lighting and
  normalisation they equal the release's float32 transform to rounding."""
  for ours, reference in _release_pairs('pil', 'alexnet'):
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def _old_draws(seed, step, positions, sizes, lighting):
  """The draws of the pipeline before data workers, as it made them (a transcription of
  its per-example loop): each example's generator, then box, flip, lighting."""
  out = []
  for position, (h, w) in zip(positions, sizes):
    rng = np.random.default_rng([2, seed, step, int(position)])
    box = aug.random_resized_crop_params(rng, h, w)
    flip = rng.random() < 0.5
    out.append((box, flip, aug.lighting_offset(rng, form=lighting)))
  return out


def test_augmentation_law_is_unchanged():
  """The draws made in the data workers are the earlier pipeline's, example for example,
  and they follow the release's law: crop area uniform on (0.08, 1.25) of the image
  where the box fits, log-uniform aspect on (3/4, 4/3), a fair flip, and lighting with
  the PCA covariance (checked against an independent NumPy sampler and the formula)."""
  n, (h, w) = 4000, (375, 500)
  boxes, flips, offsets = [], [], []
  for step in range(n // 100):
    positions = np.arange(100) + 1000 * step  # rows of one global batch
    b, f, o = imagenet.draws(3, step, positions, [(h, w)] * 100, 'alexnet')
    for k, (box, flip, offset) in enumerate(_old_draws(3, step, positions, [(h, w)] * 100,
                                                       'alexnet')):
      assert tuple(b[k]) == box and f[k] == flip and np.array_equal(o[k], offset)
    boxes.append(b), flips.append(f), offsets.append(o)
  boxes, flips, offsets = np.concatenate(boxes), np.concatenate(flips), np.concatenate(offsets)
  area = boxes[:, 2] * boxes[:, 3] / (h * w)
  log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
  # Independent reference: the first try of RandomResizedCrop that fits, vectorised.
  rng = np.random.default_rng(123)
  s = rng.uniform(0.08, 1.25, (n, 10))
  r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (n, 10)))
  rw, rh = np.round(np.sqrt(s * h * w * r)), np.round(np.sqrt(s * h * w / r))
  fits = (rw <= w) & (rh <= h)
  first = fits.argmax(1)
  assert fits.any(1).mean() > 0.99  # the central-crop fallback is rare at this shape
  ok = fits.any(1)
  ref_area = (rw * rh)[np.arange(n), first][ok] / (h * w)
  ref_aspect = np.log((rw / rh)[np.arange(n), first][ok])
  for ours, ref, edges in ((area, ref_area, np.linspace(0, 1, 11)),
                           (log_aspect, ref_aspect, np.linspace(-0.3, 0.3, 7))):
    p = np.histogram(ours, edges)[0] / len(ours)
    q = np.histogram(ref, edges)[0] / len(ref)
    assert np.abs(p - q).max() < 0.03, (p, q)  # ~4 binomial std of 4000 draws
  assert abs(flips.mean() - 0.5) < 0.03
  np.testing.assert_allclose(offsets.mean(0), 0, atol=2e-3)
  expected_cov = aug.IMAGENET_EIGVEC @ np.diag((0.1 * aug.IMAGENET_EIGVAL) ** 2) \
      @ aug.IMAGENET_EIGVEC.T
  np.testing.assert_allclose(np.cov(offsets.T), expected_cov, atol=2e-5)


def test_data_threads_scale_with_the_host_and_read_remote_stores_concurrently(monkeypatch):
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  local = _config('imagenet2012', data_dir='/data/tfds')
  gib = 2**30
  assert ip.data_threads(local, cpus=96, memory=400 * gib) == (96, 1, 1)
  # A worker is budgeted 2 GiB of the available memory (a quarter for each pipeline's
  # workers): 64 GiB hold 32 workers, which then share the 96 CPUs 3 threads each.
  assert ip.data_threads(local, cpus=96, memory=64 * gib) == (32, 3, 1)
  assert ip.data_threads(local, cpus=96, memory=0.5 * gib) == (1, 96, 1)
  assert ip.data_threads(_with(local, data_workers=24), cpus=96, memory=gib) == (24, 4, 1)
  assert ip.data_threads(_with(local, data_workers=0), cpus=96) == (0, 96, 1)
  remote = _config('imagenet2012', data_dir='gs://bucket/tfds')
  assert ip.data_threads(remote, cpus=8, memory=400 * gib) == (8, 1, ip.READ_THREADS_REMOTE)
  monkeypatch.setenv('TFDS_DATA_DIR', 'gs://bucket/tfds')
  assert ip.data_threads(_config('imagenet2012'), cpus=8)[2] == ip.READ_THREADS_REMOTE
  assert ip.data_threads(_with(remote, read_threads=7, decode_threads=3, data_workers=8),
                         cpus=8) == (8, 3, 7)


def test_memory_available_follows_the_containers_limit(tmp_path):
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal: 400000000 kB\nMemAvailable: 300000000 kB\n')
  root = tmp_path / 'cgroup'
  (root / 'memory').mkdir(parents=True)
  assert ip.memory_available(str(root), str(meminfo)) == 300000000 * 1024
  (root / 'memory.max').write_text('34359738368\n')  # v2: 32 GiB, 8 GiB of it used
  (root / 'memory.current').write_text('8589934592\n')
  assert ip.memory_available(str(root), str(meminfo)) == 24 * 2**30
  (root / 'memory.max').write_text('max\n')
  assert ip.memory_available(str(root), str(meminfo)) == 300000000 * 1024
  (root / 'memory.max').unlink()
  (root / 'memory' / 'memory.limit_in_bytes').write_text(f'{2**63 - 4096}\n')  # v1 unlimited
  (root / 'memory' / 'memory.usage_in_bytes').write_text('0\n')
  assert ip.memory_available(str(root), str(meminfo)) == 300000000 * 1024
  (root / 'memory' / 'memory.limit_in_bytes').write_text(f'{2**30}\n')
  assert ip.memory_available(str(root), str(meminfo)) == 2**30
  assert ip.memory_available(str(tmp_path / 'no'), str(tmp_path / 'no')) is None


def test_cpus_follow_the_containers_quota(tmp_path):
  v2 = tmp_path / 'v2'
  v2.mkdir()
  (v2 / 'cpu.max').write_text('250000 100000\n')
  assert ip.cgroup_cpu_limit(str(v2)) == 2.5
  affinity = len(os.sched_getaffinity(0))
  assert ip.host_cpus(str(v2)) == min(affinity, 3)
  (v2 / 'cpu.max').write_text('max 100000\n')
  assert ip.cgroup_cpu_limit(str(v2)) is None and ip.host_cpus(str(v2)) == affinity
  v1 = tmp_path / 'v1' / 'cpu'
  v1.mkdir(parents=True)
  (v1 / 'cpu.cfs_period_us').write_text('100000\n')
  (v1 / 'cpu.cfs_quota_us').write_text('-1\n')
  assert ip.cgroup_cpu_limit(str(v1.parent)) is None
  (v1 / 'cpu.cfs_quota_us').write_text('50000\n')
  assert ip.cgroup_cpu_limit(str(v1.parent)) == 0.5 and ip.host_cpus(str(v1.parent)) == 1
  assert ip.cgroup_cpu_limit(str(tmp_path / 'none')) is None


def test_too_little_shared_memory_for_the_workers_is_named_at_the_call(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  config = _config('imagenet2012', tfds_name=tiny_images.prepare(data_dir), data_dir=data_dir,
                   image_size=16, data_workers=2)
  real = os.statvfs

  def small(path):
    if path != '/dev/shm':
      return real(path)
    return types.SimpleNamespace(f_bavail=2, f_frsize=4096)  # 8 KiB free
  monkeypatch.setattr(os, 'statvfs', small)
  for make in (ip.train_iterator, ip.eval_passes):
    with pytest.raises(ValueError) as error:
      make(config, global_batch_size=4)
    message = str(error.value)
    assert '/dev/shm has 0 MiB free' in message and '2 data workers' in message
    assert '--shm-size' in message and '--config.data_workers' in message
  # Room enough, or no workers: no complaint (and no process started for the check).
  monkeypatch.setattr(os, 'statvfs', lambda path: types.SimpleNamespace(
      f_bavail=10**9, f_frsize=4096))
  ip.train_iterator(config, global_batch_size=4).close()
  monkeypatch.setattr(os, 'statvfs', small)
  config.data_workers = 0
  assert next(ip.train_iterator(config, global_batch_size=4))['image'].shape == (4, 16, 16, 3)


class _CountingSource:
  """A source whose reads wait `delay_s` and count how many run at once."""

  def __init__(self, records, delay_s):
    self.records, self.delay_s = records, delay_s
    self.lock, self.now, self.most = threading.Lock(), 0, 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    with self.lock:
      self.now += 1
      self.most = max(self.most, self.now)
    time.sleep(self.delay_s)
    with self.lock:
      self.now -= 1
    return self.records[i]


def test_a_batch_requests_its_records_concurrently():
  """A remote store pays its latency per round of requests: the records of a batch are
  requested `read_threads` at a time, in order of the indices."""
  records = [{'image': np.full((8, 8, 3), i, np.uint8), 'label': i} for i in range(40)]
  source = _CountingSource(records, 0.3)
  batches = imagenet.ImageNetBatches(source, source, 8, read_threads=32)
  got = batches.records(source, np.arange(40)[::-1])
  assert [r['label'] for r in got] == list(range(40))[::-1]
  # Up to 32 at once (the pool starts its threads as reads come; on a loaded machine the
  # first reads may end before the last thread starts, and a free thread takes the next).
  assert 24 <= source.most <= 32
  one = _CountingSource(records, 0.0)
  imagenet.ImageNetBatches(one, one, 8, read_threads=1).records(one, range(10))
  assert one.most == 1


def test_encoded_size_reads_the_header():
  img = np.zeros((37, 53, 3), np.uint8)
  for fmt in ('JPEG', 'PNG'):
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format=fmt)
    assert tf_images.encoded_size(buffer.getvalue()) == (37, 53)
  assert tf_images.encoded_size(img) == (37, 53)


def test_tf_train_batch_flip_commutes_with_the_resize():
  """The TF decoder flips the uint8 crop before the resize (cheaper than after):
  the result must be the mirror of the unflipped one, and the crop's pixels
  resized by an independent bilinear formula (numpy, half-pixel centres)."""
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(img).save(buffer, format='PNG')  # lossless: pixels known exactly
  data = buffer.getvalue()
  box = (3, 5, 30, 37)  # top, left, height, width
  out = tf_images.train_batch([data, data], [box, box], [False, True], 16, workers=2)
  np.testing.assert_array_equal(out[1], out[0][:, ::-1])

  crop = img[3:33, 5:42].astype(np.float64)

  def coords(n_out, n_in):
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  y0, y1, fy = coords(16, 30)
  x0, x1, fx = coords(16, 37)
  rows = crop[y0] * (1 - fy)[:, None, None] + crop[y1] * fy[:, None, None]
  expected = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
  assert out.dtype == np.uint8
  assert np.abs(out[0].astype(int) - np.round(expected)).max() <= 1
