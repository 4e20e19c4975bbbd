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

Images (vision models): each image becomes a block of SOFT_TOKEN slots in `_tokens`;
`_segments` numbers the blocks (0 for text) and `_soft` keeps each block's projected soft
tokens on the host, so a block can be prefilled again after the cache was rewound.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.nn import vision
from gemma_app.nn.transformer import Transformer
from gemma_app.text import sampling as sampling_lib
from gemma_app.text.sampler import DEFAULT_PAD_LENGTHS, CacheFullError, DecodeState, Sampler
from gemma_app.text.template import SOFT_TOKEN, ChatTemplate
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
    images: tuple[str, ...] = ()  # content hashes of the turn's images


def image_key(image: np.ndarray) -> str:
    """A content hash, to tell whether a history turn still holds the same images."""
    image = np.ascontiguousarray(image)
    return hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()


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
        self._cache = None  # device KV cache, allocated on first use and then reused
        self.reset()

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
        self.turns: list[Turn] = []
        self._tokens: list[int] = [self.tokenizer.special.bos]
        self._segments: list[int] = [0]
        self._soft: dict[int, np.ndarray] = {}  # image block -> [M, D] soft tokens
        self._next_block = 1
        self._cached = 0

    def truncate(self, num_turns: int) -> None:
        """Keeps only the first `num_turns` turns; the cache before that point stays valid."""
        if not 0 <= num_turns <= len(self.turns):
            raise ValueError(f"Cannot keep {num_turns} of {len(self.turns)} turns")
        if num_turns == len(self.turns):
            return
        start = self.turns[num_turns].start
        self.turns = self.turns[:num_turns]
        self._cut(start)

    def _cut(self, length: int) -> None:
        self._tokens, self._segments = self._tokens[:length], self._segments[:length]
        self._cached = min(self._cached, length)
        live = set(self._segments)
        self._soft = {b: v for b, v in self._soft.items() if b in live}

    def load_history(self, history: Sequence[tuple], *, system_prompt: str | None = ...) -> None:
        """Makes the conversation equal to `history` (e.g. the browser's).

        Items are `(user, answer)` or `(user, answer, images)`, images as uint8 [H, W, 3]
        arrays. Turns that match the current ones are kept with their cache; the rest is
        re-encoded and will be prefilled with the next message. A no-op when nothing changed.
        """
        if system_prompt is not ... and (system_prompt or None) != self.system_prompt:
            self.reset(system_prompt=system_prompt)
        items = [(h[0], h[1], list(h[2]) if len(h) > 2 else []) for h in history]
        keep = 0
        for turn, (user, answer, images) in zip(self.turns, items, strict=False):
            keys = tuple(image_key(i) for i in images)
            if turn.user != user or turn.answer != answer or turn.images != keys:
                break
            keep += 1
        self.truncate(keep)
        for user, answer, images in items[keep:]:
            ids = tuple(self.tokenizer.encode(answer)) if answer else ()
            start = len(self._tokens)
            self._append_user(user, self._encode_images(images))
            self._close_turn(user, answer, ids, complete=True, images=images, start=start)

    def history(self) -> list[tuple[str, str]]:
        return [(t.user, t.answer) for t in self.turns]

    def _user_tokens(self, prompt: str, num_images: int = 0) -> list[int]:
        system = self.system_prompt if not self.turns else None
        m = self.model.config.vision.num_mm_tokens_per_image if num_images else 0
        return self.template.user_turn(prompt, system=system, images=num_images, tokens_per_image=m)

    def _extend(self, ids: list[int], soft: Sequence[np.ndarray] = ()) -> None:
        """Appends tokens; each run of SOFT_TOKEN gets a new image block and its soft tokens."""
        soft = list(soft)
        for i, token in enumerate(ids):
            block = 0
            if token == SOFT_TOKEN:
                if i == 0 or ids[i - 1] != SOFT_TOKEN:
                    self._soft[self._next_block] = soft.pop(0)
                    self._next_block += 1
                block = self._next_block - 1
            self._tokens.append(token)
            self._segments.append(block)

    def _append_user(self, user: str, soft: Sequence[np.ndarray]) -> None:
        self._extend(self._user_tokens(user, len(soft)), soft)

    def _close_turn(self, user, answer, answer_tokens, *, complete, images, start) -> None:
        """Appends the answer and the end of the model turn; records the turn."""
        self._extend(list(answer_tokens) + self.template.end_of_model_turn())
        keys = tuple(image_key(i) for i in images)
        self.turns.append(Turn(user, answer, tuple(answer_tokens), start, complete, keys))

    # -- generation -------------------------------------------------------------------------

    def chat(
        self,
        prompt: str,
        *,
        images: Sequence[np.ndarray] | None = None,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        max_new_tokens: int | None = None,
        multi_turn: bool | None = None,
    ) -> str:
        """Answers `prompt`; returns the answer without the end-of-turn marker."""
        return "".join(
            self.stream(
                prompt, images=images, sampling=sampling, rng=rng,
                max_new_tokens=max_new_tokens, multi_turn=multi_turn,
            )
        )  # fmt: skip

    def stream(
        self,
        prompt: str,
        *,
        images: Sequence[np.ndarray] | None = None,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        max_new_tokens: int | None = None,
        multi_turn: bool | None = None,
    ) -> Iterator[str]:
        """Answers `prompt` (and `images`, uint8 RGB [H, W, 3]), yielding text deltas.

        The deltas never split a UTF-8 character and concatenate to the final answer. Closing
        the generator early (a stop button) keeps the partial answer as the turn's answer.

        Raises:
          ValueError: empty message, images for a text-only model, or bad `max_new_tokens`
            (all before any work is done).
          CacheFullError: the conversation no longer fits; `reset()` and try again.
        """
        images = list(images or [])
        if not isinstance(prompt, str) or not (prompt.strip() or images):
            raise ValueError("Empty message: type something first")
        max_new = self.max_out_length if max_new_tokens is None else max_new_tokens
        self.sampler._check_max_new(max_new)
        soft = self._encode_images(images)
        if not (self.multi_turn if multi_turn is None else multi_turn):
            self.reset()
        return self._stream(prompt, images, soft, sampling, rng, max_new)

    @property
    def supports_images(self) -> bool:
        return self.model.config.vision is not None and "vision_encoder" in self.params

    def _encode_images(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 [H, W, 3] images -> their projected soft tokens [M, D] (host arrays)."""
        if not images:
            return []
        if not self.supports_images:
            raise ValueError("This model does not accept images")
        vc, embedder = self.model.config.vision, self.params["embedder"]
        pixels = jnp.stack([vision.preprocess_image(i, vc.image_size) for i in images])
        soft = vision.encode_images(vc, self.params["vision_encoder"], pixels)
        projected = vision.project_soft_tokens(
            soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
        )
        return list(np.asarray(projected, np.float32))

    def _stream(self, prompt, images, soft, sampling, rng, max_new) -> Iterator[str]:
        start = len(self._tokens)
        self._append_user(prompt, soft)
        try:
            state = self._prefill(sampling, rng)
        except BaseException:
            self._cut(start)  # nothing of this turn is recorded
            raise
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
            self._finish_turn(prompt, images, start, answer, results)

    def _prefill(self, sampling, rng) -> DecodeState:
        """Feeds every token not yet in the cache (pending ones + the new user turn)."""
        if self._cache is None:
            self._cache = self.sampler.new_state_cache(batch=1)
        last = DecodeState(
            cache=self._cache, lengths=np.array([self._cached], np.int32),
            token=np.zeros(1, np.int32), done=np.zeros(1, bool), rng=jax.random.key(0),
        )  # fmt: skip
        tokens, extra = self._tokens[self._cached :], {}
        if self.model.config.vision is not None:
            extra = {"segments": [self._segments[self._cached :]], "mm_embeddings": [self._mm()]}
        self._cache = None  # donated to the prefill; the result's cache replaces it
        try:
            state = self.sampler.prefill(
                [tokens], last_state=last, sampling=sampling, rng=rng, **extra
            )
        except BaseException:
            self._cache = last.cache
            if any(x.is_deleted() for x in jax.tree.leaves(last.cache)):
                self._cache, self._cached = None, 0  # lost mid-call: rebuild next time
            raise
        self._cache = state.cache
        self._cached = len(self._tokens)
        return state

    def _mm(self) -> np.ndarray:
        """[pending, D] soft tokens of the pending tokens (zeros on text)."""
        segments = np.asarray(self._segments[self._cached :])
        mm = np.zeros((len(segments), self.model.config.embed_dim), np.float32)
        for block in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == block)
            first = self._segments.index(int(block))  # the block may begin before the cache end
            mm[where] = self._soft[int(block)][self._cached + where - first]
        return mm

    def _finish_turn(self, prompt, images, start, answer, results) -> None:
        """Records the (possibly partial) answer and keeps the cache for the next turn."""
        result = results[0] if results else None
        if result is not None:
            self._cache = result.state.cache
            self._cached = int(result.state.lengths[0])
        complete = bool(result and result.stopped_by_end_token[0])
        text = self.tokenizer.decode(answer)
        cached = self._cached
        self._close_turn(prompt, text, tuple(answer), complete=complete, images=images, start=start)
        # Everything sampled after the cached prefix (the pending token) is fed next turn.
        self._cached = min(cached, len(self._tokens))


class _closing:
    """Closes a generator on exit so its `finally` (result bookkeeping) runs right away."""

    def __init__(self, gen):
        self.gen = gen

    def __enter__(self):
        return self.gen

    def __exit__(self, *exc):
        self.gen.close()
        return False
