"""Bounded load test: 8 `gradio_client` users chat at once with the demo app, loopback only.

Every answer must complete and equal the engine's own greedy answer for that user's
conversation (so no text crosses sessions). The lane must run replies concurrently but never
more than its limit, and after the clients disconnect the registry must be empty, every
sampler garbage-collected and the process RSS back near where it started.
"""

import concurrent.futures
import ctypes
import gc
import threading
import time
import weakref

import jax
import psutil

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: RSS is read as is
    _LIBC = None

from gemma_app import ui

CLIENTS = 8
TURNS = 2
MAX_NEW = 32
LANE = 4
# A long context makes each chat's KV cache 48 MiB (6 layers x K,V x 32768 x 32 x fp32), so
# the 8 chats hold 384 MiB: well above the RSS noise of a test process that also runs other
# servers and clients (tens of MiB), so a leak of even a quarter of them cannot hide.
CACHE_LENGTH = 32768


def prompts(i: int) -> list[str]:
    return [f"User {i} asks question {t} about topic {i * 7 + t}." for t in range(TURNS)]


def live_array_bytes() -> int:
    """Bytes of every live jax array: the device memory view, exact and free of allocator noise."""
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def rss() -> int:
    """Resident memory of live objects: collected, and freed heap pages handed back to the OS.

    Without `malloc_trim`, glibc keeps freed KV-cache-sized blocks in its heap and RSS only
    ever grows, which would hide whether the memory was released at all.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return psutil.Process().memory_info().rss


def wait_until(condition, timeout_s=15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


class BusyMonitor:
    """Samples how many sessions are generating at once (bounded: stops when told)."""

    def __init__(self, registry):
        self.registry = registry
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self.registry.busy_count())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=5)


def chat_round(url, round_: str):
    """CLIENTS users, TURNS turns each, all at once; returns (drivers, histories)."""
    from conftest import ChatDriver

    # Plain drivers, not the `open_chat` fixture: they must be gone before memory is measured.
    drivers = [ChatDriver(url) for _ in range(CLIENTS)]

    def converse(i: int) -> list:
        for prompt in prompts(i):
            drivers[i].send(f"{round_} {prompt}", max_new_tokens=MAX_NEW)
        return drivers[i].history

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        return drivers, list(pool.map(converse, range(CLIENTS), timeout=240))


def disconnect(app, drivers) -> None:
    try:
        for driver in drivers:
            driver.close()  # the heartbeat drops: Gradio fires `unload` for the session
    finally:
        assert wait_until(lambda: len(app.registry) == 0)


def reference_answers(engine, max_out_length: int) -> dict[int, list[str]]:
    """Each user's conversation answered by the engine itself, outside the app (greedy)."""
    answers = {}
    for i in range(CLIENTS):
        chat = engine.new_chat(cache_length=CACHE_LENGTH, max_out_length=max_out_length)
        answers[i] = [chat.chat(f"Load: {p}", max_new_tokens=MAX_NEW) for p in prompts(i)]
    return answers


def test_eight_concurrent_clients_complete_in_isolation_and_leave_nothing_behind(
    launch_app, demo_engine
):
    from conftest import APP_TEST_SETTINGS

    # Computed first: the 8 reference chats' caches must not be part of the measured memory.
    expected = reference_answers(demo_engine, APP_TEST_SETTINGS["max_out_length"])
    app, url = launch_app(concurrency_limit=LANE, cache_length=CACHE_LENGTH)
    # A first round warms compilation, thread pools, malloc arenas and Gradio's lazy imports,
    # so the baseline is the steady state the second round must return to.
    disconnect(app, chat_round(url, "Warm-up:")[0])
    baseline, baseline_arrays = rss(), live_array_bytes()

    with BusyMonitor(app.registry) as monitor:
        drivers, histories = chat_round(url, "Load:")
    assert 2 <= monitor.peak <= LANE  # concurrent, and never beyond the lane's limit
    kv_total = CLIENTS * app.registry.kv_bytes_per_session
    assert live_array_bytes() >= baseline_arrays + kv_total  # every chat holds its cache
    assert rss() >= baseline + kv_total // 2  # ... resident in this process

    samplers = []
    for i, history in enumerate(histories):
        pairs = ui.history_pairs(ui.history_turns(history))
        assert [user for user, _ in pairs] == [f"Load: {p}" for p in prompts(i)]
        assert [answer for _, answer in pairs] == expected[i]  # complete, and only its own
        others = [p for j in range(CLIENTS) if j != i for p in prompts(j)]
        assert not any(p in str(history) for p in others)
        session = app.registry.peek(drivers[i].session_hash)
        assert session.last_stats.finished and session.last_stats.answer_tokens == MAX_NEW
        assert session.sampler.history() == pairs
        samplers.append(weakref.ref(session.sampler))
    del session
    assert len(app.registry) == CLIENTS

    disconnect(app, drivers)
    del drivers, histories
    gc.collect()
    assert all(ref() is None for ref in samplers)  # every sampler is collected ...
    # ... with its KV cache: polled (worker threads drop their last references a moment after
    # the sessions are gone), and up to 1 MB may stay. Seen in 1 of 5 runs: one session's
    # [1, S] segment ids (128 KB) outlive it, held outside Python's gc-tracked objects (not
    # found); it does not grow with sessions, and one session's KV cache is 50 MB.
    assert wait_until(lambda: live_array_bytes() <= baseline_arrays + 2**20), (
        live_array_bytes() - baseline_arrays
    )
    # ... and the memory is handed back to the OS. A third of the sessions' caches may stay
    # resident (allocator and thread-arena noise): seen up to 0.27x in a CI run.
    assert wait_until(lambda: rss() <= baseline + kv_total // 3), (rss() - baseline, kv_total)
