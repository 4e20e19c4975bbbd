"""Gemma chat formatting, straight to token ids.

Turn markers are inserted as ids, never by encoding marker text, and every text (role,
content, system prompt, model answers given as text) goes through `Tokenizer.encode`, which
escapes special-looking substrings: a user cannot open or close a turn by typing one.

Families 1, 2 and 3 (spec §5):

    <start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n

A system prompt is folded into the first user turn as `{system}\\n\\n{user}`, as Hugging
Face's Gemma chat template does: these models were not trained with a system role.
Family 4 uses `<|turn>`/`<turn|>` and has a native `system` turn before the first user turn.

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

from gemma_app.text.tokenizer import Tokenizer

Answer = Sequence[int] | np.ndarray | str

# Placeholder id of an image soft token: never a tokenizer id; the model embeds the image there.
SOFT_TOKEN = -2


class ChatTemplate:
    """Formats chat turns as token ids for the tokenizer's Gemma version.

    Args:
        tokenizer: the tokenizer; its `version` selects the family (4, or 1/2/3).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.native_system = tokenizer.version == 4
        self._start = tokenizer.special.start_of_turn
        self._end = tokenizer.special.end_of_turn
        self._newline = tokenizer.encode("\n")

    def user_turn(
        self, text: str, *, system: str | None = None, images: int = 0, tokens_per_image: int = 0
    ) -> list[int]:
        """Returns everything fed to the model for one user message.

        That is the closed user turn, "\\n", and the open model turn
        (`<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`), preceded by
        the system turn in family 4.

        Args:
            text: the user's message (plain text; special-looking substrings stay text).
            system: optional system prompt, meant for the first turn only; empty means none.
            images: number of images, placed before the text (Gemma 3 layout: each is
                `\n\n<start_of_image>` + `tokens_per_image` SOFT_TOKEN slots +
                `<end_of_image>\n\n`, as Hugging Face's Gemma3Processor expands it).
            tokens_per_image: soft tokens per image.
        """
        turns = []
        if system and self.native_system:
            turns += self._closed_turn("system", system)
        elif system:
            text = f"{system}\n\n{text}"
        if not images:
            return turns + self._closed_turn("user", text) + self._open_turn("model")
        special = self.tokenizer.special
        if special.start_of_image is None or special.end_of_image is None:
            raise ValueError("This tokenizer has no image tokens")
        blank = self.tokenizer.encode("\n\n")
        image = blank + [special.start_of_image] + [SOFT_TOKEN] * tokens_per_image
        image += [special.end_of_image] + blank
        body = self._open_turn("user") + image * images + self.tokenizer.encode(text)
        return turns + body + [self._end] + self._newline + self._open_turn("model")

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
    ) -> list[int]:
        """Formats a whole conversation.

        Equal, token for token, to `[bos] + user_turn(u1, system=system) + a1 +
        end_of_model_turn() + user_turn(u2) + ...`.

        Args:
            turns: (user text, model answer) pairs. An answer is token ids (without the
                end-of-turn id) or text; only the last answer may be None, and then the
                result ends with the open model turn, ready for sampling. Otherwise it ends
                with the closed last model turn (the training format).
            system: optional system prompt, applied to the first turn.
            add_bos: start with the `<bos>` id.

        Raises:
            ValueError: an answer other than the last is None, or answer ids end with the
                end-of-turn id (it would be doubled).
        """
        ids = [self.tokenizer.special.bos] if add_bos else []
        for i, (user, answer) in enumerate(turns):
            ids += self.user_turn(user, system=system if i == 0 else None)
            if answer is None and i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last answer may be None")
            if answer is not None:
                ids += self._answer_ids(answer) + self.end_of_model_turn()
        return ids

    def strip_end_marker(self, text: str) -> str:
        """Removes a trailing end-of-turn marker (`<end_of_turn>`/`<turn|>`) from decoded text."""
        return text.removesuffix(self.tokenizer.piece(self._end))

    def _closed_turn(self, role: str, text: str) -> list[int]:
        # One encode call for "role\ncontent", as the reference encodes the whole text.
        return (
            [self._start] + self.tokenizer.encode(f"{role}\n{text}") + [self._end] + self._newline
        )

    def _open_turn(self, role: str) -> list[int]:
        return [self._start] + self.tokenizer.encode(f"{role}\n")

    def _answer_ids(self, answer: Answer) -> list[int]:
        if isinstance(answer, str):
            return self.tokenizer.encode(answer)
        ids = np.asarray(answer, dtype=np.int64).reshape(-1).tolist()
        if ids and ids[-1] == self._end:
            raise ValueError("answer ids must not end with the end-of-turn id")
        return ids
