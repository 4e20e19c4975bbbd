"""User uploads (images, audio) decoded and validated into arrays; no model math, no jax.

Every failure a user can cause (a corrupt, truncated, empty or renamed file, a decompression
bomb, a clip that is too long) raises `MediaError` whose message can be shown as is in the UI.
The UI validates each attachment here before anything is queued, and the encoders of later
issues receive the arrays these functions return:

* `load_image` -> uint8 [H, W, 3] RGB, upright (EXIF orientation applied), first frame only.
* `load_audio` -> float32 [N] mono in [-1, 1] at `MediaLimits.audio_sample_rate` (16 kHz, the
  rate of the Gemma audio encoders), at most `MediaLimits.max_audio_seconds` long.

Example:

    kind = media_kind("photo.jpg")          # "image"
    pixels = load_image("photo.jpg")        # np.ndarray [H, W, 3] uint8
    samples = load_audio("question.wav")    # np.ndarray [N] float32, 16 kHz
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "AUDIO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MediaError",
    "MediaKind",
    "MediaLimits",
    "load_audio",
    "load_image",
    "load_media",
    "media_kind",
    "resample",
]

MediaKind = Literal["image", "audio"]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ico", ".avif"}
)
# What libsndfile reads (MP3 since libsndfile 1.1); browser microphone recordings are WAV.
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"})


class MediaError(ValueError):
    """An upload that cannot be used; the message is written for the person who sent it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MediaLimits:
    """Bounds on what one attachment may cost the server.

    Attributes:
      max_file_bytes: largest accepted file (the launch-time upload limit catches most first).
      max_image_pixels: width * height bound, checked from the header before decoding, so a
        small file that expands to gigabytes (a decompression bomb) is refused cheaply.
      max_audio_seconds: longest accepted clip (Gemma audio encoders take about 30 s).
      audio_sample_rate: rate every clip is resampled to.
    """

    max_file_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 30.0
    audio_sample_rate: int = 16_000


DEFAULT_LIMITS = MediaLimits()


def media_kind(path: str | os.PathLike) -> MediaKind:
    """Classifies an upload by its suffix, or by sniffing its content when the suffix is unknown.

    Raises:
      MediaError: neither an image nor an audio file.
    """
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if _sniff_image(path):
        return "image"
    if _sniff_audio(path):
        return "audio"
    raise MediaError(
        f"{_name(path)} is neither an image nor an audio file. Attach images (PNG, JPEG, WebP, "
        "GIF, ...) or audio (WAV, FLAC, OGG, MP3)."
    )


def load_media(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decodes an upload of either kind (see `load_image` and `load_audio`)."""
    if media_kind(path) == "image":
        return load_image(path, limits)
    return load_audio(path, limits)


# -- images ------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decodes an image to an upright RGB array [H, W, 3] uint8 (first frame of animations).

    Raises:
      MediaError: missing, empty, too large, too many pixels, not an image, or corrupt.
    """
    name = _name(path)
    _check_file(path, limits)
    try:
        # PIL warns above its own bomb threshold and raises above twice that; both mean the
        # same thing to the user, so the warning is promoted to an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixels(name, image.size, limits)
                image.seek(0)  # animations (GIF, APNG, WebP): the first frame
                image.load()
                return np.asarray(_to_rgb(ImageOps.exif_transpose(image)))
    except MediaError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise MediaError(
            f"{name} has too many pixels to be decoded safely (limit "
            f"{limits.max_image_pixels / 1e6:.0f} megapixels)."
        ) from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{name} is not an image file that can be read (or it is corrupt).") from e
    except (
        Exception
    ) as e:  # PIL's decoders raise many types (OSError, SyntaxError, ...) on bad data.
        raise MediaError(f"{name} is corrupt or truncated and cannot be decoded: {e}") from e


def _check_pixels(name: str, size: tuple[int, int], limits: MediaLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"{name} has no pixels ({width}x{height}).")
    if width * height > limits.max_image_pixels:
        raise MediaError(
            f"{name} is {width}x{height} pixels; the limit is "
            f"{limits.max_image_pixels / 1e6:.0f} megapixels. Downscale it and try again."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is flattened onto white (the usual page colour)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit and float single-channel images: PIL's own convert would clip them to white."""
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        low, high = float(array.min(initial=0.0)), float(array.max(initial=1.0))
        if low >= 0.0 and high <= 1.0:  # the usual [0, 1] convention
            return (array * 255).round().astype(np.uint8)
        return ((array - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
    return (np.clip(array.astype(np.float32), 0, 65535) / 257).round().astype(np.uint8)


def _sniff_image(path: str | os.PathLike) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return True
    except Exception:  # any failure to identify means "not an image"
        return False


# -- audio -------------------------------------------------------------------------------------


def load_audio(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decodes a clip to mono float32 [N] at `limits.audio_sample_rate`.

    Raises:
      MediaError: missing, empty, too large, too long, silent-length, not audio, or corrupt.
    """
    name = _name(path)
    _check_file(path, limits)
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile reports unknown formats and bad headers alike
        raise MediaError(
            f"{name} is not an audio file that can be read (WAV, FLAC, OGG, MP3)."
        ) from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError(f"{name} contains no audio.")
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise MediaError(
            f"{name} is {seconds:.1f} s long; the limit is {limits.max_audio_seconds:g} s. "
            "Trim it and try again."
        )
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaError(f"{name} is corrupt or truncated and cannot be decoded: {e}") from e
    if samples.size == 0:
        raise MediaError(f"{name} contains no audio.")
    mono = samples.mean(axis=1)  # [N]; a plain average keeps the level of identical channels
    if not np.all(np.isfinite(mono)):
        raise MediaError(f"{name} contains invalid samples (NaN or infinity).")
    return resample(mono, rate, limits.audio_sample_rate)


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono signal [N] by zero-padding/cropping its spectrum.

    Exact for signals below both Nyquist rates; cropping the spectrum is the anti-alias filter
    when downsampling. O(N log N), which is ~10 ms for 30 s at 48 kHz.
    """
    if rate == target_rate or samples.size == 0:
        return samples.astype(np.float32)
    length = max(1, round(samples.size * target_rate / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    out = np.fft.irfft(spectrum, length) * (length / samples.size)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _sniff_audio(path: str | os.PathLike) -> bool:
    try:
        sf.info(str(path))
        return True
    except Exception:  # any failure to read a header means "not audio"
        return False


# -- shared ------------------------------------------------------------------------------------


def _name(path: str | os.PathLike) -> str:
    return Path(path).name or str(path)


def _check_file(path: str | os.PathLike, limits: MediaLimits) -> None:
    name = _name(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(f"{name} could not be read (the upload may have expired).") from e
    if size == 0:
        raise MediaError(f"{name} is empty (0 bytes).")
    if size > limits.max_file_bytes:
        raise MediaError(
            f"{name} is {size / 2**20:.1f} MiB; the limit is "
            f"{limits.max_file_bytes / 2**20:.0f} MiB."
        )
