"""Gemma 4 audio front end in numpy: log-mel features, their validity mask, soft-token counts.

A 16 kHz mono clip (from `gemma_app.media.load_audio`) becomes 128 log-mel features every
10 ms, exactly as Hugging Face's `Gemma4AudioFeatureExtractor` (transformers 5.23) computes
them, so the encoder (`gemma_app.nn.audio`) sees the inputs it was converted against:

* the clip is zero-padded on the right to a multiple of 128 samples (HF
  `pad_to_multiple_of=128`; a batch is padded to its longest clip first) and 160 zeros are
  prepended ("semicausal" padding, so frame 0 is centred on t = 0);
* frames of 321 samples every 160; the first 320 of each are multiplied by a periodic Hann
  window `0.5 - 0.5 cos(2 pi n / 320)`;
* `|rfft(n=512)|` (magnitude, not power) times an HTK-mel triangular filterbank of 128 bins
  over 0-8000 Hz without area normalisation, then `log(mel + 0.001)`;
* a frame is valid iff the last sample of its 321-sample window is real audio; invalid
  frames are zeroed;
* clips are cut at 480000 samples (30 s; HF `max_length`, `truncation=True`), which is
  where the 750-token cap of `num_audio_tokens` comes from. (`gemma_app.media` refuses
  longer uploads with a message before they get here.)

Where the google-deepmind/gemma reference (spec §8, `GemaxMelFilterbank`) differs, this
follows HF: the reference uses no left padding (`n_frames = (len - 321) // 160 + 1`) and
the "nonzero" Hann window `0.5 - 0.5 cos(2 pi (n + 0.5) / 320)`.

The number of soft tokens a clip turns into (`num_audio_tokens`) is the valid frame count
through the encoder's two stride-2 convolutions, capped at 750 (30 s): the count HF's
processor inserts placeholders for (`Gemma4Processor._compute_audio_num_tokens`, which
equals the subsampled mask sum of `replace_audio_token`).

Example:

    features, mask = log_mel_features(samples)      # [T, 128] float32, [T] bool
    n = num_audio_tokens(samples.size)               # 16000 samples -> 25
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "FRAME_LENGTH",
    "HOP_LENGTH",
    "MAX_AUDIO_TOKENS",
    "MAX_SAMPLES",
    "NUM_MEL_BINS",
    "SAMPLE_RATE",
    "batch_log_mel_features",
    "log_mel_features",
    "mel_filterbank",
    "num_audio_tokens",
    "num_mel_frames",
]

SAMPLE_RATE = 16_000
FRAME_LENGTH = 320  # 20 ms analysis window
HOP_LENGTH = 160  # 10 ms between frames
FFT_LENGTH = 512  # next power of two of FRAME_LENGTH
NUM_MEL_BINS = 128
MEL_FLOOR = 1e-3  # log(mel + MEL_FLOOR)
MAX_FREQUENCY = 8000.0
PAD_TO_MULTIPLE_OF = 128  # HF's default padding of the waveform
MAX_AUDIO_TOKENS = 750  # HF `audio_seq_length`; 30 s of audio at 25 tokens/s
MAX_SAMPLES = 480_000  # HF's truncation length: 30 s, 2999 frames, 750 tokens

_PAD_LEFT = FRAME_LENGTH // 2  # "semicausal" padding: frame 0 centred on the first sample
_UNFOLD = FRAME_LENGTH + 1  # HF unfolds 321 samples and keeps the first 320 (no pre-emphasis)


@functools.cache
def mel_filterbank() -> np.ndarray:
    """HTK-mel triangular filters [257, 128] float64 over 0-8000 Hz, peak 1, no normalisation.

    `transformers.audio_utils.mel_filter_bank(257, 128, 0, 8000, 16000, norm=None,
    mel_scale="htk")`: filter edges equally spaced in mel, FFT bins at `linspace(0, 8000,
    257)` Hz. The lowest filter is narrower than the 31.25 Hz bin spacing and catches no
    bin, so feature 0 is always `log(0.001)` (HF warns about it and keeps it).
    """
    bins = FFT_LENGTH // 2 + 1
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(MAX_FREQUENCY), NUM_MEL_BINS + 2)
    edges = _mel_to_hz(mel_edges)  # [130] Hz
    fft_hz = np.linspace(0, SAMPLE_RATE // 2, bins)  # [257]
    slopes = edges[None, :] - fft_hz[:, None]  # [257, 130]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]  # rising edge of filter m (between edges m, m+1)
    up = slopes[:, 2:] / widths[1:]  # falling edge (between edges m+1, m+2)
    return np.maximum(0.0, np.minimum(down, up))


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.cache
def _window() -> np.ndarray:
    """Periodic Hann window [320] (HF `window_function(320)`, as float32 like HF's)."""
    n = np.arange(FRAME_LENGTH)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / FRAME_LENGTH)).astype(np.float32)


def num_mel_frames(num_samples: int) -> int:
    """Valid mel frames of a clip: frames whose whole 321-sample window is real audio."""
    return max(0, (num_samples + _PAD_LEFT - _UNFOLD) // HOP_LENGTH + 1)


def num_audio_tokens(num_samples: int, max_tokens: int = MAX_AUDIO_TOKENS) -> int:
    """Soft tokens the encoder makes of a clip of `num_samples` samples at 16 kHz.

    Valid mel frames, through two stride-2 convolutions (kernel 3, padding 1: `t -> (t - 1)
    // 2 + 1`), at most `max_tokens`. 16000 samples -> 99 frames -> 50 -> 25 tokens.
    """
    t = num_mel_frames(num_samples)
    for _ in range(2):
        t = (t - 1) // 2 + 1 if t > 0 else 0
    return min(t, max_tokens)


def log_mel_features(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of one clip, as HF's extractor returns them for it alone.

    Args:
      samples: float [N] mono waveform at 16 kHz in [-1, 1].

    Returns:
      features: float32 [T, 128], zero on invalid frames; T counts the frames of the clip
        padded to a multiple of 128 samples, so a few trailing frames may be invalid.
      mask: bool [T], True on valid frames (`num_mel_frames(N)` of them, a prefix).
    """
    features, mask = batch_log_mel_features([samples])
    return features[0], mask[0]


def batch_log_mel_features(clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of several clips padded to the longest, like HF's batched call.

    Args:
      clips: n float [N_i] mono waveforms at 16 kHz (each cut at `MAX_SAMPLES`).

    Returns:
      features float32 [n, T, 128] and mask bool [n, T] (see `log_mel_features`).
    """
    if not clips:
        raise ValueError("batch_log_mel_features needs at least one clip")
    clips = [np.asarray(c, np.float32).reshape(-1)[:MAX_SAMPLES] for c in clips]
    longest = max(c.size for c in clips)
    padded_len = math.ceil(longest / PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    features, masks = [], []
    for clip in clips:
        wave = np.zeros(_PAD_LEFT + padded_len, np.float32)
        wave[_PAD_LEFT : _PAD_LEFT + clip.size] = clip
        feats = _log_mel(wave)  # [T, 128]
        valid = np.arange(feats.shape[0]) < num_mel_frames(clip.size)  # [T]
        features.append(np.where(valid[:, None], feats, 0.0).astype(np.float32))
        masks.append(valid)
    return np.stack(features), np.stack(masks)


def _log_mel(wave: np.ndarray) -> np.ndarray:
    """Already-padded float32 waveform [L] -> log-mel [T, 128] float32 (T may be 0)."""
    n_frames = max(0, (wave.size - _UNFOLD) // HOP_LENGTH + 1)
    starts = np.arange(n_frames)[:, None] * HOP_LENGTH
    frames = wave[starts + np.arange(FRAME_LENGTH)[None, :]] * _window()  # [T, 320] float32
    # HF multiplies in float32 and lets numpy's FFT right-pad to 512; the spectrum and the
    # filterbank product run in float64 here, which moves the features by < 1e-5.
    magnitude = np.abs(np.fft.rfft(frames.astype(np.float64), n=FFT_LENGTH, axis=-1))  # [T, 257]
    return np.log(magnitude @ mel_filterbank() + MEL_FLOOR).astype(np.float32)
