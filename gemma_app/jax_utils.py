"""Small JAX helpers shared by the engine, the tests and the benchmarks."""

from __future__ import annotations

import ctypes
import threading

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


def release_freed_host_memory() -> None:
    """Hands memory that freed arrays left in the C heap back to the OS (glibc `malloc_trim`).

    Called after the weights are rearranged (`Engine`): the per-layer arrays a stack replaced
    leave their pages in glibc's heap (Gemma 3 1B bf16: 1.2 GB of RSS) until trimmed. No-op
    where there is no glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
