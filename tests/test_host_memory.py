"""glibc heap tuning of the engine: freed big blocks are reused without page faults."""

import subprocess
import sys
import textwrap

import pytest

# Mallocs and touches a 96 MB block twice, freeing it in between, and prints the minor page faults of the
# second touch. glibc maps blocks this big afresh on every malloc unless told to keep them.
_PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from gemma_app.jax_utils import keep_freed_host_memory
    if sys.argv[1] == "keep":
        assert keep_freed_host_memory()
    if sys.argv[1] == "sampler":  # a bare Sampler (no Engine) must set it up itself
        from gemma_app.nn import presets
        from gemma_app.nn.transformer import Transformer, init_params
        from gemma_app.text.sampler import Sampler
        config = presets.tiny_gemma3()
        Sampler(model=Transformer(config), params=init_params(config), cache_length=64)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def touch():  # as XLA:CPU's allocations are: plain malloc
        block = libc.malloc(96 << 20)
        ctypes.memset(block, 1, 96 << 20)
        libc.free(block)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _second_touch_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_blocks_are_reused_without_page_faults():
    pages = (96 << 20) // 4096
    assert _second_touch_faults("default") > pages // 2  # the control: a fresh mapping
    assert _second_touch_faults("keep") < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_sampler_on_cpu_keeps_freed_blocks():
    # Each new chat's KV cache is such a block: without this, a bare Sampler's every prefill
    # page-faulted a fresh 151 MB cache (Gemma 3 270M), ~35 ms of its time to first token.
    assert _second_touch_faults("sampler") < (96 << 20) // 4096 // 20


def _thp_off() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" in f.read()
    except OSError:
        return True  # not Linux, or no THP


@pytest.mark.skipif(_thp_off(), reason="no transparent huge pages on this system")
def test_weights_move_onto_huge_pages_unchanged():
    """`huge_pages_for` rebuilds the 2 MB-aligned part of each big CPU array on huge pages, in
    place: same address, same values, and computations on it still work."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemma_app.jax_utils import huge_pages_for

    values = np.random.default_rng(0).standard_normal((3000, 2048), np.float32)  # 23.4 MiB
    weight = jnp.asarray(values) + 0  # an XLA buffer, not numpy's memory
    small = jnp.ones(16)
    address = weight.unsafe_buffer_pointer()
    moved = huge_pages_for({"w": weight, "small": small, "other": "not an array"})
    if moved == 0:
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux 6.1+)")
    # Everything but the unaligned ends (< 2 MB each) of the one big array.
    assert weight.nbytes - (4 << 20) <= moved <= weight.nbytes and moved % (2 << 20) == 0
    assert weight.unsafe_buffer_pointer() == address
    np.testing.assert_array_equal(np.asarray(weight), values)
    x = jnp.ones(2048, jnp.float32)
    np.testing.assert_allclose(jax.jit(jnp.dot)(weight, x), values @ np.ones(2048), atol=1e-3)


def test_a_cpu_engine_puts_its_final_weights_on_huge_pages(monkeypatch, tokenizer):
    """The Engine hands its served parameters (after stacking) to `huge_pages_for` on CPU."""
    from gemma_app import engine as engine_lib
    from gemma_app.nn import presets
    from gemma_app.nn.transformer import init_params

    seen = []
    monkeypatch.setattr(engine_lib, "huge_pages_for", lambda tree: seen.append(tree) or 0)
    config = presets.tiny_gemma3()
    engine = engine_lib.Engine(
        name="t", config=config, params=init_params(config), tokenizer=tokenizer, scan_layers=True
    )
    assert len(seen) == 1 and seen[0] is engine.params and "layers" in engine.params
