"""Images and audio clips -> projected soft tokens for the chat, with counts checked first.

The chat needs each item's soft-token count before any encoding work (to lay out the prompt
and to refuse what does not fit), then the soft tokens themselves as host arrays [M, D]
(kept by `ChatSampler` so a block can be prefilled again after the cache was rewound).

* Gemma 3: every image is squashed to the encoder's square and gives
  `num_mm_tokens_per_image` soft tokens.
* Gemma 4: an image keeps its aspect ratio and gives its own count (`vision_input`); an audio
  clip (float mono 16 kHz) gives about 25 tokens a second, at most `AudioConfig.max_tokens`.

Compilation: Gemma 4 images are encoded one at a time with patches padded to the budget and
all `max_soft_tokens` slots projected, so every aspect ratio shares one compile; the audio
encoder buckets mel frames and the projection runs on a power-of-two row count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from gemma_app import audio_input, vision_input
from gemma_app.nn import audio, vision, vision4
from gemma_app.nn.config import TransformerConfig


def image_counts(config: TransformerConfig, images: Sequence[np.ndarray]) -> list[int]:
    """Soft tokens of each uint8 RGB [H, W, 3] image (cheap: no encoding)."""
    if config.family != 4:
        return [config.vision.num_mm_tokens_per_image] * len(images)
    return [vision_input.soft_token_count(*_image_hw(i), config.vision) for i in images]


def encode_images(
    config: TransformerConfig, params: dict, images: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """uint8 [H, W, 3] images -> their projected soft tokens [M_i, D] (float32 host arrays)."""
    if not images:
        return []
    if config.family == 4:
        return [_encode_image4(config.vision, params, image) for image in images]
    vc, embedder = config.vision, params["embedder"]
    pixels = jnp.stack([vision.preprocess_image(i, vc.image_size) for i in images])
    soft = vision.encode_images(vc, params["vision_encoder"], pixels)
    projected = vision.project_soft_tokens(
        soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
    )
    return list(np.asarray(projected, np.float32))


def audio_counts(config: TransformerConfig, clips: Sequence[np.ndarray]) -> list[int]:
    """Soft tokens of each clip; refuses clips the encoder cannot take whole.

    Raises:
      ValueError: not float mono samples, too short for one token, or longer than
        `max_tokens` tokens (30 s): Hugging Face would cut it silently, we ask to trim it.
    """
    ac, counts = config.audio, []
    for k, clip in enumerate(clips, 1):
        clip = np.asarray(clip)
        if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(
                f"Audio clip {k}: expected float mono samples [N], got {clip.dtype} {clip.shape}"
            )
        n = audio_input.num_audio_tokens(clip.size, max_tokens=ac.max_tokens + 1)
        seconds = clip.size / ac.sample_rate
        if n == 0:
            raise ValueError(f"Audio clip {k} is too short ({seconds * 1000:.0f} ms)")
        if n > ac.max_tokens:
            limit = ac.max_tokens * 4 * audio_input.HOP_LENGTH / ac.sample_rate
            raise ValueError(
                f"Audio clip {k} is {seconds:.1f} s long; the model takes at most {limit:g} s "
                "per clip. Trim it or split it."
            )
        counts.append(n)
    return counts


def encode_audio(
    config: TransformerConfig, params: dict, clips: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """float 16 kHz mono clips -> their projected soft tokens [M_i, D] (float32 host arrays)."""
    return [_encode_clip(config.audio, params, clip) for clip in clips]


def _encode_image4(vision_config, params: dict, image: np.ndarray) -> np.ndarray:
    pre = vision_input.preprocess(image, vision_config)
    soft, mask = vision4.encode_images(
        vision_config, params["vision_encoder"], pre.patches[None], pre.positions[None]
    )  # [1, M_max, W], [1, M_max]
    w = params["embedder"]["mm_input_projection"]["w"]
    projected = np.asarray(vision4.project_soft_tokens(soft, w), np.float32)[0]  # [M_max, D]
    return projected[np.asarray(mask)[0]]  # [M, D], raster order


def _encode_clip(audio_config, params: dict, clip: np.ndarray) -> np.ndarray:
    features, valid = audio_input.log_mel_features(np.asarray(clip, np.float32))  # [T, 128], [T]
    soft, mask = audio.encode_audio(
        audio_config, params["audio_encoder"], features[None], valid[None]
    )  # [1, t, O], [1, t]
    soft, mask = np.asarray(soft)[0], np.asarray(mask)[0]  # host-side: no per-shape op
    rows = 1 << max(4, (soft.shape[0] - 1).bit_length())  # padding rows are projected, dropped
    soft = np.pad(soft, ((0, rows - soft.shape[0]), (0, 0)))
    w = params["embedder"]["audio_input_projection"]["w"]
    projected = np.asarray(audio.project_audio(jnp.asarray(soft), w), np.float32)  # [rows, D]
    return projected[: mask.size][mask]  # [M, D]


def _image_hw(image: np.ndarray) -> tuple[int, int]:
    shape = np.shape(image)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"Expected an RGB image [H, W, 3], got shape {shape}")
    return shape[0], shape[1]
