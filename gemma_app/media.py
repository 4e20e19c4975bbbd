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
import functools
import math
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
    "MIN_AUDIO_SECONDS",
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

# Shortest clip accepted: 0.1 s makes 3 audio soft tokens. (Under 161 samples, 10 ms, a clip
# makes none and the model would be shown an empty clip.)
MIN_AUDIO_SECONDS = 0.1

# Windowed-sinc low-pass of the resampler (`resample`): the cut-off sits at 92% of the lower
# Nyquist rate and the Kaiser window spans 32 zero crossings of the sinc on each side, so the
# transition band is about 1.25 kHz wide at 16 kHz out (flat to ~6.7 kHz, stop band from
# ~8 kHz) with ~80 dB of stop-band attenuation (Kaiser beta 8).
_ROLLOFF = 0.92
_ZERO_CROSSINGS = 32
_KAISER_BETA = 8.0
_RESAMPLE_BLOCK = 8192  # output samples per vectorised step (bounds the [block, taps] gather)


def load_audio(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decodes a clip to mono float32 [N] in [-1, 1] at `limits.audio_sample_rate`.

    Any format and sample type libsndfile reads (WAV/AIFF PCM 8-32 bit or float, FLAC,
    Ogg Vorbis/Opus, MP3 with libsndfile >= 1.1): integer PCM is scaled by its full-scale
    value; a float file that goes past full scale is scaled down to peak 1 (clipping it would
    distort it). Channels are averaged, then `resample` brings the clip to the model's rate.

    Clips longer than `limits.max_audio_seconds` are refused rather than cut: a cut would
    silently drop the end of a spoken question, so the user is asked to trim it instead.
    (Hugging Face's feature extractor truncates at 30 s without notice.)

    Raises:
      MediaError: missing, empty, too large, too long or too short, not audio, a format this
        libsndfile cannot read, or corrupt.
    """
    name = _name(path)
    _check_file(path, limits)
    _check_mp3_support(path)
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile reports unknown formats and bad headers alike
        raise MediaError(
            f"{name} is not an audio file that can be read (WAV, FLAC, OGG, MP3)."
        ) from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError(f"{name} contains no audio.")
    _check_duration(name, info.frames / info.samplerate, limits)  # cheap, before decoding
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaError(f"{name} is corrupt or truncated and cannot be decoded: {e}") from e
    if samples.size == 0:
        raise MediaError(f"{name} contains no audio.")
    _check_duration(name, samples.shape[0] / rate, limits)  # headers (MP3) may estimate
    mono = samples.mean(axis=1)  # [N]; a plain average keeps the level of identical channels
    if not np.all(np.isfinite(mono)):
        raise MediaError(f"{name} contains invalid samples (NaN or infinity).")
    peak = float(np.abs(mono).max())
    if peak > 1.0:  # float files may exceed full scale; PCM never does
        mono = mono / peak
    return resample(mono, rate, limits.audio_sample_rate)


def _check_duration(name: str, seconds: float, limits: MediaLimits) -> None:
    if seconds > limits.max_audio_seconds:
        raise MediaError(
            f"{name} is {seconds:.1f} s long; the limit is {limits.max_audio_seconds:g} s. "
            "Trim it and try again."
        )
    if seconds < MIN_AUDIO_SECONDS:
        raise MediaError(
            f"{name} is too short ({seconds * 1000:.0f} ms); send at least "
            f"{MIN_AUDIO_SECONDS:g} s of audio."
        )


def _check_mp3_support(path: str | os.PathLike) -> None:
    """libsndfile reads MP3 only from version 1.1 on; say so instead of "not audio"."""
    if Path(path).suffix.lower() == ".mp3" and "MP3" not in sf.available_formats():
        raise MediaError(
            f"{_name(path)}: MP3 needs libsndfile 1.1 or newer, and this server has "
            f"{sf.__libsndfile_version__}. Send WAV, FLAC or OGG instead."
        )


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono signal [N] from `rate` to `target_rate` Hz.

    Kaiser-windowed sinc interpolation evaluated at the exact output instants
    `n * rate / target_rate` (polyphase: one filter row per distinct fractional offset,
    `target_rate / gcd` of them). The low-pass cut-off is 92% of the lower Nyquist rate, so
    downsampling removes what would alias and upsampling adds no images. Samples past the
    ends count as silence. The output has `ceil(N * target_rate / rate)` samples, clipped to
    [-1, 1] (the filter's ringing can overshoot full scale slightly).

    Args:
      samples: [N] signal (any float or int dtype; ints are used as they are).
      rate: its sample rate in Hz.
      target_rate: the rate wanted, in Hz.

    Returns:
      float32 [M] resampled signal.
    """
    x = np.asarray(samples, np.float64).reshape(-1)
    if rate == target_rate or x.size == 0:
        return np.clip(x, -1.0, 1.0).astype(np.float32)
    g = math.gcd(rate, target_rate)
    up, down = target_rate // g, rate // g
    table, half = _sinc_table(up, down)  # [up, 2*half]
    length = -(-x.size * up // down)  # ceil
    padded = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    taps = np.arange(2 * half)
    out = np.empty(length)
    for start in range(0, length, _RESAMPLE_BLOCK):
        n = np.arange(start, min(start + _RESAMPLE_BLOCK, length))
        base, phase = np.divmod(n * down, up)  # output n sits at input base + phase / up
        window = padded[base[:, None] + taps[None, :] + 1]  # [n, 2*half] x[base-half+1+j]
        out[start : start + n.size] = np.einsum("nj,nj->n", window, table[phase])
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _sinc_table(up: int, down: int) -> tuple[np.ndarray, int]:
    """Filter rows [up, 2*half]: row p weights x[base-half+1 .. base+half] for offset p/up.

    In input-sample units the low-pass is `c * sinc(c * tau)` with `c = rolloff *
    min(1, up/down)` (its cut-off relative to the input Nyquist rate), windowed by a Kaiser
    window over `|tau| <= _ZERO_CROSSINGS / c`; tau is the distance from the output instant
    to the input sample. Each row is scaled to sum to 1 so DC passes exactly.
    """
    c = _ROLLOFF * min(1.0, up / down)
    reach = _ZERO_CROSSINGS / c  # half-width of the window, in input samples
    half = math.ceil(reach)
    j = np.arange(-half + 1, half + 1)  # input offsets from base
    tau = np.arange(up)[:, None] / up - j[None, :]  # [up, 2*half]
    inside = np.clip(1.0 - (tau / reach) ** 2, 0.0, None)
    kaiser = np.i0(_KAISER_BETA * np.sqrt(inside)) / np.i0(_KAISER_BETA) * (inside > 0)
    table = c * np.sinc(c * tau) * kaiser
    return table / table.sum(axis=1, keepdims=True), half


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
