"""Gemma 4 decoder: HF parity (goldens), official trees and counts, cache and mask invariants.

`tests/golden/tiny-gemma4*.npz` come from `scripts/make_golden_gemma4.py` (transformers'
`Gemma4ForCausalLM`, float32). Measured max |ours - HF| on CPU: text 5.2e-5 / 2.0e-5, with
soft tokens 4.7e-5 / 2.1e-5 (tiny-gemma4 / tiny-gemma4-moe). That is float32 noise: on
tiny-gemma4 HF float32 is 2.9e-5 away from HF float64, and ours 2.5e-5.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LOGITS_ATOL, rerun_atol

from gemma_app.ckpt.hf_map import flatten_params, unflatten_params
from gemma_app.nn import moe, presets
from gemma_app.nn.config import AttentionType
from gemma_app.nn.transformer import (
    Transformer,
    abstract_params,
    forward,
    init_cache,
    init_params,
)
from gemma_app.text.sampler import Sampler

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_PRESETS = ("tiny-gemma4", "tiny-gemma4-moe")
L, G = AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL

# Spec §1.1 "text" counts. They include the text-side projections of the encoders that live
# under `embedder/` (`mm_input_projection/w` (d_v, D), E2B/E4B also `audio_input_projection/w`
# (1536, D)), which are not part of the decoder's own tree (gemma_app.nn.vision owns them).
SPEC_TEXT_COUNTS = {
    "gemma4-e2b": 4_650_988_835,
    "gemma4-e4b": 7_523_967_274,
    "gemma4-31b": 30_703_538_492,
    "gemma4-26b-a4b": 25_236_385_822,
}


def load_golden(preset):
    with np.load(GOLDEN_DIR / f"{preset}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    assert str(arrays["preset"]) == preset
    flat = {
        k.removeprefix("params/"): v.astype(np.float32)
        for k, v in arrays.items()
        if k.startswith("params/")
    }
    return presets.TINY_PRESETS[preset](), unflatten_params(flat), arrays


def apply(config, params, tokens, positions=None, cache=None, **mm):
    """`Transformer(config).apply` under one jit per config (mm: soft-token keyword args)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return _jitted_apply(config)(params, jnp.asarray(tokens), positions, cache, mm)


@functools.cache
def _jitted_apply(config):
    model = Transformer(config)
    return jax.jit(lambda p, t, pos, c, mm: model.apply({"params": p}, t, pos, c, **mm))


# --- parity with transformers -----------------------------------------------------------


@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_text_logits_match_transformers(preset):
    config, params, arrays = load_golden(preset)
    logits = np.asarray(forward(config, params, arrays["tokens"]))
    assert logits.shape == arrays["logits"].shape
    diff = np.abs(logits - arrays["logits"]).max()
    assert diff <= LOGITS_ATOL, f"{preset}: max |ours - HF| = {diff:.3g}"


@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_soft_token_logits_match_transformers(preset):
    """Image (and audio) soft tokens: embedding swap, PLE pad id, HF's vision masks."""
    config, params, arrays = load_golden(preset)
    segments = arrays["mm/segments"]
    assert (segments > 0).any() and ((segments < 0).any() or config.audio is None)
    logits, _ = apply(
        config, params, arrays["mm/tokens"], mm_embeddings=jnp.asarray(arrays["mm/embeddings"]),
        segments=jnp.asarray(segments),
    )  # fmt: skip
    diff = np.abs(np.asarray(logits) - arrays["mm/logits"]).max()
    assert diff <= LOGITS_ATOL, f"{preset}: max |ours - HF| = {diff:.3g}"


def test_goldens_are_small_and_exercise_every_feature():
    for preset in GOLDEN_PRESETS:
        assert (GOLDEN_DIR / f"{preset}.npz").stat().st_size < 1_000_000
        config, params, arrays = load_golden(preset)
        assert arrays["tokens"].shape == (2, 20) and config.sliding_window_size < 20
        flat = flatten_params(params)
        scales = [v for p, v in flat.items() if p.endswith(("scale", "skip_scale"))]
        assert all(np.any(s != 1.0) for s in scales), "scales must be random, not ones"
    e_style, moe_style = (presets.TINY_PRESETS[p]() for p in GOLDEN_PRESETS)
    assert e_style.per_layer_input_dim and e_style.num_kv_shared_layers
    assert e_style.shared_layer_hidden_dim and e_style.global_head_dim != e_style.head_dim
    assert moe_style.moe and moe_style.k_eq_v and moe_style.bidirectional_vision
    assert moe_style.num_global_kv_heads != moe_style.num_kv_heads


# --- official trees and parameter counts --------------------------------------------------


def official_tree(cfg) -> dict[str, tuple[int, ...]]:
    """Spec §2.1's Gemma 4 tree, written out independently of the model code."""
    d, n, v, p = cfg.embed_dim, cfg.num_heads, cfg.num_embed, cfg.per_layer_input_dim
    n_l = cfg.num_layers
    tree = {"embedder/input_embedding": (v, d), "final_norm/scale": (d,)}
    if p:
        tree["embedder/per_layer_embeddings"] = (v, n_l, p)
        tree["embedder/per_layer_model_projection/w"] = (d, n_l, p)
        tree["embedder/per_layer_projection_norm/scale"] = (p,)
    first_shared = n_l - cfg.num_kv_shared_layers
    for i, t in enumerate(cfg.attention_types):
        pre = f"layer_{i}/"
        h = 512 if t == G else 256
        k = (cfg.num_global_kv_heads or cfg.num_kv_heads) if t == G else cfg.num_kv_heads
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            tree[pre + norm + "/scale"] = (d,)
        tree[pre + "skip_scale"] = (1,)
        tree[pre + "attn/q_einsum/w"] = (n, d, h)
        tree[pre + "attn/attn_vec_einsum/w"] = (n, h, d)
        tree[pre + "attn/query_norm/scale"] = (h,)
        tree[pre + "attn/key_norm/scale"] = (h,)
        if cfg.k_eq_v and t == G:
            tree[pre + "attn/k_einsum/w"] = (k, d, h)
        else:
            tree[pre + "attn/kv_einsum/w"] = (2, k, d, h)
        if cfg.moe:
            e, fe = cfg.moe.num_experts, cfg.moe.expert_hidden_dim
            tree[pre + "mlp/gating_einsum/w"] = (e, 2, fe, d)
            tree[pre + "mlp/linear/w"] = (e, fe, d)
            tree[pre + "mlp/router_logits/w"] = (d, e)
            tree[pre + "mlp/per_expert_scale"] = (e,)
            tree[pre + "mlp/router_scale"] = (d,)
            tree[pre + "mlp2/gating_einsum"] = (2, cfg.hidden_dim, d)
            tree[pre + "mlp2/linear"] = (cfg.hidden_dim, d)
            for norm in ("pre_ffw2_norm", "post_ffw1_norm", "post_ffw2_norm"):
                tree[pre + norm + "/scale"] = (d,)
        else:
            f = (
                2 * cfg.hidden_dim
                if cfg.name == "gemma4-e2b" and i >= first_shared
                else cfg.hidden_dim
            )
            tree[pre + "mlp/gating_einsum"] = (2, f, d)
            tree[pre + "mlp/linear"] = (f, d)
        if p:
            tree[pre + "per_layer_input_gate/w"] = (d, p)
            tree[pre + "per_layer_projection/w"] = (p, d)
            tree[pre + "post_per_layer_input_norm/scale"] = (d,)
    return tree


@pytest.mark.parametrize("name", sorted(SPEC_TEXT_COUNTS))
def test_preset_tree_and_text_param_count(name):
    cfg = presets.get_preset(name)
    shapes = {p: tuple(s.shape) for p, s in flatten_params(abstract_params(cfg)).items()}
    assert shapes == official_tree(cfg)
    projections = cfg.vision.width * cfg.embed_dim
    if cfg.audio is not None:
        projections += cfg.audio.output_dim * cfg.embed_dim
    count = sum(int(np.prod(s)) for s in shapes.values())
    assert count + projections == SPEC_TEXT_COUNTS[name]


def test_preset_constants():
    e2b, e4b = presets.gemma4_e2b(), presets.gemma4_e4b()
    assert [i for i, t in enumerate(e2b.attention_types) if t == G][:3] == [4, 9, 14]
    assert {e2b.kv_source(i) for i in range(15, 35)} == {13, 14}
    assert {e4b.kv_source(i) for i in range(24, 42)} == {22, 23}
    assert e2b.layer_hidden_dim(14) == 6144 and e2b.layer_hidden_dim(15) == 12_288
    for cfg in (e2b, e4b, presets.gemma4_31b(), presets.gemma4_26b_a4b()):
        assert cfg.family == 4 and cfg.final_logit_softcap == 30.0 and cfg.query_scale == 1.0
        assert cfg.attention_types[-1] == G and cfg.layer_head_dim(G) == 512
        assert cfg.bidirectional_vision == (cfg.audio is None)
    with pytest.raises(ValueError, match="num_global_kv_heads"):
        dataclasses.replace(presets.tiny_gemma4_moe(), num_global_kv_heads=3)
    with pytest.raises(ValueError, match="KV-shared"):
        dataclasses.replace(presets.tiny_gemma4(), num_kv_shared_layers=5)


# --- cache invariants ---------------------------------------------------------------------


def test_cache_has_per_layer_shapes_and_no_entry_for_shared_layers():
    cfg = presets.tiny_gemma4()
    cache = init_cache(cfg, batch=2, cache_length=10)
    shared = [i for i in range(cfg.num_layers) if cfg.kv_source(i) != i]
    assert shared == [5, 6, 7]
    assert sorted(cache) == sorted([f"layer_{i}" for i in range(5)] + ["segments"])
    assert cache["layer_0"]["k"].shape == (2, 256, 2, 16)
    assert cache["layer_3"]["v"].shape == (2, 256, 2, 32)  # global: wider heads
    moe_cache = init_cache(presets.tiny_gemma4_moe(), batch=1, cache_length=10)
    assert moe_cache["layer_5"]["k"].shape == (1, 256, 1, 32)  # fewer global KV heads


def _prefill_then_decode(cfg, params, tokens, chunks, **mm):
    """Feeds `tokens` [B, T] in prompt chunks, then one token at a time; [B, T, V] logits."""
    b, t = tokens.shape
    cache = init_cache(cfg, batch=b, cache_length=t)
    outs, start = [], 0
    for end in [*chunks, *range(chunks[-1] + 1, t + 1)]:
        pos = jnp.broadcast_to(jnp.arange(start, end), (b, end - start))
        part = {k: v[:, start:end] for k, v in mm.items()}
        logits, cache = apply(cfg, params, tokens[:, start:end], pos, cache, **part)
        outs.append(np.asarray(logits))
        start = end
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_chunked_prefill_and_decode_match_full_forward(preset):
    """Across two cache chunks (256 slots): KV sharing must read the source's cache."""
    cfg, params, _ = load_golden(preset)
    tokens = np.random.default_rng(0).integers(0, cfg.num_embed, (2, 262), dtype=np.int32)
    full = np.asarray(forward(cfg, params, tokens))
    # Two equal prefill chunks (one compile) end past slot 256; then 4 decode steps.
    cached = _prefill_then_decode(cfg, params, tokens, chunks=[129, 258])
    np.testing.assert_allclose(cached, full, atol=2e-4)


@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_cached_soft_tokens_match_full_forward(preset):
    """Soft tokens through the cache in two prefill calls (no image block is split, as the
    sampler guarantees): the second call's image sees the first call's tokens via the cache."""
    cfg, params, arrays = load_golden(preset)
    mm = {
        "mm_embeddings": jnp.asarray(arrays["mm/embeddings"]),
        "segments": jnp.asarray(arrays["mm/segments"]),
    }
    cached = _prefill_then_decode(cfg, params, arrays["mm/tokens"], chunks=[10, 20], **mm)
    np.testing.assert_allclose(cached, arrays["mm/logits"], atol=LOGITS_ATOL)


# --- soft tokens and masks ----------------------------------------------------------------


def test_soft_tokens_replace_embeddings_and_ignore_their_ids():
    cfg, params, arrays = load_golden("tiny-gemma4")
    tokens, seg = arrays["mm/tokens"], jnp.asarray(arrays["mm/segments"])
    emb = jnp.asarray(arrays["mm/embeddings"])
    base, _ = apply(cfg, params, tokens, mm_embeddings=emb, segments=seg)
    other_ids = np.where(arrays["mm/segments"] != 0, 123, tokens)
    same, _ = apply(cfg, params, other_ids, mm_embeddings=emb, segments=seg)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(base))
    for sign in (1, -1):  # an image token, then an audio token, changes what follows
        t = int(np.flatnonzero(np.sign(arrays["mm/segments"][0]) == sign)[0])
        moved, _ = apply(cfg, params, tokens, mm_embeddings=emb.at[0, t].add(1.0), segments=seg)
        delta = np.abs(np.asarray(moved - base))[0].max(axis=-1)
        assert delta[:t].max() == 0 and delta[t:].min() > 1e-3
    text, _ = apply(cfg, params, tokens)  # without segments the placeholder ids are text
    assert np.abs(np.asarray(text - base)).max() > 1e-2


def _image_sees_the_future(cfg, params) -> bool:
    """Does the first token of an image react to a later token of the same image?"""
    tokens = np.full((1, 12), 5, np.int32)
    seg = np.zeros((1, 12), np.int32)
    seg[0, 2:8] = 1
    emb = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, cfg.embed_dim)), jnp.float32)
    base, _ = apply(cfg, params, tokens, mm_embeddings=emb, segments=jnp.asarray(seg))
    moved, _ = apply(
        cfg, params, tokens, mm_embeddings=emb.at[0, 6].add(1.0), segments=jnp.asarray(seg)
    )
    return bool(np.abs(np.asarray(moved - base))[0, 2].max() > 1e-4)


def test_bidirectional_image_attention_only_on_local_layers():
    cfg, params, _ = load_golden("tiny-gemma4-moe")
    assert _image_sees_the_future(cfg, params)
    causal = dataclasses.replace(cfg, bidirectional_vision=False)
    assert not _image_sees_the_future(causal, params)
    # Global layers stay causal: a model of global layers only never looks ahead.
    all_global = dataclasses.replace(cfg, attention_types=(G, G))
    assert not _image_sees_the_future(all_global, init_params(all_global, seed=2))
    # (E2B/E4B-style models are causal everywhere: their golden soft-token logits match HF.)


# --- mixture of experts -------------------------------------------------------------------


def _dense_experts(x, h, p, k):
    """Every expert on every token, weighted by the routing: the slow, obvious reference."""
    weights, experts = moe.route(
        x, p["router_logits"]["w"], p["router_scale"], p["per_expert_scale"], k
    )
    gates = jnp.einsum("md,esfd->mesf", h, p["gating_einsum"]["w"])
    hidden = jax.nn.gelu(gates[:, :, 0], approximate=True) * gates[:, :, 1]
    out = jnp.einsum("mef,efd->med", hidden, p["linear"]["w"])  # [M, E, D]
    mix = jnp.zeros(out.shape[:2]).at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
    return jnp.einsum("med,me->md", out, mix)


@pytest.mark.parametrize("tokens", [1, 3, 40])  # gathered (decode) and grouped (prefill) paths
def test_moe_matches_dense_reference(tokens):
    cfg, params, _ = load_golden("tiny-gemma4-moe")
    params = params["layer_0"]["mlp"]
    rng = np.random.default_rng(tokens)
    x = jnp.asarray(rng.standard_normal((1, tokens, cfg.embed_dim)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((1, tokens, cfg.embed_dim)), jnp.float32)
    out = moe.MoE(cfg).apply({"params": params}, x, h)
    expected = _dense_experts(x[0], h[0], params, cfg.moe.top_k)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(expected), atol=1e-5)


def test_router_weights():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 6)), jnp.float32)
    scale = jnp.full((6,), 2.0)
    weights, experts = moe.route(x, w, jnp.ones(8), scale, 3)
    # renormalised to 1, then times per_expert_scale
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 2.0, rtol=1e-6)
    xn = np.asarray(x) / np.sqrt(np.mean(np.square(np.asarray(x)), -1, keepdims=True) + 1e-6)
    logits = xn / np.sqrt(8) @ np.asarray(w)
    np.testing.assert_array_equal(np.asarray(experts), np.argsort(-logits, axis=-1)[:, :3])


# --- the sampler on Gemma 4 caches ----------------------------------------------------------


def test_sampler_greedy_matches_full_forward():
    """Bucketed prefill + jitted decode over a cache with KV-shared layers (no entry of their
    own) give the greedy continuation of the uncached model."""
    cfg, params, _ = load_golden("tiny-gemma4")
    sampler = Sampler(
        model=Transformer(cfg), params=params, cache_length=64, max_out_length=8, pad_length=(8,)
    )
    prompts = [[2, 17, 33, 40, 5, 9, 11, 60, 61, 62], [2, 8, 100, 31, 90]]
    result = sampler.generate_all(sampler.prefill(prompts, rng=0), max_new_tokens=6)
    for prompt, out in zip(prompts, result.tokens, strict=True):
        assert len(out) == 6
        logits = np.asarray(forward(cfg, params, np.array([prompt + out[:-1]])))[0]
        np.testing.assert_array_equal(logits[len(prompt) - 1 :].argmax(-1), out)


def test_sampler_prefill_with_soft_tokens():
    """Prefill chunks of 8 move back so the 6-token image is written in one call."""
    cfg, params, arrays = load_golden("tiny-gemma4-moe")
    sampler = Sampler(
        model=Transformer(cfg), params=params, cache_length=64, max_out_length=4, pad_length=(8,)
    )
    for row in range(2):
        state = sampler.prefill(
            [arrays["mm/tokens"][row]], segments=[arrays["mm/segments"][row]],
            mm_embeddings=[arrays["mm/embeddings"][row]], rng=0,
        )  # fmt: skip
        assert int(state.token[0]) == int(arrays["mm/logits"][row, -1].argmax())


# --- the goldens come from transformers (reference env only) ------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_goldens_reproduce_with_transformers(preset):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)  # as the script: the same reductions
    script = GOLDEN_DIR.parents[1] / "scripts" / "make_golden_gemma4.py"
    spec = importlib.util.spec_from_file_location("make_golden_gemma4", script)
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    config, params, arrays = load_golden(preset)
    model = make_golden.build_hf_model(config, params)  # asserts every HF weight is mapped
    logits, _ = make_golden.hf_forward(model, arrays["tokens"])
    np.testing.assert_allclose(logits, arrays["logits"], rtol=0, atol=rerun_atol(arrays["logits"]))
    mm = make_golden.hf_mm_forward(
        model, arrays["mm/tokens"], arrays["mm/segments"], arrays["mm/embeddings"]
    )
    np.testing.assert_allclose(
        mm, arrays["mm/logits"], rtol=0, atol=rerun_atol(arrays["mm/logits"])
    )
