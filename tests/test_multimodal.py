"""Images in the decoder: soft tokens merged into the embeddings, bidirectional image blocks.

Checked against Hugging Face's Gemma3ForConditionalGeneration logits for a prompt with two
images (tests/golden/tiny-gemma3-vision.npz, made by scripts/make_golden_vision.py).
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_vision import _golden, golden_params, golden_pixels

from gemma_app.engine import Engine
from gemma_app.nn import presets, vision
from gemma_app.nn.transformer import Transformer, init_cache, init_params
from gemma_app.text.template import SOFT_TOKEN
from gemma_app.text.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"

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


# --- the chat image path: images in turns 1 and 3 == one shot over the conversation --------


@pytest.fixture(scope="module")
def vision_engine():
    tokenizer = Tokenizer(ASSETS / "tokenizer.model", version=3)
    config = dataclasses.replace(
        presets.tiny_demo(tokenizer.vocab_size),
        name="tiny-demo-vision",
        vision=presets.tiny_vision(),
    )
    params = dict(init_params(config, seed=0))
    params["vision_encoder"] = vision.init_params(config.vision, seed=1)
    mm = vision.init_mm_embedder(config.vision, config.embed_dim, seed=2)
    params["embedder"] = {**params["embedder"], **mm}
    return Engine(
        name="tiny vision", config=config, params=params, tokenizer=tokenizer, supports_images=True
    )


def soft_tokens(engine, image):
    vc, embedder = engine.config.vision, engine.params["embedder"]
    pixels = vision.preprocess_image(image, vc.image_size)[None]
    soft = vision.encode_images(vc, engine.params["vision_encoder"], pixels)
    return np.asarray(
        vision.project_soft_tokens(
            soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
        )
    )[0]


def greedy_full_forward(engine, ids, segments, mm, n):
    """Greedy continuation by repeated uncached forwards over the whole sequence."""
    ids, segments, mm = list(ids), list(segments), list(mm)
    width = -(-(len(ids) + n) // 128) * 128
    model = Transformer(engine.config)
    apply = jax.jit(
        lambda t, p, m, s: model.apply(
            {"params": engine.params}, t, p, mm_embeddings=m, segments=s
        )[0]
    )
    out = []
    for _ in range(n):
        pad = width - len(ids)
        t = np.array([[max(i, 0) for i in ids] + [0] * pad])
        s = np.array([segments + [0] * pad])
        m = np.array([mm + [np.zeros(engine.config.embed_dim, np.float32)] * pad])
        logits = apply(t, np.arange(width)[None], m, s)[0, len(ids) - 1]
        token = int(np.argmax(np.asarray(logits)))
        out.append(token)
        ids.append(token)
        segments.append(0)
        mm.append(np.zeros(engine.config.embed_dim, np.float32))
    return out


def test_images_in_turns_one_and_three_equal_one_shot(vision_engine):
    rng = np.random.default_rng(0)
    img1 = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    img2 = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    chat = vision_engine.new_chat(cache_length=256, max_out_length=16)
    chat.chat("What is this?", images=[img1], max_new_tokens=6)
    chat.chat("Only text now.", max_new_tokens=6)
    chat.chat("And this one?", images=[img2], max_new_tokens=6)
    answers = [list(t.answer_tokens) for t in chat.turns]

    # The one-shot sequence, built from the template alone.
    template, m = chat.template, vision_engine.config.vision.num_mm_tokens_per_image
    tok = vision_engine.tokenizer
    ids = [tok.special.bos]
    ids += template.user_turn("What is this?", images=1, tokens_per_image=m)
    ids += answers[0] + template.end_of_model_turn() + template.user_turn("Only text now.")
    ids += answers[1] + template.end_of_model_turn()
    ids += template.user_turn("And this one?", images=1, tokens_per_image=m)
    soft_runs = [soft_tokens(vision_engine, img1), soft_tokens(vision_engine, img2)]
    segments, mm, block = [], [], 0
    for i, token in enumerate(ids):
        if token == SOFT_TOKEN:
            if ids[i - 1] != SOFT_TOKEN:
                block += 1
                k = 0
            segments.append(block)
            mm.append(soft_runs[block - 1][k])
            k += 1
        else:
            segments.append(0)
            mm.append(np.zeros(vision_engine.config.embed_dim, np.float32))
    assert chat._tokens[: len(ids)] == ids and block == 2
    expected = greedy_full_forward(vision_engine, ids, segments, mm, len(answers[2]))
    assert answers[2] == expected


def test_image_layout_literal(vision_engine):
    template, tok = vision_engine.new_chat().template, vision_engine.tokenizer
    ids = template.user_turn("Hi", images=2, tokens_per_image=3)
    blank = tok.encode("\n\n")
    soi, eoi = tok.special.start_of_image, tok.special.end_of_image
    image = [*blank, soi, SOFT_TOKEN, SOFT_TOKEN, SOFT_TOKEN, eoi, *blank]
    user = [tok.special.start_of_turn, *tok.encode("user\n")]
    tail = [*tok.encode("Hi"), tok.special.end_of_turn, *tok.encode("\n")]
    assert ids == user + image + image + tail + [tok.special.start_of_turn, *tok.encode("model\n")]


def test_images_rejected_by_text_models(demo_engine):
    text_only = dataclasses.replace(
        demo_engine,
        config=dataclasses.replace(demo_engine.config, vision=None),
        params={k: v for k, v in demo_engine.params.items() if k != "vision_encoder"},
        supports_images=False,
    )
    chat = text_only.new_chat(cache_length=256)
    with pytest.raises(ValueError, match="does not accept images"):
        chat.chat("look", images=[np.zeros((8, 8, 3), np.uint8)])
    assert chat.turns == [] and chat.chat("still fine", max_new_tokens=2) is not None
