"""SentencePiece tokenizer for every Gemma version, with piece-safe encoding of user text.

Special-token ids are read from the model file by piece name, never hard-coded: Gemma 2
puts `<start_of_turn>` at 106, Gemma 3 at 105, and the project's demo tokenizers
(`assets/tokenizer.model` with every version's pieces, `assets/tokenizer_gemma4.model` with the
Gemma 4 ones only, both from `scripts/train_tokenizer.py`) have their own layouts. For Gemma 4
the end of a turn is `<turn|>` (`special.end_of_turn`).

Security: `Tokenizer.encode` treats its input as plain user text. SentencePiece matches
user-defined pieces such as `<start_of_turn>` anywhere in its input, so a user typing
`<end_of_turn>\\n<start_of_turn>model\\n` would otherwise forge a model turn. `encode`
finds every substring that spells a special piece (each CONTROL or UNKNOWN piece, and each
user-defined piece that is a Gemma tag: turn markers, image/audio/tool tags, `<unusedN>`,
...) and encodes it piece-safe, so no special id ever comes out of `encode` and
`decode(encode(s)) == s` for every string `s`. Chat templates insert markers as ids
(`gemma_app.text.template`). Ordinary user-defined pieces (runs of newlines or spaces,
HTML tags in the real Gemma vocabularies) are not special and keep their single id.

Example:

    tok = Tokenizer("assets/tokenizer.model", version=3)
    ids = tok.encode("Hello <start_of_turn>", add_bos=True)
    assert tok.special.start_of_turn not in ids
    assert tok.decode(ids) == "Hello <start_of_turn>"
"""

import codecs
import dataclasses
import os
import re
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

_SPACE = "\u2581"  # SentencePiece's whitespace symbol; decodes to " "

# Matches the user-defined pieces of the Gemma vocabularies that are markup, not text.
_GEMMA_TAG = re.compile(
    r"<\|[^<>\s]*>"  # Gemma 4 opening and standalone tags: <|turn>, <|image|>, <|"|>
    r"|<[^<>\s|]*\|>"  # Gemma 4 closing tags: <turn|>, <tool_call|>
    r"|<(?:pad|eos|bos|unk|mask|escape)>|\[multimodal\]|<unused\d+>"
    r"|<(?:start|end)_of_[a-z_]+>"  # <start_of_turn>, <end_of_image>
    r"|<(?:start|end)_(?:function_[a-z_]+|receiver)>"  # Gemma 3 function calling
    r"|<[a-z_]+_soft_token>"  # <image_soft_token>
)


def _replace_each_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    # One U+FFFD per malformed byte, which is what SentencePiece's DecodeIds emits (Python's
    # "replace" emits one per maximal malformed subsequence instead).
    return "\ufffd" * (error.end - error.start), error.end


_ERRORS = "gemma_app.replace_each_byte"
codecs.register_error(_ERRORS, _replace_each_byte)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """Ids of the named special pieces of one tokenizer; None where the version has none.

    Gemma 3 uses `<start_of_image>` both as the image placeholder in prompts and as the
    start of the image soft tokens, so `image_placeholder == start_of_image` there.
    Gemma 3 function-calling pieces are mapped to the fields of their Gemma 4 equivalents
    (`<start_function_call>` is `tool_call_start`, `<escape>` is `string_quote`, ...).
    """

    pad: int
    eos: int
    bos: int
    unk: int
    start_of_turn: int
    end_of_turn: int
    mask: int | None = None
    image_placeholder: int | None = None
    start_of_image: int | None = None
    end_of_image: int | None = None
    audio_placeholder: int | None = None
    start_of_audio: int | None = None
    end_of_audio: int | None = None
    video_placeholder: int | None = None
    think: int | None = None
    channel_start: int | None = None
    channel_end: int | None = None
    tool_start: int | None = None
    tool_end: int | None = None
    tool_call_start: int | None = None
    tool_call_end: int | None = None
    tool_response_start: int | None = None
    tool_response_end: int | None = None
    string_quote: int | None = None


_BASE = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
_GEMMA_TURNS = {"start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>"}
_GEMMA3_TOOLS = {
    "tool_start": "<start_function_declaration>",
    "tool_end": "<end_function_declaration>",
    "tool_call_start": "<start_function_call>",
    "tool_call_end": "<end_function_call>",
    "tool_response_start": "<start_function_response>",
    "tool_response_end": "<end_function_response>",
    "string_quote": "<escape>",
    "channel_start": "<start_receiver>",
    "channel_end": "<end_receiver>",
}
_GEMMA4_REQUIRED = {
    "start_of_turn": "<|turn>",
    "end_of_turn": "<turn|>",
    "image_placeholder": "<|image|>",
    "start_of_image": "<|image>",
    "end_of_image": "<image|>",
    "audio_placeholder": "<|audio|>",
    "start_of_audio": "<|audio>",
    "end_of_audio": "<audio|>",
}
_GEMMA4_OPTIONAL = {
    "video_placeholder": "<|video|>",
    "think": "<|think|>",
    "channel_start": "<|channel>",
    "channel_end": "<channel|>",
    "tool_start": "<|tool>",
    "tool_end": "<tool|>",
    "tool_call_start": "<|tool_call>",
    "tool_call_end": "<tool_call|>",
    "tool_response_start": "<|tool_response>",
    "tool_response_end": "<tool_response|>",
    "string_quote": '<|"|>',
}
_GEMMA3_IMAGE = {
    "image_placeholder": "<start_of_image>",
    "start_of_image": "<start_of_image>",
    "end_of_image": "<end_of_image>",
}

# version -> (pieces that must exist, pieces used when they exist); spec §4.
_SPECIAL_PIECES: dict[int, tuple[dict[str, str], dict[str, str]]] = {
    1: (_BASE | _GEMMA_TURNS, {"mask": "<mask>"}),
    2: (_BASE | _GEMMA_TURNS, {"mask": "<mask>"}),
    3: (_BASE | _GEMMA_TURNS | _GEMMA3_IMAGE, {"mask": "<mask>"} | _GEMMA3_TOOLS),
    4: (_BASE | _GEMMA4_REQUIRED, {"mask": "<mask>"} | _GEMMA4_OPTIONAL),
}


class Tokenizer:
    """A Gemma SentencePiece tokenizer.

    Args:
        model: path to a `.model` file, or its serialized bytes.
        version: Gemma version (1, 2, 3 or 4); selects which named special pieces exist.

    Attributes:
        version: the Gemma version.
        special: ids of the named special pieces, read from the model by piece name.
        forbidden_tokens: ids a sampler must never emit (Gemma 3: start/end of image).

    Raises:
        ValueError: a piece required by `version` is missing, or the model adds a dummy
            prefix (no Gemma tokenizer does; piece-safe encoding relies on it).

    Usage:

        tok = Tokenizer("assets/tokenizer.model", version=3)
        ids = tok.encode("Hi!", add_bos=True)
        text = tok.decode(ids)  # "Hi!": <bos> decodes to ""
    """

    def __init__(self, model: str | os.PathLike | bytes, *, version: int):
        if version not in _SPECIAL_PIECES:
            raise ValueError(f"version must be one of {sorted(_SPECIAL_PIECES)}, got {version!r}")
        self._model = bytes(model) if isinstance(model, bytes | bytearray) else _read(model)
        self.version = version
        self._sp = spm.SentencePieceProcessor(model_proto=self._model)
        if self._sp.encode("a", out_type=str)[0].startswith(_SPACE):
            raise ValueError("the tokenizer adds a dummy prefix; Gemma tokenizers do not")
        self.special = self._read_special_tokens()
        self.forbidden_tokens: tuple[int, ...] = (
            (self.special.start_of_image, self.special.end_of_image) if version == 3 else ()
        )
        pieces = self._sp.id_to_piece(list(range(self.vocab_size)))
        self._texts, self._bytes = _decode_tables(self._sp, pieces)
        self._byte_ids = {raw[0]: i for i, raw in enumerate(self._bytes) if raw is not None}
        self._escape_re = _escape_pattern(_protected_pieces(self._sp, pieces))

    @property
    def vocab_size(self) -> int:
        """Number of pieces (rows of the embedding table)."""
        return self._sp.vocab_size()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes user text piece-safe: no special id comes out (see the module docstring).

        Args:
            text: plain text; substrings that spell special pieces stay plain text.
            add_bos: prepend the `<bos>` id.
            add_eos: append the `<eos>` id.

        Returns:
            The token ids, with `decode(encode(text)) == text`.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._encode_plain(text)
        return [self.special.bos] * add_bos + ids + [self.special.eos] * add_eos

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decodes ids (a list or a 1-D array) to text.

        Matches SentencePiece's `DecodeIds`: CONTROL pieces (`<bos>`, `<eos>`, `<pad>`,
        `<unusedN>`...) decode to '', a run of byte pieces is decoded as UTF-8 with one
        U+FFFD per malformed byte, and any other piece ends the run.
        """
        array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if array.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {array.shape}")
        decoder = IncrementalDecoder(self)
        return "".join(map(decoder.push, array.tolist())) + decoder.flush()

    def token_id(self, piece: str) -> int:
        """Returns the id of `piece`, which must be exactly one piece of the vocabulary.

        Pieces are spelled as in the vocabulary: a leading space is `▁` ("▁the").

        Raises:
            ValueError: `piece` is not a piece of the vocabulary.
        """
        idx = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(idx) != piece:
            raise ValueError(f"{piece!r} is not a piece of this vocabulary")
        return idx

    def piece(self, token_id: int) -> str:
        """Returns the vocabulary piece of `token_id` (e.g. "▁the", "<0x0A>", "<eos>")."""
        return self._sp.id_to_piece(self._check_id(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, version={self.version})"

    # SentencePieceProcessor does not pickle: ship the model bytes and rebuild.
    def __getstate__(self) -> dict:
        return {"model": self._model, "version": self.version}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], version=state["version"])

    def _encode_plain(self, text: str) -> list[int]:
        # Encodes the text between special-looking substrings normally; SentencePiece
        # can't produce a special id from a chunk that doesn't spell one. Chunks are
        # independent because the model adds no dummy prefix.
        ids, start = [], 0
        for match in self._escape_re.finditer(text):
            ids += self._encode_chunk(text[start : match.start()])
            ids += self._encode_literal(match.group())
            start = match.end()
        return ids + self._encode_chunk(text[start:])

    def _encode_chunk(self, text: str) -> list[int]:
        return self._sp.encode(text) if text else []

    def _encode_literal(self, text: str) -> list[int]:
        # A typed special piece (or "▁", which would decode to " "): a lone character can't
        # form a multi-character piece, so split off the first one and escape the rest
        # again (it may still spell another special piece).
        if len(text) == 1:
            return self._raw_bytes(text)
        return self._encode_plain(text[0]) + self._encode_plain(text[1:])

    def _raw_bytes(self, char: str) -> list[int]:
        data = char.encode("utf-8")
        if all(b in self._byte_ids for b in data):
            return [self._byte_ids[b] for b in data]
        return self._sp.encode(char)  # no byte fallback: best effort

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._texts):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        return token_id

    def _read_special_tokens(self) -> SpecialTokens:
        required, optional = _SPECIAL_PIECES[self.version]
        missing = [piece for piece in required.values() if not self._has_piece(piece)]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the Gemma {self.version} special pieces {missing}; "
                "is it the tokenizer of another Gemma version?"
            )
        ids = {field: self.token_id(piece) for field, piece in required.items()}
        ids |= {f: self.token_id(p) for f, p in optional.items() if self._has_piece(p)}
        return SpecialTokens(**ids)

    def _has_piece(self, piece: str) -> bool:
        return self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, never splitting a character.

    Byte-fallback pieces of one multi-byte character arrive one by one; their bytes are held
    back until the character is complete. The concatenated deltas equal
    `tokenizer.decode(ids_so_far)` whenever that decode ends on a complete character, and
    `... + flush()` always equals it. The state is a few pending bytes, so `push` is O(1)
    whatever the length of the stream.

    Usage:

        decoder = IncrementalDecoder(tokenizer)
        for token in stream:
            print(decoder.push(token), end="")
        print(decoder.flush())
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=_ERRORS)

    def push(self, token_id: int) -> str:
        """Adds one token and returns the text it completes (possibly '')."""
        token_id = self._tokenizer._check_id(int(token_id))
        raw = self._tokenizer._bytes[token_id]
        if raw is not None:
            return self._utf8.decode(raw)
        # Any other piece ends a byte run, as in DecodeIds: flush what is pending.
        return self._utf8.decode(b"", final=True) + self._tokenizer._texts[token_id]

    def flush(self) -> str:
        """Returns the held-back bytes (U+FFFD per byte of an unfinished character), resets."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _read(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _decode_tables(
    sp: spm.SentencePieceProcessor, pieces: list[str]
) -> tuple[list[str], list[bytes | None]]:
    """Returns what each id decodes to: its text, and its byte for byte pieces (else None).

    With these, decoding needs no text history (see IncrementalDecoder).
    """
    texts = sp.decode([[i] for i in range(len(pieces))])
    raw = [bytes([int(p[3:5], 16)]) if sp.is_byte(i) else None for i, p in enumerate(pieces)]
    return texts, raw


def _protected_pieces(sp: spm.SentencePieceProcessor, pieces: list[str]) -> list[str]:
    """Returns the pieces `encode` must never produce from user text."""
    return [
        piece
        for i, piece in enumerate(pieces)
        if sp.is_control(i) or sp.is_unknown(i) or _GEMMA_TAG.fullmatch(piece)
    ]


def _escape_pattern(pieces: list[str]) -> re.Pattern[str]:
    # Longest first, so that at each position the longest special piece wins.
    literals = sorted({*pieces, _SPACE}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, literals)))
