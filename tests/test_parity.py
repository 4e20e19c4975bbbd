"""Parity with Hugging Face `transformers` through golden files, and the HF key map.

`tests/golden/<preset>.npz` hold HF logits of the tiny presets on random weights (made by
`scripts/make_golden.py`). The default run compares our forward against them without torch;
the `reference` tests (torch + transformers, see requirements-reference.txt) prove the goldens
still come out of transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import LOGITS_ATOL

from gemma_app.ckpt import hf_map
from gemma_app.ckpt.hf_map import (
    CheckpointMismatchError,
    config_from_hf,
    flatten_params,
    hf_param_shapes,
    hf_to_params,
    params_to_hf,
    unflatten_params,
)
from gemma_app.nn import presets, transformer
from gemma_app.nn.config import AttentionType

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
GOLDEN_PRESETS = ("tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2", "tiny-gemma3")
L, G = AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL


def load_golden(preset: str):
    """(config, params, tokens, logits, npz) of one golden file."""
    with np.load(GOLDEN_DIR / f"{preset}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    assert str(arrays["preset"]) == preset
    flat = {k.removeprefix("params/"): v for k, v in arrays.items() if k.startswith("params/")}
    config = presets.TINY_PRESETS[preset]()
    return config, unflatten_params(flat), arrays["tokens"], arrays["logits"], arrays


def random_state_dict(config, seed=0, prefix="model."):
    rng = np.random.default_rng(seed)
    shapes = hf_param_shapes(config, prefix)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


# --- (a) our model vs the goldens (default run, no torch) --------------------------------


@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_forward_matches_transformers_logits(preset):
    config, params, tokens, expected, _ = load_golden(preset)
    logits = np.asarray(transformer.forward(config, params, tokens))
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    diff = np.abs(logits - expected).max()
    assert diff <= LOGITS_ATOL, f"{preset}: max |ours - HF| = {diff:.3g}"


def test_goldens_are_small_and_complete():
    text_goldens = [
        p.stem
        for p in GOLDEN_DIR.glob("*.npz")
        if not p.stem.endswith("-vision") and "gemma4" not in p.stem  # test_gemma4.py
    ]
    assert sorted(text_goldens) == sorted(GOLDEN_PRESETS)
    for preset in GOLDEN_PRESETS:
        assert (GOLDEN_DIR / f"{preset}.npz").stat().st_size < 1_000_000
        config, params, tokens, logits, arrays = load_golden(preset)
        assert tokens.shape == (2, 20) and logits.shape == (2, 20, config.num_embed)
        assert max(config.sliding_window_size or 0, 1) < tokens.shape[1]
        scales = [v for p, v in flatten_params(params).items() if p.endswith("/scale")]
        assert all(np.abs(s).min() > 0 for s in scales), "norm scales must be random, not zero"
        assert f"hf_hidden/layer_{config.num_layers - 1}" in arrays


# --- (b) the goldens come from transformers (reference env only) ------------------------


def _golden_script():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "scripts/make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.reference
@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_goldens_reproduce_with_transformers(preset):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    make_golden = _golden_script()
    config, params, tokens, expected, arrays = load_golden(preset)

    model = make_golden.build_hf_model(config, params)
    logits, hidden = make_golden.hf_forward(model, tokens)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    for name, value in hidden.items():
        np.testing.assert_allclose(value, arrays[f"hf_hidden/{name}"], rtol=0, atol=1e-5)

    # HF's own state dict (tied lm_head included) maps back to exactly our tree.
    hf_state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    _assert_trees_equal(hf_to_params(hf_state, config), params)
    _assert_trees_equal(hf_to_params(params_to_hf(params, config), config), params)


# --- (c) the key map and config.json (default run) --------------------------------------


def _assert_trees_equal(a, b):
    flat_a, flat_b = flatten_params(a), flatten_params(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=path)


@pytest.mark.parametrize("preset", [*GOLDEN_PRESETS, "demo"])
def test_round_trip(preset):
    config = presets.get_preset(preset)
    state_dict = random_state_dict(config)
    params = hf_to_params(state_dict, config)
    back = params_to_hf(params, config)
    assert back.keys() == state_dict.keys()
    for name, value in state_dict.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    _assert_trees_equal(hf_to_params(back, config), params)


@pytest.mark.parametrize(
    "name", [n for n in [*presets.PRESETS, *presets.TINY_PRESETS] if "gemma4" not in n]
)  # hf_map has no Gemma 4 rules yet
def test_key_map_covers_the_model_tree(name):
    """`hf_map`'s tree is exactly the one our model initialises (shapes via eval_shape)."""
    config = presets.get_preset(name)
    model_tree = flatten_params(transformer.abstract_params(config))
    assert {p: tuple(s.shape) for p, s in model_tree.items()} == hf_map.param_shapes(config)


def test_layouts_follow_hf_row_order():
    """HF rows are head-major (`n * H + h`); gate/up stack on axis 0; Gemma 1 norm naming."""
    config = presets.tiny_gemma1_mqa()  # N=4, K=1, H=16, D=64, F=128, (2, D, F) gating
    n, k, h, d, f = 4, 1, 16, 64, 128
    state_dict = random_state_dict(config)
    q = np.arange(n * h * d, dtype=np.float32).reshape(n * h, d)
    o = np.arange(d * n * h, dtype=np.float32).reshape(d, n * h)
    state_dict["model.layers.0.self_attn.q_proj.weight"] = q
    state_dict["model.layers.0.self_attn.o_proj.weight"] = o
    layer = hf_to_params(state_dict, config)["layer_0"]
    attn = layer["attn"]
    assert attn["q_einsum"]["w"][2, 5, 7] == q[2 * h + 7, 5]
    assert attn["attn_vec_einsum"]["w"][3, 9, 11] == o[11, 3 * h + 9]
    kv = attn["kv_einsum"]["w"]
    assert kv.shape == (2, k, d, h)
    np.testing.assert_array_equal(kv[1, 0], state_dict["model.layers.0.self_attn.v_proj.weight"].T)
    gating = layer["mlp"]["gating_einsum"]
    assert gating.shape == (2, d, f)
    np.testing.assert_array_equal(gating[0], state_dict["model.layers.0.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(gating[1], state_dict["model.layers.0.mlp.up_proj.weight"].T)
    np.testing.assert_array_equal(
        layer["pre_ffw_norm"]["scale"], state_dict["model.layers.0.post_attention_layernorm.weight"]
    )
    assert "post_attention_norm" not in layer and "post_ffw_norm" not in layer

    mha = hf_to_params(random_state_dict(presets.tiny_gemma1_mha()), presets.tiny_gemma1_mha())
    assert mha["layer_0"]["attn"]["qkv_einsum"]["w"].shape == (3, 4, d, h)
    g3 = presets.tiny_gemma3()
    g3_sd = random_state_dict(g3)
    g3_layer = hf_to_params(g3_sd, g3)["layer_1"]
    np.testing.assert_array_equal(
        g3_layer["mlp"]["gating_einsum"][1], g3_sd["model.layers.1.mlp.up_proj.weight"]
    )
    np.testing.assert_array_equal(
        g3_layer["pre_ffw_norm"]["scale"], g3_sd["model.layers.1.pre_feedforward_layernorm.weight"]
    )
    np.testing.assert_array_equal(
        g3_layer["attn"]["_key_norm"]["scale"], g3_sd["model.layers.1.self_attn.k_norm.weight"]
    )


def test_multimodal_prefixes_vision_keys_and_tied_head():
    config = presets.tiny_gemma3()
    expected = hf_to_params(random_state_dict(config), config)
    for prefix in ("model.language_model.", "language_model.model."):
        state_dict = random_state_dict(config, prefix=prefix)
        state_dict["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(8)
        state_dict["multi_modal_projector.mm_input_projection_weight"] = np.ones((8, 64))
        state_dict["lm_head.weight"] = state_dict[f"{prefix}embed_tokens.weight"].copy()
        _assert_trees_equal(hf_to_params(state_dict, config), expected)
    assert next(iter(params_to_hf(expected, config, prefix="model.language_model."))).startswith(
        "model.language_model."
    )


def test_mismatches_are_listed_together():
    config = presets.tiny_gemma2()
    state_dict = random_state_dict(config)
    del state_dict["model.layers.1.self_attn.k_proj.weight"]
    state_dict["model.layers.2.mlp.up_proj.weight"] = np.zeros((128, 65), np.float32)
    state_dict["model.layers.4.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    state_dict["model.layers.0.self_attn.q_norm.weight"] = np.zeros(16, np.float32)
    state_dict["lm_head.weight"] = np.zeros((256, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        hf_to_params(state_dict, config)
    message = str(info.value)
    assert len(info.value.problems) == 5, message
    for needle in (
        "missing model.layers.1.self_attn.k_proj.weight (expected (32, 64))",
        "model.layers.2.mlp.up_proj.weight: shape (128, 65), expected (128, 64)",
        "unexpected model.layers.4.mlp.up_proj.weight (128, 64)",
        "unexpected model.layers.0.self_attn.q_norm.weight (16,)",
        "lm_head.weight differs from embed_tokens",
    ):
        assert needle in message

    params = flatten_params(hf_to_params(random_state_dict(config), config))
    del params["layer_3/post_ffw_norm/scale"]
    params["layer_0/attn/q_einsum/w"] = np.zeros((4, 64, 8), np.float32)
    params["layer_0/attn/_query_norm/scale"] = np.zeros(16, np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        params_to_hf(unflatten_params(params), config)
    assert len(info.value.problems) == 3, str(info.value)
    for needle in (
        "missing layer_3/post_ffw_norm/scale",
        "layer_0/attn/q_einsum/w: shape (4, 64, 8)",
    ):
        assert needle in str(info.value)
    assert "unexpected layer_0/attn/_query_norm/scale (16,)" in str(info.value)

    with pytest.raises(CheckpointMismatchError, match="embed_tokens"):
        hf_to_params({"transformer.wte.weight": np.zeros(3)}, config)


# Published config.json files (values from the Hugging Face Hub repos, transformers-written).
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 16384,
    "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000,
}  # fmt: skip
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000,
}  # fmt: skip
GEMMA3_1B_IT = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}  # fmt: skip
GEMMA3_4B_IT = {  # sparse text_config: the rest are transformers' class defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
        "patch_size": 14, "vision_use_head": False,
    },
}  # fmt: skip


@pytest.mark.parametrize(
    ("config_json", "preset", "vocab"),
    [
        (GEMMA_2B, presets.gemma1_2b, 256_000),
        (GEMMA2_2B, presets.gemma2_2b, 256_000),
        (GEMMA3_1B_IT, presets.gemma3_1b, 262_144),
        (GEMMA3_4B_IT, presets.gemma3_4b, 262_208),
    ],
    ids=["gemma-2b", "gemma-2-2b", "gemma-3-1b-it", "gemma-3-4b-it"],
)
def test_config_from_hf_matches_presets(config_json, preset, vocab):
    """HF configs give our spec-derived presets; only the name and HF's vocab rows differ."""
    config = config_from_hf(config_json)
    assert config == dataclasses.replace(preset(), name=f"hf-gemma{config.family}", num_embed=vocab)


def test_config_from_hf_newer_formats_and_errors():
    # transformers >= 5 writes `layer_types` and per-layer-type `rope_parameters`.
    new_style = {
        **{k: v for k, v in GEMMA3_1B_IT.items() if not k.startswith("rope")},
        "layer_types": ["sliding_attention", "full_attention"] * 13,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
        },
    }
    config = config_from_hf(new_style)
    assert config.attention_types == (L, G) * 13
    assert (config.local_base_frequency, config.local_scale_factor) == (10_000, 1.0)
    assert (config.global_base_frequency, config.global_scale_factor) == (500_000, 4.0)
    assert config_from_hf({**GEMMA_2B, "hidden_act": "gelu_pytorch_tanh"}) == config_from_hf(
        GEMMA_2B
    )
    g2 = config_from_hf(
        {**GEMMA2_2B, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    )
    assert g2.attention_types[:2] == (L, G) and g2.query_pre_attn_scalar == 256
    assert config_from_hf({"model_type": "gemma2"}).attention_types == (L, G) * 13  # all defaults
    assert config_from_hf(GEMMA2_2B, transpose_gating_einsum=True).transpose_gating_einsum

    with pytest.raises(ValueError, match="Not a Gemma"):
        config_from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="activation 'silu'.*attention_bias.*tie_word_embeddings"):
        config_from_hf(
            {**GEMMA_2B, "hidden_act": "silu", "attention_bias": True, "tie_word_embeddings": False}
        )
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_hf({**GEMMA2_2B, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_config_from_hf_then_load():
    """A checkpoint mapped with its own config fits our model's tree (real-size shapes)."""
    config = config_from_hf(GEMMA3_4B_IT)
    model_tree = jax.tree.map(lambda s: tuple(s.shape), transformer.abstract_params(config))
    assert flatten_params(model_tree) == hf_map.param_shapes(config)
