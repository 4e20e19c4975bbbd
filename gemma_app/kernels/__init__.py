"""Weight products of the decoder, with a fast path for decode steps on CPU.

`contract_last(x, w)` and `contract_first(x, w)` are the two shapes every weight product of
the engine takes (heads and MLP gates are a leading batch axis G of the weight):

  contract_last:  x [..., K], w [G?, N, K] -> [G?, ..., N]   (embedding logits, Gemma 3 gates)
  contract_first: x [..., K], w [G?, K, N] -> [G?, ..., N]   (q/k/v heads, output, MLP linear)

On a CPU they run `gemv.cc` through the XLA FFI, fp32 math whatever the weights' storage:
  - at most `MAX_ROWS` rows of x (a decode step): fp32 or bf16 weights read once at memory
    speed (XLA:CPU's own GEMV runs bf16 weights at ~1.5 GB/s);
  - more rows (prefill chunks) with bf16 weights: a GEMM that widens panels of w in cache
    (XLA would need an fp32 copy of every weight per chunk).
Otherwise (fp32 prefill, GPUs, `GEMMA_APP_KERNELS=0`, no compiler) they are XLA dots on the
weights cast to x's dtype. Both paths give the same numbers up to fp32 summation order
(tests/test_kernels.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma_app.kernels import build

MAX_ROWS = 4  # rows of x (batch x tokens) the GEMV takes: a decode step, not a prefill chunk


def contract_last(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w[..., N, K]^T: [..., K], [N, K] -> [..., N]; [G, N, K] -> [G, ..., N]."""
    return _product(x, w, last=True)


def contract_first(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w: [..., K], [K, N] -> [..., N]; [G, K, N] -> [G, ..., N]."""
    return _product(x, w, last=False)


def _product(x: jax.Array, w: jax.Array, *, last: bool) -> jax.Array:
    grouped = w.ndim == 3
    w3 = w if grouped else w[None]  # [G, N, K] or [G, K, N]
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    target = _target(x2, w3)
    if target is None:
        y = _xla(x2, w3, last)
    else:
        cpu = functools.partial(_kernel, target=target, last=last)
        y = jax.lax.platform_dependent(x2, w3, cpu=cpu, default=functools.partial(_xla, last=last))
    y = y.reshape(w3.shape[0], *lead, -1)  # [G, ..., N]
    return y if grouped else y[0]


def _target(x2: jax.Array, w3: jax.Array) -> str | None:
    """The FFI target for this product on CPU, or None for XLA's dot everywhere."""
    if x2.shape[0] <= MAX_ROWS and w3.dtype in (jnp.float32, jnp.bfloat16):
        target = "gemma_app_gemv"
    elif w3.dtype == jnp.bfloat16 and x2.dtype == jnp.float32:
        target = "gemma_app_gemm_bf16"
    else:
        return None
    return target if build.load() else None


def _xla(x2: jax.Array, w3: jax.Array, last: bool) -> jax.Array:
    # G as a batch axis of both operands: XLA:CPU then reads w in place, where a plain einsum
    # would transpose it (a full weight copy per call) whenever G > 1.
    xb = jnp.broadcast_to(x2, (w3.shape[0], *x2.shape))  # [G, M, K]
    dims = (((2,), (2 if last else 1,)), ((0,), (0,)))
    return jax.lax.dot_general(xb, w3.astype(x2.dtype), dims)  # [G, M, N]


def _kernel(x2: jax.Array, w3: jax.Array, *, target: str, last: bool) -> jax.Array:
    g, a, b = w3.shape
    out = jax.ShapeDtypeStruct((g, x2.shape[0], a if last else b), jnp.float32)
    y = jax.ffi.ffi_call(target, out)(x2.astype(jnp.float32), w3, contract_last=last)
    return y.astype(x2.dtype)
