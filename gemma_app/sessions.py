"""One `ChatSampler` per browser session, in a registry with TTL, LRU and a KV-memory budget.

Why a registry and not `gr.State`: Gradio deep-copies a State's default for every session
(the sampler would copy the weights), and it evicts States at `state_session_capacity`
without calling their `delete_callback`. Samplers live here instead, keyed by
`request.session_hash`; the UI drops a session on `demo.unload` (the browser disconnected).

The browser owns the conversation (retry, undo, edit and stop rewrite it outside the model),
so every reply first makes the sampler's conversation equal to the browser's
(`ChatSampler.load_history`, which keeps the cache of the unchanged prefix). Evicting a
session is therefore always safe: its next message rebuilds the sampler from the browser's
history, at the price of one longer prefill.

Budget: each session holds one KV cache of `kv_cache_bytes(...)`; the registry keeps at most
`min(max_sessions, kv_budget_bytes // that)` sessions and evicts the least recently used idle
one to make room. A session that is generating is never evicted or expired.

Example:

    registry = SessionRegistry(lambda: engine.new_chat(cache_length=4096), max_sessions=32)
    session = registry.get(request.session_hash)
    for delta in session.reply([("Hi", "Hello!")], "How are you?", sampling=Greedy()):
        ...
    registry.drop(request.session_hash)   # on unload
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import init_cache
from gemma_app.text.chat import CacheFullError, ChatSampler
from gemma_app.text.sampling import SamplingMethod, make_sampling

__all__ = [
    "CacheFullError",
    "ReplyStats",
    "SamplingSettings",
    "Session",
    "SessionBusyError",
    "SessionLimitError",
    "SessionRegistry",
    "kv_cache_bytes",
]

logger = logging.getLogger(__name__)

# The channels of `Session.reply_parts` (and `ChatSampler.stream_parts`).
THOUGHT, ANSWER = "thought", "answer"


def kv_cache_bytes(config: TransformerConfig, cache_length: int, dtype) -> int:
    """Bytes of one session's KV cache, read off the shapes `init_cache` would allocate.

    Shapes, not a formula: Gemma 4 layers differ (global layers have wider heads and their own
    KV-head count; KV-shared layers may hold no cache of their own), and the engine rounds the
    slots up to whole attention chunks (256). Nothing is allocated (`jax.eval_shape`).
    """
    shapes = jax.eval_shape(
        lambda: init_cache(config, batch=1, cache_length=cache_length, dtype=dtype)
    )
    return sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(shapes))


class SessionLimitError(RuntimeError):
    """No room for another session: every slot in the budget is busy generating."""


class SessionBusyError(RuntimeError):
    """The session is already generating a reply (one reply at a time per chat)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """The UI's sampling controls, validated into a sampling method and a seed.

    Defaults are Gemma's recommended generation config (temperature 1, top-k 64, top-p 0.95).
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    max_new_tokens: int = 512
    seed: int | None = None  # None or negative: a fresh random seed per reply

    def method(self) -> SamplingMethod:
        """The sampling method; raises ValueError with a user-facing message on bad values."""
        top_k = self.top_k
        if top_k is not None and float(top_k).is_integer():
            top_k = int(top_k)  # sliders send floats such as 64.0
        return make_sampling(
            greedy=bool(self.greedy), temperature=self.temperature, top_k=top_k,
            top_p=self.top_p, min_p=self.min_p,
        )  # fmt: skip

    def rng(self) -> int | None:
        if self.seed is None or self.seed < 0:
            return None
        return int(self.seed)


@dataclasses.dataclass
class ReplyStats:
    """What one reply cost; updated live while it streams.

    Attributes:
      answer_tokens: tokens generated (text deltas while streaming, exact once finished).
      ttft_s: seconds from the request to the first text (history sync + prefill + 1 step).
      tokens_per_s: decode rate after the first token.
      context_used / context_length: tokens in the conversation / the KV cache size.
      complete: the model ended its turn (not cut by max_new_tokens, a full cache, or stop).
      stopped: the user pressed stop (or the browser went away).
      finished: the reply is over.
    """

    answer_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    context_used: int = 0
    context_length: int = 0
    complete: bool = False
    stopped: bool = False
    finished: bool = False


class Session:
    """One browser session's chat: a sampler, a lock (one reply at a time), a stop flag."""

    def __init__(self, key: str, sampler: ChatSampler, now: float):
        self.key = key
        self.sampler = sampler
        self.last_used = now
        self.last_stats: ReplyStats | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def request_stop(self) -> None:
        """Ends the running reply at its next token, or the next reply at its first token.

        A stop pressed while the reply still waits in the queue must not be lost, so the flag
        stays set until `clear_stop()`, which the UI calls when the user sends a new request.
        """
        self._stop.set()

    def clear_stop(self) -> None:
        self._stop.clear()

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits (bounded) until no reply is running; True if idle."""
        if not self._lock.acquire(timeout=timeout_s):
            return False
        self._lock.release()
        return True

    def sync(self, history: Sequence[tuple], *, system_prompt: str | None) -> bool:
        """Makes the sampler's conversation equal to `history` now (after undo); False if busy."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.sampler.load_history(list(history), system_prompt=system_prompt or None)
            return True
        finally:
            self._lock.release()

    def reply(self, history: Sequence[tuple], prompt: str, **kwargs) -> Iterator[str]:
        """`reply_parts` without the thoughts: the answer's text deltas only."""
        parts = self.reply_parts(history, prompt, **kwargs)
        try:
            for channel, delta in parts:
                if channel == ANSWER:
                    yield delta
        finally:
            parts.close()  # a closed `reply` stops the decode loop like a closed `reply_parts`

    def reply_parts(
        self,
        history: Sequence[tuple],
        prompt: str,
        *,
        system_prompt: str | None = None,
        sampling: SamplingMethod | None = None,
        rng: int | None = None,
        max_new_tokens: int | None = None,
        media: Mapping[str, Sequence[np.ndarray]] | None = None,
        thinking: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Iterator[tuple[str, str]]:
        """Answers `prompt` after `history`, yielding `(channel, delta)`; stats go to `last_stats`.

        `channel` is "thought" (a Gemma 4 model thinking, only with `thinking=True`) or
        "answer". Stops within one token of `request_stop()`; closing the generator also stops
        it. Either way the partial answer stays the turn's answer and the lock is released.

        `media` holds this message's decoded attachments by kind ({"images": [...], "audio":
        [...]}); non-empty kinds are passed on to the sampler as keyword arguments. The UI only
        sends kinds the engine declares it reads (`Engine.supports_images`, ...), so a
        text-only sampler never receives any. `thinking` must stay False for models without a
        thinking mode (`Engine.supports_thinking`); the sampler refuses it otherwise.

        Raises (on the first `next`):
          SessionBusyError: another reply of this session is running.
          ValueError: empty prompt or bad max_new_tokens; CacheFullError (a ValueError): the
            conversation does not fit. The sampler stays consistent in every case.
        """
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError(
                "A reply is already being written in this chat: wait for it or press stop."
            )
        stats = ReplyStats(context_length=self.sampler.cache_length)
        self.last_stats = stats
        try:
            start = clock()
            extra = {kind: list(arrays) for kind, arrays in (media or {}).items() if arrays}
            self.sampler.load_history(list(history), system_prompt=system_prompt or None)
            # Switching thinking here, not in `load_history`, lets the sampler re-render the
            # kept turns with their encoded media instead of encoding them again.
            stream = self.sampler.stream_parts(
                prompt, sampling=sampling, rng=rng, max_new_tokens=max_new_tokens,
                thinking=bool(thinking), **extra,
            )  # fmt: skip
            try:
                yield from self._metered(stream, stats, start, clock)
            except GeneratorExit:  # closed by the caller: Gradio's cancel, a disconnect
                stats.stopped = True
                raise
            finally:
                stream.close()  # keeps the partial answer as the turn's answer
                self._finish(stats, start, clock)
        finally:
            self._lock.release()

    def _metered(self, stream, stats: ReplyStats, start: float, clock) -> Iterator[tuple]:
        first = None
        for part in stream:
            now = clock()
            if first is None:
                first = now
                stats.ttft_s = now - start
            stats.answer_tokens += 1
            if stats.answer_tokens > 1 and now > first:
                stats.tokens_per_s = (stats.answer_tokens - 1) / (now - first)
            yield part
            if self._stop.is_set():
                stats.stopped = True
                return

    def _finish(self, stats: ReplyStats, start: float, clock) -> None:
        turns = self.sampler.turns
        if turns and stats.ttft_s is not None:
            turn = turns[-1]
            stats.answer_tokens = len(turn.answer_tokens)
            stats.complete = turn.complete
            elapsed = clock() - start - stats.ttft_s
            if stats.answer_tokens > 1 and elapsed > 0:
                stats.tokens_per_s = (stats.answer_tokens - 1) / elapsed
        stats.context_used = self.sampler.used_cache_length
        stats.stopped = stats.stopped or self._stop.is_set()
        stats.finished = True


class SessionRegistry:
    """Sessions by key with TTL expiry, LRU eviction and a KV-memory budget. Thread-safe.

    Args:
      factory: makes a fresh sampler (`lambda: engine.new_chat(...)`).
      max_sessions: hard cap on live sessions.
      ttl_s: idle seconds after which a session is dropped (checked on every access).
      kv_budget_bytes: total KV memory allowed; None means no budget beyond max_sessions.
      kv_bytes_per_session: one session's KV cache (`kv_cache_bytes`).
      clock: monotonic time source (tests pass a fake one).
    """

    def __init__(
        self,
        factory: Callable[[], ChatSampler],
        *,
        max_sessions: int = 64,
        ttl_s: float = 3600.0,
        kv_budget_bytes: int | None = None,
        kv_bytes_per_session: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if kv_budget_bytes is not None and kv_bytes_per_session > kv_budget_bytes:
            raise ValueError(
                f"The KV-memory budget ({kv_budget_bytes / 2**20:.0f} MiB) is smaller than one "
                f"session's KV cache ({kv_bytes_per_session / 2**20:.0f} MiB): raise the budget "
                "or lower the cache length."
            )
        self.factory = factory
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_session = kv_bytes_per_session
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Most sessions alive at once: the smaller of max_sessions and the KV budget."""
        if not self.kv_budget_bytes or not self.kv_bytes_per_session:
            return self.max_sessions
        return min(self.max_sessions, self.kv_budget_bytes // self.kv_bytes_per_session)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._sessions

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def busy_count(self) -> int:
        """Sessions generating a reply right now."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.busy)

    @property
    def kv_bytes_in_use(self) -> int:
        return len(self) * self.kv_bytes_per_session

    def get(self, key: str) -> Session:
        """The session for `key`, created if needed (evicting to make room); marks it used.

        Raises:
          SessionLimitError: the registry is full and every session is busy generating.
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            session = self._sessions.get(key)
            if session is None:
                self._make_room(now)
                session = Session(key, self.factory(), now)
                self._sessions[key] = session
            self._sessions.move_to_end(key)
            session.last_used = now
            return session

    def peek(self, key: str) -> Session | None:
        """The session for `key` if it exists; never creates one."""
        with self._lock:
            return self._sessions.get(key)

    def drop(self, key: str) -> bool:
        """Removes a session (its KV cache is freed once its reply, if any, has stopped)."""
        with self._lock:
            session = self._sessions.pop(key, None)
            self._expire(self._clock())
        if session is None:
            return False
        session.request_stop()
        return True

    def sweep(self) -> int:
        """Drops expired sessions now; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        expired = [
            key
            for key, s in self._sessions.items()
            if not s.busy and now - s.last_used > self.ttl_s
        ]
        for key in expired:
            self._sessions.pop(key).request_stop()
        if expired:
            logger.info("Expired %d idle chat session(s)", len(expired))
        return len(expired)

    def _make_room(self, now: float) -> None:
        while len(self._sessions) >= self.capacity:
            victim = next((k for k, s in self._sessions.items() if not s.busy), None)
            if victim is None:
                raise SessionLimitError(
                    f"The server is at capacity ({len(self._sessions)} chats are generating). "
                    "Try again in a moment."
                )
            # Safe: the evicted browser's next message rebuilds its sampler from its history.
            logger.info("Evicting least recently used chat session to stay within budget")
            self._sessions.pop(victim).request_stop()
