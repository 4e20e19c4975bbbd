"""The Gemma 4 audio path: log-mel features, token counts and the conformer, against HF.

`tests/golden/tiny-gemma4-audio.npz` (made by `scripts/make_golden_gemma4_audio.py`) holds
transformers' `Gemma4AudioFeatureExtractor`, `Gemma4AudioModel` and audio embedder outputs
for two clips on the random-weight `tiny_gemma4_audio()` preset; the default run compares
ours with it without torch, and the `reference` test proves the golden still comes out of
transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import rerun_atol

from gemma_app import audio_input, media
from gemma_app.ckpt.hf_map import flatten_params, unflatten_params
from gemma_app.nn import audio, presets

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny-gemma4-audio.npz"
REF_PYTHON = ROOT / "bench" / ".envs" / "ref" / "bin" / "python"
ATOL = 1e-4  # ours vs HF, float32 on CPU
CONFIG = presets.tiny_gemma4_audio()


@functools.cache
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def golden_params() -> dict:
    g = golden()
    flat = {
        k[len("params/") :]: v.astype(np.float32) for k, v in g.items() if k.startswith("params/")
    }
    return unflatten_params(flat)


def golden_clips() -> list[np.ndarray]:
    g = golden()
    return [g["waveforms"][i, :n] for i, n in enumerate(g["lengths"])]


@functools.cache
def our_tower() -> tuple[np.ndarray, np.ndarray]:
    g = golden()
    soft, valid = audio.encode_audio(
        CONFIG, golden_params()["audio_encoder"], g["features"], g["features_mask"]
    )
    return np.asarray(soft), np.asarray(valid)


# -- features ----------------------------------------------------------------------------------


def test_log_mel_features_match_hf_extractor():
    g = golden()
    features, mask = audio_input.batch_log_mel_features(golden_clips())
    assert features.shape == g["features"].shape and features.dtype == np.float32
    np.testing.assert_array_equal(mask, g["features_mask"])
    assert np.abs(features - g["features"]).max() <= ATOL  # measured 4.8e-7


def test_one_clip_alone_gives_its_rows_of_the_batch():
    g = golden()
    short = golden_clips()[1]  # 9875 samples: padded alone to 9984, 62 frames, 61 valid
    features, mask = audio_input.log_mel_features(short)
    assert features.shape == (62, 128) and mask.sum() == 61 and not mask[-1]
    np.testing.assert_allclose(features, g["features"][1, :62], atol=ATOL)
    assert (features[~mask] == 0).all()


def test_mel_filterbank_shape_and_peaks():
    bank = audio_input.mel_filterbank()
    assert bank.shape == (257, 128) and bank.min() == 0.0 and bank.max() <= 1.0
    # HTK mel over 0-8000 Hz: filters widen with frequency, and the lowest one is narrower
    # than the 31.25 Hz bin spacing, so it catches no bin (HF warns and keeps it).
    width = (bank > 0).sum(axis=0)
    assert width[0] == 0 and width[1] == 1 and width[-1] == 11


# -- token counts ------------------------------------------------------------------------------


def test_token_counts_match_hf_processor_both_ways():
    g = golden()
    ours = [audio_input.num_audio_tokens(int(n)) for n in g["count/lengths"]]
    np.testing.assert_array_equal(ours, g["count/tokens"])  # `_compute_audio_num_tokens`
    np.testing.assert_array_equal(ours, g["count/mask_tokens"])  # `replace_audio_token`


@pytest.mark.parametrize(
    "samples, tokens",
    [(0, 0), (160, 0), (161, 1), (1_600, 3), (16_000, 25), (32_000, 50), (480_000, 750),
     (480_160, 750), (960_000, 750)],
)  # fmt: skip
def test_num_audio_tokens(samples, tokens):
    assert audio_input.num_audio_tokens(samples) == tokens


def test_clips_past_30_s_are_cut_like_hf():
    features, mask = audio_input.log_mel_features(np.zeros(500_000, np.float32))
    assert features.shape == (2999, 128) and mask.all()
    assert audio_input.num_audio_tokens(500_000) == audio.num_output_frames(2999) == 750


def test_token_count_is_the_encoders_valid_length():
    _, valid = our_tower()
    counts = [audio_input.num_audio_tokens(int(n)) for n in golden()["lengths"]]
    assert valid.sum(axis=1).tolist() == counts == [25, 16]


# -- the conformer -----------------------------------------------------------------------------


def test_param_tree_is_the_official_one():
    ours = jax.tree_util.tree_map(lambda x: x.shape, audio.abstract_params(CONFIG))
    saved = jax.tree_util.tree_map(lambda x: x.shape, golden_params()["audio_encoder"])
    assert ours == saved


def test_tower_matches_hf_on_valid_frames():
    g = golden()
    soft, valid = our_tower()
    np.testing.assert_array_equal(valid, g["tower_mask"])
    diff = np.abs(soft - g["tower"])[valid]
    assert diff.max() <= ATOL, diff.max()  # measured 1.8e-6 (outputs up to 2.8)
    assert (soft[~valid] == 0).all()  # HF leaves garbage there; we zero it


def test_projection_matches_hf():
    g = golden()
    soft, valid = our_tower()
    w = golden_params()["embedder"]["audio_input_projection"]["w"]
    projected = np.asarray(audio.project_audio(soft, w))
    assert projected.shape == (2, 25, 64)
    assert np.abs(projected - g["projected"])[valid].max() <= ATOL  # measured 1.7e-6


def test_clip_bounds_are_exercised_by_the_golden():
    """With the learned bounds opened to +-inf the output moves: the golden tests clipping."""
    flat = flatten_params(golden_params()["audio_encoder"])
    opened = {
        k: (np.float32(-np.inf) if k.endswith("_min") else np.float32(np.inf))
        if "/clip_" in k
        else v
        for k, v in flat.items()
    }
    g = golden()
    soft, valid = audio.encode_audio(
        CONFIG, unflatten_params(opened), g["features"], g["features_mask"]
    )
    assert np.abs(np.asarray(soft) - g["tower"])[valid].max() > 1e-2


def test_attention_window_is_hfs():
    """HF's blocked mask equals our rule: frame q sees frame k iff 0 <= q - k < window and k
    is valid (block b, row i is frame q = 12 b + i; context column j is k = 12 b - 12 + j)."""
    g = golden()
    hf = g["attention_mask_5d"][:, 0]  # [B, blocks, 12, 24]
    _, blocks, chunk, context = hf.shape
    valid = g["tower_mask"]  # [B, T]
    t = valid.shape[1]
    q = (np.arange(blocks) * chunk)[:, None, None] + np.arange(chunk)[None, :, None]
    k = (np.arange(blocks) * chunk - chunk)[:, None, None] + np.arange(context)[None, None, :]
    near = (q - k >= 0) & (q - k < CONFIG.attention_window) & (q < t) & (k >= 0) & (k < t)
    expected = near[None] & valid[:, np.clip(k, 0, t - 1)]  # [B, blocks, 12, 24]
    np.testing.assert_array_equal(hf, expected)
    assert CONFIG.attention_window == 12  # the reference library would allow 13


def test_bucket_padding_changes_nothing():
    g = golden()
    params = golden_params()["audio_encoder"]
    extra = 300 - g["features"].shape[1]  # 99 frames -> bucket 128; 300 -> bucket 512
    features = np.pad(g["features"], ((0, 0), (0, extra), (0, 0)))
    mask = np.pad(g["features_mask"], ((0, 0), (0, extra)))
    soft, valid = audio.encode_audio(CONFIG, params, features, mask)
    base, base_valid = our_tower()
    assert soft.shape == (2, 75, 48) and np.asarray(valid).sum() == base_valid.sum()
    # Another bucket is another XLA program: equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(soft)[:, :25], base, atol=1e-5)


def test_frame_buckets():
    assert [audio.frame_bucket(t) for t in (1, 128, 129, 600, 1024, 1025, 3000)] == [
        128, 128, 256, 1024, 1024, 2048, 3072,
    ]  # fmt: skip


def test_file_to_soft_tokens_end_to_end():
    samples = media.load_audio(ROOT / "assets" / "examples" / "question_math.wav")
    features, mask = audio_input.log_mel_features(samples)
    params = audio.init_params(CONFIG, seed=1)
    soft, valid = audio.encode_audio(CONFIG, params, features[None], mask[None])
    embedder = audio.init_audio_embedder(CONFIG, 64, seed=2)
    tokens = audio.project_audio(soft[0][valid[0]], embedder["audio_input_projection"]["w"])
    assert tokens.shape == (audio_input.num_audio_tokens(samples.size), 64)
    assert np.isfinite(np.asarray(tokens)).all()


def test_real_e2b_audio_tree_by_eval_shape():
    config = presets.gemma4_audio()
    flat = flatten_params(audio.abstract_params(config))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 304_825_088
    layer = "conformer/stacked_layers_11"
    expected = {
        "feature/subsampling_0/kernel": (3, 3, 1, 128),
        "feature/norm_0/scale": (128,),
        "feature/subsampling_1/kernel": (3, 3, 128, 32),
        "feature/norm_1/scale": (32,),
        "feature/input_proj/kernel": (32, 32, 1024),
        f"{layer}/fflayer_start/ffn_layer1/kernel": (1024, 4096),
        f"{layer}/fflayer_end/ffn_layer2/kernel": (4096, 1024),
        f"{layer}/fflayer_end/post_layer_norm/scale": (1024,),
        f"{layer}/trans_atten/self_atten/query/kernel": (1024, 1024),
        f"{layer}/trans_atten/self_atten/per_dim_scale": (128,),
        f"{layer}/trans_atten/self_atten/relative_position_embedding/pos_proj/kernel": (
            1024, 8, 128,
        ),
        f"{layer}/trans_atten/post/kernel": (8, 128, 1024),
        f"{layer}/trans_atten/post/clip_output_max": (),
        f"{layer}/lconv/linear_start/kernel": (1024, 2048),
        f"{layer}/lconv/depthwise_conv1d/kernel": (5, 1, 1024),
        f"{layer}/lconv/conv_norm/scale": (1024,),
        f"{layer}/final_ln/scale": (1024,),
        "output_projection/kernel": (1024, 1536),
        "output_projection/bias": (1536,),
    }  # fmt: skip
    assert {k: flat[k].shape for k in expected} == expected
    assert "conformer/stacked_layers_12/final_ln/scale" not in flat
    # 10 clipped linears per layer: 2 FFNs x 2, query/key/value/post, linear_start/end.
    assert sum(k.count("/clip_") for k in flat) == 12 * 10 * 4
    # The forward pass traces on the real tree: 30 s (2999 frames) -> 750 soft tokens.
    forward = audio.AudioEncoder(config).apply
    soft, valid = jax.eval_shape(
        lambda p, f, m: forward({"params": p}, f, m),
        audio.abstract_params(config),
        jax.ShapeDtypeStruct((1, 2999, 128), np.float32),
        jax.ShapeDtypeStruct((1, 2999), bool),
    )
    assert soft.shape == (1, 750, 1536) and valid.shape == (1, 750)
    assert audio.audio_embedder_shapes(config, 1536) == {
        "embedder/audio_input_projection/w": (1536, 1536)
    }


def test_unclipped_config_has_no_clip_leaves():
    config = dataclasses.replace(CONFIG, use_clipped_linears=False)
    assert not any("/clip_" in k for k in flatten_params(audio.abstract_params(config)))


def test_embedder_init_matches_shapes():
    embedder = audio.init_audio_embedder(CONFIG, 64)
    shapes = audio.audio_embedder_shapes(CONFIG, 64)
    assert {f"embedder/{k}": v.shape for k, v in flatten_params(embedder).items()} == shapes


@pytest.mark.reference
@pytest.mark.skipif(not REF_PYTHON.exists(), reason="reference venv missing")
def test_golden_still_comes_out_of_transformers(tmp_path):
    out = tmp_path / "audio.npz"
    subprocess.run(
        [str(REF_PYTHON), "scripts/make_golden_gemma4_audio.py", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    with np.load(out) as fresh:
        for key in fresh.files:
            if key.startswith("meta/"):
                continue
            stored = golden()[key]
            if np.issubdtype(stored.dtype, np.floating):  # torch's fp32 sums: CPU-dependent
                np.testing.assert_allclose(
                    fresh[key], stored, rtol=0, atol=rerun_atol(stored), err_msg=key
                )
            else:
                np.testing.assert_array_equal(fresh[key], stored, err_msg=key)
