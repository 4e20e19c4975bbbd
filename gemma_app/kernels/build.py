"""Builds and loads the project's CPU kernels (`gemv.cc`, `attention.cc`) once per machine.

The shared library is compiled with the system C++ compiler for the CPU it runs on
(`-march=native`) into a per-user cache, keyed by a hash of the source, the flags, the compiler
and jaxlib's version, so a second process loads it in milliseconds. Without a compiler, or with
`GEMMA_APP_KERNELS=0`, `load()` returns None and the engine uses XLA's own dots.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "gemv.cc", _HERE / "attention.cc")  # compiled into one library
# Included by the sources: part of the cache key.
HEADERS = (_HERE / "amx.h", _HERE / "pool.h", _HERE / "vec.h")
TARGETS = {
    "gemma_app_gemv": "GemmaAppGemv",
    "gemma_app_gemm": "GemmaAppGemm",
    "gemma_app_decode_attention": "GemmaAppDecodeAttention",
    "gemma_app_unwritten": "GemmaAppUnwritten",
}
_LOG = logging.getLogger(__name__)


def enabled() -> bool:
    """False when the user turned the kernels off with `GEMMA_APP_KERNELS=0`."""
    return os.environ.get("GEMMA_APP_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def cache_dir() -> pathlib.Path:
    """`$GEMMA_APP_KERNEL_DIR`, else `$XDG_CACHE_HOME/gemma_app/kernels` (~/.cache by default)."""
    if os.environ.get("GEMMA_APP_KERNEL_DIR"):
        return pathlib.Path(os.environ["GEMMA_APP_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "gemma_app" / "kernels"


def compiler() -> str | None:
    """The C++ compiler to use: `$CXX`, else the first of c++, g++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def compile_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-fno-math-errno"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # GCC defaults to 256-bit even on AVX-512
    return [*flags, f"-I{jax.ffi.include_dir()}"]


def _library_path(cxx: str) -> pathlib.Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = "\n".join([*texts, " ".join(compile_flags()), version, jaxlib.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"gemv-{platform.machine()}-{digest}.so"


def _compile(
    cxx: str, out: pathlib.Path, defines: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> None:
    """Builds SOURCES into `out`; `defines` (-D...) select code paths, e.g. the tests build the
    portable bf16 loops with GEMMA_APP_NO_DPBF16 on a CPU that has AVX512-BF16; `extra` flags
    go after the usual ones (the tests build an AVX2 library with -mno-avx512f)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = pathlib.Path(tmp) / out.name
        flags = [*compile_flags(), *(f"-D{d}" for d in defines), *extra]
        cmd = [cxx, *flags, *map(str, SOURCES), "-o", str(tmp_out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_out, out)


@functools.cache
def load() -> bool:
    """Builds (first time) and registers the kernels with XLA; True when they are usable.

    Never raises: a failed build is logged once and the engine falls back to XLA's dots.
    """
    if not enabled():
        return False
    cxx = compiler()
    if cxx is None:
        _LOG.warning("No C++ compiler found: decoding uses XLA's dots (bf16 weights run slowly).")
        return False
    try:
        path = _library_path(cxx)
        if not path.exists():
            _LOG.info("Building CPU kernels into %s", path)
            _compile(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, RuntimeError, AttributeError) as err:
        _LOG.warning("CPU kernels unavailable (%s): decoding uses XLA's dots.", err)
        return False
    return True
