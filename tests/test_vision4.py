"""The Gemma 4 image path: preprocessing, encoder, pooling and projection against transformers.

`tests/golden/tiny-gemma4-vision.npz` and `tiny-gemma4-vision-std.npz` (made by
`scripts/make_golden_gemma4_vision.py`) hold transformers' `Gemma4ImageProcessorPil`,
`Gemma4VisionModel` and `embed_vision` outputs for three images (224x224, 100x300, 20x1000)
on random weights: the clipped-linear preset and a standardized variant. The default run
compares our numpy/JAX code with them without torch; the `reference` test proves the goldens
still come out of transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import rerun_atol
from flax.traverse_util import flatten_dict, unflatten_dict

from gemma_app import vision_input
from gemma_app.nn import presets, vision4
from gemma_app.nn.config import Gemma4VisionConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
ATOL = 1e-4  # ours vs HF, float32 on CPU


def _std_config() -> Gemma4VisionConfig:
    return dataclasses.replace(
        presets.tiny_gemma4_vision(), use_clipped_linears=False, standardize=True
    )


VARIANTS = {"tiny-gemma4-vision": presets.tiny_gemma4_vision, "tiny-gemma4-vision-std": _std_config}


@functools.cache
def _golden(name: str = "tiny-gemma4-vision") -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def _params(name: str) -> dict:
    flat = {
        tuple(k.removeprefix("params/").split("/")): v.astype(np.float32)
        for k, v in _golden(name).items()
        if k.startswith("params/")
    }
    return unflatten_dict(flat)


def _images() -> list[np.ndarray]:
    golden = _golden()
    return [golden[f"image_{i}"] for i in range(3)]


def _hf_inputs() -> tuple[np.ndarray, np.ndarray]:
    golden = _golden()
    pixels = golden["hf/pixel_values_x255"].astype(np.float32) / np.float32(255)
    return pixels, golden["hf/position_ids"]


# --- preprocessing ------------------------------------------------------------------------


def test_preprocess_matches_hf_processor():
    vc = presets.tiny_gemma4_vision()
    pixels, positions = _hf_inputs()
    pre = [vision_input.preprocess(image, vc) for image in _images()]
    patches, ours_positions, counts = vision_input.stack(pre)
    assert patches.shape == (3, vc.max_patches, 768) and patches.dtype == np.float32
    assert ours_positions.dtype == np.int32
    np.testing.assert_array_equal(patches, pixels)  # bit for bit (PIL bicubic on uint8, / 255)
    np.testing.assert_array_equal(ours_positions, positions)
    assert counts == _golden()["hf/num_soft_tokens"].tolist() == [36, 30, 36]
    assert [p.size for p in pre] == [(288, 288), (144, 480), (48, 1728)]
    assert [p.num_patches for p in pre] == [324, 270, 324]


@pytest.mark.parametrize(
    ("size", "target", "tokens"),
    [((224, 224), (768, 768), 256), ((480, 640), (672, 912), 266), ((100, 1000), (240, 2496), 260)],
)
def test_token_counts_at_budget_280(size, target, tokens):
    vc = presets.gemma4_vision_small()
    assert vision_input.target_size(*size, vc) == target
    assert vision_input.soft_token_count(*size, vc) == tokens


def test_token_counts_tiny_budget_and_invariants():
    vc = presets.tiny_gemma4_vision()  # 36 tokens
    counts = {s: vision_input.soft_token_count(*s, vc) for s in [(224, 224), (100, 300), (20, 1000), (100, 1000)]}  # fmt: skip
    assert counts == {(224, 224): 36, (100, 300): 30, (20, 1000): 36, (100, 1000): 18}
    assert vision_input.target_size(1000, 20, vc) == (1728, 48)  # a side rounding to 0
    rng = np.random.default_rng(0)
    for config in (vc, presets.gemma4_vision_large()):
        for h, w in rng.integers(1, 4000, size=(200, 2)):
            th, tw = vision_input.target_size(int(h), int(w), config)
            assert th % 48 == 0 and tw % 48 == 0 and th > 0 and tw > 0
            tokens = vision_input.soft_token_count(int(h), int(w), config)
            assert 1 <= tokens <= config.max_soft_tokens


def test_patchify_layout():
    """Patch (h w) raster order, values (p q c) with channels fastest, positions (x, y)."""
    pixels = np.arange(32 * 48 * 3, dtype=np.float32).reshape(32, 48, 3)
    patches, positions = vision_input.patchify(pixels, 16)
    assert patches.shape == (6, 768)
    np.testing.assert_array_equal(positions, [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]])
    np.testing.assert_array_equal(patches[4].reshape(16, 16, 3), pixels[16:32, 16:32])


def test_preprocess_rejects_non_rgb():
    vc = presets.tiny_gemma4_vision()
    with pytest.raises(ValueError, match="uint8 RGB"):
        vision_input.preprocess(np.zeros((32, 32, 4), np.uint8), vc)
    with pytest.raises(ValueError, match="uint8 RGB"):
        vision_input.preprocess(np.zeros((32, 32, 3), np.float32), vc)


# --- encoder parity -----------------------------------------------------------------------


def _transformer_output(vc, params_vision, patches, positions) -> np.ndarray:
    """Encoder output before pooling [B, T, W] (captured inside `VisionEncoder.apply`)."""
    _, state = vision4.VisionEncoder(vc).apply(
        {"params": params_vision},
        patches,
        positions,
        capture_intermediates=lambda module, _: isinstance(module, vision4.VisionTransformer),
    )
    return np.asarray(state["intermediates"]["transformer"]["__call__"][0])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_encoder_matches_transformers(name):
    vc, golden, params = VARIANTS[name](), _golden(name), _params(name)
    pixels, positions = _hf_inputs()
    soft, mask = vision4.encode_images(vc, params["vision_encoder"], pixels, positions)
    soft, mask = np.asarray(soft), np.asarray(mask)
    assert soft.shape == (3, vc.max_soft_tokens, vc.width) and soft.dtype == np.float32
    np.testing.assert_array_equal(mask, golden["hf/pooled_mask"])
    # valid cells are the first `count` in raster order
    counts = _golden()["hf/num_soft_tokens"]
    np.testing.assert_array_equal(mask, np.arange(vc.max_soft_tokens) < counts[:, None])
    np.testing.assert_allclose(soft[mask], golden["hf/soft"], rtol=0, atol=ATOL)
    if not vc.standardize:  # HF's pooler output is before standardize: compare every cell
        np.testing.assert_allclose(soft, golden["hf/pooled"], rtol=0, atol=ATOL)
    else:
        assert np.abs(soft[mask] - golden["hf/pooled"][mask]).max() > 0.1  # standardize acts
    projected = vision4.project_soft_tokens(
        soft[mask], params["embedder"]["mm_input_projection"]["w"]
    )
    assert projected.shape == golden["hf/projected"].shape == (102, 64)
    np.testing.assert_allclose(projected, golden["hf/projected"], rtol=0, atol=ATOL)


def test_transformer_output_matches_transformers():
    vc, params = presets.tiny_gemma4_vision(), _params("tiny-gemma4-vision")
    pixels, positions = _hf_inputs()
    hidden = _transformer_output(vc, params["vision_encoder"], pixels, positions)
    valid = positions[..., 0] >= 0
    expected = _golden()["hf/encoder_hidden"]
    np.testing.assert_allclose(hidden[valid], expected[valid], rtol=0, atol=ATOL)


def test_clipping_is_exercised():
    """Loosening the golden's clip bounds changes the output: the parity above covers them."""
    vc, params = presets.tiny_gemma4_vision(), _params("tiny-gemma4-vision")
    pixels, positions = _hf_inputs()
    loose = unflatten_dict(
        {
            k: (np.sign(v) * np.inf if k[-1].startswith("clip_") else v)
            for k, v in flatten_dict(params["vision_encoder"]).items()
        }
    )
    soft, mask = vision4.encode_images(vc, params["vision_encoder"], pixels, positions)
    free, _ = vision4.encode_images(vc, loose, pixels, positions)
    assert np.abs(np.asarray(soft) - np.asarray(free))[np.asarray(mask)].max() > 1e-2


# --- padding, batching, compilation --------------------------------------------------------


def test_padding_does_not_change_valid_outputs():
    vc, params = presets.tiny_gemma4_vision(), _params("tiny-gemma4-vision")["vision_encoder"]
    pixels, positions = _hf_inputs()
    soft, mask = (np.asarray(a) for a in vision4.encode_images(vc, params, pixels, positions))
    noisy = pixels.copy()
    pad = positions[..., 0] < 0
    assert pad.any()
    noisy[pad] = np.random.default_rng(1).uniform(0, 1, noisy[pad].shape)
    other, other_mask = vision4.encode_images(vc, params, noisy, positions)
    np.testing.assert_array_equal(np.asarray(other_mask), mask)
    np.testing.assert_allclose(np.asarray(other)[mask], soft[mask], rtol=0, atol=1e-6)
    # image 1 alone, unpadded (encode_images pads it), gives the same tokens as in the batch
    # (up to float32 rounding: another batch size sums in another order)
    n = int((~pad[1]).sum())
    alone, _ = vision4.encode_images(vc, params, pixels[1:2, :n], positions[1:2, :n])
    np.testing.assert_allclose(np.asarray(alone)[0][mask[1]], soft[1][mask[1]], rtol=0, atol=ATOL)


def test_one_compilation_for_two_aspect_ratios():
    vc = dataclasses.replace(presets.tiny_gemma4_vision(), max_soft_tokens=35)  # fresh config
    params = vision4.init_params(vc, seed=3)
    rng = np.random.default_rng(2)
    before = vision4._encode._cache_size()
    for size in [(64, 64), (90, 400)]:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        pre = vision_input.preprocess(image, vc)
        soft, mask = vision4.encode_images(vc, params, pre.patches[None], pre.positions[None])
        assert int(np.asarray(mask).sum()) == pre.num_soft_tokens
        assert np.isfinite(np.asarray(soft)).all()
    assert vision4._encode._cache_size() == before + 1


def test_encode_images_validates_inputs():
    vc = presets.tiny_gemma4_vision()
    params = _params("tiny-gemma4-vision")["vision_encoder"]
    with pytest.raises(ValueError, match="exceed"):
        vision4.encode_images(vc, params, np.zeros((1, 325, 768)), np.zeros((1, 325, 2)))
    with pytest.raises(ValueError, match="position table"):
        vision4.encode_images(vc, params, np.zeros((1, 9, 768)), np.full((1, 9, 2), 128))


def test_rope_2d_turns_halves_by_x_and_y():
    x = np.random.default_rng(0).standard_normal((1, 1, 1, 16)).astype(np.float32)
    only_x = np.asarray(vision4.apply_rope_2d(x, np.array([[[3, 0]]]), 100.0))
    only_y = np.asarray(vision4.apply_rope_2d(x, np.array([[[0, 3]]]), 100.0))
    np.testing.assert_array_equal(only_x[..., 8:], x[..., 8:])  # y half untouched
    np.testing.assert_array_equal(only_y[..., :8], x[..., :8])
    # pair (0, 4) of the x half turns by angle 3 * 100**0 = 3
    c, s = np.cos(3.0), np.sin(3.0)
    np.testing.assert_allclose(only_x[..., 0], x[..., 0] * c - x[..., 4] * s, atol=1e-6)
    np.testing.assert_allclose(only_x[..., 4], x[..., 4] * c + x[..., 0] * s, atol=1e-6)


# --- trees --------------------------------------------------------------------------------


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    ("preset", "count", "embed_dims"),
    [
        (presets.gemma4_vision_small, 167_364_928, (1536, 2560)),  # E2B, E4B
        (presets.gemma4_vision_large, 569_550_384, (5376, 2816)),  # 31B, 26B-A4B
    ],
)
def test_real_trees(preset, count, embed_dims):
    vc = preset()
    tree = vision4.abstract_params(vc)
    flat = {"/".join(k): v.shape for k, v in flatten_dict(tree).items()}
    w, lv, n, h, f = vc.width, vc.depth, vc.num_heads, vc.head_dim, vc.mlp_dim
    block = "transformer/stacked_layers/block/"
    assert flat["entry/input_projection/w"] == (768, w)
    assert flat["entry/pos_emb"] == (10240, 2, w)
    assert flat[block + "attn/q_einsum/w"] == (lv, n, w, h)
    assert flat[block + "attn/kv_einsum/w"] == (lv, 2, n, w, h)
    assert flat[block + "attn/attn_vec_einsum/w"] == (lv, n, h, w)
    assert flat[block + "attn/query_norm/scale"] == flat[block + "attn/key_norm/scale"] == (lv, h)
    assert flat[block + "mlp/gating_einsum/w"] == (lv, 2, f, w)
    assert flat[block + "mlp/linear/w"] == (lv, f, w)
    clips = [k for k in flat if "/clip_" in k]
    assert len(clips) == (20 if vc.use_clipped_linears else 0)
    assert all(flat[k] == (lv,) for k in clips)
    assert ("standardize/scale" in flat) == vc.standardize == ("standardize/bias" in flat)
    assert all(k.startswith(("entry/", block, "standardize/")) for k in flat)
    assert _count(tree) == count
    for d in embed_dims:
        assert vision4.mm_embedder_shapes(vc, d) == {"embedder/mm_input_projection/w": (w, d)}


def test_init_params_matches_abstract_tree():
    vc = presets.tiny_gemma4_vision()
    real = vision4.init_params(vc, seed=0)
    abstract = vision4.abstract_params(vc)
    assert jax.tree.map(lambda a: a.shape, real) == jax.tree.map(lambda a: a.shape, abstract)
    mm = vision4.init_mm_embedder(vc, 64, seed=1)
    assert mm["mm_input_projection"]["w"].shape == (32, 64)


def test_config_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="multiple of 4"):
        Gemma4VisionConfig(width=32, depth=1, num_heads=2, head_dim=18, mlp_dim=64)


# --- the goldens come from transformers (reference env only) -------------------------------


@pytest.mark.reference
def test_goldens_recompute_with_transformers(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = ROOT / "scripts" / "make_golden_gemma4_vision.py"
    spec = importlib.util.spec_from_file_location("make_golden_gemma4_vision", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for i, (name, vc) in enumerate(script.variants().items()):
        fresh = script.make_golden(name, vc, tmp_path, store_inputs=i == 0)
        with np.load(fresh) as data:
            for key in data.files:
                if not key.startswith("meta/"):
                    stored = _golden(name)[key]
                    np.testing.assert_allclose(
                        data[key], stored, atol=rerun_atol(stored), err_msg=key
                    )
