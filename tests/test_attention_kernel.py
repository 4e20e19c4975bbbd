"""The decode attention kernel (kernels/attention.cc) against fp64 math and XLA's loop."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_app.kernels import attention as kernel_attention
from gemma_app.kernels import build
from gemma_app.nn import attention, presets
from gemma_app.nn.transformer import (
    Transformer,
    forward,
    init_cache,
    init_params,
    stack_layers,
)

pytestmark = pytest.mark.skipif(not build.load(), reason="no C++ compiler for the CPU kernels")

TARGET = kernel_attention.TARGET


def _reference(q, k_cache, v_cache, q_pos, window, cap):
    """fp64 softmax attention of each query over its valid slots (p - window, p], [0, S)."""
    q = np.asarray(q, np.float64)
    kc = np.asarray(jnp.asarray(k_cache, jnp.float32), np.float64)
    vc = np.asarray(jnp.asarray(v_cache, jnp.float32), np.float64)
    b_size, t_size = q.shape[:2]
    slots = kc.shape[1]
    out = np.zeros_like(q)
    for b, t in itertools.product(range(b_size), range(t_size)):
        p = int(q_pos[b, t])
        lo, hi = max(0, p - (window or 1 << 30) + 1), min(p + 1, slots)
        if hi <= lo:
            continue  # no slot: zeros
        logits = np.einsum("kgh,skh->kgs", q[b, t], kc[b, lo:hi])
        if cap:
            logits = cap * np.tanh(logits / cap)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out[b, t] = np.einsum("kgs,skh->kgh", w / w.sum(-1, keepdims=True), vc[b, lo:hi])
    return out


def _loop(q, k_cache, v_cache, q_pos, window, cap, layer=None):
    """XLA's loop, which the kernel replaces on CPU."""
    return attention._attention_loop(
        q, k_cache, v_cache, q_pos, layer, window, cap=cap, q_seg=None, seg_cache=None
    )


def _operands(rng, b, t, k, g, h, slots, dtype, scale=1.0):
    q = jnp.asarray(rng.standard_normal((b, t, k, g, h)) * scale, jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((b, slots, k, h)), dtype) for _ in range(2))
    return q, kc, vc


# (B, T, K, G, H, S, window, cap): decode shapes of the presets, MQA/GQA/MHA, widths that are
# not whole vectors, spans longer than one part (merged), several queries per row.
CASES = [
    (1, 1, 1, 4, 256, 512, None, None),
    (1, 1, 1, 4, 256, 1536, 512, None),
    (2, 3, 2, 2, 40, 256, 7, 50.0),
    (2, 1, 2, 1, 72, 768, 300, None),
    (1, 4, 4, 1, 16, 1024, None, 30.0),
    (3, 2, 1, 8, 8, 256, 1, None),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_equals_fp64_reference_and_the_loop(case, dtype):
    b, t, k, g, h, slots, window, cap = case
    rng = np.random.default_rng(slots + h)
    q, kc, vc = _operands(rng, b, t, k, g, h, slots, dtype, scale=2.0)
    # Positions: mid-cache, near the start, past the end (a padding query), before the start.
    flat = rng.integers(0, slots, b * t)
    flat[0] = slots - 3
    if b * t >= 4:
        flat[1:4] = 0, slots + 9, -2
    q_pos = jnp.asarray(flat.reshape(b, t), jnp.int32)
    fn = jax.jit(lambda *a: attention.chunked_attention(*a, window=window, cap=cap))
    assert TARGET in fn.lower(q, kc, vc, q_pos).as_text()
    got = np.asarray(fn(q, kc, vc, q_pos).astype(jnp.float32))
    want = _reference(q, kc, vc, np.asarray(q_pos), window, cap)
    # A bf16 cache gives a bf16 output (and the loop rounds its weights to bf16 as well).
    tol = {"rtol": 1e-5, "atol": 2e-5} if dtype == jnp.float32 else {"rtol": 0, "atol": 2e-2}
    np.testing.assert_allclose(got, want, **tol)
    loop = jax.jit(lambda *a: _loop(*a, window=window, cap=cap))(q, kc, vc, q_pos)
    np.testing.assert_allclose(got, np.asarray(loop.astype(jnp.float32)), **tol)
    assert got.dtype == np.float32 and fn(q, kc, vc, q_pos).dtype == kc.dtype


def test_extreme_logits_stay_exact():
    """Logits hundreds apart: weights that underflow are ~0, the largest keeps its mass."""
    rng = np.random.default_rng(0)
    q, kc, vc = _operands(rng, 1, 1, 1, 4, 64, 256, jnp.float32, scale=40.0)
    q_pos = jnp.asarray([[200]], jnp.int32)
    got = jax.jit(lambda *a: attention.chunked_attention(*a, window=None, cap=None))(
        q, kc, vc, q_pos
    )
    want = _reference(q, kc, vc, np.asarray(q_pos), None, None)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_stacked_cache_reads_the_traced_layer(dtype):
    """[L, B, S, K, H] with a traced layer and window (the scanned decoder): each layer equals
    the same attention over that layer's own [B, S, K, H] cache."""
    rng = np.random.default_rng(5)
    layers, slots = 3, 512
    q = jnp.asarray(rng.standard_normal((2, 1, 1, 4, 32)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((layers, 2, slots, 1, 32)), dtype)
    vc = jnp.asarray(rng.standard_normal((layers, 2, slots, 1, 32)), dtype)
    q_pos = jnp.asarray([[300], [77]], jnp.int32)

    @jax.jit
    def stacked(layer, window):
        return attention.chunked_attention(
            q, kc, vc, q_pos, window=window, cap=None, layer=layer
        )  # fmt: skip

    for layer, window in ((0, 1 << 30), (1, 64), (2, 300)):
        got = stacked(jnp.int32(layer), jnp.int32(window))
        want = _reference(q, kc[layer], vc[layer], np.asarray(q_pos), window, None)
        atol = 2e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=1e-5, atol=atol)
        loop = _loop(q, kc, vc, q_pos, jnp.int32(window), None, layer=jnp.int32(layer))
        np.testing.assert_allclose(got.astype(jnp.float32), loop.astype(jnp.float32), atol=atol)


def test_only_decode_steps_without_image_blocks_use_the_kernel():
    rng = np.random.default_rng(1)
    q, kc, vc = _operands(rng, 1, 1, 1, 2, 16, 256, jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)

    def lowered(q, pos, **kw):
        fn = jax.jit(lambda q, p: attention.chunked_attention(q, kc, vc, p, **kw))
        return fn.lower(q, pos).as_text()

    assert TARGET in lowered(q, pos, window=None, cap=None)
    chunk = jnp.zeros((1, 8, 1, 2, 16), jnp.float32)  # a prefill chunk: XLA's loop
    assert TARGET not in lowered(chunk, jnp.zeros((1, 8), jnp.int32), window=None, cap=None)
    seg = jnp.ones((1, 1), jnp.int32)  # image blocks: XLA's loop
    assert TARGET not in lowered(
        q, pos, window=None, cap=None, q_seg=seg, seg_cache=jnp.ones((1, 256), jnp.int32)
    )
    assert not kernel_attention.usable(q.astype(jnp.bfloat16), kc)  # bf16 compute: XLA's


@pytest.mark.parametrize("make_config", [presets.tiny_gemma2, presets.tiny_gemma3])
def test_decode_with_the_kernel_equals_decode_with_the_loop(make_config, monkeypatch):
    """Whole decode steps (sliding windows, soft-cap, the scanned decoder's stacked cache):
    logits with the kernel equal those with XLA's loop."""
    cfg = make_config()
    params = init_params(cfg, seed=2)
    tokens = jax.random.randint(jax.random.key(4), (2, 40), 0, cfg.num_embed)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))

    def run():
        apply = jax.jit(Transformer(cfg).apply)
        cache = init_cache(cfg, batch=2, cache_length=attention.CACHE_CHUNK)
        out, cache = apply({"params": params}, tokens[:, :24], pos[:, :24], cache)
        steps = [out]
        for t in range(24, 40):
            out, cache = apply({"params": params}, tokens[:, t : t + 1], pos[:, t : t + 1], cache)
            steps.append(out)
        return np.asarray(jnp.concatenate(steps, axis=1)), apply

    with_kernel, apply = run()
    step = (tokens[:, :1], pos[:, :1], init_cache(cfg, batch=2, cache_length=256))
    assert TARGET in apply.lower({"params": params}, *step).as_text()
    monkeypatch.setattr(kernel_attention, "usable", lambda *a: False)
    with_loop, apply = run()
    assert TARGET not in apply.lower({"params": params}, *step).as_text()
    scale = float(np.abs(with_loop).max())
    np.testing.assert_allclose(with_kernel, with_loop, atol=1e-5 * scale)


def test_kernel_rejects_mismatched_operands():
    """Checked in the library: a wrong call is an error, never a wild read."""
    q = jnp.ones((1, 1, 1, 2, 16), jnp.float32)
    kc = jnp.ones((2, 1, 64, 1, 16), jnp.float32)
    pos, layer, win = jnp.zeros((1, 1), jnp.int32), jnp.int32(0), jnp.int32(8)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    np.testing.assert_allclose(call(q, kc, kc, layer, pos, win, cap=np.float32(0)), 1.0)
    bad = [
        ((q, kc, kc[:, :, :32], layer, pos, win), "differ in shape"),
        ((q, kc, kc.astype(jnp.bfloat16), layer, pos, win), "differ in dtype"),
        ((q[..., :8], kc, kc, layer, pos, win), "head width"),
        ((q, kc, kc, jnp.int32(2), pos, win), "layer index out of range"),
        ((q, kc, kc, layer, jnp.zeros((1, 2), jnp.int32), win), r"q_pos must be \[B, T\]"),
        ((q, kc.astype(jnp.float16), kc.astype(jnp.float16), layer, pos, win), "float32 or"),
    ]
    for operands, message in bad:
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(call(*operands, cap=np.float32(0)))


# Taken at import, before conftest's session fixture makes every new cache NaN.
REAL_CACHE_ARRAY = kernel_attention.cache_array


def test_new_caches_are_unwritten_memory(monkeypatch):
    """On CPU a new cache is the allocator's memory, not zeros written over it, and serves a
    scanned-decoder prefill and decode steps with the uncached forward's logits."""
    lowered = kernel_attention._cache_array.lower((2, 512, 1, 8), jnp.dtype(jnp.bfloat16))
    assert kernel_attention.UNWRITTEN in lowered.as_text()
    array = REAL_CACHE_ARRAY((2, 512, 1, 8), jnp.bfloat16)
    assert array.shape == (2, 512, 1, 8) and array.dtype == jnp.bfloat16
    monkeypatch.setattr(kernel_attention, "cache_array", REAL_CACHE_ARRAY)
    cfg = presets.tiny_gemma3()
    official = init_params(cfg, seed=6)
    params = stack_layers(cfg, official)
    tokens = jax.random.randint(jax.random.key(5), (2, 30), 0, cfg.num_embed)
    pos = jnp.broadcast_to(jnp.arange(30), (2, 30))
    apply = jax.jit(Transformer(cfg).apply, donate_argnums=3)
    cache = init_cache(cfg, batch=2, cache_length=attention.CACHE_CHUNK, stacked=True)
    out, cache = apply({"params": params}, tokens[:, :20], pos[:, :20], cache)
    steps = [out]
    for t in range(20, 30):
        out, cache = apply({"params": params}, tokens[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(out)
    full = forward(cfg, official, tokens)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
