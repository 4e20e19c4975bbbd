"""Gemma 4 image encoder: variable-aspect ViT, pooling by position, text projection (spec §7.3).

Parameters carry the names of the official checkpoints (spec §2.1):
  vision_encoder/entry/input_projection/w          (768, W)
  vision_encoder/entry/pos_emb                     (10240, 2, W)   factorized: [pos, axis, W]
  vision_encoder/transformer/stacked_layers/block/ every leaf with a leading layer axis L:
      pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm: scale (L, W)
      attn/q_einsum/w (L, N, W, H)   attn/kv_einsum/w (L, 2, N, W, H)
      attn/attn_vec_einsum/w (L, N, H, W)   attn/query_norm/scale, attn/key_norm/scale (L, H)
      mlp/gating_einsum/w (L, 2, F, W)   mlp/linear/w (L, F, W)
      <each einsum>/clip_{input,output}_{min,max} (L,)        when use_clipped_linears
  vision_encoder/standardize/{scale, bias} (W,)                 when standardize
  embedder/mm_input_projection/w (W, D)  (text side; its RMSNorm has no parameters)

Axis letters: B images, T patches (queries), S patches (keys), N heads, H head width,
W ViT width, F MLP hidden, M soft-token cells (= max_soft_tokens), D text model width.

The maths follows transformers' `Gemma4VisionModel` (5.23), checked against it in
`tests/test_vision4.py`:
  * entry: `(2 * (patch - 0.5)) @ w_in + pos_emb[x, 0] + pos_emb[y, 1]` (padding gets no
    position embedding);
  * blocks: `x += post_attn_norm(attn(pre_attn_norm(x)))`, `x += post_ffw_norm(mlp(...))`,
    norms `normed * scale` (no `1 +`); q and k RMSNorm'ed with a scale, v without one, 2-D
    RoPE base 100 (first half of each head turned by x, second half by y), **no** 1/sqrt(H)
    logit scaling; GeGLU with tanh GELU; E2B/E4B linears clip their input and output;
  * exit: padding zeroed, k x k cells averaged by position (cell `x//k + (Gw//k) * (y//k)`),
    `* sqrt(W)`, then `(x - bias) * scale` on 31B/26B.
Where google-deepmind/gemma differs we follow transformers: padding patches are masked out of
attention with -inf (the library *adds* the boolean mask, so padding leaks into real tokens,
spec §7.3), and the output length is `patches // k**2` = `max_soft_tokens` (no 1120 vs 280
mismatch). Norm scales initialise to ones (transformers) rather than the library's zeros, so a
random model is usable.

Usage:
  pre = [vision_input.preprocess(image, vc) for image in images]
  patches, positions, counts = vision_input.stack(pre)
  soft, mask = encode_images(vc, params["vision_encoder"], patches, positions)   # [B, M, W]
  tokens = project_soft_tokens(soft[0, :counts[0]], params["embedder"]["mm_input_projection"]["w"])

Everything runs in float32 whatever the parameters are stored in.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.nn.config import Gemma4VisionConfig
from gemma_app.nn.layers import ScaleRMSNorm, rms_normalize

RMS_NORM_EPS = 1e-6  # transformers' `rms_norm_eps`; the library's RMSNorm constant
QUERY_CHUNK = 1024  # at most this many queries per attention step (bounds the [B,N,C,S] logits)
PAD_POSITION = -1

_f32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)  # masked logits: finite, so an all-padding row is no NaN


def _rms(x: jax.Array) -> jax.Array:
    """`x * rsqrt(mean(x**2) + eps)` over the last axis, float32 (no scale)."""
    return rms_normalize(x, RMS_NORM_EPS)


class ClippedEinsum(nn.Module):
    """`einsum(eqn, clip(x, in_min, in_max), w)` clipped to `[out_min, out_max]`.

    Without `clipped` this is a plain einsum with one weight `w` (the library's `Einsum`).
    The bounds are learned scalars (±inf at init, i.e. no clipping). transformers splits the
    fused kv / gating einsums into two linears that share these bounds.
    """

    shape: tuple[int, ...]
    clipped: bool
    in_axis: int | tuple[int, ...]
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=self.in_axis)
        w = self.param("w", init, self.shape, self.param_dtype).astype(_f32)
        if not self.clipped:
            return jnp.einsum(eqn, x, w)
        bounds = {
            name: self.param(name, nn.initializers.constant(value), (), self.param_dtype)
            for name, value in (
                ("clip_input_min", -jnp.inf),
                ("clip_input_max", jnp.inf),
                ("clip_output_min", -jnp.inf),
                ("clip_output_max", jnp.inf),
            )
        }
        b = {k: v.astype(_f32) for k, v in bounds.items()}
        x = jnp.clip(x, b["clip_input_min"], b["clip_input_max"])
        y = jnp.einsum(eqn, x, w)
        return jnp.clip(y, b["clip_output_min"], b["clip_output_max"])


def apply_rope_2d(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """2-D RoPE: x [B, T, N, H], positions [B, T, 2] (x, y) -> [B, T, N, H].

    Channels `[0, H/2)` turn with the x coordinate, `[H/2, H)` with y; inside each half the
    usual half-split rule (pair `i` with `i + H/4`) and frequencies `base**(-2i / (H/2))`
    (transformers' "axial" rope: cos laid out x-x-y-y; the library's multidimensional RoPE).
    """
    h = x.shape[-1]
    half, quarter = h // 2, h // 4
    inv_freq = base ** (-jnp.arange(0, half, 2, dtype=_f32) / half)  # [H/4]
    parts = []
    for axis in range(2):
        part = x[..., axis * half : (axis + 1) * half]  # [B, T, N, H/2]
        angle = positions[..., axis, None].astype(_f32) * inv_freq  # [B, T, H/4]
        cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]  # [B, T, 1, H/4]
        a, b = part[..., :quarter], part[..., quarter:]
        parts += [a * cos - b * sin, b * cos + a * sin]
    return jnp.concatenate(parts, axis=-1)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax attention over valid keys only: [B, T, N, H] x3, valid [B, S] -> [B, T, N, H].

    No 1/sqrt(H) scaling (q and k are RMS-normalised instead). Queries run in equal chunks of
    at most QUERY_CHUNK so E2B's 2520 x 2520 logits per head never exist at once.
    """
    b, t, n, h = q.shape
    bias = jnp.where(valid, 0.0, _NEG)[:, None, None, :]  # [B, 1, 1, S]

    def one_chunk(qc):  # [B, C, N, H] -> [B, C, N, H]
        logits = jnp.einsum("bcnh,bsnh->bncs", qc, k) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bncs,bsnh->bcnh", probs, v)

    chunks = -(-t // QUERY_CHUNK)
    while t % chunks:
        chunks += 1
    if chunks == 1:
        return one_chunk(q)
    qs = q.reshape(b, chunks, t // chunks, n, h).swapaxes(0, 1)  # [T/C, B, C, N, H]
    return jax.lax.map(one_chunk, qs).swapaxes(0, 1).reshape(b, t, n, h)


class Attention(nn.Module):
    """Bidirectional ViT attention with q/k/v norms and 2-D RoPE (`attn`)."""

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, positions: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        w, n, h, clip = cfg.width, cfg.num_heads, cfg.head_dim, cfg.use_clipped_linears
        q = ClippedEinsum((n, w, h), clip, -2, pd, name="q_einsum")("btw,nwh->btnh", x)
        kv = ClippedEinsum((2, n, w, h), clip, -2, pd, name="kv_einsum")("bsw,cnwh->cbsnh", x)
        q = ScaleRMSNorm(pd, name="query_norm")(q)
        k = ScaleRMSNorm(pd, name="key_norm")(kv[0])
        v = _rms(kv[1])  # value norm without a scale
        q = apply_rope_2d(q, positions, cfg.rope_base)
        k = apply_rope_2d(k, positions, cfg.rope_base)
        o = _attention(q, k, v, valid)  # [B, T, N, H]
        out = ClippedEinsum((n, h, w), clip, (0, 1), pd, name="attn_vec_einsum")
        return out("btnh,nhw->btw", o)


class FeedForward(nn.Module):
    """GeGLU: `gelu_tanh(x Wg0) * (x Wg1) -> W_linear` (`mlp`)."""

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        w, f, clip = cfg.width, cfg.mlp_dim, cfg.use_clipped_linears
        gate = ClippedEinsum((2, f, w), clip, -1, pd, name="gating_einsum")("btw,cfw->btcf", x)
        hidden = jax.nn.gelu(gate[..., 0, :], approximate=True) * gate[..., 1, :]  # [B, T, F]
        return ClippedEinsum((f, w), clip, 0, pd, name="linear")("btf,fw->btw", hidden)


class Block(nn.Module):
    """One encoder block (pre + post norms around attention and MLP)."""

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, positions: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        y = Attention(cfg, pd, name="attn")(
            ScaleRMSNorm(pd, name="pre_attention_norm")(x), valid, positions
        )
        x = x + ScaleRMSNorm(pd, name="post_attention_norm")(y)
        y = FeedForward(cfg, pd, name="mlp")(ScaleRMSNorm(pd, name="pre_ffw_norm")(x))
        return x + ScaleRMSNorm(pd, name="post_ffw_norm")(y)


class _ScanBody(nn.Module):
    """`nn.scan` body: holds the block as `block`, as the library's `VisionBlock` does."""

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x, valid, positions):
        return Block(self.config, self.param_dtype, name="block")(x, valid, positions), None


class VisionTransformer(nn.Module):
    """The scanned stack: every parameter has a leading layer axis (`stacked_layers`)."""

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, positions: jax.Array) -> jax.Array:
        stack = nn.scan(
            _ScanBody,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.config.depth,
        )
        x, _ = stack(self.config, self.param_dtype, name="stacked_layers")(x, valid, positions)
        return x


class VisionEntry(nn.Module):
    """`2 * (patch - 0.5) @ w` plus the factorized (x, y) position embedding (`entry`)."""

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, patches: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        proj = ClippedEinsum((cfg.patch_dim, cfg.width), False, 0, pd, name="input_projection")
        x = proj("btp,pw->btw", 2.0 * (patches.astype(_f32) - 0.5))  # [B, T, W]
        init = nn.initializers.normal(stddev=0.02)
        table = self.param("pos_emb", init, (cfg.position_embedding_size, 2, cfg.width), pd)
        table = table.astype(_f32)
        clamped = jnp.maximum(positions, 0)  # padding looks up row 0, then is zeroed
        pos = table[clamped[..., 0], 0] + table[clamped[..., 1], 1]  # [B, T, W]
        return x + jnp.where(valid[..., None], pos, 0.0)


def pool_by_position(
    x: jax.Array, positions: jax.Array, valid: jax.Array, kernel: int
) -> tuple[jax.Array, jax.Array]:
    """Averages k x k patch cells: x [B, T, W] -> ([B, T // k**2, W], mask [B, T // k**2]).

    Patch (x, y) goes to cell `x // k + (Gw // k) * (y // k)`, Gw the image's width in patches
    (so the valid cells are the first `(Gh/k) * (Gw/k)` in raster order), weight 1/k**2.
    Padding is zeroed first and counted in cell 0, as in transformers; a cell is valid when
    some patch went to it.
    """
    b, t, w = x.shape
    length = t // kernel**2
    x = jnp.where(valid[..., None], x, 0.0)
    clamped = jnp.maximum(positions, 0)
    width = jnp.max(clamped[..., 0], axis=-1, keepdims=True) + 1  # [B, 1] patches per row
    cell = clamped[..., 0] // kernel + (width // kernel) * (clamped[..., 1] // kernel)  # [B, T]
    weights = jax.nn.one_hot(cell, length, dtype=_f32) / kernel**2  # [B, T, M]
    pooled = jnp.einsum("btm,btw->bmw", weights, x)
    return pooled, jnp.any(weights != 0, axis=1)


class Standardize(nn.Module):
    """`(x - bias) * scale` per feature on the pooled tokens (31B/26B, `standardize`)."""

    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (w,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (w,), self.param_dtype)
        return (x - bias.astype(_f32)) * scale.astype(_f32)


class VisionEncoder(nn.Module):
    """The `vision_encoder` subtree: entry, scanned ViT, pooling, sqrt(W), standardize.

    Usage (inside a parent, or alone):
      soft, mask = VisionEncoder(vc, name="vision_encoder")(patches, positions)
    """

    config: Gemma4VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, patches: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """patches [B, T, 768] in [0, 1], positions [B, T, 2] -> ([B, T/k², W], [B, T/k²])."""
        cfg, pd = self.config, self.param_dtype
        valid = jnp.any(positions != PAD_POSITION, axis=-1)  # [B, T]; padding is (-1, -1)
        x = VisionEntry(cfg, pd, name="entry")(patches, positions, valid)
        x = VisionTransformer(cfg, pd, name="transformer")(x, valid, positions)
        soft, mask = pool_by_position(x, positions, valid, cfg.pooling_kernel)
        soft = soft * math.sqrt(cfg.width)
        if cfg.standardize:
            soft = Standardize(pd, name="standardize")(soft)
        return soft, mask


# --- entry points -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("vision_config",))
def _encode(vision_config, params_vision, patches, positions):
    return VisionEncoder(vision_config).apply({"params": params_vision}, patches, positions)


def encode_images(
    vision_config: Gemma4VisionConfig, params_vision: dict, patches, positions
) -> tuple[jax.Array, jax.Array]:
    """Patches of n images -> soft tokens [n, M, W] float32 and their mask [n, M] bool.

    Args:
      vision_config: the encoder's architecture (static).
      params_vision: the `vision_encoder` subtree.
      patches: [n, P, 768] in [0, 1] (`vision_input.stack`), P <= `max_patches`.
      positions: [n, P, 2] int (x, y); (-1, -1) marks padding.

    Returns:
      `soft[i, :c_i]` are image i's c_i soft tokens in raster order (`mask[i]` is True exactly
      there), M = `max_soft_tokens`; they still need `project_soft_tokens`.

    Inputs are padded to `max_patches` on the host, so every aspect ratio (and budget use) of
    one config shares one compilation per batch size n.
    """
    patches = np.asarray(patches, np.float32)
    positions = np.asarray(positions, np.int32)
    n, p, dim = patches.shape
    if dim != vision_config.patch_dim or positions.shape != (n, p, 2):
        raise ValueError(f"Expected patches [n, P, {vision_config.patch_dim}] and positions "
                         f"[n, P, 2], got {patches.shape} and {positions.shape}")  # fmt: skip
    if p > vision_config.max_patches:
        raise ValueError(f"{p} patches exceed the budget of {vision_config.max_patches}")
    if positions.max(initial=0) >= vision_config.position_embedding_size:
        raise ValueError(f"Patch position {positions.max()} is outside the position table")
    extra = vision_config.max_patches - p
    patches = np.pad(patches, ((0, 0), (0, extra), (0, 0)))
    positions = np.pad(positions, ((0, 0), (0, extra), (0, 0)), constant_values=PAD_POSITION)
    return _encode(vision_config, params_vision, patches, positions)


def project_soft_tokens(soft: jax.Array, projection_w: jax.Array) -> jax.Array:
    """Soft tokens [..., W] -> text embeddings [..., D]: parameter-free RMSNorm, then `@ w`.

    transformers' `embed_vision` (`Gemma4MultimodalEmbedder`): RMSNorm without scale, eps 1e-6,
    then a bias-free linear; the library's `mm_pre_projection_norm` + `mm_input_projection`.
    The result replaces the text embeddings of the image slots (no sqrt(D) scaling).
    """
    return jnp.dot(_rms(jnp.asarray(soft)), jnp.asarray(projection_w).astype(_f32))


def _dummy_inputs(vision_config: Gemma4VisionConfig):
    k2 = vision_config.pooling_kernel**2  # one pooled cell: the smallest valid input
    return jnp.zeros((1, k2, vision_config.patch_dim), _f32), jnp.zeros((1, k2, 2), jnp.int32)


def init_params(vision_config: Gemma4VisionConfig, *, seed: int = 0, dtype=_f32) -> dict:
    """Deterministic random `vision_encoder` parameters (tests and the demo)."""
    return _init_params(vision_config, jnp.dtype(dtype), jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compile per config (seed as data)
def _init_params(vision_config: Gemma4VisionConfig, dtype, rng: jax.Array) -> dict:
    patches, positions = _dummy_inputs(vision_config)
    return VisionEncoder(vision_config, param_dtype=dtype).init(rng, patches, positions)["params"]


def abstract_params(vision_config: Gemma4VisionConfig, dtype=_f32) -> dict:
    """The `vision_encoder` tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    model = VisionEncoder(vision_config, param_dtype=dtype)
    patches, positions = _dummy_inputs(vision_config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), patches, positions))["params"]


def init_mm_embedder(vision_config: Gemma4VisionConfig, embed_dim: int, *, seed: int = 0) -> dict:
    """Random `embedder/mm_input_projection/w` (W, D), to merge into a text model's `embedder`."""
    width = vision_config.width
    w = jax.random.normal(jax.random.key(seed), (width, embed_dim), _f32) * width**-0.5
    return {"mm_input_projection": {"w": w}}


def mm_embedder_shapes(vision_config: Gemma4VisionConfig, embed_dim: int) -> dict[str, tuple]:
    """The one `embedder/` leaf the image path adds (flat path -> shape)."""
    return {"embedder/mm_input_projection/w": (vision_config.width, embed_dim)}
