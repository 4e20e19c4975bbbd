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

Media: each image becomes a block of SOFT_TOKEN slots in `_tokens`, each audio clip a block of
AUDIO_SOFT_TOKEN slots. `_segments` numbers the blocks (k > 0: image k, -k: audio clip k, 0:
text) and `_soft` keeps each block's projected soft tokens on the host, so a block can be
prefilled again after the cache was rewound. Gemma 3 images are squashed to the encoder's
square; Gemma 4 images keep their aspect ratio and yield their own number of soft tokens.

Gemma 4 thinking (`thinking=True`) puts `<|think|>` in the system turn; the model then writes
`<|channel>thought\n…<channel|>` before its answer. `stream_parts` yields both channels,
`stream`/`chat` only the answer. A finished answer stays in the context without its thought
(as Hugging Face's template renders earlier turns), so the cache is rewound to where the thought
began: the answer tokens are fed again with the next message.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from gemma_app.nn.transformer import Transformer
from gemma_app.text import sampling as sampling_lib
from gemma_app.text import soft_tokens
from gemma_app.text.sampler import DEFAULT_PAD_LENGTHS, CacheFullError, DecodeState, Sampler
from gemma_app.text.template import AUDIO_SOFT_TOKEN, SOFT_TOKEN, ChatTemplate
from gemma_app.text.thoughts import ANSWER, Part, ThoughtSplitter
from gemma_app.text.tokenizer import Tokenizer

__all__ = ["CacheFullError", "ChatSampler", "Turn"]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One exchange. `start` indexes `_tokens` where the user turn begins."""

    user: str
    answer: str
    answer_tokens: tuple[int, ...]  # every sampled token, thought included (no end token)
    start: int
    complete: bool  # False: cut by max_new_tokens, a full cache, or the user pressing stop
    images: tuple[str, ...] = ()  # content hashes of the turn's images
    audio: tuple[str, ...] = ()  # content hashes of the turn's audio clips
    thought: str = ""  # Gemma 4 thinking text (not part of the context of later turns)


def image_key(array: np.ndarray) -> str:
    """A content hash, to tell whether a history turn still holds the same images or clips."""
    array = np.ascontiguousarray(array)
    return hashlib.sha1(repr((array.shape, array.dtype.str)).encode() + array.tobytes()).hexdigest()


class ChatSampler:
    """Multi-turn chat with a Gemma model.

    Args:
      thinking: Gemma 4: think before answering (`<|think|>` in the system turn).
      empty_thought: Gemma 4 26B/31B: open answers with an empty thought when not thinking.
      (the others as for `Sampler`, plus `multi_turn` and `system_prompt`)

    Usage:
      chat = ChatSampler(model=Transformer(config), params=params, tokenizer=tok, multi_turn=True)
      chat.chat("Hi!")                      # -> "Hello! ..."
      for delta in chat.stream("And then?"):
          print(delta, end="")
      for channel, delta in chat.stream_parts("Why?", thinking=True):  # Gemma 4
          print(channel, delta)
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
        thinking: bool = False,
        empty_thought: bool = False,
    ):
        self.multi_turn = multi_turn
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, empty_thought=empty_thought)
        self.sampler = Sampler(
            model=model, params=params, tokenizer=tokenizer, sampling=sampling,
            forbidden_tokens=forbidden_tokens, stop_tokens=stop_tokens,
            cache_length=cache_length, max_out_length=max_out_length, pad_length=pad_length,
        )  # fmt: skip
        self._check_thinking(thinking)
        self.system_prompt = system_prompt or None
        self.thinking = thinking
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

    @property
    def supports_images(self) -> bool:
        return self.model.config.vision is not None and "vision_encoder" in self.params

    @property
    def supports_audio(self) -> bool:
        return self.model.config.audio is not None and "audio_encoder" in self.params

    @property
    def supports_thinking(self) -> bool:
        return self.template.supports_thinking

    # -- conversation management ----------------------------------------------------------

    def reset(self, *, system_prompt: str | None = ..., thinking: bool = ...) -> None:
        """Starts a new conversation (keeps the allocated cache; optionally new settings)."""
        if system_prompt is not ...:
            self.system_prompt = system_prompt or None
        if thinking is not ...:
            self._check_thinking(thinking)
            self.thinking = thinking
        self.turns: list[Turn] = []
        self._tokens: list[int] = [self.tokenizer.special.bos]
        self._segments: list[int] = [0]
        self._soft: dict[int, np.ndarray] = {}  # segment (image k / audio -k) -> [M, D]
        self._next_image, self._next_audio = 1, 1
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

    def load_history(
        self,
        history: Sequence[tuple],
        *,
        system_prompt: str | None = ...,
        thinking: bool = ...,
    ) -> None:
        """Makes the conversation equal to `history` (e.g. the browser's).

        Items are `(user, answer)`, `(user, answer, images)` or `(user, answer, images,
        audio)`: images uint8 [H, W, 3], audio clips float32 mono 16 kHz [N]; answers without
        their thoughts. Turns that match the current ones are kept with their cache; the rest
        is re-encoded and will be prefilled with the next message. A no-op when nothing
        changed; a new system prompt or thinking switch starts over (they open the context).
        """
        if system_prompt is not ... and (system_prompt or None) != self.system_prompt:
            self.reset(system_prompt=system_prompt)
        if thinking is not ... and thinking != self.thinking:
            self.reset(thinking=thinking)
        items = [_history_item(h) for h in history]
        keep = 0
        for turn, (user, answer, images, audio) in zip(self.turns, items, strict=False):
            keys = tuple(map(image_key, images)), tuple(map(image_key, audio))
            if (turn.user, turn.answer, turn.images, turn.audio) != (user, answer, *keys):
                break
            keep += 1
        self.truncate(keep)
        for user, answer, images, audio in items[keep:]:
            ids = tuple(self.tokenizer.encode(answer)) if answer else ()
            start = len(self._tokens)
            ids_user = self._user_tokens(
                user, self._image_counts(images), self._audio_counts(audio)
            )
            self._extend(ids_user, self._encode_images(images), self._encode_audio(audio))
            media = tuple(map(image_key, images)), tuple(map(image_key, audio))
            self._close_turn(Turn(user, answer, ids, start, True, *media), answer_start=None)

    def history(self) -> list[tuple[str, str]]:
        return [(t.user, t.answer) for t in self.turns]

    def _user_tokens(self, prompt: str, images: list[int], audio: list[int]) -> list[int]:
        """The user turn (with the system turn first, on turn 1) and the generation prefix."""
        first = not self.turns
        ids = self.template.user_turn(
            prompt, system=self.system_prompt if first else None, images=images, audio=audio,
            thinking=self.thinking and first,
        )  # fmt: skip
        return ids + self.template.generation_prefix(thinking=self.thinking)

    def _extend(self, ids: list[int], images=(), audio=()) -> None:
        """Appends tokens; each run of soft tokens gets a new segment and its soft tokens."""
        images, audio = list(images), list(audio)
        for i, token in enumerate(ids):
            segment = 0
            if token in (SOFT_TOKEN, AUDIO_SOFT_TOKEN):
                is_image = token == SOFT_TOKEN
                if i == 0 or ids[i - 1] != token:  # a new block
                    if is_image:
                        self._soft[self._next_image] = images.pop(0)
                        self._next_image += 1
                    else:
                        self._soft[-self._next_audio] = audio.pop(0)
                        self._next_audio += 1
                segment = self._next_image - 1 if is_image else 1 - self._next_audio
            self._tokens.append(token)
            self._segments.append(segment)

    def _close_turn(self, turn: Turn, *, answer_start: int | None) -> None:
        """Appends the answer as later turns see it, and the end of the model turn.

        `answer_start` (where the generation prefix began, for a sampled answer) lets the
        thought and the generation prefix be replaced by the bare answer; the cache is kept
        up to the first token that changed.
        """
        cut = len(self._tokens) if answer_start is None else answer_start
        seen = self._tokens[cut:] + list(turn.answer_tokens)  # prefix + sampled, as fed
        context = self.template.context_answer(turn.answer_tokens)
        context += self.template.end_of_model_turn()
        cached = self._cached
        self._cut(cut)
        self._cached = min(cached, cut + _common_prefix(seen, context))
        self._extend(context)
        self.turns.append(turn)

    # -- generation -------------------------------------------------------------------------

    def chat(self, prompt: str, **kwargs) -> str:
        """Answers `prompt`; returns the answer (no thought, no end-of-turn marker).

        Keyword arguments are those of `stream`.
        """
        return "".join(self.stream(prompt, **kwargs))

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Answers `prompt`, yielding the answer's text deltas (thoughts are left out).

        Keyword arguments are those of `stream_parts`.
        """
        return _answer_deltas(self.stream_parts(prompt, **kwargs))  # validated eagerly

    def stream_parts(
        self,
        prompt: str,
        *,
        images: Sequence[np.ndarray] | None = None,
        audio: Sequence[np.ndarray] | None = None,
        sampling: sampling_lib.SamplingMethod | None = None,
        rng: int | jax.Array | None = None,
        max_new_tokens: int | None = None,
        multi_turn: bool | None = None,
        thinking: bool | None = None,
    ) -> Iterator[Part]:
        """Answers `prompt` with `images` and `audio`; yields `(channel, text delta)` pairs.

        `channel` is "thought" (Gemma 4 thinking) or "answer". Per channel, the deltas never
        split a UTF-8 character and concatenate to the turn's `thought` / `answer`. Closing
        the generator early (a stop button) keeps the partial answer as the turn's answer.

        Args:
          prompt: the user's message.
          images: uint8 RGB [H, W, 3] arrays, shown before the text.
          audio: float32 mono 16 kHz clips [N] (Gemma 4 models with an audio encoder).
          sampling, rng, max_new_tokens: as for `Sampler`; None means the defaults.
          multi_turn: override the constructor's `multi_turn` for this call.
          thinking: Gemma 4: switch thinking on/off. It lives in the system turn, so changing
            it mid-conversation rebuilds the context (everything is prefilled again).

        Raises:
          ValueError: empty message, media the model does not take, an audio clip too short
            or longer than the encoder takes, or bad `max_new_tokens` (all before any work).
          CacheFullError: the conversation no longer fits; `reset()` and try again.
        """
        images, audio = list(images or []), list(audio or [])
        if not isinstance(prompt, str) or not (prompt.strip() or images or audio):
            raise ValueError("Empty message: type something first")
        max_new = self.max_out_length if max_new_tokens is None else max_new_tokens
        self.sampler._check_max_new(max_new)
        if thinking is not None:
            self._check_thinking(thinking)
        counts = self._image_counts(images), self._audio_counts(audio)
        if not (self.multi_turn if multi_turn is None else multi_turn):
            self.reset()
        if thinking is not None and thinking != self.thinking:
            self._rebuild(thinking)
        ids = self._user_tokens(prompt, *counts)
        self.sampler._check_room(np.zeros(1, np.int32), np.array([len(self._tokens) + len(ids)]))
        soft = self._encode_images(images), self._encode_audio(audio)
        sizes = tuple([len(x) for x in part] for part in soft)
        if sizes != counts:  # the encoders must agree with the placeholder counts
            raise RuntimeError(f"Soft token counts {counts} != encoder outputs {sizes}")
        keys = tuple(map(image_key, images)), tuple(map(image_key, audio))
        return self._stream(prompt, ids, soft, keys, sampling, rng, max_new)

    def _stream(self, prompt, ids, soft, keys, sampling, rng, max_new) -> Iterator[Part]:
        start = len(self._tokens)
        self._extend(ids, *soft)
        answer_start = len(self._tokens) - len(
            self.template.generation_prefix(thinking=self.thinking)
        )
        try:
            state = self._prefill(sampling, rng)
        except BaseException:
            self._cut(start)  # nothing of this turn is recorded
            raise
        results = []
        splitter = ThoughtSplitter(self.tokenizer)
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
                    yield from splitter.push(token)
                    if token in ends:  # a user stop token: kept in the answer, like gm
                        break
            yield from splitter.flush()
        finally:
            self._finish_turn(prompt, keys, start, answer_start, answer, splitter, results)

    def _prefill(self, sampling, rng) -> DecodeState:
        """Feeds every token not yet in the cache (pending ones + the new user turn)."""
        if self._cache is None:
            self._cache = self.sampler.new_state_cache(batch=1)
        last = DecodeState(
            cache=self._cache, lengths=np.array([self._cached], np.int32),
            token=np.zeros(1, np.int32), done=np.zeros(1, bool), rng=jax.random.key(0),
        )  # fmt: skip
        tokens, extra = self._tokens[self._cached :], {}
        config = self.model.config
        if config.vision is not None or config.audio is not None:
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
        for block in np.unique(segments[segments != 0]):
            where = np.flatnonzero(segments == block)
            first = self._segments.index(int(block))  # the block may begin before the cache end
            mm[where] = self._soft[int(block)][self._cached + where - first]
        return mm

    def _finish_turn(self, prompt, keys, start, answer_start, answer, splitter, results) -> None:
        """Records the (possibly partial) answer and keeps the cache for the next turn."""
        result = results[0] if results else None
        if result is not None:
            self._cache = result.state.cache
            self._cached = int(result.state.lengths[0])
        complete = bool(result and result.stopped_by_end_token[0])
        splitter.flush()
        turn = Turn(
            prompt, splitter.answer, tuple(answer), start, complete, *keys, thought=splitter.thought
        )
        self._close_turn(turn, answer_start=answer_start)

    def _rebuild(self, thinking: bool) -> None:
        """Re-renders the conversation with another thinking switch (a new system turn)."""
        turns, soft, segments = self.turns, self._soft, self._segments
        self.reset(thinking=thinking)
        for i, turn in enumerate(turns):
            end = turns[i + 1].start if i + 1 < len(turns) else len(segments)
            blocks = list(dict.fromkeys(s for s in segments[turn.start : end] if s != 0))
            images = [soft[b] for b in blocks if b > 0]
            audio = [soft[b] for b in blocks if b < 0]
            start = len(self._tokens)
            sizes = [len(x) for x in images], [len(x) for x in audio]
            self._extend(self._user_tokens(turn.user, *sizes), images, audio)
            self._close_turn(dataclasses.replace(turn, start=start), answer_start=None)

    def _check_thinking(self, thinking: bool) -> None:
        if thinking and not self.template.supports_thinking:
            raise ValueError("This model has no thinking mode (Gemma 4 only)")

    # -- media --------------------------------------------------------------------------------

    def _image_counts(self, images: Sequence[np.ndarray]) -> list[int]:
        """Soft tokens of each image (checked before any encoding work)."""
        if images and not self.supports_images:
            raise ValueError("This model does not accept images")
        return soft_tokens.image_counts(self.model.config, images) if images else []

    def _encode_images(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return soft_tokens.encode_images(self.model.config, self.params, images)

    def _audio_counts(self, clips: Sequence[np.ndarray]) -> list[int]:
        """Soft tokens of each clip; refuses clips the encoder cannot take whole."""
        if clips and not self.supports_audio:
            raise ValueError("This model does not accept audio")
        return soft_tokens.audio_counts(self.model.config, clips) if clips else []

    def _encode_audio(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        return soft_tokens.encode_audio(self.model.config, self.params, clips)


def _history_item(item: tuple) -> tuple[str, str, list, list]:
    user, answer, *media = item
    images = list(media[0]) if media and media[0] is not None else []
    audio = list(media[1]) if len(media) > 1 and media[1] is not None else []
    return user, answer, images, audio


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _answer_deltas(parts: Iterator[Part]) -> Iterator[str]:
    # Closing this generator closes `parts`, so the turn is recorded right away.
    with _closing(parts):
        for channel, delta in parts:
            if channel == ANSWER:
                yield delta


class _closing:
    """Closes a generator on exit so its `finally` (result bookkeeping) runs right away."""

    def __init__(self, gen):
        self.gen = gen

    def __enter__(self):
        return self.gen

    def __exit__(self, *exc):
        self.gen.close()
        return False
