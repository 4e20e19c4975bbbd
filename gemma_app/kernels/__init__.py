"""Weight products of the decoder, with a fast path for decode steps on CPU.

`contract_last(x, w)` and `contract_first(x, w)` are the two shapes every weight product of
the engine takes (heads and MLP gates are a leading batch axis G of the weight):

  contract_last:  x [..., K], w [G?, N, K] -> [G?, ..., N]   (embedding logits, Gemma 3 gates)
  contract_first: x [..., K], w [G?, K, N] -> [G?, ..., N]   (q/k/v heads, output, MLP linear)

`w` may also be a `LayerSlice`: one layer of a weight stacked over the decoder's layers, as
the scanned decoder (nn/transformer.py) hands them out. The kernels read that layer in place.

On a CPU with fp32 activations they run `gemv.cc` through the XLA FFI: fp32 math on fp32
weights; on bf16 weights, x rounded to bf16 and fp32 sums (`_rounded_for`, what a bf16 matmul
computes on an accelerator; AVX512-BF16 CPUs run it at twice the fp32 rate):
  - at most `MAX_ROWS` rows of x (a decode step): weights read once at memory speed (XLA:CPU's
    own GEMV runs bf16 weights at ~1.5 GB/s);
  - more rows (prefill chunks): a GEMM on panels of w packed in cache, widened to fp32 or, on
    AVX512-BF16, kept as bf16 pairs (XLA would need an fp32 copy of every bf16 weight per
    chunk, and a sliced copy of every stacked layer); on CPUs with AMX, bf16 weights go
    through its tiles (`amx.h`).
Otherwise (GPUs, bf16 activations, `GEMMA_APP_KERNELS=0`, no compiler) they are XLA dots on
the weights cast to x's dtype, with the same rounding of x. Both paths give the same numbers
up to fp32 summation order (tests/test_kernels.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gemma_app.kernels import build

MAX_ROWS = 4  # rows of x (batch x tokens) the GEMV takes: a decode step, not a prefill chunk


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """Layer `layer` (a traced int32 scalar) of a weight stacked over layers, [L, *shape].

    Quacks like the sliced array where a module looks at it (`shape`, `dtype`, `ndim`,
    `reshape`). The products below read it in place; anything else takes `value()`, a copy.
    Not a pytree: it only lives inside one trace.
    """

    stacked: jax.Array
    layer: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stacked.shape[1:]

    @property
    def ndim(self) -> int:
        return self.stacked.ndim - 1

    @property
    def dtype(self) -> jnp.dtype:
        return self.stacked.dtype

    def reshape(self, *shape) -> LayerSlice:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return LayerSlice(self.stacked.reshape(self.stacked.shape[0], *shape), self.layer)

    def value(self) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(self.stacked, self.layer, keepdims=False)

    def astype(self, dtype) -> jax.Array:
        return self.value().astype(dtype)


def contract_last(x: jax.Array, w: jax.Array | LayerSlice, rows: jax.Array | None = None):
    """x [..., K] @ w[..., N, K]^T: [..., K], [N, K] -> [..., N]; [G, N, K] -> [G, ..., N].

    `rows` (int32 scalar, data): only the first `rows` of x's rows, flattened over its leading
    axes, are needed (a prompt padded to its bucket). Output rows past them are unspecified but
    finite: the prefill kernel skips them and writes zeros; other paths compute them.
    """
    return _product(x, w, rows, last=True)


def contract_first(x: jax.Array, w: jax.Array | LayerSlice, rows: jax.Array | None = None):
    """x [..., K] @ w: [..., K], [K, N] -> [..., N]; [G, K, N] -> [G, ..., N]. `rows`: as in
    `contract_last`."""
    return _product(x, w, rows, last=False)


def _product(x: jax.Array, w: jax.Array | LayerSlice, rows, *, last: bool) -> jax.Array:
    groups = w.shape[0] if w.ndim == 3 else 1
    if isinstance(w, LayerSlice):  # [L, G?, a, b] -> [L * G, a, b]: merging major axes is free
        stack, layer = w.stacked.reshape(-1, *w.shape[-2:]), w.layer.astype(jnp.int32)
    else:
        stack, layer = w.reshape(-1, *w.shape[-2:]), jnp.zeros((), jnp.int32)  # [G, a, b]
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    target = _target(x2, stack)
    xla = functools.partial(_xla, groups=groups, last=last)
    if target is None:
        y = xla(x2, stack, layer)
    else:
        rows = jnp.asarray(x2.shape[0] if rows is None else rows, jnp.int32)
        cpu = functools.partial(_kernel, target=target, groups=groups, last=last)
        y = jax.lax.platform_dependent(x2, stack, layer, rows, cpu=cpu, default=xla)
    y = y.reshape(groups, *lead, -1)  # [G, ..., N]
    return y if w.ndim == 3 else y[0]


def _target(x2: jax.Array, stack: jax.Array) -> str | None:
    """The FFI target for this product on CPU, or None for XLA's dot everywhere."""
    if x2.dtype != jnp.float32 and x2.shape[0] > MAX_ROWS:
        return None  # bf16 activations: prefill keeps the reference's bf16 numerics
    if stack.dtype not in (jnp.float32, jnp.bfloat16):
        return None
    target = "gemma_app_gemv" if x2.shape[0] <= MAX_ROWS else "gemma_app_gemm"
    return target if build.load() else None


def _xla(x2: jax.Array, stack: jax.Array, layer: jax.Array, rows=None, *, groups: int, last: bool):
    """stack [L * G, a, b]: layer `layer`'s [G, a, b] times x2 [M, K] -> [G, M, N]."""
    if stack.shape[0] == groups:
        w3 = stack
    else:
        w3 = jax.lax.dynamic_slice_in_dim(stack, layer * groups, groups, axis=0)
    # G as a batch axis of both operands: XLA:CPU then reads w in place, where a plain einsum
    # would transpose it (a full weight copy per call) whenever G > 1.
    xb = jnp.broadcast_to(_rounded_for(x2, stack.dtype), (groups, *x2.shape))  # [G, M, K]
    dims = (((2,), (2 if last else 1,)), ((0,), (0,)))
    return jax.lax.dot_general(xb, w3.astype(x2.dtype), dims)  # [G, M, N]


def _rounded_for(x2: jax.Array, weight_dtype) -> jax.Array:
    """x rounded to bf16 (kept in x's dtype) when the weights are bf16, as the kernels do.

    bf16 weights multiply bf16 activations: each product is exact in fp32 and only the fp32
    sums round, the numerics of a bf16 matmul on GPUs and TPUs. The kernels get the same
    numbers from AVX512-BF16 instructions (twice the products per cycle of fp32 FMAs) or AMX
    tiles.
    """
    if weight_dtype == jnp.bfloat16 and x2.dtype == jnp.float32:
        return x2.astype(jnp.bfloat16).astype(jnp.float32)
    return x2


def _kernel(x2, stack, layer, rows, *, target: str, groups: int, last: bool) -> jax.Array:
    _, a, b = stack.shape
    out = jax.ShapeDtypeStruct((groups, x2.shape[0], a if last else b), jnp.float32)
    operands = (x2.astype(jnp.float32), stack, layer)
    if target == "gemma_app_gemm":  # the decode GEMV takes every row (at most MAX_ROWS)
        operands += (rows,)
    y = jax.ffi.ffi_call(target, out)(*operands, contract_last=last)
    return y.astype(x2.dtype)
