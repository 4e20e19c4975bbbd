"""Primitive layers: Einsum (a named weight `w`), RMSNorm, the tied Embedder.

Parameter names (`w`, `scale`, `input_embedding`) are those of the official checkpoints, so a
restored checkpoint drops into `model.apply({"params": params}, ...)` without renaming.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Fan-in scaled normal init: random weights (tests, the demo model) keep activations at unit
# scale through many layers. Real checkpoints overwrite these values anyway.
_default_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2)


class Einsum(nn.Module):
    """An einsum with one weight named `w` of shape `shape`.

    The weight is cast to the activation dtype, so bf16-stored weights run in fp32 on CPU when
    the activations are fp32 (XLA:CPU bf16 matmuls are several times slower than fp32).
    """

    shape: tuple[int, ...]
    in_axis: int = -2
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=self.in_axis)
        w = self.param("w", init, self.shape, self.param_dtype)
        return jnp.einsum(eqn, x, w.astype(x.dtype))


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
        return jnp.einsum("...d,vd->...v", x, self.input_embedding.astype(x.dtype))
