"""Primitive layers: named weights `w`, head projections, RMSNorms, the GeGLU MLP, the Embedder.

Parameter names (`w`, `scale`, `input_embedding`) are those of the official checkpoints, so a
restored checkpoint drops into `model.apply({"params": params}, ...)` without renaming.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_app import kernels
from gemma_app.nn.config import TransformerConfig


class Weight(nn.Module):
    """A weight named `w`: as stored (`dtype=None`), or cast to a compute dtype.

    Fan-in scaled normal init keeps random-weight models (tests, the demo) at unit activation
    scale; real checkpoints overwrite it. The decoder's products take the stored weight and
    go through `gemma_app.kernels`, which reads bf16 weights without an fp32 copy per step.
    """

    shape: tuple[int, ...]
    in_axis: int | tuple[int, ...] = -2
    param_dtype: jnp.dtype = jnp.float32
    out_axis: int | tuple[int, ...] = -1

    @nn.compact
    def __call__(self, dtype: jnp.dtype | None = None) -> jax.Array:
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "normal", in_axis=self.in_axis, out_axis=self.out_axis
        )
        w = self.param("w", init, self.shape, self.param_dtype)
        return w if dtype is None else w.astype(dtype)


def project_heads(x: jax.Array, w: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] @ w [*lead, D, H] -> [*lead, B, T, H], the heads a batch axis of the product.

    `rows`: only the first `rows` of the B * T rows are needed (see `kernels.contract_last`).

    Never `einsum("btd,ndh->btnh")`: XLA:CPU would transpose w (D is not its outermost axis)
    on every call, a full copy of the attention weights per decode step.
    """
    *lead, d, h = w.shape
    y = kernels.contract_first(x, w.reshape(-1, d, h), rows)  # leading axes merge for free
    return y.reshape(*lead, *x.shape[:2], h)


def merge_heads(o: jax.Array, w: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """o [B, T, N, H] @ w [N, H, D] -> [B, T, D] as one [N*H, D] product (no weight copy)."""
    n, h, d = w.shape
    return kernels.contract_first(o.reshape(*o.shape[:2], n * h), w.reshape(n * h, d), rows)


class RMSNorm(nn.Module):
    """Gemma 1/2/3 RMSNorm: `x * rsqrt(mean(x**2) + 1e-6) * (1 + scale)`, scale zero-initialised.

    Computed in float32 and cast back, as Hugging Face does (transformers PR #29402 moved the
    `(1 + scale)` product into fp32 too); for fp32 inputs this equals the reference library.
    """

    param_dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon
        )
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rms_normalize(x: jax.Array, epsilon: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)


class ScaleRMSNorm(nn.Module):
    """Gemma 4 RMSNorm: `normed * scale`, scale initialised to ones (no `1 +`).

    `with_scale=False` is the parameter-free variant (Gemma 4 value norm, router input norm).
    Float32 inside and cast back, like Hugging Face's `Gemma4RMSNorm`.
    """

    param_dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6
    with_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        normed = rms_normalize(x, self.epsilon)
        if self.with_scale:
            init = nn.initializers.ones_init()
            scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
            normed = normed * scale.astype(jnp.float32)
        return normed.astype(x.dtype)


class FeedForward(nn.Module):
    """GeGLU MLP with the official bare leaves `gating_einsum` and `linear` (no `/w`).

    `hidden_dim` overrides `config.hidden_dim` (Gemma 4: double-wide KV-shared layers and the
    26B-A4B dense branch).
    """

    config: TransformerConfig
    param_dtype: jnp.dtype = jnp.float32
    hidden_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; `rows`: as in `kernels.contract_last`."""
        d, f = self.config.embed_dim, self.hidden_dim or self.config.hidden_dim
        scaled = functools.partial(nn.initializers.variance_scaling, 1.0, "fan_in", "normal")
        if self.config.transpose_gating_einsum:  # stored (2, F, D)
            w = self.param(
                "gating_einsum", scaled(in_axis=-1, out_axis=-2), (2, f, d), self.param_dtype
            )
            gates = kernels.contract_last(x, w, rows)  # [2, B, T, F]
        else:  # stored (2, D, F): Gemma 1 and Gemma 2 2B
            w = self.param(
                "gating_einsum", scaled(in_axis=-2, out_axis=-1), (2, d, f), self.param_dtype
            )
            gates = kernels.contract_first(x, w, rows)  # [2, B, T, F]
        # tanh-approximated GELU, as flax.linen.gelu's default and HF's gelu_pytorch_tanh.
        hidden = jax.nn.gelu(gates[0], approximate=True) * gates[1]  # [B, T, F]
        linear = self.param("linear", scaled(in_axis=-2, out_axis=-1), (f, d), self.param_dtype)
        return kernels.contract_first(hidden, linear, rows)


class Embedder(nn.Module):
    """Tied token embedding: `encode` scales by sqrt(D); `decode` gives logits `x @ E^T`."""

    vocab_size: int
    embed_dim: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=self.embed_dim**-0.5)
        self.input_embedding = self.param(
            "input_embedding", init, (self.vocab_size, self.embed_dim), self.param_dtype
        )

    def encode(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        # [B, T] -> [B, T, D]. sqrt(D) is rounded to the compute dtype first, as the reference
        # does, so bf16 runs match bf16 references bit for bit.
        x = self.input_embedding[tokens].astype(dtype)
        return x * jnp.sqrt(jnp.asarray(self.embed_dim, dtype)).astype(dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        # [..., D] -> [..., V]
        return kernels.contract_last(x, self.input_embedding)
