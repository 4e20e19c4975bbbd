"""Attention of decode steps over the KV cache, with a CPU kernel (`attention.cc`).

`cached_attention` is `nn.attention.chunked_attention`'s fast path: a few query positions
(T <= MAX_ROWS, a decode step) with fp32 queries, on CPU, go to the kernel, which reads each
used cache slot once in place. XLA's loop copies every 256-slot chunk of K (transposed) and V
before its dots, which cost ~0.1 ms of a ~0.45 ms layer in a Gemma 3 270M decode step. Other
platforms, prefill chunks and image-block masks keep XLA's loop (`default`), whose numbers
the kernel matches up to fp32 summation order (tests/test_attention_kernel.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.kernels import MAX_ROWS, build

TARGET = "gemma_app_decode_attention"
UNWRITTEN = "gemma_app_unwritten"
NO_WINDOW = 1 << 30  # the kernel's window of a global layer


def cache_array(shape: tuple[int, ...], dtype) -> jax.Array:
    """A KV cache array of unspecified values: on CPU, memory as the allocator hands it out.

    Zeros cost a write of the whole cache per new conversation (~15 ms of Gemma 3 270M's
    ~95 ms first token at bf16), and no reader depends on them: the kernel reads only slots
    up to each query's position, and XLA's loop (nn/attention.py) gives V's slots past the
    call's last position zero weight by a select, so even NaN there is harmless. Elsewhere
    (no kernels, other platforms) zeros, which a GPU writes at ~TB/s.
    """
    dtype = jnp.dtype(dtype)
    if not build.load():
        return jnp.zeros(shape, dtype)
    return _cache_array(tuple(shape), dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _cache_array(shape: tuple[int, ...], dtype) -> jax.Array:
    def cpu():
        return jax.ffi.ffi_call(UNWRITTEN, jax.ShapeDtypeStruct(shape, dtype))()

    return jax.lax.platform_dependent(cpu=cpu, default=lambda: jnp.zeros(shape, dtype))


def usable(q: jax.Array, k_cache: jax.Array) -> bool:
    """Whether `cached_attention` can take these operands to the kernel on CPU."""
    return (
        q.ndim == 5
        and q.shape[1] <= MAX_ROWS
        and q.dtype == jnp.float32
        and k_cache.dtype in (jnp.float32, jnp.bfloat16)
        and build.load()
    )


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_pos: jax.Array,
    *,
    window,
    cap: float | None,
    layer: jax.Array | None,
    default: Callable[..., jax.Array],
) -> jax.Array:
    """q [B, T, K, G, H] over caches [B, S, K, H] (or layer `layer` of [L, B, S, K, H]).

    `window`: None, a Python int or a traced int32 (the scanned decoder's per-layer window).
    `default(q, k_cache, v_cache, q_pos, layer, window)`: the XLA loop, for other platforms.
    Returns [B, T, K, G, H] in the cache's dtype, as the loop does.
    """
    layer_arr = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    win = jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)

    def cpu(q, k_cache, v_cache, q_pos, layer_arr, win):
        stacked = (k_cache, v_cache) if layer is not None else (k_cache[None], v_cache[None])
        out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
        call = jax.ffi.ffi_call(TARGET, out)
        o = call(q, *stacked, layer_arr, q_pos.astype(jnp.int32), win, cap=np.float32(cap or 0))
        return o.astype(v_cache.dtype)

    def xla(q, k_cache, v_cache, q_pos, layer_arr, win):
        static = window is None or isinstance(window, int)
        return default(
            q, k_cache, v_cache, q_pos, None if layer is None else layer_arr,
            window if static else win,
        )  # fmt: skip

    args = (q, k_cache, v_cache, q_pos, layer_arr, win)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=xla)
