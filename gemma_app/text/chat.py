"""`ChatSampler`: a stateful multi-turn chat over a `Sampler`, API after `gm.text.ChatSampler`.

The conversation is kept as one host-side token list, `_tokens`: everything the model has
seen or will see next, in order. The device cache holds a prefix of it (`_cached` tokens; slot
i holds token i); the rest is fed with the next prompt. Hence:

* a new turn feeds the previous answer's unfed last token, `<end_of_turn>`, `"\n"`, then the
  user turn: exactly the tokens a one-shot run over the whole formatted conversation sees
  (google-deepmind/gemma drops the end-of-turn token here; spec §6.7);
* going back to turn k (retry, undo, edit in the UI) only truncates `_tokens` and lowers
  `_cached`: the cache slots before that point are still valid, so nothing is recomputed;
* a conversation rebuilt from a UI history is appended as tokens and prefilled, in chunks,
  together with the next message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from gemma_app.nn.transformer import Transformer
from gemma_app.text import sampling as sampling_lib
from gemma_app.text.sampler import DEFAULT_PAD_LENGTHS, CacheFullError, DecodeState, Sampler
from gemma_app.text.template import ChatTemplate
from gemma_app.text.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["CacheFullError", "ChatSampler", "Turn"]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One exchange. `start` indexes `_tokens` where the user turn begins."""

    user: str
    answer: str
    answer_tokens: tuple[int, ...]
    start: int
    complete: bool  # False: cut by max_new_tokens, a full cache, or the user pressing stop


class ChatSampler:
    """Multi-turn chat with a Gemma model.

    Usage:
      chat = ChatSampler(model=Transformer(config), params=params, tokenizer=tok, multi_turn=True)
      chat.chat("Hi!")                      # -> "Hello! ..."
      for delta in chat.stream("And then?"):
          print(delta, end="")
      chat.reset()
    """

    def __init__(
        self,
        *,
        model: Transformer,
        params: dict,
        tokenizer: Tokenizer,
        multi_turn: bool = False,
        sampling: sampling_lib.SamplingMethod | None = None,
        forbidden_tokens: Sequence[str | int] | None = None,
        stop_tokens: Sequence[str | int] | None = None,
        cache_length: int = 4096,
        max_out_length: int = 2048,
        pad_length: Sequence[int] = DEFAULT_PAD_LENGTHS,
        system_prompt: str | None = None,
    ):
        self.multi_turn = multi_turn
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer)
        self.sampler = Sampler(
            model=model, params=params, tokenizer=tokenizer, sampling=sampling,
            forbidden_tokens=forbidden_tokens, stop_tokens=stop_tokens,
            cache_length=cache_length, max_out_length=max_out_length, pad_length=pad_length,
        )  # fmt: skip
        self.system_prompt = system_prompt or None
        self.turns: list[Turn] = []
        self._tokens: list[int] = [tokenizer.special.bos]
        self._cached = 0
        self._cache = None  # device KV cache, allocated on first use and then reused

    # -- properties -------------------------------------------------------------------------

    @property
    def model(self) -> Transformer:
        return self.sampler.model

    @property
    def params(self) -> dict:
        return self.sampler.params

    @property
    def sampling(self) -> sampling_lib.SamplingMethod:
        return self.sampler.sampling

    @property
    def cache_length(self) -> int:
        return self.sampler.cache_length

    @property
    def max_out_length(self) -> int:
        return self.sampler.max_out_length

    @property
    def used_cache_length(self) -> int:
        """Tokens of the conversation so far (cached or about to be fed)."""
        return len(self._tokens)

    # -- conversation management ----------------------------------------------------------

    def reset(self, *, system_prompt: str | None = ...) -> None:
        """Starts a new conversation (keeps the allocated cache; optionally a new system prompt)."""
        if system_prompt is not ...:
            self.system_prompt = system_prompt or None
        self.turns = []
        self._tokens = [self.tokenizer.special.bos]
        self._cached = 0

    def truncate(self, num_turns: int) -> None:
        """Keeps only the first `num_turns` turns; the cache before that point stays valid."""
        if not 0 <= num_turns <= len(self.turns):
            raise ValueError(f"Cannot keep {num_turns} of {len(self.turns)} turns")
        if num_turns == len(self.turns):
            return
        start = self.turns[num_turns].start
        self.turns = self.turns[:num_turns]
        self._tokens = self._tokens[:start]
        self._cached = min(self._cached, start)

    def load_history(
        self, history: Sequence[tuple[str, str]], *, system_prompt: str | None = ...
    ) -> None:
        """Makes the conversation equal to `history` [(user, answer), ...] (e.g. the browser's).

        Turns that match the current ones are kept with their cache; the rest is re-encoded and
        will be prefilled with the next message. A no-op when nothing changed.
        """
        if system_prompt is not ... and (system_prompt or None) != self.system_prompt:
            self.reset(system_prompt=system_prompt)
        keep = 0
        for turn, (user, answer) in zip(self.turns, history, strict=False):
            if turn.user != user or turn.answer != answer:
                break
            keep += 1
        self.truncate(keep)
        for user, answer in history[keep:]:
            ids = tuple(self.tokenizer.encode(answer)) if answer else ()
            self._append_turn(user, answer, ids, complete=True, start=len(self._tokens))

    def history(self) -> list[tuple[str, str]]:
        return [(t.user, t.answer) for t in self.turns]

    def _user_tokens(self, prompt: str) -> list[int]:
        system = self.system_prompt if not self.turns else None
        return self.template.user_turn(prompt, system=system)

    def _append_turn(self, user, answer, answer_tokens, *, complete: bool, start: int) -> None:
        """Records a turn whose user tokens are already in `_tokens[start:]`, or adds them."""
        if len(self._tokens) == start:
            self._tokens += self._user_tokens(user)
        self._tokens += list(answer_tokens) + self.template.end_of_model_turn()
        self.turns.append(Turn(user, answer, tuple(answer_tokens), start, complete))

    # -- generation -------------------------------------------------------------------------

    def chat(
        self,
        prompt: str,
        *,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        max_new_tokens: int | None = None,
        multi_turn: bool | None = None,
    ) -> str:
        """Answers `prompt`; returns the answer without the end-of-turn marker."""
        return "".join(
            self.stream(
                prompt, sampling=sampling, rng=rng, max_new_tokens=max_new_tokens,
                multi_turn=multi_turn,
            )
        )  # fmt: skip

    def stream(
        self,
        prompt: str,
        *,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        max_new_tokens: int | None = None,
        multi_turn: bool | None = None,
    ) -> Iterator[str]:
        """Answers `prompt`, yielding text deltas as tokens arrive.

        The deltas never split a UTF-8 character and concatenate to the final answer. Closing
        the generator early (a stop button) keeps the partial answer as the turn's answer.

        Raises:
          ValueError: empty prompt or bad `max_new_tokens` (before any work is done).
          CacheFullError: the conversation no longer fits; `reset()` and try again.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("Empty message: type something first")
        max_new = self.max_out_length if max_new_tokens is None else max_new_tokens
        self.sampler._check_max_new(max_new)
        if not (self.multi_turn if multi_turn is None else multi_turn):
            self.reset()
        return self._stream(prompt, sampling, rng, max_new)

    def _stream(self, prompt, sampling, rng, max_new) -> Iterator[str]:
        start = len(self._tokens)
        prompt_tokens = self._user_tokens(prompt)
        state = self._prefill(self._tokens[self._cached :] + prompt_tokens, sampling, rng)
        self._tokens += prompt_tokens
        self._cached = len(self._tokens)
        results = []
        decoder = IncrementalDecoder(self.tokenizer)
        answer: list[int] = []
        ends = set(self.sampler.program.end_tokens)
        eos_like = {self.tokenizer.special.eos, self.tokenizer.special.end_of_turn}
        try:
            gen = self.sampler.generate(
                state, max_new_tokens=max_new, sampling=sampling, result=results
            )
            with _closing(gen):
                for token in gen:
                    token = int(token[0])
                    if token in eos_like:
                        break
                    answer.append(token)
                    delta = decoder.push(token)
                    if delta:
                        yield delta
                    if token in ends:  # a user stop token: kept in the answer, like gm
                        break
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            self._finish_turn(prompt, start, answer, results)

    def _prefill(self, tokens, sampling, rng) -> DecodeState:
        if self._cache is None:
            self._cache = self.sampler.new_state_cache(batch=1)
        last = DecodeState(
            cache=self._cache, lengths=np.array([self._cached], np.int32),
            token=np.zeros(1, np.int32), done=np.zeros(1, bool), rng=jax.random.key(0),
        )  # fmt: skip
        self._cache = None  # donated to the prefill; the result's cache replaces it
        try:
            state = self.sampler.prefill([tokens], last_state=last, sampling=sampling, rng=rng)
        except CacheFullError:
            self._cache = last.cache
            raise
        self._cache = state.cache
        return state

    def _finish_turn(self, prompt, start, answer, results) -> None:
        """Records the (possibly partial) answer and keeps the cache for the next turn."""
        result = results[0] if results else None
        if result is not None:
            self._cache = result.state.cache
            self._cached = int(result.state.lengths[0])
        complete = bool(result and result.stopped_by_end_token[0])
        text = self.tokenizer.decode(answer)
        self._tokens = self._tokens[:start]
        self._append_turn(prompt, text, tuple(answer), complete=complete, start=start)
        # Everything sampled after the cached prefix (the pending token) is fed next turn.
        self._cached = min(self._cached, len(self._tokens))


class _closing:
    """Closes a generator on exit so its `finally` (result bookkeeping) runs right away."""

    def __init__(self, gen):
        self.gen = gen

    def __enter__(self):
        return self.gen

    def __exit__(self, *exc):
        self.gen.close()
        return False
