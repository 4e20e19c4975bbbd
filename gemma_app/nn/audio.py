"""Gemma 4 (E2B/E4B) audio encoder: a USM-style conformer over log-mel features (spec §8).

Parameters carry the names of the official checkpoints (`audio_encoder/feature/...`,
`audio_encoder/conformer/stacked_layers_{i}/...`, `audio_encoder/output_projection`, spec
§2.1), so a restored tree drops into `AudioEncoder(config).apply` as it is. The math follows
Hugging Face's `Gemma4AudioModel` (transformers 5.23, `modeling_gemma4.py`); where it
differs from google-deepmind/gemma (`gm/nn/gemma4/audio`), HF wins and the difference is
written where it happens:

* local attention: a frame sees itself and the `context_left - 2` = 11 frames before it
  (HF's `sliding_window_mask_function((context_left - 1, 0))` keeps `0 <= q - k < 12`);
  the reference's causal mask keeps `0 <= q - k <= 12`, one frame more;
* the subsampling convolutions mask (zero) invalid frames before each convolution; the
  reference masks the features only;
* no `x *= mask` after the attention block (it only changes padded frames, which no valid
  frame reads: every later step is causal or masked);
* text side (`project_audio`): RMSNorm (no scale) of the 1536-wide output, *then* the
  projection; the reference projects first and normalises the D-wide result.

HF splits the attention into blocks of 12 queries with 24-frame key contexts and a
Transformer-XL "relative shift"; that layout changes nothing in the math (every query's
keys are inside its block context), so here each frame gathers its window of keys directly.

Axis letters: B clips, T frames (after subsampling), F mel bins / frequency rows, C conv
channels, W conformer width (1024), N heads, H head width (128), R window of keys (12),
I FFN hidden (4096), O output width (1536), D text model width.

Usage:
  soft, valid = encode_audio(config.audio, params["audio_encoder"], features, mask)
  tokens = project_audio(soft[0][valid[0]], params["embedder"]["audio_input_projection"]["w"])
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.nn.config import AudioConfig
from gemma_app.nn.layers import ScaleRMSNorm, rms_normalize

NORM_EPS = 1e-6  # every RMSNorm / LayerNorm of the encoder and the text-side norm (HF)
GRADIENT_CLIP = 1e10  # HF / reference clamp activations to +-1e10 at fixed points
INVALID_LOGIT = -1e9  # masked attention logits (after the soft-cap)
FRAME_BUCKET_MIN = 128  # mel frames are padded to 128, 256, 512, 1024, then multiples of 1024

_f32 = jnp.float32


def _lecun(in_axis=-2, out_axis=-1):
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis, out_axis)


def _clip_activations(x: jax.Array) -> jax.Array:
    """HF's `torch.clamp(x, -gradient_clipping, gradient_clipping)`: a no-op on finite fp32."""
    return jnp.clip(x, -GRADIENT_CLIP, GRADIENT_CLIP)


# --- primitives -------------------------------------------------------------------------


class Kernel(nn.Module):
    """A lone weight named `kernel` (convolutions, `pos_proj`, `input_proj`)."""

    shape: tuple[int, ...]
    in_axis: int | tuple[int, ...] = -2
    out_axis: int | tuple[int, ...] = -1
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self) -> jax.Array:
        init = _lecun(self.in_axis, self.out_axis)
        return self.param("kernel", init, self.shape, self.param_dtype).astype(_f32)


class ClippedLinear(nn.Module):
    """`clip(clip(x, in) @ kernel, out)`: the reference's ClippedEinsum, HF's ClippableLinear.

    The kernel's leading `len(shape) - 1` axes are contracted with x's last axis (so a
    `(N, H, W)` kernel reads heads [..., N, H] reshaped to [..., N*H]). With clipped linears
    the four bounds are learned scalars `clip_{input,output}_{min,max}`; they start at +-inf
    (no clipping) until a checkpoint fills them.
    """

    shape: tuple[int, ...]
    clipped: bool
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *fan_in, out = self.shape
        in_axes = tuple(range(len(fan_in)))
        kernel = self.param("kernel", _lecun(in_axes, -1), self.shape, self.param_dtype)
        kernel = kernel.astype(_f32).reshape(math.prod(fan_in), out)  # a free reshape
        if not self.clipped:
            return jnp.dot(x, kernel)
        bounds = {
            name: self.param(name, nn.initializers.constant(value), (), self.param_dtype)
            for name, value in (
                ("clip_input_min", -jnp.inf),
                ("clip_input_max", jnp.inf),
                ("clip_output_min", -jnp.inf),
                ("clip_output_max", jnp.inf),
            )
        }
        x = jnp.clip(x, bounds["clip_input_min"], bounds["clip_input_max"])
        return jnp.clip(jnp.dot(x, kernel), bounds["clip_output_min"], bounds["clip_output_max"])


def _rms(x: jax.Array) -> jax.Array:
    """RMSNorm without a scale, over the last axis, in float32."""
    return rms_normalize(x, NORM_EPS)


class LayerNorm(nn.Module):
    """`(x - mean) * rsqrt(var + 1e-6) * scale` (no bias), two-pass variance as in HF."""

    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        return centered * jax.lax.rsqrt(var + NORM_EPS) * scale.astype(_f32)


# --- subsampling ------------------------------------------------------------------------


def _conv_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 2 and padding 1 on time and frequency: [B,T,F,C] -> [B,T',F',C']."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(2, 2), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip


class SubSampling(nn.Module):
    """`feature`: two (conv 3x3 / 2 -> LayerNorm -> ReLU) stages, then `input_proj` to W.

    Time and the 128 mel bins both shrink 4x (T -> ceil(ceil(T/2)/2)); the mask is strided
    alike. As HF does, each stage first zeroes the frames its mask calls invalid.
    """

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = features.astype(_f32)[..., None]  # [B, T, F, 1]
        channels = (1, *cfg.subsampling_channels)
        for i in range(2):
            kernel = Kernel(
                (3, 3, channels[i], channels[i + 1]), in_axis=(0, 1, 2), out_axis=3,
                param_dtype=self.param_dtype, name=f"subsampling_{i}",
            )()  # fmt: skip
            x = _conv_stride2(x * mask[:, :, None, None], kernel)  # [B, T/2, F/2, C]
            x = jax.nn.relu(LayerNorm(self.param_dtype, name=f"norm_{i}")(x))
            mask = mask[:, ::2]
        b, t, f, c = x.shape
        proj = Kernel(
            (f, c, cfg.width), in_axis=(0, 1), out_axis=2, param_dtype=self.param_dtype,
            name="input_proj",
        )()  # fmt: skip
        # HF flattens [B, T, F, C] with C fastest, the order of the (F, C, W) kernel.
        return jnp.dot(x.reshape(b, t, f * c), proj.reshape(f * c, cfg.width)), mask


# --- conformer blocks -------------------------------------------------------------------


class FeedForward(nn.Module):
    """Macaron half: `x + 0.5 * post_norm(W2 swish(W1 pre_norm(x)))`."""

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        clipped = cfg.use_clipped_linears
        y = ScaleRMSNorm(pd, name="pre_layer_norm")(_clip_activations(x))
        y = ClippedLinear((cfg.width, cfg.ffn_dim), clipped, pd, name="ffn_layer1")(y)  # [B,T,I]
        y = ClippedLinear((cfg.ffn_dim, cfg.width), clipped, pd, name="ffn_layer2")(nn.swish(y))
        y = ScaleRMSNorm(pd, name="post_layer_norm")(_clip_activations(y))
        return x + 0.5 * y


def relative_timing_signal(num_positions: int, width: int) -> jax.Array:
    """Sinusoids [R, W] of the distances 0..R-1: `[sin(d / s_i), cos(d / s_i)]`, s_i up to 1e4."""
    half = width // 2
    increment = math.log(1.0e4) / max(half - 1, 1)
    inv_timescales = np.exp(np.arange(half) * -increment)
    scaled = np.arange(num_positions)[:, None] * inv_timescales[None, :]  # [R, W/2]
    return jnp.asarray(np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1), _f32)


class RelativePositionEmbedding(nn.Module):
    """`relative_position_embedding`: the Transformer-XL position keys [R, N, H] per distance."""

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, window: int) -> jax.Array:
        cfg = self.config
        n, h = cfg.num_heads, cfg.head_dim
        proj = Kernel(
            (cfg.width, n, h), in_axis=0, out_axis=(1, 2), param_dtype=self.param_dtype,
            name="pos_proj",
        )()  # fmt: skip
        sinusoids = relative_timing_signal(window, cfg.width)  # [R, W]
        return jnp.dot(sinusoids, proj.reshape(cfg.width, n * h)).reshape(window, n, h)


def _key_windows(x: jax.Array, window: int) -> jax.Array:
    """[B, T, ...] -> [B, T, R, ...]: entry (t, r) is x[t - r], zero before the start."""
    t = x.shape[1]
    padded = jnp.pad(x, [(0, 0), (window - 1, 0)] + [(0, 0)] * (x.ndim - 2))
    index = (window - 1) + jnp.arange(t)[:, None] - jnp.arange(window)[None, :]  # [T, R]
    return padded[:, index]


class LocalSelfAttention(nn.Module):
    """`self_atten`: each frame attends to itself and the frames just before it.

    Logits are `q . k + q . P[t - s]` (content plus relative position), soft-capped at
    `logit_cap`; queries are scaled by `softplus(per_dim_scale) / (sqrt(H) ln 2)` and keys
    by `softplus(1) / ln 2` (HF `q_scale`, `k_scale`).
    """

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, T, W], mask [B, T] -> [B, T, N, H]."""
        cfg, pd = self.config, self.param_dtype
        b, t, _ = x.shape
        n, h, r = cfg.num_heads, cfg.head_dim, cfg.attention_window
        shape, clipped = (cfg.width, n * h), cfg.use_clipped_linears
        q, k, v = (
            ClippedLinear(shape, clipped, pd, name=name)(x).reshape(b, t, n, h)  # [B, T, N, H]
            for name in ("query", "key", "value")
        )
        per_dim_scale = self.param("per_dim_scale", nn.initializers.zeros_init(), (h,), pd)
        q = q * (h**-0.5 / math.log(2)) * jax.nn.softplus(per_dim_scale.astype(_f32))
        k = k * (math.log(1 + math.e) / math.log(2))  # softplus(1) / ln 2
        positions = RelativePositionEmbedding(cfg, pd, name="relative_position_embedding")(r)

        k_win, v_win = _key_windows(k, r), _key_windows(v, r)  # [B, T, R, N, H]
        logits = jnp.einsum("btnh,btrnh->bntr", q, k_win)
        logits += jnp.einsum("btnh,rnh->bntr", q, positions)
        logits = cfg.logit_cap * jnp.tanh(logits / cfg.logit_cap)
        first = (jnp.arange(t)[:, None] - jnp.arange(r)[None, :]) >= 0  # [T, R] inside the clip
        valid = first[None] & _key_windows(mask, r)  # [B, T, R]
        logits = jnp.where(valid[:, None], logits, INVALID_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, N, T, R]
        return jnp.einsum("bntr,btrnh->btnh", probs, v_win)


class AttentionBlock(nn.Module):
    """`trans_atten`: `x + post_norm(post(LocalSelfAttention(pre_norm(x))))`."""

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        y = ScaleRMSNorm(pd, name="pre_norm")(_clip_activations(x))
        y = LocalSelfAttention(cfg, pd, name="self_atten")(y, mask)  # [B, T, N, H]
        post = ClippedLinear(
            (cfg.num_heads, cfg.head_dim, cfg.width), cfg.use_clipped_linears, pd, name="post"
        )
        y = post(y.reshape(*y.shape[:2], -1))
        return x + ScaleRMSNorm(pd, name="post_norm")(_clip_activations(y))


class LightConv(nn.Module):
    """`lconv`: `x + W_end swish(norm(causal_depthwise_conv(GLU(W_start ln(x)))))`."""

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        w, kw = cfg.width, cfg.conv_kernel
        y = ScaleRMSNorm(pd, name="ln")(x)
        y = ClippedLinear((w, 2 * w), cfg.use_clipped_linears, pd, name="linear_start")(y)
        y = y[..., :w] * jax.nn.sigmoid(y[..., w:])  # GLU: first half gated by the second
        kernel = Kernel((kw, 1, w), in_axis=(0, 1), out_axis=2, param_dtype=pd,
                        name="depthwise_conv1d")()  # fmt: skip
        # Causal: output t reads inputs t-kw+1 .. t (left padding kw-1), per channel.
        padded = jnp.pad(y, ((0, 0), (kw - 1, 0), (0, 0)))
        t = y.shape[1]
        y = sum(padded[:, j : j + t] * kernel[j, 0] for j in range(kw))
        y = ScaleRMSNorm(pd, name="conv_norm")(_clip_activations(y))
        y = ClippedLinear((w, w), cfg.use_clipped_linears, pd, name="linear_end")(nn.swish(y))
        return x + y


class ConformerLayer(nn.Module):
    """`stacked_layers_{i}`: FFN/2 -> local attention -> light conv -> FFN/2 -> `final_ln`."""

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, pd = self.config, self.param_dtype
        x = FeedForward(cfg, pd, name="fflayer_start")(x)
        x = AttentionBlock(cfg, pd, name="trans_atten")(x, mask)
        x = LightConv(cfg, pd, name="lconv")(x)
        x = FeedForward(cfg, pd, name="fflayer_end")(x)
        return ScaleRMSNorm(pd, name="final_ln")(_clip_activations(x))


class Conformer(nn.Module):
    """`conformer`: `depth` layers, each its own `stacked_layers_{i}` subtree (not scanned)."""

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.depth):
            x = ConformerLayer(self.config, self.param_dtype, name=f"stacked_layers_{i}")(x, mask)
        return x


class AudioEncoder(nn.Module):
    """The `audio_encoder` subtree: log-mel [B, T, 128] -> soft tokens [B, ceil(T/4), O].

    Usage (inside a parent, or alone):
      soft, valid = AudioEncoder(config.audio, name="audio_encoder")(features, mask)
    """

    config: AudioConfig
    param_dtype: jnp.dtype = _f32

    @nn.compact
    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, pd = self.config, self.param_dtype
        if features.ndim != 3 or features.shape[-1] != cfg.num_mel_bins:
            raise ValueError(
                f"Expected log-mel features [B, T, {cfg.num_mel_bins}], got {tuple(features.shape)}"
            )
        mask = mask.astype(bool)
        x, mask = SubSampling(cfg, pd, name="feature")(features, mask)  # [B, T', W], [B, T']
        x = Conformer(cfg, pd, name="conformer")(x, mask)
        out = nn.Dense(
            cfg.output_dim, param_dtype=pd, kernel_init=_lecun(), name="output_projection"
        )(x)  # [B, T', O]
        # Padded frames come out as garbage in HF; zero them so they are inert if kept.
        return jnp.where(mask[..., None], out.astype(_f32), 0.0), mask


# --- entry points -----------------------------------------------------------------------


def frame_bucket(num_frames: int) -> int:
    """Padded frame count for `num_frames`: 128, 256, 512, 1024, then multiples of 1024."""
    bucket = FRAME_BUCKET_MIN
    while bucket < min(num_frames, 1024):
        bucket *= 2
    return bucket if num_frames <= 1024 else -(-num_frames // 1024) * 1024


def num_output_frames(num_frames: int) -> int:
    """Frames after the two stride-2 convolutions: `ceil(ceil(T / 2) / 2) = ceil(T / 4)`."""
    return (num_frames + 3) // 4


@functools.partial(jax.jit, static_argnames=("audio_config",))
def _encode(audio_config: AudioConfig, params_audio: dict, features, mask):
    return AudioEncoder(audio_config).apply({"params": params_audio}, features, mask)


def encode_audio(
    audio_config: AudioConfig, params_audio: dict, features: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Log-mel features -> soft tokens before the text-side projection.

    The frame axis is zero-padded (mask False) to `frame_bucket(T)` so clips of different
    lengths share a few compilations; padding changes no valid output (every step after the
    masked subsampling is causal or masked), and the result is cut back to T's length.

    Args:
      audio_config: the encoder's architecture (static: compiled per config and bucket).
      params_audio: the `audio_encoder` subtree `{"feature", "conformer", "output_projection"}`.
      features: float32 [n, T, 128] log-mel features (`gemma_app.audio_input`).
      mask: bool [n, T], True on valid frames (a prefix of each row).

    Returns (host numpy arrays):
      soft: float32 [n, t, O] with t = ceil(ceil(T / 2) / 2); zero where `valid` is False.
      valid: bool [n, t]; row i has `num_audio_tokens(len_i)` True entries (before the cap).
    """
    # Pad and cut on the host: eager jnp.pad / slicing would compile a small program for
    # every new clip length; this way a new length inside a known bucket compiles nothing.
    features = np.asarray(features, np.float32)
    mask = np.asarray(mask, bool)
    t = features.shape[1]
    pad = frame_bucket(t) - t
    features = np.pad(features, ((0, 0), (0, pad), (0, 0)))
    mask = np.pad(mask, ((0, 0), (0, pad)))
    soft, valid = _encode(audio_config, params_audio, features, mask)
    keep = num_output_frames(t)
    return np.asarray(soft)[:, :keep], np.asarray(valid)[:, :keep]


def project_audio(soft: jax.Array, projection_w: jax.Array) -> jax.Array:
    """Soft tokens into the text model's embedding space (HF `Gemma4MultimodalEmbedder`).

    HF normalises first (RMSNorm without scale, eps 1e-6, over the O = 1536 features) and
    projects after; google-deepmind/gemma projects first and normalises over D
    (`audio_soft_embedding_norm`). This follows HF.

    Args:
      soft: [..., O] encoder output (`encode_audio`).
      projection_w: [O, D] `embedder/audio_input_projection/w`.

    Returns:
      [..., D] float32; these replace the text embeddings of the audio slots (no sqrt(D)).
    """
    return jnp.dot(_rms(soft), projection_w.astype(_f32))


def _example_inputs(audio_config: AudioConfig):
    return (
        jax.ShapeDtypeStruct((1, FRAME_BUCKET_MIN, audio_config.num_mel_bins), _f32),
        jax.ShapeDtypeStruct((1, FRAME_BUCKET_MIN), bool),
    )


def init_params(audio_config: AudioConfig, *, seed: int = 0, dtype=_f32) -> dict:
    """Deterministic random `audio_encoder` parameters (tests and the demo)."""
    return _init_params(audio_config, jnp.dtype(dtype), jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compile per config (seed as data)
def _init_params(audio_config: AudioConfig, dtype, rng: jax.Array) -> dict:
    features, mask = (jnp.zeros(s.shape, s.dtype) for s in _example_inputs(audio_config))
    return AudioEncoder(audio_config, param_dtype=dtype).init(rng, features, mask)["params"]


def abstract_params(audio_config: AudioConfig, dtype=_f32) -> dict:
    """The `audio_encoder` tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    model = AudioEncoder(audio_config, param_dtype=dtype)
    init = lambda f, m: model.init(jax.random.key(0), f, m)  # noqa: E731
    return jax.eval_shape(init, *_example_inputs(audio_config))["params"]


def init_audio_embedder(audio_config: AudioConfig, embed_dim: int, *, seed: int = 0) -> dict:
    """Random `embedder/audio_input_projection/w` [O, D], as the `embedder` sub-dict to merge."""
    o = audio_config.output_dim
    w = jax.random.normal(jax.random.key(seed), (o, embed_dim), _f32) * o**-0.5
    return {"audio_input_projection": {"w": w}}


def audio_embedder_shapes(audio_config: AudioConfig, embed_dim: int) -> dict[str, tuple]:
    """The `embedder/` leaf the audio projection adds to a model (flat path -> shape)."""
    return {"embedder/audio_input_projection/w": (audio_config.output_dim, embed_dim)}
