"""Gemma chat formatting, straight to token ids.

Turn markers are inserted as ids, never by encoding marker text, and every text (role,
content, system prompt, model answers given as text) goes through `Tokenizer.encode`, which
escapes special-looking substrings: a user cannot open or close a turn by typing one.

Families 1, 2 and 3 (spec §5):

    <start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n

A system prompt is folded into the first user turn as `{system}\\n\\n{user}`, as Hugging
Face's Gemma chat template does: these models were not trained with a system role.

Family 4 (spec §5 and Hugging Face's Gemma 4 `chat_template.jinja`) uses `<|turn>`/`<turn|>`
and has a native `system` turn before the first user turn:

    <|turn>system\\n<|think|>\\n{system}<turn|>\\n<|turn>user\\n{content}<turn|>\\n<|turn>model\\n

* Thinking on puts `<|think|>` at the very top of the system turn, which then exists even
  without a system prompt. We follow the current upstream template, which writes
  `<|think|>\\n` (an early revision wrote no newline after it).
* Thinking off: no `<|think|>`. The upstream templates of the larger sizes (26B, 31B) also
  open the answer with an empty thought block `<|channel>thought\\n<channel|>` (E2B/E4B do
  not); `ChatTemplate(..., empty_thought=True)` does the same via `generation_prefix`.
* Thoughts of earlier model turns are not fed back (upstream `strip_thinking`); see
  `gemma_app.text.thoughts.strip_thought_ids`.

Media go before the text of their user turn, images first, as Hugging Face's template
renders them (`\\n\\n<|image|>\\n\\n` per image, `<|audio|>` per clip) and Gemma4Processor
expands them (`<|image>` + n soft tokens + `<image|>`, `<|audio>` + m + `<audio|>`), with each
image's and clip's own count:

    image k (n_k soft tokens): "\\n\\n" <|image> SOFT_TOKEN * n_k <image|> "\\n\\n"
    audio clip k (m_k tokens): <|audio> AUDIO_SOFT_TOKEN * m_k <audio|>

Family 4 encodes the text between two markers in one piece, as Hugging Face tokenizes the
rendered prompt: `user\\n` + `\\n\\n` is one `encode("user\\n\\n\\n")`, and the "\\n\\n" after
the last image is encoded together with the message. (The gemma library's Gemma4Sampler
splices the id of "\\n\\n" instead; the two differ where the vocabulary has a piece for a
longer run of newlines.) Gemma 3 images keep the library's id-level layout, with
`<start_of_image>`/`<end_of_image>` and one count for all images.

BOS is not part of any turn: a caller adds it once, before the first turn (`conversation`
does, with `add_bos=True`).

Usage:

    template = ChatTemplate(tokenizer)
    prompt = [tokenizer.special.bos] + template.user_turn("Hi!", system="Be brief.")
    ... sample `answer` ids until <end_of_turn> (not included) ...
    prompt2 = template.end_of_model_turn() + template.user_turn("Why?")
"""

from collections.abc import Sequence

import numpy as np

from gemma_app.text.thoughts import split_thoughts, strip_thought_ids
from gemma_app.text.tokenizer import Tokenizer

Answer = Sequence[int] | np.ndarray | str

# Placeholder ids of soft tokens (spec §4): never tokenizer ids; the model embeds the image or
# the audio clip there.
SOFT_TOKEN = -2
AUDIO_SOFT_TOKEN = -4


class ChatTemplate:
    """Formats chat turns as token ids for the tokenizer's Gemma version.

    Args:
        tokenizer: the tokenizer; its `version` selects the family (4, or 1/2/3).
        empty_thought: family 4 only: open every answer with an empty thought block when
            thinking is off, as the upstream templates of Gemma 4 26B/31B do.
    """

    def __init__(self, tokenizer: Tokenizer, *, empty_thought: bool = False):
        self.tokenizer = tokenizer
        self.native_system = tokenizer.version == 4
        if empty_thought and not self.native_system:
            raise ValueError("empty_thought is a Gemma 4 option")
        self.empty_thought = empty_thought
        self._start = tokenizer.special.start_of_turn
        self._end = tokenizer.special.end_of_turn
        self._newline = tokenizer.encode("\n")

    @property
    def supports_thinking(self) -> bool:
        """Whether the family has a thinking mode (Gemma 4 with a `<|think|>` piece)."""
        return self.native_system and self.tokenizer.special.think is not None

    def user_turn(
        self,
        text: str,
        *,
        system: str | None = None,
        images: int | Sequence[int] = 0,
        tokens_per_image: int = 0,
        audio: Sequence[int] = (),
        thinking: bool = False,
    ) -> list[int]:
        """Returns everything fed to the model for one user message.

        That is the closed user turn, "\\n", and the open model turn
        (`<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`), preceded by
        the system turn in family 4 (first turn only: pass `system`/`thinking` only there).

        Args:
            text: the user's message (plain text; special-looking substrings stay text).
            system: optional system prompt, meant for the first turn only; empty means none.
            images: the number of images (each `tokens_per_image` soft tokens), or the soft
                token count of each image (Gemma 4: each image has its own). They go before
                the text, in the layout of the module docstring.
            tokens_per_image: soft tokens per image, when `images` is a number.
            audio: the soft token count of each audio clip (Gemma 4), placed after the images.
            thinking: family 4: put `<|think|>` at the top of the system turn (first turn only).

        Raises:
            ValueError: thinking, audio or images the tokenizer has no tokens for.
        """
        counts = [tokens_per_image] * images if isinstance(images, int) else list(images)
        clips = self._audio(list(audio))
        turns = self._system_turn(system, thinking)
        if system and not self.native_system:
            text = f"{system}\n\n{text}"
        if not counts and not audio:
            body = self._closed_turn("user", text)
        elif self.native_system:
            body = self._encode_runs([self._start, "user\n", *self._images(counts), *clips, text])
            body += [self._end] + self._newline
        else:
            body = self._open_turn("user") + self._encode_runs(self._images(counts))
            body += self.tokenizer.encode(text) + [self._end] + self._newline
        return turns + body + self._open_turn("model")

    def generation_prefix(self, *, thinking: bool = False) -> list[int]:
        """Ids fed after `user_turn` to start the answer: the empty thought block or nothing.

        Only with `empty_thought` and thinking off (see the module docstring). Like a thought,
        it is not part of the answer when the conversation goes on.
        """
        if not self.empty_thought or thinking:
            return []
        special = self.tokenizer.special
        return [special.channel_start, *self.tokenizer.encode("thought\n"), special.channel_end]

    def end_of_model_turn(self) -> list[int]:
        """Returns what closes a model answer: the end-of-turn id, then "\\n".

        Fed before the next `user_turn` once an answer has ended (the sampler stops on the
        end-of-turn id without feeding it).
        """
        return [self._end] + self._newline

    def conversation(
        self,
        turns: Sequence[tuple[str, Answer | None]],
        *,
        system: str | None = None,
        add_bos: bool = True,
        thinking: bool = False,
    ) -> list[int]:
        """Formats a whole text conversation.

        Equal, token for token, to `[bos] + user_turn(u1, system=system, thinking=thinking) +
        a1 + end_of_model_turn() + user_turn(u2) + ...`, where family 4 answers are stripped
        of their thoughts (`split_thoughts` for text, `strip_thought_ids` for ids).

        Args:
            turns: (user text, model answer) pairs. An answer is token ids (without the
                end-of-turn id) or text; only the last answer may be None, and then the
                result ends with the open model turn (and `generation_prefix`), ready for
                sampling. Otherwise it ends with the closed last model turn (the training
                format).
            system: optional system prompt, applied to the first turn.
            add_bos: start with the `<bos>` id.
            thinking: family 4 thinking switch (the first turn's system turn).

        Raises:
            ValueError: an answer other than the last is None, or answer ids end with the
                end-of-turn id (it would be doubled).
        """
        ids = [self.tokenizer.special.bos] if add_bos else []
        for i, (user, answer) in enumerate(turns):
            first = i == 0
            ids += self.user_turn(
                user, system=system if first else None, thinking=thinking and first
            )
            if answer is None and i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last answer may be None")
            if answer is None:
                ids += self.generation_prefix(thinking=thinking)
            else:
                ids += self.context_answer(self._answer_ids(answer)) + self.end_of_model_turn()
        return ids

    def context_answer(self, answer: Sequence[int]) -> list[int]:
        """The ids of a finished answer as later turns see them (family 4: without thoughts)."""
        return strip_thought_ids(answer, self.tokenizer)

    def strip_end_marker(self, text: str) -> str:
        """Removes a trailing end-of-turn marker (`<end_of_turn>`/`<turn|>`) from decoded text."""
        return text.removesuffix(self.tokenizer.piece(self._end))

    def _system_turn(self, system: str | None, thinking: bool) -> list[int]:
        if thinking and not self.supports_thinking:
            raise ValueError(f"Gemma {self.tokenizer.version} has no thinking mode")
        if not self.native_system or not (system or thinking):
            return []
        if not thinking:
            return self._closed_turn("system", system)
        head = [self._start] + self.tokenizer.encode("system\n") + [self.tokenizer.special.think]
        return head + self.tokenizer.encode(f"\n{system or ''}") + [self._end] + self._newline

    def _images(self, counts: list[int]) -> list[int | str]:
        """Image blocks as ids and newline texts (see `_encode_runs`)."""
        if not counts:
            return []
        special = self.tokenizer.special
        if special.start_of_image is None or special.end_of_image is None:
            raise ValueError("This tokenizer has no image tokens")
        items = []
        for n in counts:
            # Gemma 3 (the library's layout): each "\n\n" is its own encode call.
            blank = "\n\n" if self.native_system else self.tokenizer.encode("\n\n")
            items += [blank, special.start_of_image, *[SOFT_TOKEN] * n, special.end_of_image]
            items += [blank]
        return [x for item in items for x in (item if isinstance(item, list) else [item])]

    def _audio(self, counts: list[int]) -> list[int]:
        if not counts:
            return []
        special = self.tokenizer.special
        if special.start_of_audio is None or special.end_of_audio is None:
            raise ValueError("This tokenizer has no audio tokens")
        ids = []
        for n in counts:
            ids += [special.start_of_audio] + [AUDIO_SOFT_TOKEN] * n + [special.end_of_audio]
        return ids

    def _encode_runs(self, items: list[int | str]) -> list[int]:
        """Ids stay; each run of adjacent texts is encoded in one call."""
        ids, run = [], ""
        for item in items:
            if isinstance(item, str):
                run += item
                continue
            ids += self.tokenizer.encode(run) + [item]
            run = ""
        return ids + self.tokenizer.encode(run)

    def _closed_turn(self, role: str, text: str) -> list[int]:
        # One encode call for "role\ncontent", as the reference encodes the whole text.
        return (
            [self._start] + self.tokenizer.encode(f"{role}\n{text}") + [self._end] + self._newline
        )

    def _open_turn(self, role: str) -> list[int]:
        return [self._start] + self.tokenizer.encode(f"{role}\n")

    def _answer_ids(self, answer: Answer) -> list[int]:
        if isinstance(answer, str):
            # Marker text would be escaped by encode: drop thoughts first (family 4).
            return self.tokenizer.encode(
                split_thoughts(answer)[1] if self.native_system else answer
            )
        ids = np.asarray(answer, dtype=np.int64).reshape(-1).tolist()
        if ids and ids[-1] == self._end:
            raise ValueError("answer ids must not end with the end-of-turn id")
        return ids
