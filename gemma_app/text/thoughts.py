"""Gemma 4 thinking output: separates `<|channel>thought\\n…<channel|>` from the answer.

With thinking on (`<|think|>` in the system turn, spec §5), a Gemma 4 model writes its
reasoning first, in a channel, then the answer:

    <|channel>thought\\nThe user asks for ... so 2 + 2 = 4.<channel|>The answer is 4.

`<|channel>` and `<channel|>` are single tokens. The line after `<|channel>` names the channel
("thought"; no other name is used by Gemma 4); it is dropped, not shown. Everything inside a
channel is "thought", everything outside is "answer": the answer never contains thought text
nor channel markers. Some Gemma 4 sizes emit an empty block (`<|channel>thought\\n<channel|>`)
when thinking is off; it yields nothing.

Two streaming front ends share one state machine:

* `ThoughtSplitter` takes generated token ids (markers are recognised by id only, so text that
  merely spells `<|channel>` stays text); multi-byte characters are held back until complete.
* `TextThoughtSplitter` takes text deltas (e.g. from another engine) and recognises the marker
  strings even when a delta ends in the middle of one.

Both return `(channel, delta)` pairs, channel in {"thought", "answer"}, with empty deltas
omitted; the concatenated deltas of a channel equal the non-streaming `split_thoughts` result.

Usage:

    splitter = ThoughtSplitter(tokenizer)
    for token in tokens:
        for channel, delta in splitter.push(token):
            ...
    parts = splitter.flush()
"""

from collections.abc import Iterable, Sequence

from gemma_app.text.tokenizer import IncrementalDecoder, Tokenizer

THOUGHT = "thought"
ANSWER = "answer"
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"

Part = tuple[str, str]  # (channel, text delta)


class _ChannelMachine:
    """The shared state machine: text and marker events in, (channel, delta) pairs out.

    States: "answer"; "header" (after `<|channel>`, reading the channel name up to its
    newline); "thought".
    """

    def __init__(self):
        self.state = ANSWER
        self.parts: dict[str, list[str]] = {THOUGHT: [], ANSWER: []}

    def text(self, text: str) -> list[Part]:
        if not text:
            return []
        if self.state == "header":
            # The name line ends at the first newline; what follows is thought text.
            _name, newline, rest = text.partition("\n")
            if not newline:
                return []
            self.state, text = THOUGHT, rest
            if not text:
                return []
        self.parts[self.state].append(text)
        return [(self.state, text)]

    def marker(self, opens: bool) -> None:
        # A block closed before its name line ended (`<|channel>thought<channel|>`) is empty.
        self.state = "header" if opens else ANSWER

    @property
    def thought(self) -> str:
        return "".join(self.parts[THOUGHT])

    @property
    def answer(self) -> str:
        return "".join(self.parts[ANSWER])


class _Splitter:
    """What both splitters expose: the thought and answer text received so far."""

    _machine: _ChannelMachine

    @property
    def thought(self) -> str:
        return self._machine.thought

    @property
    def answer(self) -> str:
        return self._machine.answer


class ThoughtSplitter(_Splitter):
    """Streams generated token ids into thought and answer text.

    Args:
        tokenizer: the model's tokenizer. For Gemma versions without thinking (1-3), or a
            vocabulary without `<|channel>`/`<channel|>`, everything is answer.

    Attributes:
        thought: the thought text so far (all channel blocks, names dropped).
        answer: the answer text so far.
    """

    def __init__(self, tokenizer: Tokenizer):
        special = tokenizer.special
        has_channels = special.channel_start is not None and special.channel_end is not None
        self._start = special.channel_start if tokenizer.version == 4 and has_channels else None
        self._end = special.channel_end if self._start is not None else None
        self._decoder = IncrementalDecoder(tokenizer)
        self._machine = _ChannelMachine()

    def push(self, token: int) -> list[Part]:
        """Adds one generated token; returns the text it completes, by channel."""
        token = int(token)
        if token in (self._start, self._end):
            parts = self._machine.text(self._decoder.flush())
            self._machine.marker(opens=token == self._start)
            return parts
        return self._machine.text(self._decoder.push(token))

    def push_all(self, tokens: Iterable[int]) -> list[Part]:
        """Adds several tokens; returns their parts in order."""
        return [part for token in tokens for part in self.push(token)]

    def flush(self) -> list[Part]:
        """Returns held-back bytes (an unfinished character) at the end of the stream."""
        return self._machine.text(self._decoder.flush())

    @property
    def in_thought(self) -> bool:
        """True between `<|channel>` and `<channel|>`."""
        return self._machine.state != ANSWER


class TextThoughtSplitter(_Splitter):
    """Streams text deltas into thought and answer text; markers may span deltas.

    A delta that ends with a proper prefix of a marker (e.g. "<|chan") is held back until the
    next delta says whether the marker is complete; `flush` releases it as text.
    """

    def __init__(self):
        self._machine = _ChannelMachine()
        self._pending = ""

    def push(self, delta: str) -> list[Part]:
        """Adds one text delta; returns the text it completes, by channel."""
        text, parts = self._pending + delta, []
        while True:
            marker, at = _first_marker(text)
            if marker is None:
                break
            parts += self._machine.text(text[:at])
            self._machine.marker(opens=marker == CHANNEL_START)
            text = text[at + len(marker) :]
        keep = _partial_marker_length(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return parts + self._machine.text(text[: len(text) - keep])

    def flush(self) -> list[Part]:
        """Releases a held-back partial marker as plain text."""
        text, self._pending = self._pending, ""
        return self._machine.text(text)


def split_thoughts(text: str) -> tuple[str, str]:
    """Returns `(thought, answer)` of a complete decoded output (markers as text)."""
    splitter = TextThoughtSplitter()
    splitter.push(text)
    splitter.flush()
    return splitter.thought, splitter.answer


def strip_thought_ids(ids: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Removes every channel block (markers included) from token ids; an unclosed one to the end.

    This is what Hugging Face's Gemma 4 chat template does to earlier model turns
    (`strip_thinking`): thoughts are not fed back in later turns. Unlike that template, the
    answer ids are not re-encoded from trimmed text, so they stay exactly as sampled.
    A no-op for Gemma versions without thinking.
    """
    special = tokenizer.special
    start, end = special.channel_start, special.channel_end
    if tokenizer.version != 4 or start is None or end is None:
        return list(ids)
    kept, inside = [], False
    for token in ids:
        token = int(token)
        if token == start:
            inside = True
        elif token == end:
            inside = False
        elif not inside:
            kept.append(token)
    return kept


def _first_marker(text: str) -> tuple[str | None, int]:
    hits = [(text.find(m), m) for m in (CHANNEL_START, CHANNEL_END) if m in text]
    if not hits:
        return None, -1
    at, marker = min(hits)
    return marker, at


def _partial_marker_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    for n in range(min(len(text), max(map(len, (CHANNEL_START, CHANNEL_END))) - 1), 0, -1):
        suffix = text[-n:]
        if CHANNEL_START.startswith(suffix) or CHANNEL_END.startswith(suffix):
            return n
    return 0
