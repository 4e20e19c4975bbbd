"""The decoder: parameter trees of every preset, golden RMSNorm/RoPE values, cache invariants."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gemma_app import kernels
from gemma_app.nn import presets
from gemma_app.nn.attention import CACHE_CHUNK, attention_mask
from gemma_app.nn.layers import RMSNorm
from gemma_app.nn.rope import apply_rope
from gemma_app.nn.transformer import (
    Transformer,
    abstract_params,
    forward,
    init_cache,
    init_params,
    is_stacked,
    stack_layers,
    unstack_layers,
)

# Measured with jax.eval_shape on google-deepmind/gemma (spec §1.1); Gemma 3 4B+ minus SigLIP.
# Gemma 1: the published 2B/7B counts with the 256128-row (padded) embedding table.
SPEC_PARAM_COUNTS = {
    "gemma1-2b": 2_506_172_416 + 128 * 2048,
    "gemma1-7b": 8_537_680_896 + 128 * 3072,
    "gemma2-2b": 2_614_636_800,
    "gemma2-9b": 9_242_164_736,
    "gemma2-27b": 27_227_718_144,
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_099_328,
    "gemma3-12b": 11_765_788_416,
    "gemma3-27b": 27_009_002_240,
}


def official_tree(cfg) -> dict[str, tuple[int, ...]]:
    """The official nested tree of spec §2.1, written out independently of the model code."""
    d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tree = {"embedder/input_embedding": (cfg.num_embed, d), "final_norm/scale": (d,)}
    for i in range(cfg.num_layers):
        p = f"layer_{i}/"
        tree[p + "pre_attention_norm/scale"] = (d,)
        tree[p + "pre_ffw_norm/scale"] = (d,)
        if cfg.family >= 2:
            tree[p + "post_attention_norm/scale"] = (d,)
            tree[p + "post_ffw_norm/scale"] = (d,)
        if k == n:
            tree[p + "attn/qkv_einsum/w"] = (3, n, d, h)
        else:
            tree[p + "attn/q_einsum/w"] = (n, d, h)
            tree[p + "attn/kv_einsum/w"] = (2, k, d, h)
        tree[p + "attn/attn_vec_einsum/w"] = (n, h, d)
        if cfg.family == 3:
            tree[p + "attn/_query_norm/scale"] = (h,)
            tree[p + "attn/_key_norm/scale"] = (h,)
        gemma1_or_2b = cfg.family == 1 or cfg.name == "gemma2-2b"
        tree[p + "mlp/gating_einsum"] = (2, d, f) if gemma1_or_2b else (2, f, d)
        tree[p + "mlp/linear"] = (f, d)
    return tree


@pytest.mark.parametrize("name", sorted(n for n in presets.PRESETS if "gemma4" not in n))
def test_preset_tree_and_param_count(name):  # Gemma 4: tests/test_gemma4.py
    cfg = presets.get_preset(name)
    shapes = {"/".join(k): v.shape for k, v in flatten_dict(abstract_params(cfg)).items()}
    assert shapes == official_tree(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == SPEC_PARAM_COUNTS[name]


def test_preset_constants():
    g3_4b, g3_27b, g2_27b = presets.gemma3_4b(), presets.gemma3_27b(), presets.gemma2_27b()
    assert g3_4b.global_scale_factor == 8.0 and presets.gemma3_1b().global_scale_factor == 1.0
    assert g3_27b.query_scale == pytest.approx(168**-0.5)
    assert g2_27b.query_scale == pytest.approx(144**-0.5)
    assert presets.gemma2_9b().attn_logits_soft_cap == 50.0
    assert presets.gemma2_9b().final_logit_softcap == 30.0
    globals_ = [i for i, t in enumerate(presets.gemma3_1b().attention_types) if t.value == "global"]
    assert globals_ == [5, 11, 17, 23]
    assert presets.gemma2_2b().attention_types[:2][1].value == "global"
    assert presets.gemma1_7b().use_qkv_einsum and not presets.gemma1_2b().use_qkv_einsum
    with pytest.raises(ValueError, match="Unknown model preset"):
        presets.get_preset("gemma9-1t")


def test_rmsnorm_golden():
    x = jnp.array([[0.1, 0.2]])
    out = RMSNorm().apply({"params": {"scale": jnp.zeros(2)}}, x)
    np.testing.assert_allclose(out, [[0.6324429, 1.2648858]], rtol=1e-6)
    out = RMSNorm().apply({"params": {"scale": jnp.ones(2)}}, x)
    np.testing.assert_allclose(out, [[1.2648858, 2.5297716]], rtol=1e-6)


def test_rope_golden():
    x = jnp.ones((2, 1, 2, 4))
    positions = jnp.array([[1], [0]])
    out = apply_rope(x, positions, base_frequency=100)
    np.testing.assert_allclose(
        out[0, 0, 0], [-0.30116868, 0.89517075, 1.3817732, 1.0948375], rtol=1e-6
    )
    np.testing.assert_allclose(out[1], x[1])
    half = apply_rope(x, positions, base_frequency=100, rope_proportion=0.5)
    np.testing.assert_allclose(half[0, 0, 1], [-0.30116868, 1.0, 1.3817732, 1.0], rtol=1e-6)
    scaled = apply_rope(x, positions * 8, base_frequency=100, scale_factor=8.0)
    np.testing.assert_allclose(scaled, out, rtol=1e-6)


def test_sliding_window_mask_literal():
    q = jnp.arange(5)[None]
    mask = attention_mask(q, q, window=2)[0].astype(int)
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    np.testing.assert_array_equal(mask, expected)


TINY = [presets.tiny_gemma1_mqa, presets.tiny_gemma1_mha, presets.tiny_gemma2, presets.tiny_gemma3]


# Every family in the scanned layout the CPU engine serves; the official unrolled layout (what
# accelerators and Gemma 4 run) on Gemma 3 by default, on the other families under `-m slow`.
CACHED_CASES = [
    pytest.param(
        make, stacked, id=f"{make.__name__}-{'stacked' if stacked else 'unrolled'}",
        marks=[pytest.mark.slow] if not stacked and make is not presets.tiny_gemma3 else [],
    )
    for make in TINY
    for stacked in (False, True)
]  # fmt: skip


@pytest.mark.parametrize(("make_config", "stacked"), CACHED_CASES)
def test_cached_prefill_and_decode_equal_full_forward(make_config, stacked):
    """Prefill in two chunks, then decode token by token == one uncached forward (of the
    official tree: the scanned decoder over stacked layers must give the same logits)."""
    cfg = make_config()
    official = init_params(cfg, seed=1)
    params = stack_layers(cfg, official) if stacked else official
    length = CACHE_CHUNK + 40  # crosses a cache chunk; windows (4) are far smaller
    tokens = jax.random.randint(jax.random.key(0), (2, length), 0, cfg.num_embed)
    full = forward(cfg, official, tokens)
    model = Transformer(cfg)
    apply = jax.jit(model.apply)
    cache = init_cache(cfg, batch=2, cache_length=2 * CACHE_CHUNK, stacked=stacked)
    pos = jnp.broadcast_to(jnp.arange(length), (2, length))
    split, prefill_end = 100, length - 10
    logits_a, cache = apply({"params": params}, tokens[:, :split], pos[:, :split], cache)
    logits_b, cache = apply(
        {"params": params}, tokens[:, split:prefill_end], pos[:, split:prefill_end], cache
    )
    cached = [logits_a, logits_b]
    for t in range(prefill_end, length):
        step, cache = apply({"params": params}, tokens[:, t : t + 1], pos[:, t : t + 1], cache)
        cached.append(step)
    np.testing.assert_allclose(jnp.concatenate(cached, axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make_config", [presets.tiny_gemma1_mha, presets.tiny_gemma3], ids=lambda f: f.__name__
)
def test_stacked_layers_give_the_unrolled_logits(make_config):
    """Same weights, two layouts: the scan reproduces the unrolled decoder bit for bit, and
    unstacking gives the official tree back."""
    cfg = make_config()
    official = init_params(cfg, seed=2)
    stacked = stack_layers(cfg, official)
    assert is_stacked(stacked) and not any(k.startswith("layer_") for k in stacked)
    assert stack_layers(cfg, stacked) is stacked
    layer0 = flatten_dict(official["layer_0"], sep="/")
    layers = flatten_dict(stacked["layers"], sep="/")
    assert layers.keys() == layer0.keys()
    for path, leaf in layers.items():
        assert leaf.shape == (cfg.num_layers, *layer0[path].shape), path
    tokens = jax.random.randint(jax.random.key(1), (2, 30), 0, cfg.num_embed)
    np.testing.assert_array_equal(forward(cfg, stacked, tokens), forward(cfg, official, tokens))
    back = flatten_dict(unstack_layers(stacked), sep="/")
    want = flatten_dict(official, sep="/")
    assert back.keys() == want.keys()
    for key, leaf in want.items():
        np.testing.assert_array_equal(back[key], leaf, err_msg=key)


def test_stacking_can_free_the_per_layer_arrays():
    """consume=True frees each layer's arrays once stacked (peak: params + one stack); bf16
    leaves keep their exact bits."""
    cfg = presets.tiny_gemma3()
    official = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, seed=0))
    want = {k: np.asarray(v) for k, v in flatten_dict(unstack_layers(official), sep="/").items()}
    layer0 = jax.tree.leaves(official["layer_0"])
    embed = official["embedder"]["input_embedding"]
    stacked = stack_layers(cfg, official, consume=True)
    assert all(a.is_deleted() for a in layer0)
    got = flatten_dict(unstack_layers(stacked), sep="/")  # bf16 stacked bit for bit
    for key, value in want.items():
        assert got[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    assert stacked["embedder"]["input_embedding"] is embed and not embed.is_deleted()
    gemma4 = presets.tiny_gemma4()
    p4 = abstract_params(gemma4)
    assert stack_layers(gemma4, p4) is p4  # per-layer shapes differ: stays unrolled


def test_scanned_decoder_compiles_one_layer_body():
    """The decode step over stacked layers lowers as many weight products as a one-layer model
    (the body is traced once and looped), where the unrolled one has one set per layer."""
    cfg = presets.tiny_gemma3()
    one_layer = dataclasses.replace(cfg, attention_types=cfg.attention_types[:1])

    def products(config, stacked):
        params = abstract_params(config)  # lowering needs shapes only
        if stacked:
            params = jax.eval_shape(lambda p: stack_layers(config, p), params)
        cache = init_cache(config, batch=1, cache_length=CACHE_CHUNK, stacked=stacked)
        token = jnp.zeros((1, 1), jnp.int32)
        fn = jax.jit(lambda p, t, c: Transformer(config).apply({"params": p}, t, t, c))
        text = fn.lower(params, token, cache).as_text()
        return text.count("gemma_app_gemv") + text.count("dot_general"), text

    scanned, text = products(cfg, stacked=True)
    assert "stablehlo.while" in text
    assert scanned == products(one_layer, stacked=False)[0]
    assert products(cfg, stacked=False)[0] > scanned + cfg.num_layers - 2


def test_logits_at_selects_one_position():
    cfg = presets.tiny_gemma3()
    params = init_params(cfg)
    tokens = jnp.arange(12)[None] % cfg.num_embed
    pos = jnp.arange(12)[None]
    full = forward(cfg, params, tokens)
    cache = init_cache(cfg, batch=1, cache_length=CACHE_CHUNK)
    last, _ = Transformer(cfg).apply(
        {"params": params}, tokens, pos, cache, logits_at=jnp.array([7])
    )
    np.testing.assert_allclose(last[0], full[0, 7], atol=2e-5)


def test_right_padded_rows_do_not_leak():
    """Row 1 is padded with junk after its prompt; its logits match its own unpadded run."""
    cfg = presets.tiny_gemma2()
    params = init_params(cfg, seed=3)
    prompt = jnp.array([5, 9, 2, 7, 7, 1])
    junk = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [*prompt.tolist(), 99, 98, 97, 96]])
    cache = init_cache(cfg, batch=2, cache_length=CACHE_CHUNK)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    logits, _ = Transformer(cfg).apply(
        {"params": params}, junk, pos, cache, logits_at=jnp.array([9, 5])
    )
    alone = forward(cfg, params, prompt[None])
    np.testing.assert_allclose(logits[1], alone[0, -1], atol=2e-5)


@pytest.mark.parametrize(
    ("stacked", "dtype"), [(False, jnp.float32), (True, jnp.bfloat16)], ids=["fp32", "bf16"]
)
def test_padding_skipped_by_num_real_changes_no_real_output(stacked, dtype):
    """A prompt padded to its bucket with `num_real` set: the weight products skip the padding,
    and the logits and the real tokens' cache slots equal those of the fully computed chunk,
    bit for bit; the padding's slots stay finite (later chunks of attention read them)."""
    cfg = presets.tiny_gemma3()
    params = jax.tree.map(lambda a: a.astype(dtype), init_params(cfg, seed=5))
    params = stack_layers(cfg, params) if stacked else params
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.num_embed, (1, 32)))
    pos = jnp.arange(32)[None]

    @functools.partial(jax.jit, static_argnums=2)
    def prefill(n, cache, skip):
        return Transformer(cfg).apply(
            {"params": params}, tokens, pos, cache, logits_at=jnp.array([n - 1]),
            num_real=n if skip else None,
        )  # fmt: skip

    def leaves(cache):  # [..., S, K, H] per layer, slots on axis -3
        return [np.asarray(x) for x in jax.tree.leaves(cache)]

    new_cache = lambda: init_cache(cfg, batch=1, cache_length=CACHE_CHUNK, stacked=stacked)  # noqa: E731
    for n in (5, 13, 32):
        full, full_cache = prefill(jnp.int32(n), new_cache(), False)
        got, got_cache = prefill(jnp.int32(n), new_cache(), True)
        np.testing.assert_array_equal(got, full)
        for a, b in zip(leaves(got_cache), leaves(full_cache), strict=True):
            np.testing.assert_array_equal(a[..., :n, :, :], b[..., :n, :, :])
            assert np.isfinite(a[..., :32, :, :]).all()  # past slot 32: never written
            if kernels.build.load():  # skipped for real: zero rows give zero k and v
                assert not a[..., n:32, :, :].any()
    with pytest.raises(ValueError, match="batch of one row"):
        Transformer(cfg).apply(
            {"params": params}, jnp.tile(tokens, (2, 1)), jnp.tile(pos, (2, 1)),
            logits_at=jnp.array([4, 4]), num_real=jnp.int32(5),
        )  # fmt: skip


@pytest.mark.parametrize("queries", [8, 128])
def test_a_prompt_chunk_reads_only_the_key_slots_it_needs(queries):
    """A prompt at the start of a chat reads key_chunk(T) slots (64 for 8 queries, 128 for up
    to 128), not CACHE_CHUNK: NaN in every slot past them would poison the output."""
    from gemma_app.nn.attention import chunked_attention, dense_attention, key_chunk

    t = queries  # a bucket length (a 100-token prompt is padded to 128)
    size = key_chunk(t)
    assert size == max(64, t) < CACHE_CHUNK
    assert (key_chunk(1), key_chunk(512), key_chunk(300)) == (CACHE_CHUNK,) * 3
    b, k_heads, g, h, slots = 1, 1, 2, 8, 2 * CACHE_CHUNK
    rng = np.random.default_rng(1)
    k = rng.standard_normal((b, slots, k_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, slots, k_heads, h)).astype(np.float32)
    k[:, t:size] = v[:, t:size] = 0.0  # read but masked: must be finite
    k[:, size:] = v[:, size:] = np.nan  # never read
    q = jnp.asarray(rng.standard_normal((b, t, k_heads, g, h)), jnp.float32)
    pos = jnp.arange(t)[None, :]
    out = chunked_attention(q, jnp.asarray(k), jnp.asarray(v), pos, window=None, cap=None)
    assert np.isfinite(np.asarray(out)).all()
    ref = dense_attention(q, k[:, :t], v[:, :t], pos, pos, window=None, cap=None)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_prompt_rows_whose_first_chunks_are_masked_match_dense_attention():
    """A windowed prompt chunk: the loop starts at the chunk of the earliest window, which is
    wholly masked for the later queries. Their masked slots must carry no weight in the end."""
    from gemma_app.nn.attention import chunked_attention, dense_attention, key_chunk

    t, window, first = 128, 40, 600  # queries at 600..727; key_chunk(128) = 128 slots a step
    b, k_heads, g, h, slots = 1, 1, 2, 8, 4 * CACHE_CHUNK
    assert (first - window + 1) // key_chunk(t) * key_chunk(t) + key_chunk(t) < first + t - window
    rng = np.random.default_rng(2)
    k = rng.standard_normal((b, slots, k_heads, h)).astype(np.float32)
    v = 10 * rng.standard_normal((b, slots, k_heads, h)).astype(np.float32)
    q = jnp.asarray(rng.standard_normal((b, t, k_heads, g, h)), jnp.float32)
    q_pos = first + jnp.arange(t)[None, :]
    out = chunked_attention(q, jnp.asarray(k), jnp.asarray(v), q_pos, window=window, cap=None)
    end = first + t
    k_pos = jnp.arange(end)[None, :]
    ref = dense_attention(q, k[:, :end], v[:, :end], q_pos, k_pos, window=window, cap=None)
    np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("stacked", [False, True], ids=["layer_cache", "stacked_cache"])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_reads_only_the_used_cache_chunks(window, stacked):
    """NaN in every chunk a step must not touch: a read would poison the output. Stacked:
    the other layers' caches are all NaN too."""
    from gemma_app.nn.attention import chunked_attention

    b, k_heads, g, h, slots = 1, 1, 2, 8, 8 * CACHE_CHUNK
    pos = 3 * CACHE_CHUNK + 5  # the query sits in chunk 3 of 8
    rng = np.random.default_rng(0)
    k = rng.standard_normal((b, slots, k_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, slots, k_heads, h)).astype(np.float32)
    k[:, pos + 1 :] = np.nan  # future slots: the whole of chunks 4..7 and the rest of chunk 3
    v[:, pos + 1 :] = np.nan
    k[:, 4 * CACHE_CHUNK :] = v[:, 4 * CACHE_CHUNK :] = np.nan
    if window is not None:  # chunks entirely before the window (754..773) are not read either
        k[:, : 2 * CACHE_CHUNK] = v[:, : 2 * CACHE_CHUNK] = np.nan
    q = jnp.asarray(rng.standard_normal((b, 1, k_heads, g, h)), jnp.float32)
    # Masked-but-read slots would still poison the sum (0 * nan), so zero the in-chunk future:
    k[:, pos + 1 : 4 * CACHE_CHUNK] = v[:, pos + 1 : 4 * CACHE_CHUNK] = 0.0
    kc, vc, layer = jnp.asarray(k), jnp.asarray(v), None
    if stacked:  # layer 1 of three; layers 0 and 2 are NaN everywhere
        nan = jnp.full_like(kc, jnp.nan)
        kc, vc, layer = jnp.stack([nan, kc, nan]), jnp.stack([nan, vc, nan]), jnp.int32(1)
    out = chunked_attention(q, kc, vc, jnp.array([[pos]]), window=window, cap=None, layer=layer)
    assert np.isfinite(np.asarray(out)).all()
    keys = np.arange(slots)
    seen = (keys <= pos) & ((keys > pos - window) if window else True)
    logits = np.einsum("gh,sh->gs", np.asarray(q)[0, 0, 0], np.nan_to_num(k[0, :, 0]))
    logits = np.where(seen, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, 0, 0], probs @ np.nan_to_num(v[0, :, 0]), atol=1e-5)
