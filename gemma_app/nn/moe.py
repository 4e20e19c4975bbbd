"""The Gemma 4 26B-A4B mixture of experts (spec §1.4, HF `Gemma4TextRouter`/`Gemma4TextExperts`).

Axis letters as in attention.py, plus: M flattened tokens (B * T), E experts, X the top-k
slots of a token, F the hidden width of one expert.

Routing follows Hugging Face, not the reference library: exact `top_k` over the softmax
probabilities (the library uses `lax.approx_max_k` on the logits), weights renormalised over
the chosen experts and multiplied by `per_expert_scale`.

Two ways to run the chosen experts, both exact:
  * few tokens (decode): gather the X chosen experts' weights per token, so a step reads
    only the weights it uses;
  * many tokens (prefill): sort the (token, expert) pairs by expert and run one matmul per
    tile of rows of one expert, over the weights in place (`_experts_grouped`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.layers import Weight, rms_normalize


def route(
    x: jax.Array, router_w: jax.Array, router_scale: jax.Array, per_expert_scale: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Chooses `k` experts per token. x [M, D] -> (weights [M, X] float32, experts [M, X]).

    Router input: `rmsnorm_noscale(x) * router_scale * D**-0.5`; probabilities are the
    float32 softmax over all experts; the chosen ones are renormalised to sum to 1.
    """
    d = x.shape[-1]
    r = rms_normalize(x, 1e-6)  # float32, no scale
    r = r * router_scale.astype(jnp.float32) * d**-0.5
    logits = jnp.dot(r, router_w.astype(jnp.float32))  # [M, E]
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)  # exact, like torch.topk
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return weights * per_expert_scale.astype(jnp.float32)[top_i], top_i


def _experts_gathered(h, gating, linear, weights, experts):
    """Reads only the chosen experts: h [M, D] -> [M, D]."""
    wg = gating[experts]  # [M, X, 2, F, D]
    gates = jnp.einsum("md,mxsfd->smxf", h, wg)
    hidden = jax.nn.gelu(gates[0], approximate=True) * gates[1]  # [M, X, F]
    out = jnp.einsum("mxf,mxfd->mxd", hidden, linear[experts])
    return jnp.einsum("mxd,mx->md", out, weights.astype(h.dtype))


TILE = 32  # rows of one expert matmul in the grouped path


def _experts_grouped(h, gating, linear, weights, experts):
    """(token, expert) pairs sorted by expert, each expert's run padded to whole tiles of
    `TILE` rows, then one loop step per used tile: h [M, D] -> [M, D].

    Each tile belongs to one expert, so a step is a plain [TILE, D] x [D, 2F] matmul on that
    expert's weights read in place. (`jax.lax.ragged_dot` would do the same job, but XLA:CPU
    lowers it to a masked dense product per group: slower than running every expert.)
    """
    m, k = experts.shape
    num_experts, _, f, d = gating.shape
    pairs = m * k
    flat = experts.reshape(-1)  # [M * X]
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    sizes = jnp.bincount(flat, length=num_experts)  # [E]
    tiles_per_expert = (sizes + TILE - 1) // TILE
    tile_end = jnp.cumsum(tiles_per_expert)  # [E], exclusive end of each expert's tiles
    first_tile = tile_end - tiles_per_expert
    # Row of each sorted pair in the padded layout.
    rank = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[sorted_e]
    dest = first_tile[sorted_e] * TILE + rank
    num_tiles = -(-pairs // TILE) + num_experts  # static bound on the tiles used
    rows = jnp.full((num_tiles * TILE,), m).at[dest].set(order // k)  # m: an all-zero row
    row_w = jnp.zeros((num_tiles * TILE,), jnp.float32).at[dest].set(weights.reshape(-1)[order])
    tile_expert = jnp.minimum(
        jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"), num_experts - 1
    )
    h_pad = jnp.concatenate([h, jnp.zeros((1, d), h.dtype)])  # [M + 1, D]

    def body(t, acc):
        e = tile_expert[t]
        idx = jax.lax.dynamic_slice_in_dim(rows, t * TILE, TILE)
        x = h_pad[idx]  # [TILE, D]
        w_gate = jax.lax.dynamic_index_in_dim(gating, e, keepdims=False)  # [2, F, D], no copy
        gates = jnp.einsum("rd,sfd->srf", x, w_gate)
        hidden = jax.nn.gelu(gates[0], approximate=True) * gates[1]  # [TILE, F]
        out = jnp.dot(hidden, jax.lax.dynamic_index_in_dim(linear, e, keepdims=False))
        w = jax.lax.dynamic_slice_in_dim(row_w, t * TILE, TILE).astype(out.dtype)
        return acc.at[idx].add(out * w[:, None])

    acc = jnp.zeros((m + 1, d), h.dtype)
    return jax.lax.fori_loop(0, tile_end[-1], body, acc)[:m]


class MoE(nn.Module):
    """Routed experts with the official leaves (`gating_einsum/w`, `linear/w`, `router_logits/w`,
    `per_expert_scale`, `router_scale`), stored under the layer's `mlp`."""

    config: TransformerConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        """x [B, T, D] routes (the residual stream), h [B, T, D] (its `pre_ffw_norm`) is the
        experts' input. Returns the weighted sum of the chosen experts, [B, T, D]."""
        cfg, pd = self.config, self.param_dtype
        e, k, f, d = cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden_dim, cfg.embed_dim
        gating = Weight((e, 2, f, d), -1, pd, out_axis=-2, name="gating_einsum")(h.dtype)
        linear = Weight((e, f, d), -2, pd, name="linear")(h.dtype)
        router_w = Weight((d, e), -2, pd, name="router_logits")(jnp.float32)
        router_scale = self.param("router_scale", nn.initializers.ones_init(), (d,), pd)
        per_expert_scale = self.param("per_expert_scale", nn.initializers.ones_init(), (e,), pd)
        b, t, _ = x.shape
        weights, experts = route(x.reshape(b * t, d), router_w, router_scale, per_expert_scale, k)
        flat_h = h.reshape(b * t, d)
        if b * t * k <= e:  # decode: fewer chosen pairs than experts
            y = _experts_gathered(flat_h, gating, linear, weights, experts)
        else:
            y = _experts_grouped(flat_h, gating, linear, weights, experts)
        return y.reshape(b, t, d).astype(x.dtype)
