"""Small JAX helpers shared by the engine, the tests and the benchmarks."""

from __future__ import annotations

import ctypes
import functools
import threading

import jax
import jax.monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_compiles = 0
_compile_seconds = 0.0


def _on_event(name: str, seconds: float, **kwargs) -> None:
    global _compiles, _compile_seconds
    if name == _BACKEND_COMPILE:
        with _lock:
            _compiles += 1
            _compile_seconds += seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileCounter:
    """Counts XLA backend compilations (process-wide) inside a `with` block.

    Usage:
      with CompileCounter() as counter:
          chat.chat("second turn")
      assert counter.count == 0
    """

    def __enter__(self) -> CompileCounter:
        self._start, self._start_seconds = _compiles, _compile_seconds
        return self

    def __exit__(self, *exc) -> None:
        self.count = _compiles - self._start
        self.seconds = _compile_seconds - self._start_seconds

    @property
    def so_far(self) -> int:
        return _compiles - self._start


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_host_memory() -> bool:
    """Makes glibc keep freed blocks mapped for reuse instead of unmapping them.

    glibc serves every block over 32 MB (a KV cache, prefill temporaries) from a fresh mmap
    and unmaps it on free, so each use page-faults all of it again: 0.3-0.4 ms per MB on this
    VM, 40-60 ms of every new chat's first token for Gemma 3 270M's 151 MB cache, against ~7
    ms to zero it once mapped. With mmap off (M_MMAP_MAX = 0) and no trimming of the heap top
    below 2 GB, freed blocks stay mapped and are reused; `release_freed_host_memory` still
    hands free pages back on demand. Returns False (nothing changed) without glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_host_memory() -> None:
    """Hands memory that freed arrays left in the C heap back to the OS (glibc `malloc_trim`).

    Called after the weights are rearranged (`Engine`): the per-layer arrays a stack replaced
    leave their pages in glibc's heap (Gemma 3 1B bf16: 1.2 GB of RSS) until trimmed. No-op
    where there is no glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1+
_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def huge_pages_for(tree) -> int:
    """Moves the host memory of a tree's large CPU arrays (the weights) onto 2 MB pages.

    A decode step streams every weight once; on 4 KB pages that is a TLB miss (a nested page
    walk under a VM) every 4 KB, and the hardware prefetchers stop at each page edge. THP is
    usually `madvise`-only and XLA's allocator does not ask, so the weights sit on 4 KB pages.
    `MADV_COLLAPSE` rebuilds the 2 MB-aligned part of each array on huge pages in place (same
    addresses, same bytes). In-process A/B on the 2-vCPU AMD EPYC (bench/README.md): Gemma 3
    270M bf16 decode 38.7 -> 41.2 tok/s, 1B bf16 12.0 -> 12.7, TTFT unchanged; it costs 2-3 s per
    GB once, at load. Returns the bytes moved: 0 off Linux, on kernels without
    MADV_COLLAPSE, with THP off, or for arrays not in host memory.
    """
    madvise = _madvise()
    if madvise is None:
        return 0
    moved = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or leaf.nbytes < 2 * _HUGE_PAGE:
            continue
        try:
            if leaf.devices() != {jax.devices("cpu")[0]}:
                continue
            address = leaf.unsafe_buffer_pointer()
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        lo = -(-address // _HUGE_PAGE) * _HUGE_PAGE
        hi = (address + leaf.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo and madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            moved += hi - lo
    return moved
