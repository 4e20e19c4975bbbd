"""Gemma 4 image preprocessing: uint8 RGB -> padded 16x16 patches with (x, y) positions.

What transformers' `Gemma4ImageProcessorPil` (5.23) does, in numpy and PIL (spec §7.2):

1. Aspect-preserving resize to sides that are multiples of `patch_size * pooling_kernel`
   (48 px) and hold at most `max_patches = max_soft_tokens * pooling_kernel**2` patches;
   images are scaled *up* as well as down to fill the budget (`target_size`).
2. PIL `BICUBIC` on the uint8 image (PIL antialiases when it shrinks), skipped when the size
   is already right; then `/ 255` to float32 in [0, 1]. The encoder maps that to [-1, 1].
3. Patchify: patch `(h w)` in raster order, each flattened `(p q c)` (row-major within the
   patch, channel fastest) to 768 values; positions are `(x = column, y = row)` in patches.
4. Pad to `max_patches` with zero patches at position `(-1, -1)`, so every image of a config
   has one shape and the encoder compiles once for all aspect ratios.

Choices where the references differ (we follow transformers' PIL backend, bit for bit):
  * google-deepmind/gemma rescales to float first and resizes with `jax.image.resize`
    bicubic; transformers' torchvision backend uses `tvF.resize(bicubic, antialias=True)` on
    the uint8 tensor. Both land within a few 1/255 steps of PIL; neither is what we match.
  * A 0 x 0 target raises in transformers and becomes 48 x 48 in the library; it cannot happen
    (the budget's area is at least 48 x 48), so we raise like transformers.
  * transformers only accepts budgets in {70, 140, 280, 560, 1120}; any positive budget works
    here (the tiny test config uses 36).

Soft tokens per image = `(H' / 48) * (W' / 48)`: 224x224 -> 768x768 -> 256 at budget 280,
480x640 -> 672x912 -> 266, 100x1000 -> 240x2496 -> 260.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import PIL.Image

from gemma_app.nn.config import Gemma4VisionConfig

PAD_POSITION = -1  # (x, y) of padding patches


@dataclasses.dataclass(frozen=True)
class PreprocessedImage:
    """One image ready for `gemma_app.nn.vision4.encode_images`.

    Attributes:
      patches: float32 [P, 768] in [0, 1]; real patches first, then zeros.
      positions: int32 [P, 2] (x, y) of each patch; (-1, -1) for padding.
      num_soft_tokens: soft tokens the image yields (its valid pooled cells, in raster order).
      size: (height, width) in pixels after the resize.
    """

    patches: np.ndarray
    positions: np.ndarray
    num_soft_tokens: int
    size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        """Real (non-padding) patches."""
        return int(np.count_nonzero(self.positions[:, 0] != PAD_POSITION))


def target_size(height: int, width: int, config: Gemma4VisionConfig) -> tuple[int, int]:
    """(height, width) in pixels the image is resized to (transformers' formula, spec §7.2).

    The largest multiples of `m = patch_size * pooling_kernel` with the original aspect
    ratio and at most `max_patches` patches: `f = sqrt(max_patches * patch**2 / (h * w))`,
    `H' = floor(f * h / m) * m`, likewise W'. A side that rounds to 0 (extreme aspect ratio)
    becomes `m`, and the other `min(floor(long / short) * m, max_soft_tokens * m)`.
    """
    if height < 1 or width < 1:
        raise ValueError(f"Image has no pixels: {height}x{width}")
    patch, k = config.patch_size, config.pooling_kernel
    side = patch * k
    target_px = config.max_patches * patch**2
    factor = math.sqrt(target_px / (height * width))
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise ValueError(f"{height}x{width} resizes to 0x0 at budget {config.max_soft_tokens}")
    longest = (config.max_patches // k**2) * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    if h * w > target_px:  # cannot happen with the formula above; kept as transformers does
        raise ValueError(f"{height}x{width} -> {h}x{w} exceeds {config.max_patches} patches")
    return h, w


def soft_token_count(height: int, width: int, config: Gemma4VisionConfig) -> int:
    """Soft tokens an image of this size yields: `(H' / 48) * (W' / 48)` <= max_soft_tokens."""
    h, w = target_size(height, width, config)
    side = config.patch_size * config.pooling_kernel
    return (h // side) * (w // side)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] with PIL BICUBIC (transformers' `resample`)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((w, h), PIL.Image.Resampling.BICUBIC))


def patchify(pixels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """float [H, W, 3] -> patches [Gh*Gw, p*p*3] (raster order) and int32 (x, y) [Gh*Gw, 2]."""
    h, w, c = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    if (gh * patch_size, gw * patch_size) != (h, w):
        raise ValueError(f"{h}x{w} is not a multiple of the {patch_size}-px patch")
    grid = pixels.reshape(gh, patch_size, gw, patch_size, c).transpose(0, 2, 1, 3, 4)
    patches = grid.reshape(gh * gw, patch_size * patch_size * c)  # [(h w), (p q c)]
    ys, xs = np.divmod(np.arange(gh * gw, dtype=np.int32), np.int32(gw))
    return patches, np.stack([xs, ys], axis=-1)


def pad_patches(
    patches: np.ndarray, positions: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pads [P, 768] / [P, 2] to `length` rows with zero patches at (-1, -1)."""
    extra = length - patches.shape[0]
    if extra < 0:
        raise ValueError(f"{patches.shape[0]} patches do not fit in {length}")
    patches = np.pad(patches, ((0, extra), (0, 0)))
    positions = np.pad(positions, ((0, extra), (0, 0)), constant_values=PAD_POSITION)
    return patches, positions


def preprocess(image: np.ndarray, config: Gemma4VisionConfig) -> PreprocessedImage:
    """uint8 RGB [H, W, 3] -> `PreprocessedImage` padded to `config.max_patches` patches.

    Decoding files and converting gray / RGBA to RGB belong to `gemma_app.media`.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
    size = target_size(image.shape[0], image.shape[1], config)
    pixels = resize(image, size).astype(np.float32) / np.float32(255)
    patches, positions = patchify(pixels, config.patch_size)
    num_soft_tokens = patches.shape[0] // config.pooling_kernel**2
    patches, positions = pad_patches(patches, positions, config.max_patches)
    return PreprocessedImage(patches, positions.astype(np.int32), num_soft_tokens, size)


def stack(images: Sequence[PreprocessedImage]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Batches preprocessed images: patches [n, P, 768], positions [n, P, 2], token counts."""
    if not images:
        raise ValueError("No images to stack")
    length = max(image.patches.shape[0] for image in images)
    padded = [pad_patches(image.patches, image.positions, length) for image in images]
    patches = np.stack([p for p, _ in padded])
    positions = np.stack([x for _, x in padded]).astype(np.int32)
    return patches, positions, [image.num_soft_tokens for image in images]
