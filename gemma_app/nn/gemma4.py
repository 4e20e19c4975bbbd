"""The Gemma 4 text decoder (spec §1.4), reached through `transformer.Transformer` (family 4).

What differs from Gemma 1/2/3 (transformer.py / attention.py), following Hugging Face's
`modeling_gemma4.py` where the reference library differs:
  * RMSNorms are `normed * scale` (ones init); a parameter-free norm on V; q/k norms with scale.
  * No query scaling (logits = q.k), no attention softcap; final logit softcap 30.
  * Global layers have their own head width (`global_head_dim`, 512), KV heads
    (`num_global_kv_heads`) and partial RoPE (`global_rope_proportion`, HF "proportional").
    With `k_eq_v` they have one `k_einsum`: its output is K (key norm, RoPE) and V (value norm).
  * Per-layer embeddings (PLE, E2B/E4B): `(norm(x0 @ W * D**-0.5) + E_ple[id] * sqrt(P)) / sqrt(2)`
    feeds a gated residual after each block's MLP. Soft-token positions look up id 0 (HF's pad
    id) in `E_ple`, while x0 already holds the soft tokens.
  * KV sharing: the last `num_kv_shared_layers` layers attend over the K/V of the last earlier
    unshared layer of their type (`config.kv_source`). They keep their own q/kv weights in the
    tree (checkpoints hold them) but their K/V are never used, and they own no cache entry.
  * MoE (26B-A4B): routed experts (`mlp`, moe.py) beside a dense MLP (`mlp2`).
  * A learned per-layer `skip_scale` multiplies each block's output.
  * Bidirectional attention within an image only with `bidirectional_vision` and only on local
    layers (HF `create_masks_for_vision_model`); audio soft tokens are causal.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_app import kernels
from gemma_app.nn.attention import (
    LayerCache,
    chunked_attention,
    dense_attention,
    write_cache,
)
from gemma_app.nn.config import AttentionType, TransformerConfig
from gemma_app.nn.layers import (
    Embedder,
    FeedForward,
    ScaleRMSNorm,
    Weight,
    merge_heads,
    project_heads,
)
from gemma_app.nn.moe import MoE
from gemma_app.nn.rope import apply_rope

KV = dict[str, jax.Array]  # {"k", "v"}: [B, S, K, H] (a cache) or [B, T, K, H] (no cache)


class Gemma4Embedder(Embedder):
    """Tied embedding plus the per-layer embeddings (PLE) of E2B/E4B."""

    num_layers: int = 0
    per_layer_dim: int = 0

    def setup(self):
        super().setup()
        if self.per_layer_dim:
            v, d, n_l, p = self.vocab_size, self.embed_dim, self.num_layers, self.per_layer_dim
            init = nn.initializers.normal(stddev=p**-0.5)
            self.per_layer_embeddings = self.param(
                "per_layer_embeddings", init, (v, n_l, p), self.param_dtype
            )
            self.per_layer_model_projection = Weight(
                (d, n_l, p), in_axis=0, param_dtype=self.param_dtype
            )
            self.per_layer_projection_norm = ScaleRMSNorm(param_dtype=self.param_dtype)

    def per_layer_inputs(self, ids: jax.Array, x0: jax.Array) -> jax.Array:
        """ids [B, T] (0 at soft tokens), x0 [B, T, D] embeddings -> [B, T, L, P]."""
        d, p = self.embed_dim, self.per_layer_dim
        w = self.per_layer_model_projection()  # [D, L, P]
        proj = kernels.contract_first(x0, w.reshape(d, -1)).reshape(*x0.shape[:2], *w.shape[1:])
        proj = proj * jnp.asarray(d**-0.5, x0.dtype)
        proj = self.per_layer_projection_norm(proj)
        table = self.per_layer_embeddings[ids].astype(x0.dtype)  # [B, T, L, P]
        tok = table * jnp.sqrt(jnp.asarray(p, x0.dtype)).astype(x0.dtype)
        return (proj + tok) * jnp.asarray(2.0**-0.5, x0.dtype)


class Gemma4Attention(nn.Module):
    """Attention of one Gemma 4 layer; see the module docstring for what is special."""

    config: TransformerConfig
    attn_type: AttentionType
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None,
        shared: KV | None,
        segments: jax.Array | None,
        seg_cache: jax.Array | None,
        *,
        cached: bool,
    ) -> tuple[KV, jax.Array]:
        """x [B, T, D] -> (the K/V later layers may share, [B, T, D]).

        Args:
          cache: this layer's cache (None without a cache, and always for KV-shared layers).
          shared: K/V of this layer's source layer (KV-shared layers only): its updated cache
            when `cached`, else its fresh [B, T, K, H] keys and values.
          segments / seg_cache: image blocks of the tokens / of every cache slot; only given
            where attention is bidirectional within an image.
          cached: whether K/V are slot-indexed caches (chunked attention) or fresh tensors.
        """
        cfg, pd, t = self.config, self.param_dtype, self.attn_type
        n, d = cfg.num_heads, cfg.embed_dim
        k_heads, h = cfg.layer_kv_heads(t), cfg.layer_head_dim(t)
        w_q = Weight((n, d, h), param_dtype=pd, name="q_einsum")()
        q = jnp.moveaxis(project_heads(x, w_q), 0, 2)  # [B, T, N, H]
        q = self._rope(ScaleRMSNorm(param_dtype=pd, name="query_norm")(q), positions)

        # Always projected so that KV-shared layers own their (unused) weights as in the
        # checkpoints; under jit XLA drops the dead K/V computation.
        if cfg.k_eq_v and t == AttentionType.GLOBAL:
            w_k = Weight((k_heads, d, h), param_dtype=pd, name="k_einsum")()
            k = v = jnp.moveaxis(project_heads(x, w_k), 0, 2)  # [B, T, K, H]
        else:
            w_kv = Weight((2, k_heads, d, h), param_dtype=pd, name="kv_einsum")()
            k, v = jnp.moveaxis(project_heads(x, w_kv), 1, 3)  # each [B, T, K, H]
        k = self._rope(ScaleRMSNorm(param_dtype=pd, name="key_norm")(k), positions)
        v = ScaleRMSNorm(with_scale=False)(v)

        if shared is not None:
            kv = shared
        elif cached:
            kv = write_cache(cache, k, v, positions)
        else:
            kv = {"k": k, "v": v}

        q = q.reshape(*q.shape[:2], k_heads, n // k_heads, h)  # [B, T, K, G, H]
        window = cfg.sliding_window_size if t == AttentionType.LOCAL_SLIDING else None
        if cached:
            o = chunked_attention(
                q, kv["k"], kv["v"], positions, window=window, cap=None,
                q_seg=segments, seg_cache=seg_cache,
            )  # fmt: skip
        else:
            o = dense_attention(
                q, kv["k"], kv["v"], positions, positions, window=window, cap=None,
                segments=segments,
            )  # fmt: skip
        o = o.reshape(*o.shape[:2], n, h)  # [B, T, N, H]
        w_o = Weight((n, h, d), param_dtype=pd, in_axis=(0, 1), name="attn_vec_einsum")()
        return kv, merge_heads(o, w_o)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config
        base, scale = cfg.rope_base_and_scale(self.attn_type)
        proportion = cfg.global_rope_proportion if self.attn_type == AttentionType.GLOBAL else 1.0
        return apply_rope(
            x, positions, base_frequency=base, scale_factor=scale, rope_proportion=proportion
        )


class Gemma4Block(nn.Module):
    """One Gemma 4 layer: attention, dense MLP or dense + MoE, PLE gate, skip scale."""

    config: TransformerConfig
    layer: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x, positions, cache, shared, per_layer_input, segments, seg_cache, *, cached
    ):
        """x [B, T, D], per_layer_input [B, T, P] or None -> (K/V to share, [B, T, D])."""
        cfg, pd = self.config, self.param_dtype
        attn_type = cfg.attention_types[self.layer]

        def norm(name):
            return ScaleRMSNorm(param_dtype=pd, name=name)

        bidirectional = cfg.bidirectional_vision and attn_type == AttentionType.LOCAL_SLIDING
        if not bidirectional or (cached and seg_cache is None):
            segments = seg_cache = None  # purely causal layer
        attn = Gemma4Attention(cfg, attn_type, param_dtype=pd, name="attn")
        kv, a = attn(
            norm("pre_attention_norm")(x), positions, cache, shared, segments, seg_cache,
            cached=cached,
        )  # fmt: skip
        x = x + norm("post_attention_norm")(a)

        h = norm("pre_ffw_norm")(x)
        if cfg.moe is None:
            hidden = cfg.layer_hidden_dim(self.layer)
            f = FeedForward(cfg, param_dtype=pd, hidden_dim=hidden, name="mlp")(h)
        else:  # the library's names: `mlp` = experts, `mlp2` = the dense branch
            experts = norm("post_ffw1_norm")(MoE(cfg, param_dtype=pd, name="mlp")(x, h))
            dense = FeedForward(cfg, param_dtype=pd, name="mlp2")(norm("pre_ffw2_norm")(x))
            f = experts + norm("post_ffw2_norm")(dense)
        x = x + norm("post_ffw_norm")(f)

        if per_layer_input is not None:
            d, p = cfg.embed_dim, cfg.per_layer_input_dim
            gate = Weight((d, p), param_dtype=pd, name="per_layer_input_gate")()
            proj = Weight((p, d), param_dtype=pd, name="per_layer_projection")()
            g = jax.nn.gelu(kernels.contract_first(x, gate), approximate=True)
            g = g * per_layer_input  # [B, T, P]
            x = x + norm("post_per_layer_input_norm")(kernels.contract_first(g, proj))
        skip = self.param("skip_scale", nn.initializers.ones_init(), (1,), pd)
        return kv, x * skip.astype(x.dtype)


def decode(
    cfg: TransformerConfig,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    tokens: jax.Array,
    positions: jax.Array,
    cache: dict | None,
    logits_at: jax.Array | None,
    mm_embeddings: jax.Array | None,
    segments: jax.Array | None,
) -> tuple[jax.Array, dict | None]:
    """The body of `Transformer.__call__` for family 4 (must run inside its compact method, so
    that the submodules below land at the top of the parameter tree)."""
    embedder = Gemma4Embedder(
        cfg.num_embed, cfg.embed_dim, param_dtype=param_dtype, num_layers=cfg.num_layers,
        per_layer_dim=cfg.per_layer_input_dim, name="embedder",
    )  # fmt: skip
    ids = tokens if segments is None else jnp.where(segments != 0, 0, tokens)  # HF: pad id
    x = embedder.encode(ids, dtype)  # [B, T, D]
    if segments is not None:
        x = jnp.where((segments != 0)[..., None], mm_embeddings.astype(dtype), x)
    ple = embedder.per_layer_inputs(ids, x) if cfg.per_layer_input_dim else None

    seg_cache, new_cache = None, None if cache is None else {}
    if cache is not None and "segments" in cache:
        rows = jnp.arange(tokens.shape[0])[:, None]
        seg = jnp.zeros_like(tokens) if segments is None else segments
        seg_cache = cache["segments"].at[rows, positions].set(seg, mode="drop")
        new_cache["segments"] = seg_cache

    kv_of = {}  # layer -> the K/V it produced, for the KV-shared layers after it
    for i in range(cfg.num_layers):
        name, src = f"layer_{i}", cfg.kv_source(i)
        own = None if cache is None or src != i else cache[name]
        block = Gemma4Block(cfg, i, param_dtype=param_dtype, name=name)
        kv, x = block(
            x, positions, own, None if src == i else kv_of[src],
            None if ple is None else ple[:, :, i], segments, seg_cache, cached=cache is not None,
        )  # fmt: skip
        if src == i:
            kv_of[i] = kv
            if cache is not None:
                new_cache[name] = kv
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
    x = ScaleRMSNorm(param_dtype=param_dtype, name="final_norm")(x)
    logits = embedder.decode(x).astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
        c = cfg.final_logit_softcap
        logits = c * jnp.tanh(logits / c)
    return logits, new_cache


def cache_layers(cfg: TransformerConfig) -> list[int]:
    """Layers that own a cache entry (every layer except the KV-shared ones)."""
    return [i for i in range(cfg.num_layers) if cfg.kv_source(i) == i]
