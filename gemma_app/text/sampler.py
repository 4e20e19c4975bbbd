"""Stateless `Sampler`: bucketed prefill, a jitted decode step with a donated KV cache, streaming.

Compilation is designed out of the hot path: prompt chunks are padded to a few bucket lengths,
the cache has one static size, `max_new_tokens` is data, and sampling methods are pytrees
whose values are data. So after the first call of each bucket, nothing recompiles.

Slot == position: row b keeps the token at position p in cache slot p. `lengths[b]` counts the
tokens in row b's cache; the last sampled token is held back ("pending") and only written when
it is fed to the next step, so a finished turn leaves its end-of-turn token pending and the next
turn feeds it first: multi-turn continuation is exact by construction.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.jax_utils import keep_freed_host_memory
from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import Cache, Transformer, init_cache, is_stacked
from gemma_app.text import sampling as sampling_lib
from gemma_app.text.tokenizer import Tokenizer

DEFAULT_PAD_LENGTHS = (32, 128, 512)


class CacheFullError(ValueError):
    """The prompt (plus the conversation so far) does not fit in the KV cache."""


@flax.struct.dataclass
class DecodeState:
    """Device state of a generation; a pytree, donated to every decode step.

    Attributes:
      cache: per-layer KV cache, [B, S, K, H] each.
      lengths: [B] tokens held in each row's cache (also the position of `token`).
      token: [B] last sampled token, not yet written to the cache.
      done: [B] row finished (end token sampled, or its cache is full).
      rng: PRNG key, split once per sampled token.
    """

    cache: Cache
    lengths: jax.Array
    token: jax.Array
    done: jax.Array
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class _Program:
    """Everything static about the compiled functions (hashable: a jit static argument)."""

    config: TransformerConfig
    dtype: jnp.dtype
    capacity: int  # logical cache length: positions 0..capacity-1 are usable
    end_tokens: tuple[int, ...]
    forbidden_tokens: tuple[int, ...]

    @property
    def model(self) -> Transformer:
        return Transformer(self.config, dtype=self.dtype)


def _sample(program: _Program, logits, sampling, rng):
    if program.forbidden_tokens:
        logits = logits.at[:, jnp.asarray(program.forbidden_tokens)].set(-jnp.inf)
    rng, key = jax.random.split(rng)
    return sampling(logits, key).astype(jnp.int32), rng


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill_chunk(program: _Program, params, cache, tokens, start, logits_at, mm=None, seg=None):
    """Writes one padded chunk of prompt tokens [B, P] at slots start[b] + arange(P).

    `logits_at[b]`: the chunk index of row b's last prompt token, or P - 1 where the prompt goes
    on past the chunk. With one row, the tokens after it are padding: the model skips them.
    `mm` [B, P, D] and `seg` [B, P] carry image soft tokens and their blocks (None: text).
    """
    positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]
    num_real = logits_at[0] + 1 if tokens.shape[0] == 1 else None
    logits, cache = program.model.apply(
        {"params": params}, tokens, positions, cache, logits_at=logits_at,
        mm_embeddings=mm, segments=seg, num_real=num_real,
    )  # fmt: skip
    return logits, cache


def _chunk_starts(length: int, chunk: int, segments: np.ndarray | None) -> list[int]:
    """Chunk boundaries every `chunk` tokens, moved back so no image or audio block is split.

    The tokens of one image may attend to each other both ways (Gemma 3, Gemma 4 26B/31B),
    so a block must be written in one call; audio blocks are kept whole too. No block is
    longer than a chunk (`_chunk_length` sees to it).
    """
    starts, c0 = [], 0
    while c0 < length:
        starts.append(c0)
        end = c0 + chunk
        if segments is not None and end < length:
            while _splits_block(segments, end) and end > c0 + 1:
                end -= 1
        c0 = end
    return starts


def _splits_block(segments: np.ndarray, end: int) -> bool:
    """Whether a boundary before column `end` cuts a media block in some row."""
    return bool(((segments[:, end] != 0) & (segments[:, end] == segments[:, end - 1])).any())


def _longest_block(segments: np.ndarray | None) -> int:
    """Length of the longest run of one nonzero segment in any row of [B, T] `segments`."""
    if segments is None:
        return 0
    longest = 0
    for row in segments:
        edges = np.flatnonzero(np.diff(row) != 0) + 1  # run boundaries
        for run in np.split(row, edges):
            if run.size and run[0] != 0:
                longest = max(longest, run.size)
    return longest


def _chunk_length(pad_length: Sequence[int], length: int, longest_block: int) -> int:
    """The smallest bucket holding the prompt, else the largest; never shorter than a block.

    A block longer than every bucket (a 1120-token image) gets a multiple of the largest.
    """
    chunk = next((b for b in pad_length if b >= length), pad_length[-1])
    if longest_block > chunk:
        chunk = next((b for b in pad_length if b >= longest_block), None) or (
            -(-longest_block // pad_length[-1]) * pad_length[-1]
        )
    return chunk


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)  # the cache: no copy
def _first_token(program: _Program, logits, lengths, sampling, rng, cache):
    token, rng = _sample(program, logits, sampling, rng)
    done = jnp.isin(token, jnp.asarray(program.end_tokens)) | (lengths >= program.capacity)
    return DecodeState(cache=cache, lengths=lengths, token=token, done=done, rng=rng)


def _step(program: _Program, params, state: DecodeState, sampling) -> DecodeState:
    """Feeds `state.token` at slot `lengths`, samples the next token. Finished rows stay put."""
    logits, cache = program.model.apply(
        {"params": params}, state.token[:, None], state.lengths[:, None], state.cache,
        logits_at=jnp.zeros_like(state.lengths),
    )  # fmt: skip
    token, rng = _sample(program, logits, sampling, state.rng)
    active = ~state.done
    lengths = state.lengths + active.astype(jnp.int32)
    token = jnp.where(active, token, state.token)
    done = state.done | jnp.isin(token, jnp.asarray(program.end_tokens))
    done |= lengths >= program.capacity
    return DecodeState(cache=cache, lengths=lengths, token=token, done=done, rng=rng)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_step(program: _Program, params, state: DecodeState, sampling):
    state = _step(program, params, state, sampling)
    return state, state.token  # the token is a separate buffer: readable after donation


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def _decode_loop(program: _Program, params, state: DecodeState, sampling, max_out_length, max_new):
    """Non-streaming: up to `max_new` tokens (data) in one while_loop; [B, max_out_length]."""
    out = jnp.zeros((state.token.shape[0], max_out_length), jnp.int32).at[:, 0].set(state.token)

    def cond(carry):
        step, state, _ = carry
        return (step < max_new) & ~jnp.all(state.done)

    def body(carry):
        step, state, out = carry
        # Tied to the step counter, the weights look loop-variant to XLA, which then leaves
        # each cast where it is used. Otherwise it hoists the fp32 cast XLA:CPU gathers a bf16
        # embedding through out of the loop: the whole table, every call (270M: 670 MB, ~150 ms).
        step, weights = jax.lax.optimization_barrier((step, params))
        state = _step(program, weights, state, sampling)
        return step + 1, state, out.at[:, step].set(state.token)

    steps, state, out = jax.lax.while_loop(cond, body, (jnp.int32(1), state, out))
    return state, out, steps


def as_rng(rng: int | jax.Array | None) -> jax.Array:
    """None -> a fresh random key; int -> `jax.random.key(int)`; a key passes through."""
    if rng is None:
        rng = random.randint(0, 2**31 - 1)
    if isinstance(rng, int | np.integer):
        return jax.random.key(int(rng))
    return rng


@dataclasses.dataclass
class GenerationResult:
    """What a finished (or interrupted) generation leaves behind, per row.

    `tokens[b]` are the sampled tokens in order, including the end token if one was sampled.
    `state` is ready to continue: `state.lengths` counts what is really in the cache, and
    `state.token` is each row's last sampled token, not yet fed.
    """

    tokens: list[list[int]]
    state: DecodeState
    stopped_by_end_token: list[bool]
    cache_full: list[bool]


class Sampler:
    """Samples from a Gemma model; stateless between calls unless given `last_state`.

    Usage:
      sampler = Sampler(model=Transformer(config), params=params, tokenizer=tokenizer)
      text = sampler.sample("Tell me a joke", max_new_tokens=64)
      for token in sampler.sample("Hi", stream=True): ...
    """

    def __init__(
        self,
        *,
        model: Transformer,
        params: dict,
        tokenizer: Tokenizer | None = None,
        sampling: sampling_lib.SamplingMethod | None = None,
        forbidden_tokens: Sequence[str | int] | None = None,
        stop_tokens: Sequence[str | int] | None = None,
        cache_length: int = 4096,
        max_out_length: int = 2048,
        pad_length: Sequence[int] = DEFAULT_PAD_LENGTHS,
    ):
        if cache_length < 2:
            raise ValueError(f"cache_length must be >= 2, got {cache_length}")
        if max_out_length < 1:
            raise ValueError(f"max_out_length must be >= 1, got {max_out_length}")
        if jax.default_backend() == "cpu":
            # Every new conversation allocates a KV cache (Gemma 3 270M: 151 MB). Unless glibc
            # keeps freed blocks mapped, each one is a fresh mapping that page-faults during the
            # prefill: ~35 ms of 270M's first token, measured from idle in the TTFT duel.
            keep_freed_host_memory()
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.sampling = sampling or sampling_lib.Greedy()
        self.cache_length = cache_length
        self.max_out_length = max_out_length
        self.pad_length = tuple(sorted(pad_length))
        special = tokenizer.special if tokenizer is not None else None
        ends = [special.eos, special.end_of_turn] if special is not None else []
        ends += [self._token_id(t) for t in stop_tokens or ()]
        forbidden = list(tokenizer.forbidden_tokens) if tokenizer is not None else []
        forbidden += [self._token_id(t) for t in forbidden_tokens or ()]
        self.program = _Program(
            config=model.config,
            dtype=model.dtype,
            capacity=cache_length,
            end_tokens=tuple(dict.fromkeys(ends)),
            forbidden_tokens=tuple(sorted(set(forbidden))),
        )

    def _token_id(self, token: str | int) -> int:
        if isinstance(token, int | np.integer):
            if not 0 <= token < self.model.config.num_embed:
                raise ValueError(f"Token id {token} is outside the vocabulary")
            return int(token)
        if self.tokenizer is None:
            raise ValueError(f"String token {token!r} needs a tokenizer")
        return self.tokenizer.token_id(token)

    # -- building blocks (used by ChatSampler) ---------------------------------------------

    def new_state_cache(self, batch: int) -> Cache:
        return init_cache(
            self.model.config, batch=batch, cache_length=self.cache_length,
            dtype=self.model.dtype, stacked=is_stacked(self.params),
        )  # fmt: skip

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        last_state: DecodeState | None = None,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        segments: Sequence[Sequence[int]] | None = None,
        mm_embeddings: Sequence[np.ndarray] | None = None,
    ) -> DecodeState:
        """Feeds each row's tokens after its cache contents and samples its first token.

        Args:
          prompts: token ids per row; soft-token slots may hold any id (e.g. -2, -4).
          segments: per row, the media block of each token (k > 0: image k, -k: audio clip
            k, 0: text), for models with an image or audio encoder.
          mm_embeddings: per row, [len(prompt), D] soft tokens where `segments != 0`.

        Raises:
          CacheFullError: a row's conversation would not leave room for one more token.
          ValueError: an empty prompt or a token id outside the vocabulary.
        """
        batch = len(prompts)
        if batch == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token")
        vocab = self.model.config.num_embed
        soft = [np.asarray(s) != 0 for s in segments] if segments else [False] * batch
        text = [np.asarray(p)[~m] for p, m in zip(prompts, soft, strict=True)]
        if any(t.size and (t.min() < 0 or t.max() >= vocab) for t in text):
            raise ValueError(f"Prompt token ids must lie in [0, {vocab})")
        if last_state is None:
            start = np.zeros(batch, np.int32)
            cache = self.new_state_cache(batch)
        else:
            start = np.asarray(last_state.lengths, np.int32)
            cache = last_state.cache
        lengths = np.array([len(p) for p in prompts], np.int32)
        self._check_room(start, lengths)
        seg = None
        if segments is not None:
            seg = np.zeros((batch, int(lengths.max())), np.int32)
            for b, s in enumerate(segments):
                seg[b, : len(s)] = s
        chunk = _chunk_length(self.pad_length, int(lengths.max()), _longest_block(seg))
        width = int(lengths.max()) + chunk  # room for a chunk moved back before a block
        padded = np.zeros((batch, width), np.int32)
        mm = None
        if seg is not None:
            seg = np.pad(seg, ((0, 0), (0, chunk)))
            mm = np.zeros((batch, width, self.model.config.embed_dim), np.float32)
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = np.where(np.asarray(p) < 0, 0, p)
            if mm is not None:
                mm[b, : len(p)] = mm_embeddings[b]
        last = lengths - 1  # index of each row's last prompt token in `padded`
        logits = None
        for c0 in _chunk_starts(int(lengths.max()), chunk, seg):
            c1 = c0 + chunk
            logits_at = np.clip(last - c0, 0, chunk - 1).astype(np.int32)
            extra = () if seg is None else (mm[:, c0:c1], seg[:, c0:c1])
            out, cache = _prefill_chunk(
                self.program, self.params, cache, padded[:, c0:c1], start + c0, logits_at, *extra
            )
            in_chunk = ((last >= c0) & (last < c1))[:, None]
            logits = out if logits is None else jnp.where(in_chunk, out, logits)
        return _first_token(
            self.program, logits, jnp.asarray(start + lengths), sampling or self.sampling,
            as_rng(rng), cache,
        )  # fmt: skip

    def _check_room(self, start: np.ndarray, lengths: np.ndarray) -> None:
        for b in range(len(start)):
            total = int(start[b] + lengths[b])
            if total >= self.cache_length:
                raise CacheFullError(
                    f"The conversation needs {total} tokens (+1 to answer), but the cache holds "
                    f"{self.cache_length}. Start a new chat, shorten the prompt, or raise "
                    f"cache_length."
                )

    def generate(
        self,
        state: DecodeState,
        *,
        max_new_tokens: int,
        sampling: sampling_lib.SamplingMethod | None = None,
        result: list | None = None,
    ) -> Iterator[np.ndarray]:
        """Streams tokens [B] one step at a time, starting with the prefill's token.

        Step t+1 is dispatched before token t is read back, so the host round trip overlaps
        device work. When the generator ends — exhausted, or closed early by the caller — it
        appends a `GenerationResult` to `result` (if given).
        """
        self._check_max_new(max_new_tokens)
        sampling = sampling or self.sampling
        batch = state.token.shape[0]
        tokens = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        ended = np.zeros(batch, bool)
        lengths = np.asarray(state.lengths).copy()
        # The first token lives inside `state`, which the first step donates: read it first.
        queue = collections.deque([np.asarray(state.token)])
        speculative = state
        try:
            for step in range(max_new_tokens):
                token_dev = queue.popleft()
                if step + 1 < max_new_tokens:
                    speculative, nxt = _decode_step(
                        self.program, self.params, speculative, sampling
                    )
                    queue.append(nxt)
                token = np.asarray(token_dev)
                for b in np.flatnonzero(~done):
                    if step > 0:
                        lengths[b] += 1  # the previous token of this row is now in the cache
                    tokens[b].append(int(token[b]))
                    ended[b] = token[b] in self.program.end_tokens
                    done[b] = ended[b] or lengths[b] >= self.cache_length
                yield token
                if done.all():
                    break
        finally:
            final = speculative.replace(
                lengths=jnp.asarray(lengths),
                token=jnp.asarray([t[-1] if t else 0 for t in tokens], jnp.int32),
                done=jnp.asarray(done),
            )
            if result is not None:
                result.append(
                    GenerationResult(
                        tokens, final, ended.tolist(), (lengths >= self.cache_length).tolist()
                    )
                )

    def generate_all(
        self, state: DecodeState, *, max_new_tokens: int, sampling=None
    ) -> GenerationResult:
        """Non-streaming: the whole generation in one compiled while_loop."""
        self._check_max_new(max_new_tokens)
        start = np.asarray(state.lengths)
        state, out, steps = _decode_loop(
            self.program, self.params, state, sampling or self.sampling, self.max_out_length,
            np.int32(max_new_tokens),
        )  # fmt: skip
        out, steps, lengths = np.asarray(out), int(steps), np.asarray(state.lengths)
        tokens, ended = [], []
        for b in range(out.shape[0]):
            # Row b fed lengths[b] - start[b] tokens, so it sampled one more than that.
            n = min(int(lengths[b] - start[b]) + 1, steps)
            row = out[b, :n].tolist()
            tokens.append(row)
            ended.append(bool(row) and row[-1] in self.program.end_tokens)
        full = (lengths >= self.cache_length).tolist()
        return GenerationResult(tokens, state, ended, full)

    def _check_max_new(self, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int | np.integer) or isinstance(max_new_tokens, bool):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if not 1 <= max_new_tokens <= self.max_out_length:
            raise ValueError(
                f"max_new_tokens must be between 1 and max_out_length={self.max_out_length}, "
                f"got {max_new_tokens}"
            )

    # -- the public one-call API --------------------------------------------------------------

    def sample(
        self,
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        stream: bool = False,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        add_bos: bool = True,
    ):
        """Completes raw text prompt(s) (no chat template; see `ChatSampler` for chat).

        Returns the decoded completion (a list for a list of prompts), without the end token;
        with `stream=True`, a generator of token arrays [B].
        """
        if self.tokenizer is None:
            raise ValueError("Sampler.sample needs a tokenizer; use prefill/generate with ids")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if any(not p for p in prompts):
            raise ValueError("Empty prompt: type a message first")
        ids = [self.tokenizer.encode(p, add_bos=add_bos) for p in prompts]
        max_new = self.max_out_length if max_new_tokens is None else max_new_tokens
        self._check_max_new(max_new)
        state = self.prefill(ids, sampling=sampling, rng=rng)
        if stream:
            return self.generate(state, max_new_tokens=max_new, sampling=sampling)
        result = self.generate_all(state, max_new_tokens=max_new, sampling=sampling)
        texts = [self.decode_answer(t) for t in result.tokens]
        return texts[0] if single else texts

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """Decodes sampled tokens, dropping a final end token."""
        if tokens and tokens[-1] in self.program.end_tokens:
            tokens = tokens[:-1]
        return self.tokenizer.decode(list(tokens))
