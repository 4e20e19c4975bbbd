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
