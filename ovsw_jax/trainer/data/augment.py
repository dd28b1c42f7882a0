"""Image operations of the input pipelines, in NumPy and PIL.

Every random choice is drawn from a `numpy.random.Generator` that the caller
passes in (or given as explicit offsets/flags), so an augmented batch is a pure
function of the pipeline's (seed, step) key: that is what makes resuming after
an interruption bitwise exact. Nothing here reads global random state.

The operations follow the authors' PyTorch release (torchvision on PIL images):

* CIFAR: `RandomCrop(32, padding=4)` (zero padding), `RandomHorizontalFlip()`,
  `ToTensor()`, `Normalize(mean, std)` -> `pad_and_crop`, `hflip`, `normalize`.
* ImageNet: `RandomResizedCrop(224, scale=(0.08, 1.25))` (bilinear),
  `RandomHorizontalFlip()`, `ToTensor()`, PCA lighting noise (std 0.1),
  `Normalize` -> `imagenet_train_transform`; evaluation `Resize(256)`,
  `CenterCrop(224)` -> `imagenet_eval_transform`.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# Per-channel statistics on the [0, 1] scale, as the release normalises.
CIFAR_MEAN = (0.491, 0.482, 0.447)
CIFAR_STD = (0.247, 0.243, 0.262)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PCA of ImageNet RGB pixels on the [0, 1] scale (Krizhevsky et al., 2012, as
# tabulated by fb.resnet.torch): column k of IMAGENET_EIGVEC is the eigenvector
# whose eigenvalue is IMAGENET_EIGVAL[k].
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float64)
IMAGENET_EIGVEC = np.array([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
], np.float64)

LIGHTING_FORMS = ('alexnet', 'release', 'none')


def normalize(images: np.ndarray, mean, std, scale: float = 255.0) -> np.ndarray:
  """Maps pixels to `(x / scale - mean) / std` in float32.

  Why: this is torchvision's `ToTensor()` (divide by 255) followed by
  `Normalize(mean, std)`, per channel (last axis). `mean`/`std` may be scalars
  (one statistic for all channels, as for the digits). uint8 images go through
  a 256-entry table computed with the same formula (same values, faster).
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  images = np.asarray(images)
  if images.dtype != np.uint8:
    x = images.astype(np.float32) / np.float32(scale)
    return (x - mean) / std
  channels = images.shape[-1]
  levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(scale)
  table = np.broadcast_to((levels - mean) / std, (256, channels))
  out = np.empty(images.shape, np.float32)
  for c in range(channels):
    np.take(table[:, c], images[..., c], out=out[..., c])
  return out


def pad_and_crop(images: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
  """Zero-pads each image by `pad` pixels and crops back to its size.

  Why: torchvision's `RandomCrop(size, padding=pad)`. The random part is
  `offsets`, the (row, col) top-left corners in the padded image, each in
  `[0, 2 * pad]`; offset `(pad, pad)` returns the image unchanged and `(0, 0)`
  shifts its content down and right by `pad` pixels.

  Args:
    images: `(N, H, W, C)` array, any dtype (padding uses zeros of that dtype,
      i.e. black before normalisation, as in the release).
    offsets: `(N, 2)` integer array of crop corners.
    pad: padding on every side.

  Returns:
    `(N, H, W, C)` array of the same dtype.
  """
  images = np.asarray(images)
  offsets = np.asarray(offsets)
  n, h, w, _ = images.shape
  if offsets.shape != (n, 2):
    raise ValueError(f'offsets must have shape ({n}, 2), got {offsets.shape}')
  if offsets.min(initial=0) < 0 or offsets.max(initial=0) > 2 * pad:
    raise ValueError(f'offsets must lie in [0, {2 * pad}]')
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for k in range(n):
    dy, dx = int(offsets[k, 0]), int(offsets[k, 1])
    out[k] = padded[k, dy:dy + h, dx:dx + w]
  return out


def hflip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirrors left-right the images whose flag in `flips` is True.

  Why: torchvision's `RandomHorizontalFlip()`, with the coin flips given.
  """
  images = np.asarray(images)
  flips = np.asarray(flips, bool)
  out = images.copy()
  out[flips] = images[flips, :, ::-1]
  return out


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale=(0.08, 1.25), ratio=(3 / 4, 4 / 3)):
  """Draws the crop box of torchvision's `RandomResizedCrop`.

  Why: the same algorithm as `RandomResizedCrop.get_params`, so the crops have
  the release's distribution: up to 10 tries of an area fraction uniform in
  `scale` and a log-uniform aspect ratio in `ratio`, accepted when the box fits;
  otherwise a central crop with the ratio clamped to `ratio`. An upper scale
  bound above 1 (the release's 1.25) only makes large boxes rejected more often.

  Returns:
    `(top, left, h, w)` of the box, in pixels.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def lighting_offset(rng: np.random.Generator, alphastd: float = 0.1,
                    form: str = 'alexnet') -> np.ndarray:
  """Draws the per-channel PCA lighting offset, on the [0, 1] pixel scale.

  Why: AlexNet's colour augmentation adds `eigvec @ (alpha * eigval)` with
  `alpha ~ N(0, alphastd^2)` to every pixel (fb.resnet.torch's `Lighting`).

  `form='release'` reproduces the authors' `ColorAugmentation` literally: its
  matrix is the one above with the columns reversed, and it computes
  `(alpha * eigval) @ matrix`, i.e. it pairs the eigenvalues with *rows*, not
  eigenvectors. The offsets have a similar size but other directions (the
  largest eigenvalue no longer moves brightness). `form='none'` returns zeros.
  The three forms draw the same normals, so they consume the rng alike.
  """
  if form not in LIGHTING_FORMS:
    raise ValueError(f'lighting form must be one of {LIGHTING_FORMS}, got {form!r}')
  alpha = rng.standard_normal(3) * alphastd
  if form == 'none' or alphastd == 0:
    return np.zeros(3, np.float32)
  if form == 'alexnet':
    return (IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL)).astype(np.float32)
  release_matrix = IMAGENET_EIGVEC[:, ::-1]
  return ((alpha * IMAGENET_EIGVAL) @ release_matrix).astype(np.float32)


def decode_rgb(image) -> Image.Image:
  """Returns a PIL RGB image from encoded bytes, a uint8 `(H, W[, C])` array or a PIL image.

  Why: decoding with one library (PIL) on every host keeps the pixels, and so
  the batches, identical whatever else (OpenCV) is installed.
  """
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    with Image.open(io.BytesIO(bytes(image))) as img:
      return img.convert('RGB')
  array = np.asarray(image, np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array).convert('RGB')


def crop_resize(image, box, size: int, flip: bool = False) -> np.ndarray:
  """uint8 `(size, size, 3)`: the `box` (top, left, h, w) of `image`, resized, mirrored if `flip`.

  Why: the release's `RandomResizedCrop` then `RandomHorizontalFlip` on a PIL
  image: PIL's bilinear resize (which antialiases when it shrinks), in uint8.
  """
  top, left, h, w = (int(v) for v in box)
  img = decode_rgb(image).crop((left, top, left + w, top + h))
  img = img.resize((size, size), Image.BILINEAR)
  if flip:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(img, np.uint8)


def imagenet_train_transform(image, rng: np.random.Generator, image_size: int,
                             *, scale=(0.08, 1.25), lighting: str = 'alexnet',
                             alphastd: float = 0.1) -> np.ndarray:
  """The release's ImageNet training transform for one example.

  Random resized crop to `image_size` (PIL bilinear, as torchvision), a coin
  flip, `ToTensor`, PCA lighting noise, normalisation. The rng is drawn in this
  order: crop box, flip, lighting normals. The pipeline ships the uint8 part
  (`crop_resize`) and leaves lighting and normalisation to the device; this is
  the whole transform, the reference its tests compare with.

  Args:
    image: encoded bytes or a uint8 array.
    rng: the example's generator (keyed by seed, step and batch position).
    image_size: output side.
    scale: area fraction range of the crop.
    lighting: 'alexnet', 'release' or 'none' (see `lighting_offset`).
    alphastd: std of the lighting coefficients.

  Returns:
    `(image_size, image_size, 3)` float32, normalised.
  """
  img = decode_rgb(image)
  width, height = img.size
  box = random_resized_crop_params(rng, height, width, scale=scale)
  flip = rng.random() < 0.5
  x = crop_resize(img, box, image_size, flip).astype(np.float32) / np.float32(255.0)
  x = x + lighting_offset(rng, alphastd, lighting)
  return ((x - np.asarray(IMAGENET_MEAN, np.float32))
          / np.asarray(IMAGENET_STD, np.float32)).astype(np.float32)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio.

  Why: torchvision's `Resize(int)` (the longer side is truncated, not rounded).
  """
  width, height = img.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """Crops the central `size` x `size` box (torchvision's `CenterCrop`)."""
  width, height = img.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def eval_pixels(image, image_size: int) -> np.ndarray:
  """uint8 `(S, S, 3)`: the shorter side resized to `round(256 * S / 224)`, centre crop `S`."""
  img = decode_rgb(image)
  resize = int(round(256 * image_size / 224))
  return np.asarray(center_crop(resize_shorter_side(img, resize), image_size), np.uint8)


def imagenet_eval_transform(image, image_size: int) -> np.ndarray:
  """The release's ImageNet evaluation transform for one example.

  Resize the shorter side to `round(256 * image_size / 224)` (256 at 224),
  centre crop `image_size`, normalise. Returns float32 `(S, S, 3)`.
  """
  return normalize(eval_pixels(image, image_size), IMAGENET_MEAN, IMAGENET_STD)
