"""The Gemma 3 SigLIP image encoder: HF parity via a golden file, the official tree, pooling.

`tests/golden/tiny-gemma3-vision.npz` (made by `scripts/make_golden_vision.py`) holds
`Gemma3ForConditionalGeneration` outputs for the `tiny-gemma3-vision` preset on random
weights: the vision tower (before/after pooling, after projection) and the full logits of a
two-image prompt with HF's masks. The default run checks the encoder against it without
torch; the `reference` test proves the golden still comes out of transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rerun_atol

from gemma_app.ckpt import hf_map
from gemma_app.ckpt.errors import CheckpointMismatchError
from gemma_app.ckpt.hf_map import (
    VISION_LAYOUTS,
    flatten_params,
    hf_vision_param_shapes,
    hf_vision_to_params,
    unflatten_params,
    vision_config_from_hf,
    vision_param_shapes,
    vision_params_to_hf,
)
from gemma_app.nn import presets, transformer, vision
from gemma_app.nn.config import VisionConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny-gemma3-vision.npz"
ATOL = 1e-4  # ours vs HF, float32 on CPU


@functools.cache
def _golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def golden_params() -> dict:
    """Our full float32 tree (text + vision_encoder + embedder/mm_*) from the golden."""
    flat = {
        k.removeprefix("params/"): v.astype(np.float32)
        for k, v in _golden().items()
        if k.startswith("params/")
    }
    return unflatten_params(flat)


def golden_pixels() -> np.ndarray:
    images = _golden()["images_uint8"]
    return np.stack([np.asarray(vision.preprocess_image(image, size=112)) for image in images])


# --- parity with transformers (default run, no torch) -------------------------------------


def test_vision_tower_matches_transformers():
    config, golden, params = presets.tiny_gemma3_vision(), _golden(), golden_params()
    vc, pixels = config.vision, golden_pixels()

    soft = vision.encode_images(vc, params["vision_encoder"], pixels)
    assert soft.shape == (2, 4, 32) and soft.dtype == jnp.float32
    np.testing.assert_allclose(soft, golden["vision/pooled"], rtol=0, atol=ATOL)

    siglip = params["vision_encoder"]["siglip_encoder"]
    hidden = vision.SigLiPEncoder(vc).apply({"params": siglip}, jnp.asarray(pixels))
    np.testing.assert_allclose(hidden, golden["vision/last_hidden_state"], rtol=0, atol=ATOL)

    embedder = params["embedder"]
    projected = vision.project_soft_tokens(
        soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
    )
    assert projected.shape == (2, 4, config.embed_dim)
    np.testing.assert_allclose(projected, golden["vision/projected"], rtol=0, atol=ATOL)


def test_bf16_stored_weights_run_in_float32():
    config, params = presets.tiny_gemma3_vision(), golden_params()
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params["vision_encoder"])
    soft = vision.encode_images(config.vision, bf16, golden_pixels())
    assert soft.dtype == jnp.float32
    # The golden weights are float16-exact, not bfloat16-exact: close, not equal.
    np.testing.assert_allclose(soft, _golden()["vision/pooled"], rtol=0, atol=0.1)


def test_golden_prompt_layout_and_masks():
    """The token layout around each image and HF's decoder masks, as literal expectations."""
    golden = _golden()
    assert GOLDEN.stat().st_size < 1_000_000 and str(golden["preset"]) == "tiny-gemma3-vision"
    ids, types = golden["input_ids"][0], golden["token_type_ids"][0]
    nl, boi, eoi, soft = (int(golden[f"ids/{k}"]) for k in ("double_newline", "start_of_image",
                                                          "end_of_image", "image_token"))  # fmt: skip
    assert (nl, boi, eoi, soft) == (108, 109, 110, 256)
    image = [nl, boi, soft, soft, soft, soft, eoi, nl]
    assert ids.shape == (33,) and ids[0] == 2
    assert list(ids[5:13]) == image and list(ids[16:24]) == image
    np.testing.assert_array_equal(types, ids == soft)
    np.testing.assert_array_equal(golden["positions"][0], np.arange(33))

    # Soft tokens of image 1 sit at 7..10, image 2 at 18..21 (window 4 on sliding layers).
    full, sliding = golden["mask/full_attention"], golden["mask/sliding_attention"]
    block = np.zeros((33, 33), bool)
    block[7:11, 7:11] = block[18:22, 18:22] = True
    causal = np.tril(np.ones((33, 33), bool))
    window = np.triu(np.ones((33, 33), bool), k=-3)  # key > query - 4
    np.testing.assert_array_equal(full, causal | block)
    np.testing.assert_array_equal(sliding, (causal | block) & window)
    assert full[7, 10] and sliding[7, 10]  # first soft token sees the last one of its image
    assert not full[7, 18] and not full[10, 11]  # not the other image, not <end_of_image>
    assert full[10, 6] and not sliding[10, 6]  # <start_of_image> is 4 back from the 4th token
    assert full[18, 10] and not sliding[18, 10]  # image 2 sees image 1 causally (global only)


# --- preprocessing, pooling, projection on literal values ---------------------------------


def test_preprocess_image():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:, :] = np.array([0, 64, 128, 255], np.uint8)[None, :, None]
    out = vision.preprocess_image(image, size=2)
    assert out.shape == (2, 2, 3) and out.dtype == jnp.float32
    # Antialiased 2x downscale: a triangle filter of radius 2 input pixels, weights
    # (3/4, 3/4, 1/4) / (7/4) around each output center. (Plain bilinear would give 32, 191.)
    left = (0.75 * 0 + 0.75 * 64 + 0.25 * 128) / 1.75
    right = (0.25 * 64 + 0.75 * 128 + 0.75 * 255) / 1.75
    expected = (np.array([left, right]) - 127.5) / 127.5
    np.testing.assert_allclose(out[..., 0], [expected, expected], atol=1e-6)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])

    extremes = vision.preprocess_image(np.array([[[0, 255, 127]]], np.uint8), size=1)
    np.testing.assert_allclose(extremes[0, 0], [-1.0, 1.0, -0.5 / 127.5], atol=1e-7)
    # An image of the target size is not resampled: HF's rescale/normalize, bit for bit-ish.
    images = _golden()["images_uint8"]
    hf_pixels = (images.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    np.testing.assert_allclose(golden_pixels(), hf_pixels, rtol=0, atol=1e-6)
    assert vision.preprocess_image(np.zeros((30, 50, 3), np.uint8)).shape == (896, 896, 3)
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        vision.preprocess_image(np.zeros((4, 4), np.uint8))


def test_pool_soft_tokens_literal():
    grid = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)  # 4x4 patches, raster order
    pooled = vision.pool_soft_tokens(jnp.concatenate([grid, -grid], axis=-1), tokens_per_side=2)
    np.testing.assert_array_equal(pooled[0, :, 0], [2.5, 4.5, 10.5, 12.5])
    np.testing.assert_array_equal(pooled[0, :, 1], [-2.5, -4.5, -10.5, -12.5])
    np.testing.assert_array_equal(vision.pool_soft_tokens(grid, tokens_per_side=4), grid)
    np.testing.assert_array_equal(vision.pool_soft_tokens(grid, tokens_per_side=1), [[[7.5]]])
    with pytest.raises(ValueError, match="do not pool"):
        vision.pool_soft_tokens(grid, tokens_per_side=3)


def test_chunked_attention_equals_dense(monkeypatch):
    """The real encoder (4096 patches) attends in query chunks; same result as all at once."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 8))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(8)
    dense = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
    monkeypatch.setattr(vision, "QUERY_CHUNK", 16)
    np.testing.assert_allclose(vision._attention(q, k, v), dense, atol=1e-6)
    monkeypatch.setattr(vision, "QUERY_CHUNK", 48)  # 64 is no multiple of 48: one chunk
    np.testing.assert_allclose(vision._attention(q, k, v), dense, atol=1e-6)


def test_project_soft_tokens_literal():
    soft = jnp.array([[[3.0, 4.0]]])  # rms = sqrt(12.5)
    scale = jnp.array([0.0, 1.0])  # used as (1 + scale)
    out = vision.project_soft_tokens(soft, scale, jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    a, b = 3 / math.sqrt(12.5 + 1e-6), 2 * 4 / math.sqrt(12.5 + 1e-6)
    np.testing.assert_allclose(out, [[[a, b, a + b]]], rtol=1e-6)


# --- configs, the official tree, parameter counts -----------------------------------------


def official_vision_tree(vc: VisionConfig) -> dict[str, tuple]:
    """Spec §2.1's `vision_encoder` tree, written out (W=1152, N=16, H=72, F=4304 for Gemma 3)."""
    w, n, h, f, p = vc.width, vc.num_heads, vc.head_dim, vc.mlp_dim, vc.patch_size
    root = "siglip_encoder/"
    tree = {
        root + "embedding/kernel": (p, p, 3, w),
        root + "embedding/bias": (w,),
        root + "pos_embedding": (1, vc.num_patches, w),
        root + "Transformer/encoder_norm/scale": (w,),
        root + "Transformer/encoder_norm/bias": (w,),
    }
    for i in range(vc.depth):
        b = f"{root}Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            tree[f"{b}{norm}/scale"] = tree[f"{b}{norm}/bias"] = (w,)
        for proj in ("query", "key", "value"):
            tree[f"{b}MultiHeadDotProductAttention_0/{proj}/kernel"] = (w, n, h)
            tree[f"{b}MultiHeadDotProductAttention_0/{proj}/bias"] = (n, h)
        tree[f"{b}MultiHeadDotProductAttention_0/out/kernel"] = (n, h, w)
        tree[f"{b}MultiHeadDotProductAttention_0/out/bias"] = (w,)
        tree[f"{b}MlpBlock_0/Dense_0/kernel"] = (w, f)
        tree[f"{b}MlpBlock_0/Dense_0/bias"] = (f,)
        tree[f"{b}MlpBlock_0/Dense_1/kernel"] = (f, w)
        tree[f"{b}MlpBlock_0/Dense_1/bias"] = (w,)
    return tree


def _shapes(tree) -> dict[str, tuple]:
    return {p: tuple(s.shape) for p, s in flatten_params(tree).items()}


def test_gemma3_vision_tree_and_param_count():
    vc = presets.gemma3_4b().vision
    assert (vc.width, vc.head_dim, vc.num_heads, vc.patches_per_side) == (1152, 72, 16, 64)
    assert (vc.num_patches, vc.tokens_per_side, vc.pool_size) == (4096, 16, 4)
    shapes = _shapes(vision.abstract_params(vc))
    official = official_vision_tree(vc)
    assert shapes == official
    assert shapes["siglip_encoder/Transformer/encoderblock_26/MlpBlock_0/Dense_0/kernel"] == (
        1152,
        4304,
    )
    assert sum(math.prod(s) for s in shapes.values()) == 416_866_032


@pytest.mark.parametrize(
    ("name", "total"),
    [("gemma3-4b", 4_299_915_632), ("gemma3-12b", 12_187_079_280), ("gemma3-27b", 27_432_062_576)],
)
def test_full_model_param_counts(name, total):
    config = presets.get_preset(name)
    assert config.vision == presets.gemma3_vision()
    text = sum(math.prod(s.shape) for s in jax.tree.leaves(transformer.abstract_params(config)))
    mm = vision.mm_embedder_shapes(config.vision, config.embed_dim)
    assert mm == {
        "embedder/mm_input_projection/w": (1152, config.embed_dim),
        "embedder/mm_soft_embedding_norm/scale": (1152,),
    }
    assert text + 416_866_032 + sum(math.prod(s) for s in mm.values()) == total


def test_vision_presets_and_config_checks():
    for name in ("gemma1-2b", "gemma2-9b", "gemma3-270m", "gemma3-1b", "tiny-gemma3"):
        assert presets.get_preset(name).vision is None
    tiny = presets.get_preset("tiny-gemma3-vision")
    assert dataclasses.replace(tiny, name="tiny-gemma3", vision=None) == presets.tiny_gemma3()
    assert tiny.vision == presets.tiny_vision()
    assert (tiny.vision.patches_per_side, tiny.vision.pool_size) == (8, 4)
    hash(presets.gemma3_27b())  # usable as a static jit argument

    good = dataclasses.asdict(presets.tiny_vision())
    for bad, match in [
        (dict(image_size=100), "not a multiple of patch_size"),
        (dict(num_heads=3), "not a multiple of num_heads"),
        (dict(num_mm_tokens_per_image=8), "not square"),
        (dict(num_mm_tokens_per_image=9), "do not pool evenly"),
    ]:
        with pytest.raises(ValueError, match=match):
            VisionConfig(**{**good, **bad})
    with pytest.raises(ValueError, match=r"Expected images \[B, 112, 112, 3\]"):
        vision.encode_images(
            tiny.vision, golden_params()["vision_encoder"], jnp.zeros((1, 96, 96, 3))
        )


# --- the HF key map -----------------------------------------------------------------------


def _random_hf(config, layout="safetensors", seed=0):
    rng = np.random.default_rng(seed)
    shapes = hf_vision_param_shapes(config, layout)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("layout", sorted(VISION_LAYOUTS))
def test_vision_key_map_round_trip(layout):
    config = presets.tiny_gemma3_vision()
    state_dict = _random_hf(config, layout)
    state_dict["model.language_model.norm.weight"] = np.zeros(64, np.float32)  # text: ignored
    params = hf_vision_to_params(state_dict, config)
    assert _shapes(params["vision_encoder"]) == official_vision_tree(config.vision)
    back = vision_params_to_hf(params, config, layout=layout)
    assert back.keys() == state_dict.keys() - {"model.language_model.norm.weight"}
    for name, value in back.items():
        np.testing.assert_array_equal(value, state_dict[name], err_msg=name)


def test_vision_key_map_layouts():
    """Conv OIHW -> HWIO, head-major `N*H` rows, transposed MLP, untouched projector."""
    config = presets.tiny_gemma3_vision()  # W=32, N=2, H=16, F=64, P=14
    sd = _random_hf(config)
    siglip = "vision_tower.vision_model."
    ours = hf_vision_to_params(sd, config)
    enc = ours["vision_encoder"]["siglip_encoder"]
    conv = sd[siglip + "embeddings.patch_embedding.weight"]  # (W, 3, P, P)
    assert enc["embedding"]["kernel"][5, 9, 2, 7] == conv[7, 2, 5, 9]
    np.testing.assert_array_equal(
        enc["pos_embedding"][0], sd[siglip + "embeddings.position_embedding.weight"]
    )
    attn = enc["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]
    q = sd[siglip + "encoder.layers.1.self_attn.q_proj.weight"]  # (N*H, W)
    assert attn["query"]["kernel"][20, 1, 3] == q[1 * 16 + 3, 20]
    qb = sd[siglip + "encoder.layers.1.self_attn.q_proj.bias"]
    assert attn["query"]["bias"][1, 3] == qb[1 * 16 + 3]
    o = sd[siglip + "encoder.layers.1.self_attn.out_proj.weight"]  # (W, N*H)
    assert attn["out"]["kernel"][1, 3, 20] == o[20, 1 * 16 + 3]
    mlp = enc["Transformer"]["encoderblock_0"]["MlpBlock_0"]
    np.testing.assert_array_equal(
        mlp["Dense_1"]["kernel"], sd[siglip + "encoder.layers.0.mlp.fc2.weight"].T
    )
    np.testing.assert_array_equal(
        enc["Transformer"]["encoder_norm"]["scale"], sd[siglip + "post_layernorm.weight"]
    )
    np.testing.assert_array_equal(
        ours["embedder"]["mm_input_projection"]["w"],
        sd["multi_modal_projector.mm_input_projection_weight"],
    )
    # Our tree for the real model, built by the model itself, matches the map's.
    config = presets.gemma3_4b()
    model_tree = {
        f"vision_encoder/{p}": s for p, s in _shapes(vision.abstract_params(config.vision)).items()
    }
    mm = vision.mm_embedder_shapes(config.vision, config.embed_dim)
    assert vision_param_shapes(config) == model_tree | mm


def test_vision_key_map_errors():
    config = presets.tiny_gemma3_vision()
    sd = _random_hf(config)
    siglip = "vision_tower.vision_model."
    del sd[siglip + "encoder.layers.1.mlp.fc1.bias"]
    sd[siglip + "encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 33), np.float32)
    sd[siglip + "encoder.layers.2.layer_norm1.weight"] = np.zeros(32, np.float32)
    sd[siglip + "head.probe"] = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        hf_vision_to_params(sd, config)
    assert len(info.value.problems) == 4, str(info.value)
    for needle in (
        f"missing {siglip}encoder.layers.1.mlp.fc1.bias (expected (64,))",
        f"{siglip}encoder.layers.0.self_attn.q_proj.weight: shape (32, 33), expected (32, 32)",
        f"unexpected {siglip}encoder.layers.2.layer_norm1.weight (32,)",
        f"unexpected {siglip}head.probe (1, 1, 32)",
    ):
        assert needle in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="No Gemma 3 vision tower"):
        hf_vision_to_params({"model.embed_tokens.weight": np.zeros((4, 4))}, config)
    with pytest.raises(ValueError, match="has no vision encoder"):
        hf_vision_param_shapes(presets.tiny_gemma3())

    params = flatten_params(hf_vision_to_params(_random_hf(config), config))
    del params["embedder/mm_soft_embedding_norm/scale"]
    params["vision_encoder/siglip_encoder/Transformer/encoderblock_5/LayerNorm_0/scale"] = 0
    with pytest.raises(CheckpointMismatchError) as info:
        vision_params_to_hf(unflatten_params(params), config)
    assert len(info.value.problems) == 2, str(info.value)


# gemma-3-4b-it's config.json `vision_config` (12B and 27B have the same one).
GEMMA3_VISION_JSON = {
    "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
    "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
    "patch_size": 14, "vision_use_head": False,
}  # fmt: skip


def test_vision_config_from_hf():
    config_json = {"model_type": "gemma3", "mm_tokens_per_image": 256}
    assert vision_config_from_hf(config_json) is None
    config_json["vision_config"] = GEMMA3_VISION_JSON
    assert vision_config_from_hf(config_json) == presets.gemma3_vision()
    with pytest.raises(ValueError, match="vision_use_head=True"):
        vision_config_from_hf(
            {**config_json, "vision_config": {"model_type": "siglip_vision_model"}}
        )
    assert hf_map.vision_config_from_hf({"model_type": "gemma3_text"}) is None


# --- the golden comes from transformers (reference env only) ------------------------------


def _golden_script():
    path = ROOT / "scripts" / "make_golden_vision.py"
    spec = importlib.util.spec_from_file_location("make_golden_vision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.reference
def test_golden_recomputes_with_transformers():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    script = _golden_script()
    config, golden, params = presets.tiny_gemma3_vision(), _golden(), golden_params()
    model = script.build_hf_model(config, params)
    pixels = script.pixel_values_of(golden["images_uint8"])
    logits, captured = script.run_hf(model, pixels, golden["input_ids"], golden["token_type_ids"])
    # torch's fp32 sums run in a CPU-dependent order (conftest.rerun_atol).
    atol = rerun_atol(golden["logits"])
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=atol)
    for name, value in captured.items():
        key = name if "/" in name else f"hf_hidden/{name}"
        atol = rerun_atol(golden[key])
        np.testing.assert_allclose(value, golden[key], rtol=0, atol=atol, err_msg=name)

    # HF's own state dict maps back to exactly our vision leaves.
    hf_state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = flatten_params(hf_vision_to_params(hf_state, config))
    expected = flatten_params(params)
    for path, value in ours.items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)
