"""Images in the decoder: soft tokens merged into the embeddings, bidirectional image blocks.

Checked against Hugging Face's Gemma3ForConditionalGeneration logits for a prompt with two
images (tests/golden/tiny-gemma3-vision.npz, made by scripts/make_golden_vision.py).
"""

import jax.numpy as jnp
import numpy as np
from test_vision import _golden, golden_params, golden_pixels

from gemma_app.nn import presets, vision
from gemma_app.nn.transformer import Transformer, init_cache

ATOL = 1e-4


def image_blocks(is_soft: np.ndarray) -> np.ndarray:
    """[B, T] bool -> [B, T] int: 1, 2, ... for each maximal run of soft tokens, 0 elsewhere."""
    starts = is_soft & ~np.pad(is_soft, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_soft, np.cumsum(starts, axis=1), 0).astype(np.int32)


def golden_inputs():
    config, golden, params = presets.tiny_gemma3_vision(), _golden(), golden_params()
    embedder = params["embedder"]
    soft = vision.encode_images(config.vision, params["vision_encoder"], golden_pixels())
    projected = vision.project_soft_tokens(
        soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
    )  # [images, M, D]
    ids = golden["input_ids"]
    segments = image_blocks(golden["token_type_ids"] == 1)
    mm = np.zeros((*ids.shape, config.embed_dim), np.float32)
    mm[segments > 0] = np.asarray(projected).reshape(-1, config.embed_dim)
    return config, params, ids, segments, mm, golden["logits"]


def test_image_blocks_literal():
    soft = np.array([[0, 1, 1, 0, 0, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(image_blocks(soft), [[0, 1, 1, 0, 0, 2, 2, 2, 0]])


def test_two_image_prompt_matches_transformers_uncached():
    config, params, ids, segments, mm, expected = golden_inputs()
    positions = np.arange(ids.shape[1])[None]
    logits, _ = Transformer(config).apply(
        {"params": params}, ids, positions, mm_embeddings=mm, segments=segments
    )
    np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)


def test_two_image_prompt_matches_transformers_cached_in_chunks():
    """Prefill in two calls split between the images, then decode: same logits as HF."""
    config, params, ids, segments, mm, expected = golden_inputs()
    model = Transformer(config)
    cache = init_cache(config, batch=1, cache_length=64)
    assert "segments" in cache
    pieces = []
    for a, b in [(0, 14), (14, 30), (30, 31), (31, 32), (32, 33)]:  # 30.. are text decode steps
        positions = np.arange(a, b)[None]
        logits, cache = model.apply(
            {"params": params}, ids[:, a:b], positions, cache,
            mm_embeddings=mm[:, a:b], segments=segments[:, a:b],
        )  # fmt: skip
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), expected, rtol=0, atol=ATOL)
