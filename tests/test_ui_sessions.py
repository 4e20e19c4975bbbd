"""gemma_app.sessions: KV budget, TTL/LRU registry, sampling settings, stop and history sync."""

import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_app.nn import presets
from gemma_app.sessions import (
    SamplingSettings,
    SessionBusyError,
    SessionLimitError,
    SessionRegistry,
    kv_cache_bytes,
)
from gemma_app.text import sampling


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Sampler:
    """A stand-in sampler: registry tests only count and evict sessions."""


def registry(**kwargs) -> SessionRegistry:
    kwargs.setdefault("clock", Clock())
    return SessionRegistry(Sampler, **kwargs)


def test_kv_cache_bytes_matches_the_formula():
    config = presets.get_preset("gemma3-1b")
    # 26 layers x (K, V) x 4096 slots x 1 KV head x 256 dims x 2 bytes = 104 MiB
    assert kv_cache_bytes(config, 4096, jnp.bfloat16) == 26 * 2 * 4096 * 1 * 256 * 2
    # Slots are allocated in multiples of 256.
    assert kv_cache_bytes(config, 4000, jnp.bfloat16) == kv_cache_bytes(config, 4096, jnp.bfloat16)
    assert kv_cache_bytes(config, 4097, jnp.float32) == 26 * 2 * 4352 * 1 * 256 * 4
    # Vision models also keep the image-block id (int32) of every slot.
    vision = presets.get_preset("gemma3-4b")
    assert kv_cache_bytes(vision, 4096, jnp.bfloat16) == 34 * 2 * 4096 * 4 * 256 * 2 + 4096 * 4


def test_kv_cache_bytes_follows_gemma4_layer_shapes(gemma4_demo):
    """Global layers have their own head width and KV heads; read off the real cache."""
    from gemma_app.nn.transformer import init_cache

    cache = init_cache(gemma4_demo.config, batch=1, cache_length=300, dtype=jnp.float32)
    actual = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert kv_cache_bytes(gemma4_demo.config, 300, jnp.float32) == actual


def test_get_creates_once_per_key_and_peek_never_creates():
    reg = registry()
    a = reg.get("a")
    assert reg.get("a") is a and len(reg) == 1
    assert reg.peek("b") is None and "b" not in reg


def test_lru_eviction_at_max_sessions():
    reg = registry(max_sessions=2)
    reg.get("a")
    reg.get("b")
    reg.get("a")  # a is now the most recently used
    reg.get("c")
    assert reg.keys() == ["a", "c"]


def test_kv_budget_sets_capacity():
    reg = registry(max_sessions=10, kv_budget_bytes=3 * 100 + 50, kv_bytes_per_session=100)
    assert reg.capacity == 3
    for key in "abcd":
        reg.get(key)
    assert reg.keys() == ["b", "c", "d"] and reg.kv_bytes_in_use == 300


def test_a_budget_below_one_session_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than one session's KV cache"):
        registry(kv_budget_bytes=10, kv_bytes_per_session=100)


def test_idle_sessions_expire_after_the_ttl():
    clock = Clock()
    reg = registry(ttl_s=60, clock=clock)
    reg.get("a")
    clock.now = 30
    reg.get("b")
    clock.now = 61
    assert reg.sweep() == 1 and reg.keys() == ["b"]
    clock.now = 200
    reg.get("c")  # every access sweeps
    assert reg.keys() == ["c"]


def test_busy_sessions_are_never_evicted_or_expired():
    clock = Clock()
    reg = registry(max_sessions=1, ttl_s=1, clock=clock)
    session = reg.get("a")
    with session._lock:  # generating
        clock.now = 100
        assert reg.sweep() == 0
        with pytest.raises(SessionLimitError, match="at capacity"):
            reg.get("b")
    assert reg.get("b") and reg.keys() == ["b"]


def test_drop_stops_the_session_and_forgets_it():
    reg = registry()
    session = reg.get("a")
    assert reg.drop("a") and not reg.drop("a")
    assert session._stop.is_set() and len(reg) == 0


def test_sampling_settings_map_to_methods():
    assert isinstance(SamplingSettings(greedy=True).method(), sampling.Greedy)
    default = SamplingSettings().method()
    assert isinstance(default, sampling.TopkTopPSampling) and default.k == 64
    assert isinstance(SamplingSettings(top_k=0, top_p=1.0).method(), sampling.RandomSampling)
    assert isinstance(
        SamplingSettings(top_k=0, top_p=1.0, min_p=0.1).method(), sampling.MinPSampling
    )
    assert SamplingSettings(top_k=8.0, top_p=1.0).method().k == 8  # sliders send floats
    with pytest.raises(ValueError, match="min_p"):
        SamplingSettings(min_p=0.1).method()
    assert SamplingSettings(seed=-1).rng() is None and SamplingSettings(seed=7).rng() == 7


@pytest.fixture(scope="module")
def demo_registry(demo_engine):
    return SessionRegistry(lambda: demo_engine.new_chat(cache_length=1024, max_out_length=1000))


def test_stop_ends_the_reply_within_one_token(demo_registry):
    session = demo_registry.get("stop")
    deltas = []
    for delta in session.reply([], "Count to a thousand.", max_new_tokens=500):
        deltas.append(delta)
        if len(deltas) == 3:
            session.request_stop()
    assert len(deltas) == 3
    turn = session.sampler.turns[-1]
    assert len(turn.answer_tokens) <= 4 and not turn.complete
    stats = session.last_stats
    assert stats.stopped and stats.finished and stats.answer_tokens == len(turn.answer_tokens)
    assert not session.busy


def test_a_stop_pressed_before_the_reply_starts_still_applies(demo_registry):
    session = demo_registry.get("early")
    session.request_stop()  # the reply was still queued
    assert len(list(session.reply([], "Hello.", max_new_tokens=50))) == 1
    assert session.last_stats.stopped
    session.clear_stop()  # the user's next message
    assert len(list(session.reply([], "Hello.", max_new_tokens=50))) == 50


def test_closing_the_reply_keeps_the_partial_answer_and_frees_the_lock(demo_registry):
    session = demo_registry.get("close")
    reply = session.reply([], "Hello there.", max_new_tokens=200)
    text = next(reply) + next(reply)
    assert session.busy
    with pytest.raises(SessionBusyError):
        next(session.reply([], "Again?"))
    reply.close()  # what Gradio does on cancel
    assert not session.busy and session.last_stats.stopped
    assert session.sampler.turns[-1].answer.startswith(text)


def test_reply_and_sync_make_the_sampler_follow_the_given_history(demo_registry):
    session = demo_registry.get("sync")
    answer = "".join(session.reply([], "One.", max_new_tokens=8))
    history = [("One.", answer)]
    "".join(session.reply(history, "Two.", max_new_tokens=8))
    assert [t.user for t in session.sampler.turns] == ["One.", "Two."]
    assert session.sync(history, system_prompt=None)  # undo
    assert session.sampler.history() == history
    # An edited history (and a new system prompt) replaces the conversation.
    edited = [("Uno.", "ciao")]
    "".join(session.reply(edited, "Dos.", system_prompt="Be brief.", max_new_tokens=8))
    assert session.sampler.history()[:1] == edited
    assert session.sampler.system_prompt == "Be brief."


def test_a_dropped_session_is_garbage_collected(demo_engine):
    reg = SessionRegistry(lambda: demo_engine.new_chat(cache_length=1024, max_out_length=1000))
    session = reg.get("gone")
    "".join(session.reply([], "Hi.", max_new_tokens=4))
    ref = weakref.ref(session.sampler)
    del session
    reg.drop("gone")
    gc.collect()
    assert ref() is None  # its KV cache is freed with it


def test_registry_is_safe_under_concurrent_access():
    reg = registry(max_sessions=16)

    def hammer(i):
        for j in range(200):
            reg.get(f"{i}-{j % 20}")
            reg.drop(f"{i}-{(j + 7) % 20}")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(reg) <= 16


def test_reply_passes_decoded_attachments_on_to_the_sampler(demo_registry):
    """The hook the vision/audio engines use: non-empty kinds reach `ChatSampler.stream_parts`."""
    session = demo_registry.get("media")
    real_stream, seen = session.sampler.stream_parts, []

    def stream_parts(prompt, **kwargs):
        seen.append({k: kwargs.pop(k) for k in ("images", "audio", "thinking") if k in kwargs})
        return real_stream(prompt, **kwargs)

    session.sampler.stream_parts = stream_parts
    image = np.zeros((4, 4, 3), np.uint8)
    "".join(session.reply([], "Hi.", max_new_tokens=2, media={"images": [image], "audio": []}))
    "".join(session.reply([], "Hi.", max_new_tokens=2))
    assert len(seen) == 2 and seen[1] == {"thinking": False}
    assert list(seen[0]) == ["images", "thinking"] and seen[0]["images"][0] is image


def test_reply_parts_keep_thoughts_apart_and_reply_drops_them(demo_registry):
    """Channels pass through as the sampler yields them; `reply` keeps the answer only."""
    session = demo_registry.get("parts")
    script = [("thought", "Hm, "), ("thought", "easy."), ("answer", "Four"), ("answer", ".")]
    seen = []

    def stream_parts(prompt, **kwargs):
        seen.append(kwargs.get("thinking"))
        yield from script

    session.sampler.stream_parts = stream_parts
    assert list(session.reply_parts([], "2+2?", thinking=True)) == script
    assert session.last_stats.answer_tokens == 4 and session.last_stats.finished
    assert "".join(session.reply([], "2+2?")) == "Four."
    assert seen == [True, False] and not session.busy
