"""The CPU kernels (gemma_app/kernels): every product against XLA, and their use in the decoder."""

import functools
import logging
import platform
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_app import kernels
from gemma_app.jax_utils import CompileCounter
from gemma_app.kernels import build
from gemma_app.nn import presets
from gemma_app.nn.attention import CACHE_CHUNK
from gemma_app.nn.transformer import Transformer, forward, init_cache, init_params

pytestmark = pytest.mark.skipif(not build.load(), reason="no C++ compiler for the CPU kernels")

# (G, N, K): multiples of the vector width and awkward tails of both axes; K past two of the
# AMX GEMM's slices of w (256 rows) and several of the fp32 GEMM's blocks (128 rows) with a
# tail, and multiples of 32 (the AMX GEMM's unpacked path).
SHAPES = [
    (1, 64, 64),
    (2, 37, 70),
    (3, 5, 33),
    (1, 300, 1),
    (4, 129, 640),
    (1, 96, 35),
    (2, 48, 600),
]


def _reference(x, w, last):
    """fp64 numpy product on the stored weights; bf16 weights take x rounded to bf16."""
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    w64 = w64 if last else np.swapaxes(w64, 1, 2)  # [G, N, K]
    if w.dtype == jnp.bfloat16:
        x = x.astype(jnp.bfloat16).astype(jnp.float32)
    return np.einsum("mk,gnk->gmn", np.asarray(x, np.float64), w64)


# Up to 4 rows: the GEMV. More: the GEMM, whose AMX tiles take 16 rows (13), two row tiles (31),
# and several blocks of 32 with a tail of one tile (40) or of a partial one (100).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 31, 40, 100])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("last", [True, False], ids=["contract_last", "contract_first"])
def test_products_equal_fp64_reference(rows, dtype, last):
    rng = np.random.default_rng(rows)
    for g, n, k in SHAPES:
        shape = (g, n, k) if last else (g, k, n)
        w = jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
        fn = kernels.contract_last if last else kernels.contract_first
        got = np.asarray(jax.jit(fn)(x, w))
        want = _reference(x, w, last)
        assert got.shape == want.shape == (g, rows, n)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("last", [True, False], ids=["contract_last", "contract_first"])
def test_prefill_products_skip_rows_past_the_needed_ones(dtype, last):
    """`rows` (data, one compiled call for every value): the first `rows` rows equal the full
    product's, later rows are zeros, and rows past the end or below zero are clamped."""
    rng = np.random.default_rng(3)
    g, n, k = 2, 40, 35
    w = jnp.asarray(rng.standard_normal((g, n, k) if last else (g, k, n), np.float32))
    w = w.astype(dtype)
    x = jnp.asarray(rng.standard_normal((2, 13, k), np.float32))  # [B, T, K]: 26 rows
    fn = jax.jit(kernels.contract_last if last else kernels.contract_first)
    full = np.asarray(fn(x, w)).reshape(g, 26, n)
    fn(x, w, jnp.int32(26))
    with CompileCounter() as compiles:
        for rows in (0, 1, 9, 13, 17, 26, 40, -3):
            got = np.asarray(fn(x, w, jnp.int32(rows))).reshape(g, 26, n)
            used = min(max(rows, 0), 26)
            np.testing.assert_array_equal(got[:, :used], full[:, :used])
            np.testing.assert_array_equal(got[:, used:], 0.0)
    assert compiles.count == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("last", [True, False], ids=["contract_last", "contract_first"])
def test_prefill_products_are_deterministic(last, dtype):
    """However the threads split the work, the same call gives the same bits (contract_first
    sums parts of K per thread: the parts and their order are fixed)."""
    rng = np.random.default_rng(5)
    g, n, k = 2, 96, 1100
    w = jnp.asarray(rng.standard_normal((g, n, k) if last else (g, k, n), np.float32))
    x = jnp.asarray(rng.standard_normal((40, k), np.float32))
    fn = jax.jit(kernels.contract_last if last else kernels.contract_first)
    w = w.astype(dtype)
    first = np.asarray(fn(x, w))
    for _ in range(20):
        np.testing.assert_array_equal(np.asarray(fn(x, w)), first)


def _build_variant(tmp_path, name, defines=(), extra=()):
    """The library built with `defines` / `extra` flags, its targets registered as
    `target_<name>`: what a CPU without some instructions runs, tested on this one."""
    import ctypes

    path = tmp_path / f"{name}.so"
    build._compile(build.compiler(), path, defines=defines, extra=extra)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in build.TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(f"{target}_{name}", capsule, platform="cpu")
    return name


@functools.cache
def _native_macros() -> frozenset[str]:
    """The macros the default build (`-march=native`) sees: which instructions it uses."""
    cmd = [build.compiler(), *build.compile_flags(), "-dM", "-E", "-x", "c++", "/dev/null"]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    return frozenset(line.split()[1] for line in lines if line.startswith("#define "))


def _skip_if_default_build(*needed: str) -> None:
    """A variant that drops instructions this CPU lacks anyway is the default build, which
    every other test here runs: building it again (~10 s of compiler) tests nothing new."""
    missing = [m for m in needed if m not in _native_macros()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}: the default build is this variant")


def _check_variant(name, dtype, rows_of, seed):
    rng = np.random.default_rng(seed)
    for (g, n, k), rows, last in zip(SHAPES, rows_of, [True, False] * 4, strict=False):
        w = jnp.asarray(rng.standard_normal((g, n, k) if last else (g, k, n), np.float32))
        w = w.astype(dtype)
        x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
        target = "gemma_app_gemv" if rows <= kernels.MAX_ROWS else "gemma_app_gemm"
        out = jax.ShapeDtypeStruct((g, rows, n), jnp.float32)
        call = jax.ffi.ffi_call(f"{target}_{name}", out)
        rows_operand = (jnp.int32(rows),) if target == "gemma_app_gemm" else ()
        got = call(x, w, jnp.int32(0), *rows_operand, contract_last=last)
        want = _reference(x, w, last)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


FALLBACK_DROPS = {  # what each define turns off, as the compiler names the instructions
    "GEMMA_APP_NO_DPBF16": ("__AVX512BF16__",),
    "GEMMA_APP_NO_AMX": ("__AMX_TILE__", "__AMX_BF16__", "__AVX512BF16__"),
}


@pytest.mark.parametrize(
    "define",
    [
        "GEMMA_APP_NO_DPBF16",  # a CPU without AVX512-BF16: bf16 widened to fp32
        "GEMMA_APP_NO_AMX",  # a CPU (or kernel) without AMX tiles: the vdpbf16ps loops
    ],
)
def test_bf16_fallback_loops_equal_the_reference(tmp_path, define):
    """The library built without its faster bf16 loops (what a CPU without them runs) gives the
    same products: bf16-rounded x, fp32 sums."""
    _skip_if_default_build(*FALLBACK_DROPS[define])
    name = _build_variant(tmp_path, define.lower(), defines=(define,))
    _check_variant(name, jnp.bfloat16, [1, 3, 4, 2, 9, 13, 40], seed=7)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction sets"
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_avx2_build_equals_the_reference(avx2_library, dtype):
    """Built without AVX-512 (an AVX2 CPU such as AMD's Zen 3: 16 vector registers, so the GEMM
    takes 6 x 16 tiles, not 12 x 32), every product still matches: tails of both tile axes,
    several K blocks, GEMV and GEMM."""
    _check_variant(avx2_library, dtype, [1, 7, 4, 100, 13, 6, 40], seed=11)


@pytest.fixture(scope="module")
def avx2_library(tmp_path_factory):
    """Registered once per process: XLA refuses a second library under the same names."""
    _skip_if_default_build("__AVX512F__")
    return _build_variant(tmp_path_factory.mktemp("avx2"), "avx2", extra=("-mno-avx512f",))


def test_leading_axes_and_ungrouped_weights():
    """x [B, T, K] and a 2-D w give [B, T, N]; a 3-D w puts its group axis first."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, 48), dtype=np.float32))
    w2 = jnp.asarray(rng.standard_normal((48, 20), dtype=np.float32)).astype(jnp.bfloat16)
    want = x.astype(jnp.bfloat16).astype(jnp.float32) @ w2.astype(jnp.float32)  # bf16 x, bf16 w
    got = kernels.contract_first(x, w2)
    assert got.shape == (1, 1, 20)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    w3 = jnp.stack([w2.T, 2 * w2.T])  # [2, N, K]
    got = kernels.contract_last(x, w3)
    assert got.shape == (2, 1, 1, 20)
    np.testing.assert_allclose(got[1], 2 * want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("last", [True, False], ids=["contract_last", "contract_first"])
def test_layer_slices_read_the_stack_in_place(rows, dtype, last):
    """A LayerSlice of a stacked weight gives the product with that layer, on the kernels and
    on XLA's fallback (a GPU's path); a reshaped slice (heads merged) keeps its layer."""
    rng = np.random.default_rng(rows)
    stack = jnp.asarray(rng.standard_normal((3, 2, 24, 40), dtype=np.float32)).astype(dtype)
    k = 40 if last else 24
    x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
    fn = kernels.contract_last if last else kernels.contract_first

    @jax.jit
    def products(x, stack, layer):
        xla = kernels._xla(x, stack.reshape(6, 24, 40), layer, groups=2, last=last)
        return fn(x, kernels.LayerSlice(stack, layer)), xla

    for layer in range(3):
        kernel, xla = products(x, stack, jnp.int32(layer))
        want = _reference(x, stack[layer], last)
        np.testing.assert_allclose(kernel, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(xla, want, rtol=1e-5, atol=1e-4)
    if not last:  # [2, 24, 40] viewed as [48, 40]: the heads folded into the contraction
        x48 = jnp.asarray(rng.standard_normal((rows, 48), dtype=np.float32))
        got = jax.jit(lambda x, s: fn(x, kernels.LayerSlice(s, jnp.int32(2)).reshape(48, 40)))(
            x48, stack
        )
        want = _reference(x48, stack[2].reshape(1, 48, 40), last)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _lowered_text(cfg, params, rows):
    model = Transformer(cfg)
    cache = init_cache(cfg, batch=1, cache_length=CACHE_CHUNK)
    tokens = jnp.zeros((1, rows), jnp.int32)
    fn = jax.jit(lambda p, t, c: model.apply({"params": p}, t, t, c))
    return fn.lower(params, tokens, cache).as_text()


def test_decoder_uses_the_kernels_on_cpu():
    """Decode steps call the GEMV and prefill chunks the GEMM, for fp32 and bf16 weights."""
    cfg = presets.tiny_gemma3()
    p32 = init_params(cfg, seed=0)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
    for params in (p16, p32):
        decode = _lowered_text(cfg, params, rows=1)
        assert "gemma_app_gemv" in decode and "gemma_app_gemm" not in decode
        prefill = _lowered_text(cfg, params, rows=32)
        assert "gemma_app_gemm" in prefill and "gemma_app_gemv" not in prefill


@pytest.mark.parametrize(
    "make_config",
    [presets.tiny_gemma2, pytest.param(presets.tiny_gemma4, marks=pytest.mark.slow)],
    ids=lambda f: f.__name__,
)  # Gemma 4 (MoE, PLE products) under -m slow: its four compilations take ~20 s
def test_bf16_weights_cached_decode_equals_xla_forward(make_config, monkeypatch):
    """bf16-stored weights: prefill (GEMM) + decode (GEMV) == an uncached forward on XLA's dots
    (the accelerators' path: bf16-rounded x times bf16 w, fp32 sums) up to bf16 rounding, and
    both near the fp32 forward over the same weights. (Products: exact up to fp32 sums above.)"""
    cfg = make_config()
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, seed=3))
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
    length, prefill = 56, 48
    tokens = jax.random.randint(jax.random.key(1), (1, length), 0, cfg.num_embed)
    apply = jax.jit(Transformer(cfg).apply)
    cache = init_cache(cfg, batch=1, cache_length=CACHE_CHUNK)
    pos = jnp.arange(length)[None]
    out, cache = apply({"params": p16}, tokens[:, :prefill], pos[:, :prefill], cache)
    steps = [out]
    for t in range(prefill, length):
        step, cache = apply({"params": p16}, tokens[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(step)
    cached = jnp.concatenate(steps, axis=1)
    full = jax.jit(lambda p, t: forward(cfg, p, t))
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_target", lambda x2, stack: None)
        xla = full(p16, tokens)  # traced here: XLA's dots
    # Equal up to bf16 rounding, not fp32's: a different fp32 summation order moves a few
    # activations across a bf16 rounding boundary, and attention carries that to later tokens.
    scale = float(jnp.abs(xla).max())
    np.testing.assert_allclose(cached, xla, atol=0.02 * scale)
    fp32 = full(p32, tokens)
    # Typically close to fp32 math too; the median, as a flipped MoE route (Gemma 4) moves a token.
    assert np.median(np.abs(np.asarray(cached) - np.asarray(fp32))) < 0.01 * scale
    assert not np.allclose(xla, fp32, atol=1e-4, rtol=1e-4)  # x really is rounded


def test_kernels_off_by_environment(monkeypatch):
    monkeypatch.setenv("GEMMA_APP_KERNELS", "0")
    assert not build.enabled()
    monkeypatch.setenv("GEMMA_APP_KERNELS", "1")
    assert build.enabled()


def test_failed_build_falls_back_to_xla(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves a warning, not an exception, and no library behind."""
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("GEMMA_APP_KERNEL_DIR", str(tmp_path / "cache"))
    build.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=build.__name__):
            assert build.load() is False
        assert "CPU kernels unavailable" in caplog.text and "fatal error" in caplog.text
        assert not list((tmp_path / "cache").glob("*.so"))
    finally:
        monkeypatch.undo()
        build.load.cache_clear()
    assert build.load()  # the real library again, from its cache


def test_library_is_cached_per_source(monkeypatch, tmp_path):
    """The library's cache path is stable for one set of sources, so a second load reuses the
    build; a changed source or header gets a new path, so it builds a new library."""
    monkeypatch.setenv("GEMMA_APP_KERNEL_DIR", str(tmp_path))
    cxx = build.compiler()
    first = build._library_path(cxx)
    assert build._library_path(cxx) == first
    for attr in ("SOURCES", "HEADERS"):  # any source or included header: a new library
        files = getattr(build, attr)
        for i, path in enumerate(files):
            changed = tmp_path / path.name
            changed.write_text(path.read_text() + "\n// changed\n")
            with monkeypatch.context() as patch:
                patch.setattr(build, attr, (*files[:i], changed, *files[i + 1 :]))
                assert build._library_path(cxx) != first
    # Every project header a source includes is in the key.
    texts = [path.read_text() for path in (*build.SOURCES, *build.HEADERS)]
    included = {name for text in texts for name in re.findall(r'#include "([^"/]+)"', text)}
    assert included == {path.name for path in build.HEADERS}


def test_bf16_activations_with_many_rows_use_xla():
    """The kernels compute in fp32; a bf16-compute prefill (accelerator dtype) stays XLA's."""
    x = jnp.ones((8, 16), jnp.bfloat16)
    w = jnp.ones((16, 4), jnp.bfloat16)
    assert kernels._target(x, w[None]) is None
    assert kernels._target(x[:1], w[None]) == "gemma_app_gemv"
    assert kernels._target(x.astype(jnp.float32), w[None]) == "gemma_app_gemm"
    np.testing.assert_allclose(kernels.contract_first(x, w).astype(jnp.float32), 16.0)


def test_ffi_targets_reject_mismatched_shapes():
    """The library checks shapes itself: a wrong call is an error, never a wild read."""
    x = jnp.ones((1, 8), jnp.float32)
    w = jnp.ones((2, 4, 9), jnp.bfloat16)  # two layers of [4, 9]; contraction 9 != 8
    layer = jnp.int32(0)
    for target, extra in (("gemma_app_gemv", ()), ("gemma_app_gemm", (jnp.int32(1),))):
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((1, 1, 4), jnp.float32))
        with pytest.raises(Exception, match="contraction sizes"):
            jax.block_until_ready(call(x, w, layer, *extra, contract_last=True))
        x9 = jnp.ones((1, 9), jnp.float32)
        for bad in (-1, 2):  # a layer outside the stack
            with pytest.raises(Exception, match="layer index out of range"):
                jax.block_until_ready(call(x9, w, jnp.int32(bad), *extra, contract_last=True))
    too_many = jax.ffi.ffi_call("gemma_app_gemv", jax.ShapeDtypeStruct((1, 5, 4), jnp.float32))
    with pytest.raises(Exception, match="1 to 4 rows"):
        jax.block_until_ready(too_many(jnp.ones((5, 9), jnp.float32), w, layer, contract_last=True))


def test_dtype_choice_on_cpu(monkeypatch, caplog):
    """auto = bf16 weights with fp32 math when the kernels run; fp32 without them, and a bf16
    request then warns. fp32 math on CPU in every case."""
    from gemma_app.engine import resolve_dtype

    assert resolve_dtype("auto") == (jnp.bfloat16, jnp.float32)
    assert resolve_dtype("bfloat16") == (jnp.bfloat16, jnp.float32)
    assert resolve_dtype("float32") == (jnp.float32, jnp.float32)
    monkeypatch.setattr(build, "load", lambda: False)
    assert resolve_dtype(None) == (jnp.float32, jnp.float32)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("bf16") == (jnp.bfloat16, jnp.float32)
    assert "without the project's kernels" in caplog.text
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int4")
