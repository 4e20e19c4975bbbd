"""Gemma 1/2/3 attention: GQA/MQA/MHA, qk-norm, soft-cap, sliding window, and the KV cache.

Einsum axis letters used throughout the engine:
  B batch, T query positions, S key/cache positions, D model width, N query heads,
  K key/value heads, G query heads per KV head (N = K * G), H head width, C chunk of S.

The KV cache is plain data: per layer `{"k": [B, S, K, H], "v": [B, S, K, H]}`, or for the
scanned decoder one `{"k": [L, B, S, K, H], ...}` for all layers, indexed by a traced `layer`.
Slot == position:
row b stores the token at position p in slot p, so causality, validity and the sliding window
are all read off slot indices and no positions array has to be carried between turns. A cache
attends in chunks of at most `CACHE_CHUNK` slots (`key_chunk`) and stops at the last used chunk,
so a decode step costs O(used length) (O(window) on local layers), not O(cache_length).
A new cache is not zeroed (`kernels.attention.cache_array`): a slot past the last position
written holds anything, even NaN, and every reader gives it zero weight by a select.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_app.kernels import attention as kernel_attention
from gemma_app.nn.config import AttentionType, TransformerConfig
from gemma_app.nn.layers import RMSNorm, Weight, merge_heads, project_heads
from gemma_app.nn.rope import RopeTables, rope_tables, rotate

CACHE_CHUNK = 256  # key slots per step of the chunked attention loop, at most; divides the cache
MIN_KEY_CHUNK = 64
_NEG = -1e30  # finite, so a fully masked chunk never produces inf - inf = nan
# The "window" of a global layer when windows are data (scanned decoder).
NO_WINDOW = kernel_attention.NO_WINDOW

LayerCache = dict[str, jax.Array]


def init_layer_cache(
    config: TransformerConfig,
    batch: int,
    length: int,
    dtype,
    attn_type: AttentionType = AttentionType.LOCAL_SLIDING,
) -> LayerCache:
    """`{"k", "v"}` of shape [B, S, K, H], values unspecified until written; `length` must be
    a multiple of CACHE_CHUNK.

    K and H are those of `attn_type` layers (Gemma 4 global layers differ from local ones).
    """
    shape = (batch, length, config.layer_kv_heads(attn_type), config.layer_head_dim(attn_type))
    return {
        "k": kernel_attention.cache_array(shape, dtype),
        "v": kernel_attention.cache_array(shape, dtype),
    }


def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: int | None,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array:
    """[B, T], [B or 1, S] -> [B, T, S]: causal by position, image blocks, sliding window.

    A local query at position p sees keys in (p - window, p]: itself and window-1 earlier ones.
    Tokens of one image (equal segment id > 0) also see each other both ways; the window still
    cuts the past side, as Hugging Face's Gemma 3 masks do (scripts/make_golden_vision.py).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = k <= q
    if q_seg is not None:
        mask |= (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] > 0)
    if window is not None:
        mask &= k > q - window
    return mask


def layer_constants(
    config: TransformerConfig, attn_type: AttentionType | None, layer: jax.Array | None
) -> tuple:
    """(sliding window or None, RoPE base, RoPE scale) of one layer.

    Python numbers from a static `attn_type`; with `attn_type=None` (the scanned decoder, one
    compiled body for every layer) arrays picked by the traced `layer` index instead.
    """
    local = AttentionType.LOCAL_SLIDING
    if attn_type is not None:
        base, scale = config.rope_base_and_scale(attn_type)
        return (config.sliding_window_size if attn_type == local else None), base, scale
    types = config.attention_types
    is_local = jnp.asarray([t == local for t in types])[layer]
    (lb, ls), (gb, gs) = map(config.rope_base_and_scale, (local, AttentionType.GLOBAL))
    base = jnp.where(is_local, jnp.float32(lb), jnp.float32(gb))
    scale = jnp.where(is_local, jnp.float32(ls), jnp.float32(gs))
    window = None
    if local in types:
        window = jnp.where(is_local, config.sliding_window_size, NO_WINDOW)
    return window, base, scale


def key_chunk(queries: int) -> int:
    """Key slots per step of the attention loop for `queries` query positions (static).

    A step costs ~queries x chunk, and the last used chunk is mostly past the keys any query
    sees: a 100-token prompt padded to 128 at the start of a chat needs 128 slots, not 256
    (~7% of Gemma 3 270M's time to first token). Decode steps keep the wide chunk, where each
    step's fixed cost dominates; so do long prompt chunks (512 queries ran ~9% slower with 128).
    A power of two, so it divides the cache length (a multiple of CACHE_CHUNK).
    """
    if queries == 1:
        return CACHE_CHUNK
    return min(CACHE_CHUNK, max(MIN_KEY_CHUNK, 1 << (queries - 1).bit_length()))


def _cache_chunk(cache: jax.Array, start, size: int, layer: jax.Array | None) -> jax.Array:
    """Slots [start, start + size) of a [B, S, K, H] cache or of layer `layer` of a stacked
    [L, B, S, K, H] one (read in place, never a copy of the layer)."""
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(cache, start, size, axis=1)
    _, b, _, k, h = cache.shape
    zero = jnp.zeros((), jnp.int32)
    starts = (layer.astype(jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
    return jax.lax.dynamic_slice(cache, starts, (1, b, size, k, h))[0]


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _logits(q: jax.Array, k: jax.Array, cap: float | None) -> jax.Array:
    # q [B, T, K, G, H], k [B, S, K, H] -> [B, T, K, G, S], in float32
    logits = jnp.einsum("btkgh,bskh->btkgs", q, k, preferred_element_type=jnp.float32)
    return _softcap(logits, cap)


def dense_attention(q, k, v, q_pos, k_pos, *, window, cap, segments=None) -> jax.Array:
    """Reference attention over all keys at once (no cache). Returns [B, T, K, G, H]."""
    mask = attention_mask(q_pos, k_pos, window, segments, segments)
    mask = mask[:, :, None, None, :]  # [B, T, 1, 1, S]
    logits = jnp.where(mask, _logits(q, k, cap), _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("btkgs,bskh->btkgh", probs, v)


def chunked_attention(
    q, k_cache, v_cache, q_pos, *, window, cap, q_seg=None, seg_cache=None, layer=None
) -> jax.Array:
    """Attention of queries at `q_pos` over the used chunks of the cache (online softmax).

    The loop bounds are data (the largest query position, and the window on local layers), so
    one compiled step serves every cache fill level. `seg_cache` [B, S] holds the image block
    of each slot (multimodal models only). With `layer`, the caches are stacked [L, B, S, K, H]
    and that layer is read. Returns [B, T, K, G, H].

    Decode steps on CPU (no image blocks) run the same math in a kernel instead
    (`kernels.attention`), which reads the used slots in place.
    """
    loop = functools.partial(_attention_loop, cap=cap, q_seg=q_seg, seg_cache=seg_cache)
    if q_seg is None and kernel_attention.usable(q, k_cache):
        return kernel_attention.cached_attention(
            q, k_cache, v_cache, q_pos, window=window, cap=cap, layer=layer, default=loop
        )
    return loop(q, k_cache, v_cache, q_pos, layer, window)


def _attention_loop(q, k_cache, v_cache, q_pos, layer, window, *, cap, q_seg, seg_cache):
    """XLA's chunked_attention: a loop over the used CACHE_CHUNK-slot chunks."""
    b, t, k_heads, g, h = q.shape
    cache_len, size = k_cache.shape[-3], key_chunk(t)
    hi = jnp.minimum(jnp.max(q_pos) + 1, cache_len)  # one past the last slot any query sees
    lo = 0 if window is None else jnp.maximum(jnp.min(q_pos) - window + 1, 0)
    first, last = lo // size, (hi + size - 1) // size
    row_end = jnp.max(q_pos, axis=1, keepdims=True)  # [B, 1]

    def body(c, carry):
        m, denom, acc = carry
        start = c * size
        k = _cache_chunk(k_cache, start, size, layer)  # [B, C, K, H]
        v = _cache_chunk(v_cache, start, size, layer)
        k_pos = (start + jnp.arange(size))[None, :]  # slot == position
        # Slots past the row's last position may never have been written (the cache is not
        # zeroed): their logits are masked by the select below, their values here, since a
        # zero weight times NaN is NaN.
        v = jnp.where((k_pos <= row_end)[:, :, None, None], v, jnp.zeros((), v.dtype))
        k_seg = None
        if q_seg is not None:
            k_seg = jax.lax.dynamic_slice_in_dim(seg_cache, start, size, axis=1)
            # Slots past this call's tokens may hold stale blocks of an abandoned turn.
            k_seg = jnp.where(k_pos <= row_end, k_seg, -1)
        mask = attention_mask(q_pos, k_pos, window, q_seg, k_seg)
        mask = mask[:, :, None, None, :]  # [B, T, 1, 1, C]
        logits = jnp.where(mask, _logits(q, k, cap), _NEG)  # [B, T, K, G, C]
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        # No second mask: a masked logit is _NEG, so its exp is exactly 0 once the row has seen
        # a key. Before that (m_new still _NEG) masked slots weigh 1, and the first chunk with
        # a key wipes them: its correction exp(_NEG - m_new) is exactly 0 (rows that never see
        # one are zeroed below). One pass over the [T, C] tile less: ~3% of Gemma 3 1B's
        # 1000-token prefill (in-process A/B).
        p = jnp.exp(logits - m_new[..., None])
        correction = jnp.exp(m - m_new)
        denom = denom * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "btkgc,bckh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        acc = acc * correction[..., None] + pv
        return m_new, denom, acc

    init = (
        jnp.full((b, t, k_heads, g), _NEG, jnp.float32),
        jnp.zeros((b, t, k_heads, g), jnp.float32),
        jnp.zeros((b, t, k_heads, g, h), jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(first, last, body, init)
    # Padding queries (past the cache end, before the start) may see no key at all: their max
    # is still _NEG and their sums hold the unmasked weight of 1 per slot; they get zeros.
    out = jnp.where((m > _NEG)[..., None], acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)
    return out.astype(v_cache.dtype)


def write_cache(
    cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array, layer=None
) -> LayerCache:
    """Writes k/v [B, T, K, H] at slots `positions` [B, T]; slots past the end are dropped.

    With `layer`, the cache is stacked [L, B, S, K, H] and only that layer is written.
    """
    rows = jnp.arange(k.shape[0])[:, None]
    index = (rows, positions) if layer is None else (layer, rows, positions)
    return {
        "k": cache["k"].at[index].set(k.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[index].set(v.astype(cache["v"].dtype), mode="drop"),
    }


class Attention(nn.Module):
    """Multi-head attention with the official parameter names (`q_einsum`, `kv_einsum`, ...).

    `attn_type=None`: the layer's type is data, read from the traced `layer` index of the call
    (the scanned decoder), and the cache is the stacked one of every layer.
    """

    config: TransformerConfig
    attn_type: AttentionType | None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None,
        segments: jax.Array | None = None,
        seg_cache: jax.Array | None = None,
        layer: jax.Array | None = None,
        rows: jax.Array | None = None,
        rope: RopeTables | None = None,
    ) -> tuple[LayerCache | None, jax.Array]:
        """x [B, T, D], positions [B, T] -> (updated cache, [B, T, D]).

        `segments` [B, T] numbers the image blocks of the input (0 = text); `seg_cache` [B, S]
        is the same for every cache slot, already holding this call's tokens. `layer`: this
        layer's index when `attn_type` is None. `rows`: only the first `rows` of the B * T
        tokens are real; the others are padding (outputs and cache slots unspecified, finite).
        `rope`: this layer's `rope_tables` of `positions`, if the decoder computed them.
        """
        cfg = self.config
        n, k_heads, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim
        pd = self.param_dtype
        if cfg.use_qkv_einsum:
            w = Weight((3, n, d, h), param_dtype=pd, name="qkv_einsum")()
            q, k, v = jnp.moveaxis(project_heads(x, w, rows), 1, 3)  # each [B, T, N(=K), H]
        else:
            w_q = Weight((n, d, h), param_dtype=pd, name="q_einsum")()
            q = jnp.moveaxis(project_heads(x, w_q, rows), 0, 2)  # [B, T, N, H]
            w_kv = Weight((2, k_heads, d, h), param_dtype=pd, name="kv_einsum")()
            k, v = jnp.moveaxis(project_heads(x, w_kv, rows), 1, 3)  # each [B, T, K, H]
        if cfg.use_qk_norm:
            q = RMSNorm(param_dtype=pd, name="_query_norm")(q)
            k = RMSNorm(param_dtype=pd, name="_key_norm")(k)

        window, base, scale = layer_constants(cfg, self.attn_type, layer)
        if rope is None:
            rope = rope_tables(positions, h, base_frequency=base, scale_factor=scale)
        q, k = rotate(q, rope), rotate(k, rope)
        q = q * jnp.asarray(cfg.query_scale, q.dtype)

        q = q.reshape(*q.shape[:2], k_heads, n // k_heads, h)  # [B, T, K, G, H]
        cap = cfg.attn_logits_soft_cap
        if cache is None:
            o = dense_attention(
                q, k, v, positions, positions, window=window, cap=cap, segments=segments
            )
        else:
            cache = write_cache(cache, k, v, positions, layer)
            o = chunked_attention(
                q, cache["k"], cache["v"], positions, window=window, cap=cap,
                q_seg=segments, seg_cache=seg_cache, layer=layer,
            )  # fmt: skip
        o = o.reshape(*o.shape[:2], n, h)  # [B, T, N, H]
        w_o = Weight((n, h, d), param_dtype=pd, in_axis=(0, 1), name="attn_vec_einsum")()
        return cache, merge_heads(o, w_o, rows)
