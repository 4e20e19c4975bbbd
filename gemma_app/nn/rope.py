"""Rotary position embedding, half-split layout (not interleaved), as in all Gemma versions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

RopeTables = tuple[jax.Array, jax.Array]  # (sin, cos), each [B, T, 1, H/2] float32


def rope_tables(
    positions: jax.Array,
    head_dim: int,
    *,
    base_frequency: float | jax.Array,
    scale_factor: float | jax.Array = 1.0,
    rope_proportion: float = 1.0,
) -> RopeTables:
    """(sin, cos) of the rotation angles of `positions` [B, T], broadcast over heads.

    A decoder computes them once per forward and per layer type: XLA:CPU fuses sin and cos into
    every rotated element, so inside a layer they would be recomputed for each head of q and k.
    """
    half = head_dim // 2
    rope_angles = int(rope_proportion * head_dim // 2)
    exponents = 2.0 * jnp.arange(rope_angles, dtype=jnp.float32) / head_dim
    inv_timescale = jnp.concatenate(
        [base_frequency**-exponents, jnp.zeros(half - rope_angles, jnp.float32)]
    )  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] / scale_factor * inv_timescale  # [B, T, H/2]
    angles = angles[..., None, :]  # [B, T, 1, H/2]
    return jnp.sin(angles), jnp.cos(angles)


def rotate(x: jax.Array, tables: RopeTables) -> jax.Array:
    """x [B, T, N, H] rotated by `rope_tables`; same dtype as x, computed in float32."""
    sin, cos = tables
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    base_frequency: float,
    scale_factor: float = 1.0,
    rope_proportion: float = 1.0,
) -> jax.Array:
    """Rotates the last axis of `x` by angles proportional to `positions`.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: [B, T] integer positions.
      base_frequency: RoPE base (10k local, 1M Gemma 3 global).
      scale_factor: positions are divided by it (Gemma 3 4B+ global layers: 8.0, linear scaling).
      rope_proportion: fraction of the H/2 rotation pairs that rotate; the rest are left as is
        (their timescale is infinite).

    Returns:
      [B, T, N, H], same dtype as `x`; the angles are computed in float32.
    """
    tables = rope_tables(
        positions, x.shape[-1], base_frequency=base_frequency, scale_factor=scale_factor,
        rope_proportion=rope_proportion,
    )  # fmt: skip
    return rotate(x, tables)
