"""ImageNet decoding in TensorFlow's threads: only the crop window, uint8 out.

Why: the PIL transform of `augment` decodes the whole JPEG, crops, resizes and
normalises in float32 while holding the GIL for part of every image, so one
process tops out at a few thousand images per second whatever its core
count. Here the host only draws each example's random choices (the same
draws, in the same order, from the same keyed generator as the PIL
transform) and hands a whole batch to a `tf.data` map that runs in TF's own
thread pool without the GIL:

* training: `tf.io.decode_and_crop_jpeg` decodes only the crop box's
  blocks, the flip (in uint8), then a bilinear resize to `size`, rounding
  to uint8;
* evaluation: decode, resize the shorter side (antialiased, as PIL) and
  centre crop in one op, uint8.

Lighting and normalisation are left to the device (`device_images`), so the
host ships 1 byte per pixel instead of 4. Non-JPEG bytes (PNG, ...) take
`decode_image` and are cropped after decoding; already decoded arrays (test
doubles) go through the same ops one by one.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image


def _tf():
  from ovsw_jax.trainer.data import sources  # pylint: disable=g-import-not-at-top
  return sources.import_tensorflow()


def encoded_size(image) -> tuple[int, int]:
  """(height, width) of encoded bytes (header only) or of a decoded array."""
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    with Image.open(io.BytesIO(bytes(image))) as img:  # lazy: reads the header
      width, height = img.size
    return height, width
  array = np.asarray(image)
  return int(array.shape[0]), int(array.shape[1])


def _to_uint8(tf, x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _decode_window(tf, data, box):
  """RGB uint8 pixels of `box` = (top, left, h, w) of encoded `data`."""
  def jpeg():
    return tf.io.decode_and_crop_jpeg(data, box, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _resize(tf, image, size):
  """Plain bilinear (half-pixel centres). Antialiasing is what PIL's resize does
  when it shrinks; in training it cost 2.7x the plain resize, more than the
  decode, and changes little: a random ImageNet crop is shrunk by at most about
  2x. Evaluation antialiases (`_eval_fn`), to match the release's validation
  pixels."""
  return tf.image.resize(image, size, method="bilinear", antialias=False)


@functools.lru_cache(maxsize=None)
def _train_fn(size: int, workers: int):
  tf = _tf()

  def one(data, box, flip):
    # Flipped before the resize, in uint8 on the crop: a bilinear resize with
    # half-pixel centres commutes with a horizontal flip, and flipping its
    # float32 output instead cost 1.1 CPU-ms per image, a third of the total.
    x = _decode_window(tf, data, box)
    x = tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)
    x = _resize(tf, x, (size, size))
    # A plain bilinear resize is a convex combination of uint8 pixels, so the
    # result lies in [0, 255] and needs no clip: rounding is the cast of x + 0.5.
    return tf.cast(x + 0.5, tf.uint8)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string),
                                tf.TensorSpec([None, 4], tf.int32),
                                tf.TensorSpec([None], tf.bool)])
  def batch(data, boxes, flips):
    ds = tf.data.Dataset.from_tensor_slices((data, boxes, flips))
    ds = ds.map(one, num_parallel_calls=workers, deterministic=True)
    return ds.batch(tf.shape(data, out_type=tf.int64)[0]).get_single_element()
  return batch


def shorter_side_size(height: int, width: int, resize: int) -> tuple[int, int]:
  """torchvision's `Resize(int)`: the shorter side to `resize`, the longer truncated."""
  if width <= height:
    return int(resize * height / width), resize
  return resize, int(resize * width / height)


@functools.lru_cache(maxsize=None)
def _eval_fn(size: int, workers: int):
  tf = _tf()

  def one(data, hw):
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    # The antialiased resize to `hw` and the centre crop in one op: only the
    # crop's pixels are computed (`tf.image.resize(antialias=True)` is this op
    # over the whole resized image). 17-26% less CPU per image; the pixels
    # differ by at most 1 level in about 2e-5 of them (float rounding of the
    # sample positions).
    old = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.cast(hw, tf.float32)
    corner = tf.round((new - size) / 2)  # top, left
    x = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=[size, size], scale=new / old, translation=-corner,
        kernel_type='triangle', antialias=True)[0]
    return _to_uint8(tf, x)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string),
                                tf.TensorSpec([None, 2], tf.int32)])
  def batch(data, sizes):
    ds = tf.data.Dataset.from_tensor_slices((data, sizes))
    ds = ds.map(one, num_parallel_calls=workers, deterministic=True)
    return ds.batch(tf.shape(data, out_type=tf.int64)[0]).get_single_element()
  return batch


def _as_bytes(images) -> list[bytes] | None:
  if all(isinstance(x, (bytes, bytearray, np.bytes_)) for x in images):
    return [bytes(x) for x in images]
  return None


def _encode_png(image) -> bytes:
  array = np.asarray(image, np.uint8)
  if array.ndim == 2:
    array = np.stack([array] * 3, -1)
  elif array.shape[-1] == 1:
    array = np.repeat(array, 3, -1)
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=0)
  return buffer.getvalue()


def train_batch(images, boxes, flips, size: int, workers: int) -> np.ndarray:
  """uint8 `(N, size, size, 3)`: each image's `box` (top, left, h, w), resized, flipped."""
  data = _as_bytes(images) or [_encode_png(x) for x in images]  # arrays: test doubles
  out = _train_fn(size, workers)(np.asarray(data, object), np.asarray(boxes, np.int32),
                                 np.asarray(flips, bool))
  return out.numpy()


def eval_batch(images, size: int, workers: int) -> np.ndarray:
  """uint8 `(N, size, size, 3)`: shorter side to 256/224 * size, centre crop."""
  data = _as_bytes(images) or [_encode_png(x) for x in images]
  resize = int(round(256 * size / 224))
  sizes = [shorter_side_size(*encoded_size(x), resize) for x in data]
  out = _eval_fn(size, workers)(np.asarray(data, object), np.asarray(sizes, np.int32))
  return out.numpy()
