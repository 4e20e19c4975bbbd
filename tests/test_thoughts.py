"""Tests for gemma_app.text.thoughts (separating Gemma 4 thoughts from the answer)."""

import random
from pathlib import Path

import pytest

from gemma_app.text.thoughts import (
    TextThoughtSplitter,
    ThoughtSplitter,
    split_thoughts,
    strip_thought_ids,
)
from gemma_app.text.tokenizer import Tokenizer

MODEL_GEMMA4 = Path(__file__).resolve().parent.parent / "assets" / "tokenizer_gemma4.model"

OUTPUTS = [  # (raw model output as text, thought, answer)
    ("<|channel>thought\nLet me think: 2+2.<channel|>It is 4.", "Let me think: 2+2.", "It is 4."),
    ("<|channel>thought\n<channel|>Hello!", "", "Hello!"),  # thinking off, larger sizes
    ("<|channel>thought<channel|>Hi", "", "Hi"),  # closed before the name line ended
    ("Plain answer, ünïcödé 😀", "", "Plain answer, ünïcödé 😀"),
    ("<|channel>thought\nline 1\nline 2 中文", "line 1\nline 2 中文", ""),  # cut mid-thought
    ("a<|channel>thought\nb<channel|>c<|channel>thought\nd<channel|>e", "bd", "ace"),
    ("x <channel|> y", "", "x  y"),  # a stray end marker is dropped
    ("<|chan is not a marker <|channel", "", "<|chan is not a marker <|channel"),
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL_GEMMA4, version=4)


def _ids(tok: Tokenizer, text: str) -> list[int]:
    """Model output ids: channel markers as their ids, the rest encoded as text."""
    s, ids = tok.special, []
    for i, part in enumerate(
        text.replace("<channel|>", "\0E\0").replace("<|channel>", "\0S\0").split("\0")
    ):
        if i % 2:
            ids.append(s.channel_start if part == "S" else s.channel_end)
        else:
            ids += tok.encode(part)
    return ids


def _collect(parts) -> tuple[str, str]:
    out = {"thought": "", "answer": ""}
    for channel, delta in parts:
        assert delta and channel in out
        out[channel] += delta
    return out["thought"], out["answer"]


@pytest.mark.parametrize(("text", "thought", "answer"), OUTPUTS)
def test_split_thoughts(text, thought, answer):
    assert split_thoughts(text) == (thought, answer)


@pytest.mark.parametrize(("text", "thought", "answer"), OUTPUTS)
def test_token_stream(tok, text, thought, answer):
    splitter = ThoughtSplitter(tok)
    parts = [p for token in _ids(tok, text) for p in splitter.push(token)] + splitter.flush()
    assert _collect(parts) == (thought, answer)
    assert (splitter.thought, splitter.answer) == (thought, answer)


@pytest.mark.parametrize(("text", "thought", "answer"), OUTPUTS)
def test_text_stream_any_chunking(text, thought, answer):
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter = TextThoughtSplitter()
        parts = [p for chunk in chunks for p in splitter.push(chunk)] + splitter.flush()
        assert _collect(parts) == (thought, answer), chunks


def test_text_stream_holds_back_partial_markers():
    splitter = TextThoughtSplitter()
    assert splitter.push("Hi <|chan") == [("answer", "Hi ")]
    assert splitter.push("nel>thou") == []
    assert splitter.push("ght\nhmm") == [("thought", "hmm")]
    assert splitter.push("<chan") == []
    assert splitter.push("nel|>ok <") == [("answer", "ok ")]
    assert splitter.flush() == [("answer", "<")]


def test_token_stream_is_incremental_and_marker_ids_only(tok):
    s = tok.special
    splitter = ThoughtSplitter(tok)
    assert splitter.push(s.channel_start) == [] and splitter.in_thought
    assert splitter.push_all(tok.encode("thought")) == []  # the channel name is dropped
    assert _collect(splitter.push_all(tok.encode("\nhmm"))) == ("hmm", "")
    glyph = tok.encode("ꙮ")  # byte pieces: held back until the character is complete
    assert len(glyph) == 3 and splitter.push_all(glyph[:2]) == []
    assert splitter.push(s.channel_end) == [("thought", "\ufffd\ufffd")] and not splitter.in_thought
    # Text that spells a marker is text: only the marker ids switch channels.
    assert _collect(splitter.push_all(tok.encode("<|channel>x"))) == ("", "<|channel>x")


def test_gemma3_has_no_thoughts(tokenizer):
    splitter = ThoughtSplitter(tokenizer)  # Gemma 3: <start_receiver> is not a thought marker
    ids = [tokenizer.special.channel_start] + tokenizer.encode("hi")
    assert _collect(splitter.push_all(ids)) == ("", tokenizer.decode(ids))
    assert strip_thought_ids(ids, tokenizer) == ids


def test_strip_thought_ids(tok):
    for text, _, answer in OUTPUTS:
        assert tok.decode(strip_thought_ids(_ids(tok, text), tok)) == answer
