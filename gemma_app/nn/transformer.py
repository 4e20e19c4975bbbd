"""The Gemma decoder: embed -> blocks -> final norm -> tied logits (spec §1.2).

Gemma 4 (`config.family == 4`, spec §1.4) runs the blocks of gemma4.py under the same API.

Two parameter layouts run the same math:
  - the official tree, `layer_0/...`, `layer_1/...`: the layers are unrolled into the program;
  - stacked (`stack_layers`, what the engine serves): every `layer_i/<path>` leaf becomes one
    `layers/<path>` array [L, ...], and the blocks run in a `lax.scan`, so one layer body is
    compiled instead of L (Gemma 3 1B: 26). Each step reads its layer's weights in place
    (`kernels.LayerSlice`) and its KV cache from one stacked [L, B, S, K, H] pair; a layer's
    attention type (window, RoPE) is data.

Usage:
  model = Transformer(config)
  params = init_params(config, seed=0)            # or a restored checkpoint
  logits = forward(config, params, tokens)        # [B, T, V], no cache
  cache = init_cache(config, batch=1, cache_length=1024)
  logits, cache = model.apply({"params": params}, tokens, positions, cache, logits_at=idx)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_app import kernels
from gemma_app.kernels import attention as kernel_attention
from gemma_app.nn import gemma4
from gemma_app.nn.attention import CACHE_CHUNK, Attention, init_layer_cache
from gemma_app.nn.config import AttentionType, TransformerConfig
from gemma_app.nn.layers import Embedder, FeedForward, RMSNorm
from gemma_app.nn.rope import RopeTables, rope_tables

Cache = dict[str, dict[str, jax.Array]]


class Block(nn.Module):
    """One decoder layer: pre-norm attention and MLP, each with an optional post-norm.

    `attn_type=None`: a step of the scanned decoder; `layer` (traced) picks its type and cache.
    """

    config: TransformerConfig
    attn_type: AttentionType | None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x, positions, cache, segments=None, seg_cache=None, layer=None, rows=None, rope=None
    ):
        cfg, pd = self.config, self.param_dtype
        h = RMSNorm(param_dtype=pd, name="pre_attention_norm")(x)
        attn = Attention(cfg, self.attn_type, param_dtype=pd, name="attn")
        cache, a = attn(h, positions, cache, segments, seg_cache, layer, rows, rope)
        if cfg.use_post_attn_norm:
            a = RMSNorm(param_dtype=pd, name="post_attention_norm")(a)
        x = x + a
        f = FeedForward(cfg, param_dtype=pd, name="mlp")(
            RMSNorm(param_dtype=pd, name="pre_ffw_norm")(x), rows
        )
        if cfg.use_post_ffw_norm:
            f = RMSNorm(param_dtype=pd, name="post_ffw_norm")(f)
        return cache, x + f


class Transformer(nn.Module):
    """Gemma text decoder. `dtype` is the compute dtype; parameters may be stored in another."""

    config: TransformerConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Cache | None = None,
        *,
        logits_at: jax.Array | None = None,
        mm_embeddings: jax.Array | None = None,
        segments: jax.Array | None = None,
        num_real: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Runs the decoder.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int positions; with a cache they are also the slots written.
          cache: None for a plain causal forward over `tokens`, else the per-layer KV cache.
          logits_at: optional [B] index into T: return logits of that token only, [B, V]
            (prefill needs just the last prompt token, which saves a [T, V] matmul).
          mm_embeddings: [B, T, D] soft tokens (projected image features); they replace the
            token embeddings wherever `segments > 0`.
          segments: [B, T] image block of each token (1, 2, ... per image; 0 for text): tokens
            of one image attend to each other both ways.
          num_real: optional int32 scalar, batch 1 only: tokens past the first `num_real` are
            padding (a prompt padded to its bucket). The weight products skip them, so a
            100-token prompt in a 128 bucket costs ~100 rows; their outputs, and the cache
            slots they write, are unspecified but finite. Gemma 4 computes them all.

        Returns:
          (logits [B, T, V] or [B, V] in float32, updated cache or None).
        """
        cfg, pd = self.config, self.param_dtype
        if cfg.family == 4:
            return gemma4.decode(
                cfg, self.dtype, pd, tokens, positions, cache, logits_at, mm_embeddings, segments
            )
        embedder = Embedder(cfg.num_embed, cfg.embed_dim, param_dtype=pd, name="embedder")
        if segments is None:
            x = embedder.encode(tokens, self.dtype)  # [B, T, D]
        else:
            soft = (segments > 0)[..., None]
            x = embedder.encode(jnp.where(segments > 0, 0, tokens), self.dtype)
            x = jnp.where(soft, mm_embeddings.astype(self.dtype), x)
        if num_real is not None and tokens.shape[0] != 1:
            raise ValueError(f"num_real is for a batch of one row, not {tokens.shape[0]}")
        real_rows = None if num_real is None else jnp.asarray(num_real, jnp.int32)
        seg_cache = None
        new_cache = None if cache is None else {}
        if cache is not None and "segments" in cache:
            rows = jnp.arange(tokens.shape[0])[:, None]
            seg = jnp.zeros_like(tokens) if segments is None else segments
            seg_cache = cache["segments"].at[rows, positions].set(seg, mode="drop")
            new_cache["segments"] = seg_cache
        rope = _rope_by_type(cfg, positions)
        if self.has_variable("params", "layers"):
            x, stacked_cache = self._scan_blocks(
                x, positions, cache, segments, seg_cache, real_rows, rope
            )
            if cache is not None:
                new_cache["layers"] = stacked_cache
        else:
            for i, attn_type in enumerate(cfg.attention_types):
                name = f"layer_{i}"
                layer_cache = None if cache is None else cache[name]
                block = Block(cfg, attn_type, param_dtype=pd, name=name)
                layer_cache, x = block(
                    x, positions, layer_cache, segments, seg_cache, None, real_rows,
                    rope[attn_type],
                )  # fmt: skip
                if cache is not None:
                    new_cache[name] = layer_cache
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
        x = RMSNorm(param_dtype=pd, name="final_norm")(x)
        logits = embedder.decode(x).astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            c = cfg.final_logit_softcap
            logits = c * jnp.tanh(logits / c)
        return logits, new_cache

    def _scan_blocks(self, x, positions, cache, segments, seg_cache, rows, rope):
        """The blocks over stacked params `layers/...` [L, ...]: one compiled body for all."""
        cfg = self.config
        stacked = self.variables["params"]["layers"]
        block = Block(cfg, None, param_dtype=self.param_dtype)
        # Each layer's RoPE tables, picked from the stack of its type's by a traced index.
        types = list(rope)
        kind = jnp.asarray([types.index(t) for t in cfg.attention_types], jnp.int32)  # [L]
        tables = jax.tree.map(lambda *t: jnp.stack(t), *rope.values())  # [types, B, T, 1, H/2]

        def step(carry, layer):
            x, kv = carry
            # Matrices stay in the stack (the products read them in place); the norm scales
            # [L, D] are sliced, a few hundred bytes.
            params = jax.tree.map(
                lambda a: kernels.LayerSlice(a, layer) if a.ndim >= 3 else a[layer], stacked
            )
            layer_rope = jax.tree.map(lambda t: t[kind[layer]], tables)
            kv, x = block.apply(
                {"params": params}, x, positions, kv, segments, seg_cache, layer, rows, layer_rope
            )
            return (x, kv), None

        kv = None if cache is None else cache["layers"]
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, kv), _ = jax.lax.scan(step, (x, kv), layers)
        return x, kv


def _rope_by_type(cfg: TransformerConfig, positions: jax.Array) -> dict[AttentionType, RopeTables]:
    """RoPE tables of `positions` per attention type of the decoder, once per forward."""
    return {
        t: rope_tables(positions, cfg.head_dim, base_frequency=b, scale_factor=s)
        for t in dict.fromkeys(cfg.attention_types)
        for b, s in [cfg.rope_base_and_scale(t)]
    }


def cache_slots(cache_length: int) -> int:
    """Physical cache length: `cache_length` rounded up to whole attention chunks."""
    return -(-cache_length // CACHE_CHUNK) * CACHE_CHUNK


def init_cache(
    config: TransformerConfig,
    *,
    batch: int,
    cache_length: int,
    dtype=jnp.float32,
    stacked: bool = False,
) -> Cache:
    """A KV cache for every layer: `{"layer_i": {"k", "v"}}` of [B, S, K, H], not zeroed (no
    slot is read before it is written, see nn/attention.py).

    `stacked` (for stacked params, see `stack_layers`): `{"layers": {"k", "v"}}` of
    [L, B, S, K, H] instead. Gemma 4: K and H follow each layer's type, and KV-shared layers
    have no entry. With an image encoder, `"segments"` [B, S] holds the image block of every
    slot.
    """
    slots = cache_slots(cache_length)
    if stacked:
        one = jax.eval_shape(lambda: init_layer_cache(config, batch, slots, dtype))  # no zeros
        cache = {
            "layers": {
                n: kernel_attention.cache_array((config.num_layers, *a.shape), dtype)
                for n, a in one.items()
            }
        }
    elif config.family == 4:  # per-layer shapes; KV-shared layers own no entry
        cache = {
            f"layer_{i}": init_layer_cache(config, batch, slots, dtype, config.attention_types[i])
            for i in gemma4.cache_layers(config)
        }
    else:
        cache = {
            f"layer_{i}": init_layer_cache(config, batch, slots, dtype)
            for i in range(config.num_layers)
        }
    if getattr(config, "vision", None) is not None:  # the image block of every slot
        cache["segments"] = jnp.zeros((batch, slots), jnp.int32)
    return cache


def can_stack(config: TransformerConfig) -> bool:
    """Gemma 1-3 layers share one shape; Gemma 4's differ by type (and KV sharing)."""
    return config.family != 4


def is_stacked(params: dict) -> bool:
    """Whether `params` holds the decoder layers stacked (`stack_layers`)."""
    return "layers" in params


def stack_layers(config: TransformerConfig, params: dict, *, consume: bool = False) -> dict:
    """The official tree with `layer_0/<path>` ... `layer_{L-1}/<path>` stacked into one
    `layers/<path>` [L, ...] per leaf; every other entry (embedder, encoders) is shared.

    Returns `params` itself when already stacked or when the layers cannot be (Gemma 4).
    `consume=True` frees each per-layer array once its stack exists (the caller must not use
    them again), so the peak is the parameters plus one stacked leaf, not twice the weights.
    """
    if is_stacked(params) or not can_stack(config):
        return params
    names = [f"layer_{i}" for i in range(config.num_layers)]
    leaves = [jax.tree.leaves(params[name]) for name in names]
    treedef = jax.tree.structure(params[names[0]])
    stacks = []
    for column in zip(*leaves, strict=True):
        stacks.append(_stack(*column))
        if consume:  # wait for the stack, so its inputs are really gone before the next one
            stacks[-1].block_until_ready()
            for a in column:
                if isinstance(a, jax.Array):
                    a.delete()
    out = {k: v for k, v in params.items() if k not in names}
    out["layers"] = jax.tree.unflatten(treedef, stacks)
    return out


@jax.jit
def _stack(*column: jax.Array) -> jax.Array:
    # One compiled concatenation (eager `jnp.stack` copies every input once more first); for
    # 1- and 2-byte types of the raw bits, as XLA:CPU widens a bf16 concatenate to fp32 (+3.7 GB
    # on Gemma 3 1B's gates). 4-byte types stack directly: XLA:CPU copies an fp32 -> uint32
    # bitcast (+3 GB peak on 1B fp32).
    dtype = column[0].dtype
    bits = {1: jnp.uint8, 2: jnp.uint16}.get(dtype.itemsize)
    if bits is None:
        return jnp.stack(column)
    raw = jnp.stack([jax.lax.bitcast_convert_type(a, bits) for a in column])
    return jax.lax.bitcast_convert_type(raw, dtype)


def unstack_layers(params: dict) -> dict:
    """The official tree of stacked `params` (new arrays; for checks and export)."""
    if not is_stacked(params):
        return params
    stacked = params["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(count):
        out[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def init_params(config: TransformerConfig, *, seed: int = 0, dtype=jnp.float32) -> dict:
    """Deterministic random parameters in the official nested tree (tests and the demo)."""
    return _init_params(config, jnp.dtype(dtype), jax.random.key(seed))


# One compiled init per config and dtype, the seed as data: XLA:CPU takes seconds to compile
# the random draws of every leaf (tiny_gemma3: ~5 s), and tests and demos ask again and again.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params(config: TransformerConfig, dtype, rng: jax.Array) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config, param_dtype=dtype).init(rng, tokens, tokens)["params"]


def abstract_params(config: TransformerConfig, dtype=jnp.float32) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    model = Transformer(config, param_dtype=dtype)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t), tokens)
    return shapes["params"]


@functools.partial(jax.jit, static_argnames=("config",))
def forward(config: TransformerConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """Full causal forward without cache; positions 0..T-1. Returns float32 [B, T, V]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Transformer(config).apply({"params": params}, tokens, positions)
    return logits
