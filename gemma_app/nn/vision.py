"""Gemma 3 image encoder: SigLIP So400m/14 ViT, soft-token pooling and projection (spec §7.1).

Parameters carry the names of the official checkpoints (`vision_encoder/siglip_encoder/...`,
spec §2.1), so a restored tree drops into `VisionEncoder(config).apply` as it is.

Axis letters (the text model's B T S N H D of `attention.py`, plus the ViT's own):
  B images, T patch tokens (queries), S patch tokens (keys), C a chunk of T,
  N heads, H head width, W ViT width (1152), F MLP hidden (4304),
  P patch side in pixels (14), G patches per image side (64), M soft tokens per image (256),
  D text model width.

Usage:
  soft = encode_images(config.vision, params["vision_encoder"], images)    # [B, M, W]
  embedder = params["embedder"]
  tokens = project_soft_tokens(                                           # [B, M, D]
      soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"])

Everything runs in float32 whatever the parameters are stored in, as the reference does.
Matmuls read the weights in their stored layout (`(W, N, H)` kernels reshape to `(W, N*H)`
for free), so XLA:CPU never copies a weight per call.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_app.nn.config import VisionConfig
from gemma_app.nn.layers import RMSNorm

LAYER_NORM_EPS = 1e-6  # SigLIP's LayerNorms (big_vision / HF `layer_norm_eps`)
QUERY_CHUNK = 1024  # queries per attention step: bounds the [B, N, C, S] logits (256 MiB at 4096)

_f32 = jnp.float32
_lecun = functools.partial(nn.initializers.variance_scaling, 1.0, "fan_in", "normal")


# --- preprocessing and pooling (pure functions) -----------------------------------------


def preprocess_image(image: jax.Array, size: int = 896) -> jax.Array:
    """uint8 RGB [H, W, 3] -> float32 [size, size, 3] in [-1, 1], as the reference does.

    `jax.image.resize(..., "bilinear", antialias=True)` on the raw 0..255 values (so large
    images are low-pass filtered, not aliased), then `(x - 127.5) / 127.5` and a clip. An image
    that already has the target size is not resampled. Decoding files and converting modes to
    RGB belong to `gemma_app.media`.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    x = jax.image.resize(jnp.asarray(image, _f32), (size, size, 3), "bilinear", antialias=True)
    return jnp.clip((x - 127.5) / 127.5, -1.0, 1.0)


def pool_soft_tokens(x: jax.Array, tokens_per_side: int) -> jax.Array:
    """Average-pools the square patch grid: [B, G*G, W] -> [B, M, W], M = tokens_per_side**2.

    Non-overlapping windows of k x k patches, k = G // tokens_per_side, read in raster order:
    soft token `r * tokens_per_side + c` averages patch rows `r*k ... r*k+k-1` and columns
    `c*k ... c*k+k-1` (flax `avg_pool` in the reference, `nn.AvgPool2d` in transformers).
    """
    b, t, w = x.shape
    side = math.isqrt(t)
    k = side // tokens_per_side
    if side * side != t or k * tokens_per_side != side:
        raise ValueError(f"{t} patches do not pool to {tokens_per_side}x{tokens_per_side}")
    x = x.reshape(b, tokens_per_side, k, tokens_per_side, k, w)  # [B, r, kr, c, kc, W]
    return x.mean(axis=(2, 4)).reshape(b, tokens_per_side * tokens_per_side, w)


def project_soft_tokens(soft: jax.Array, norm_scale: jax.Array, projection: jax.Array) -> jax.Array:
    """Soft tokens into the text model's embedding space (`Embedder.encode_vision`).

    Args:
      soft: [B, M, W] pooled encoder output.
      norm_scale: [W] `embedder/mm_soft_embedding_norm/scale`, used as `(1 + scale)`.
      projection: [W, D] `embedder/mm_input_projection/w`.

    Returns:
      [B, M, D] float32: these vectors *replace* the text embeddings of the soft-token slots
      (they are not scaled by sqrt(D)).
    """
    normed = RMSNorm().apply({"params": {"scale": norm_scale}}, soft.astype(_f32))
    return jnp.dot(normed, projection.astype(_f32))  # [B, M, D]


# --- the encoder ------------------------------------------------------------------------


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked softmax attention, [B, T, N, H] x3 -> [B, T, N, H], over query chunks.

    The 16 heads' 4096 x 4096 logits of one image would take 1 GiB (plus as much for the
    probabilities); chunking the queries keeps that at QUERY_CHUNK / T of it.
    """
    b, t, n, h = q.shape
    q = q * jnp.asarray(h**-0.5, q.dtype)  # scale the queries, as flax's attention does
    kt = k.transpose(0, 2, 3, 1)  # [B, N, H, S]: the layout the logits matmul reads, made once
    vt = v.transpose(0, 2, 1, 3)  # [B, N, S, H]

    def one_chunk(qc):  # [B, C, N, H] -> [B, C, N, H]
        logits = jnp.einsum("bcnh,bnhs->bncs", qc, kt, preferred_element_type=_f32)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bncs,bnsh->bcnh", probs, vt)

    if t <= QUERY_CHUNK or t % QUERY_CHUNK:
        return one_chunk(q)
    chunks = q.reshape(b, t // QUERY_CHUNK, QUERY_CHUNK, n, h).swapaxes(0, 1)  # [T/C, B, C, N, H]
    out = jax.lax.map(one_chunk, chunks)
    return out.swapaxes(0, 1).reshape(b, t, n, h)


class LayerNorm(nn.Module):
    """`(x - mean) * rsqrt(var + 1e-6) * scale + bias` over the last axis, in float32.

    Written out instead of `flax.linen.LayerNorm`, whose default "fast variance"
    `E[x^2] - E[x]^2` loses digits against the two-pass variance of the references.
    """

    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (w,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (w,), self.param_dtype)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(var + LAYER_NORM_EPS)
        return normed * scale.astype(_f32) + bias.astype(_f32)


class Dense(nn.Module):
    """`x @ kernel + bias` with a `[..., in]` -> `[..., out]` kernel of shape `kernel_shape`.

    The kernel's leading axes are the inputs and its trailing axes the outputs
    (`in_axes` of them); both groups are flattened for free (row-major), so one plain matmul
    serves `(W, F)` MLP kernels, `(W, N, H)` head projections and `(N, H, W)` output kernels.
    """

    kernel_shape: tuple[int, ...]
    in_axes: int = 1
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outs = self.kernel_shape[self.in_axes :]
        in_axis = tuple(range(self.in_axes))
        out_axis = tuple(range(self.in_axes, len(self.kernel_shape)))
        init = _lecun(in_axis=in_axis, out_axis=out_axis)
        kernel = self.param("kernel", init, self.kernel_shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), outs, self.param_dtype)
        n_in, n_out = kernel.size // bias.size, bias.size
        lead = x.shape[: x.ndim - self.in_axes]
        y = jnp.dot(x.reshape(*lead, n_in), kernel.reshape(n_in, n_out).astype(_f32))
        return (y + bias.reshape(n_out).astype(_f32)).reshape(*lead, *outs)


class MultiHeadDotProductAttention(nn.Module):
    """ViT self-attention with biases, no mask; flax's parameter layout and names."""

    config: VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, W] -> [B, T, W]."""
        w, n, h, pd = (
            self.config.width,
            self.config.num_heads,
            self.config.head_dim,
            self.param_dtype,
        )
        q = Dense((w, n, h), param_dtype=pd, name="query")(x)  # [B, T, N, H]
        k = Dense((w, n, h), param_dtype=pd, name="key")(x)
        v = Dense((w, n, h), param_dtype=pd, name="value")(x)
        o = _attention(q, k, v)  # [B, T, N, H]
        return Dense((n, h, w), in_axes=2, param_dtype=pd, name="out")(o)


class MlpBlock(nn.Module):
    """Dense(F) -> tanh-approximated GELU -> Dense(W) (flax `gelu`, HF `gelu_pytorch_tanh`)."""

    config: VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w, f, pd = self.config.width, self.config.mlp_dim, self.param_dtype
        hidden = jax.nn.gelu(Dense((w, f), param_dtype=pd, name="Dense_0")(x), approximate=True)
        return Dense((f, w), param_dtype=pd, name="Dense_1")(hidden)  # [B, T, W]


class Encoder1DBlock(nn.Module):
    """Pre-LN ViT block: `x += MHA(LN(x))`, `x += MLP(LN(x))`."""

    config: VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        y = LayerNorm(param_dtype=pd, name="LayerNorm_0")(x)
        x = x + MultiHeadDotProductAttention(
            cfg, param_dtype=pd, name="MultiHeadDotProductAttention_0"
        )(y)
        y = LayerNorm(param_dtype=pd, name="LayerNorm_1")(x)
        return x + MlpBlock(cfg, param_dtype=pd, name="MlpBlock_0")(y)


class Encoder(nn.Module):
    """`depth` blocks `encoderblock_{i}` and the final `encoder_norm`."""

    config: VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.depth):
            x = Encoder1DBlock(self.config, param_dtype=self.param_dtype, name=f"encoderblock_{i}")(
                x
            )
        return LayerNorm(param_dtype=self.param_dtype, name="encoder_norm")(x)


class SigLiPEncoder(nn.Module):
    """Patch embedding (a stride-P VALID conv) + learned positions + the ViT encoder."""

    config: VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, G*P, G*P, 3] -> [B, G*G, W] (raster order of the patch grid)."""
        cfg, pd = self.config, self.param_dtype
        b, p, g = images.shape[0], cfg.patch_size, cfg.patches_per_side
        # The conv as a matmul: each patch flattened (row, column, channel), which is the
        # row-major order of the (P, P, 3, W) HWIO kernel's leading axes.
        x = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)  # [B, G, G, P, P, 3]
        x = Dense((p, p, 3, cfg.width), in_axes=3, param_dtype=pd, name="embedding")(
            x.reshape(b, g * g, p, p, 3)
        )  # [B, G*G, W]
        init = nn.initializers.normal(stddev=cfg.width**-0.5)
        pos = self.param("pos_embedding", init, (1, cfg.num_patches, cfg.width), pd)
        x = x + pos.astype(_f32)
        return Encoder(cfg, param_dtype=pd, name="Transformer")(x)


class VisionEncoder(nn.Module):
    """The `vision_encoder` subtree: SigLIP, then pooling to M soft tokens per image.

    Usage (inside a parent, or alone):
      soft = VisionEncoder(config.vision, name="vision_encoder")(images)   # [B, M, W]
    """

    config: VisionConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, R, R, 3] float in [-1, 1], R = image_size -> [B, M, W] float32."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"Expected images [B, {cfg.image_size}, {cfg.image_size}, 3], "
                f"got {tuple(images.shape)}"
            )
        x = SigLiPEncoder(cfg, param_dtype=self.param_dtype, name="siglip_encoder")(
            images.astype(_f32)
        )  # [B, G*G, W]
        # The reference stops gradients here (the encoder is frozen); we never differentiate.
        return pool_soft_tokens(x, cfg.tokens_per_side)


# --- entry points -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("vision_config",))
def encode_images(vision_config: VisionConfig, params_vision: dict, images: jax.Array) -> jax.Array:
    """images [B, R, R, 3] in [-1, 1] -> soft tokens [B, M, W] (float32, before projection).

    Args:
      vision_config: the encoder's architecture (static: one compilation per config).
      params_vision: the `vision_encoder` subtree, `{"siglip_encoder": {...}}`.
      images: preprocessed images (`preprocess_image`), R = `vision_config.image_size`.
    """
    return VisionEncoder(vision_config).apply({"params": params_vision}, images)


def init_params(vision_config: VisionConfig, *, seed: int = 0, dtype=_f32) -> dict:
    """Deterministic random `vision_encoder` parameters (tests and the demo)."""
    return _init_params(vision_config, jnp.dtype(dtype), jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compile per config (seed as data)
def _init_params(vision_config: VisionConfig, dtype, rng: jax.Array) -> dict:
    size = vision_config.image_size
    images = jnp.zeros((1, size, size, 3), _f32)
    return VisionEncoder(vision_config, param_dtype=dtype).init(rng, images)["params"]


def abstract_params(vision_config: VisionConfig, dtype=_f32) -> dict:
    """The `vision_encoder` tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    model = VisionEncoder(vision_config, param_dtype=dtype)
    size = vision_config.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), _f32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]


def init_mm_embedder(vision_config: VisionConfig, embed_dim: int, *, seed: int = 0) -> dict:
    """Random `embedder/mm_input_projection/w` and `embedder/mm_soft_embedding_norm/scale`.

    Returned as the two `embedder` sub-dicts, to merge into a text model's `embedder`.
    """
    width = vision_config.width
    w = jax.random.normal(jax.random.key(seed), (width, embed_dim), _f32) * width**-0.5
    return {
        "mm_input_projection": {"w": w},
        "mm_soft_embedding_norm": {"scale": jnp.zeros((width,), _f32)},
    }


def mm_embedder_shapes(vision_config: VisionConfig, embed_dim: int) -> dict[str, tuple]:
    """The two `embedder/` leaves the projection adds to a vision model (flat paths)."""
    w = vision_config.width
    return {
        "embedder/mm_input_projection/w": (w, embed_dim),
        "embedder/mm_soft_embedding_norm/scale": (w,),
    }
