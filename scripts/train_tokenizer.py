"""Trains the project's demo SentencePiece tokenizers: `assets/tokenizer.model` and, with
`--gemma4`, `assets/tokenizer_gemma4.model`.

The demo model (`gemma_app.nn.presets.tiny_demo`) has a 4096-row embedding, so the vocabulary
is exactly `DEMO_VOCAB` = 4096 pieces. The settings mirror the real Gemma tokenizers (BPE,
byte fallback, no dummy prefix, identity normalisation that keeps every whitespace, split
digits), and the vocabulary holds every Gemma control piece of all versions, laid out like
Gemma 3 where that is possible:

  0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 [multimodal]  6..104 <unused0..98>
  105 <start_of_turn>  106 <end_of_turn>  107 "\\n"  108 "\\n\\n"  then image, Gemma 4 and
  function-calling tags, the 256 byte pieces, and the learned pieces.

The Gemma 4 demo model (`--gemma4`, for the tiny Gemma 4 presets) has the same settings and
vocabulary size but only the Gemma 4 special pieces (spec §4), in the order of the list below:

  0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 <|turn>  6 <turn|>  7 <|image|> ... 23 <|"|>
  24 "\\n"  25 "\\n\\n"  then the 256 byte pieces and the learned pieces.

The real Gemma 4 vocabulary has 262144 pieces (`<|turn>` at 105, `<|image>` at 255999...);
a 4096-piece demo cannot reproduce those ids, which is fine since nothing depends on them.

Ids are never hard-coded elsewhere in the project: `gemma_app.text.tokenizer.Tokenizer`
reads them from the file by piece name.

Training is deterministic (one thread, no sampling or shuffling, sentences from an iterator
so no file paths end up in the model), so rerunning the script reproduces the same bytes
with the same sentencepiece version (0.2.x). Usage:

    python scripts/train_tokenizer.py                   # (re)writes assets/tokenizer.model
    python scripts/train_tokenizer.py --check           # exits 1 if the committed file differs
    python scripts/train_tokenizer.py --gemma4 [--check]  # the same for tokenizer_gemma4.model
"""

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 4096  # == gemma_app.nn.presets.DEMO_VOCAB; not imported to keep jax out of here
_ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().with_name("tokenizer_corpus.txt")
OUTPUT = _ROOT / "assets" / "tokenizer.model"
OUTPUT_GEMMA4 = _ROOT / "assets" / "tokenizer_gemma4.model"
_MAX_BYTES = 1 << 20  # the model is committed: keep it well under 1 MB

# CONTROL pieces decode to '' and can never come out of encoding text. Gemma 3 has
# <mask>, [multimodal] and 99 unused slots before the turn markers, so keeping all 99
# puts <start_of_turn> at 105 as in Gemma 3.
CONTROL_SYMBOLS = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)]

# USER_DEFINED pieces are matched as a whole in input text and decode to their own text,
# as in the real Gemma tokenizers: encoding a template string yields the single marker id
# (the project's Tokenizer escapes them in user text; templates insert them as ids).
_TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]  # ids 105, 106 (Gemma 3)
_NEWLINES = ["\n", "\n\n"]  # ids 107, 108 (Gemma 3 puts "\n\n" around images)
_GEMMA3_IMAGE = ["<start_of_image>", "<end_of_image>"]
_GEMMA4_TAGS = [
    "<|turn>", "<turn|>",
    "<|image|>", "<|audio|>", "<|video|>",
    "<|image>", "<image|>", "<|audio>", "<audio|>",
    "<|think|>", "<|channel>", "<channel|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
    '<|"|>',
]  # fmt: skip
_FUNCTION_CALLING = [
    "<start_function_declaration>", "<end_function_declaration>",
    "<start_function_call>", "<end_function_call>",
    "<start_function_response>", "<end_function_response>",
    "<escape>", "<start_receiver>", "<end_receiver>",
]  # fmt: skip
USER_DEFINED_SYMBOLS = _TURN_MARKERS + _NEWLINES + _GEMMA3_IMAGE + _GEMMA4_TAGS + _FUNCTION_CALLING

# Gemma 4 demo tokenizer: <mask> is its only CONTROL piece besides pad/eos/bos/unk, and the
# Gemma 4 tags are its only markup pieces (no Gemma 3 turn markers, no <unusedN> slots).
GEMMA4_CONTROL_SYMBOLS = ["<mask>"]
GEMMA4_USER_DEFINED_SYMBOLS = _GEMMA4_TAGS + _NEWLINES

_TRAINER_OPTIONS = dict(
    vocab_size=VOCAB_SIZE,
    model_type="bpe",
    pad_id=0, eos_id=1, bos_id=2, unk_id=3,
    pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    byte_fallback=True,
    add_dummy_prefix=False,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become pieces
    split_digits=True,
    character_coverage=0.9995,  # the rarest characters are left to byte fallback
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,  # determinism over speed: the corpus trains in about a second
    minloglevel=2,
)  # fmt: skip
TRAINER_OPTIONS = _TRAINER_OPTIONS | dict(
    control_symbols=CONTROL_SYMBOLS, user_defined_symbols=USER_DEFINED_SYMBOLS
)
GEMMA4_TRAINER_OPTIONS = _TRAINER_OPTIONS | dict(
    control_symbols=GEMMA4_CONTROL_SYMBOLS, user_defined_symbols=GEMMA4_USER_DEFINED_SYMBOLS
)


def corpus_lines(path: Path = CORPUS) -> list[str]:
    """Returns the committed corpus lines, without blank lines and the '# ' header."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("# ")]


def _arithmetic_lines() -> Iterator[str]:
    # Small deterministic number text, so digits and operators are frequent.
    for a in range(2, 13):
        yield " ".join(f"{a} × {b} = {a * b}." for b in range(1, 13))
        yield f"{a}0 + {a}5 = {a * 10 + a * 10 + 5}, {a}.5 - 0.25 = {a + 0.25}"


def _chat_lines(lines: list[str], *, gemma4: bool = False) -> Iterator[str]:
    # The corpus dialogue rendered in the Gemma template, so `user`/`model` become pieces.
    for line in lines:
        for prefix, role in (("System: ", "system"), ("User: ", "user"), ("Assistant: ", "model")):
            if line.startswith(prefix):
                text = line.removeprefix(prefix)
                if not gemma4:
                    yield f"<start_of_turn>{role}\n{text}<end_of_turn>\n"
                yield f"<|turn>{role}\n{text}<turn|>\n"


def _thought_lines(lines: list[str]) -> Iterator[str]:
    # Gemma 4 thinking output (spec §5), so `thought` becomes a piece.
    for line in lines:
        if line.startswith("Assistant: "):
            yield f"<|channel>thought\n{line.removeprefix('Assistant: ')}<channel|>"


def training_sentences(*, gemma4: bool = False) -> list[str]:
    """Returns every training sentence, committed and generated, in a fixed order."""
    lines = corpus_lines()
    chat = list(_chat_lines(lines, gemma4=gemma4))
    thoughts = list(_thought_lines(lines)) if gemma4 else []
    return lines + list(_arithmetic_lines()) + chat + thoughts


def train(*, gemma4: bool = False) -> bytes:
    """Trains the tokenizer (the Gemma 4 one with `gemma4`) and returns the serialized model."""
    options = GEMMA4_TRAINER_OPTIONS if gemma4 else TRAINER_OPTIONS
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences(gemma4=gemma4)), model_writer=buffer, **options
    )
    model = buffer.getvalue()
    _check(model, options)
    return model


def _check(model: bytes, options: dict) -> None:
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"vocab size {sp.vocab_size()} != {VOCAB_SIZE}")
    if len(model) >= _MAX_BYTES:
        raise RuntimeError(f"model is {len(model)} bytes, the limit is {_MAX_BYTES}")
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"]
    for piece in pieces + options["control_symbols"] + options["user_defined_symbols"]:
        if sp.id_to_piece(sp.piece_to_id(piece)) != piece:
            raise RuntimeError(f"piece {piece!r} is missing from the trained model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gemma4", action="store_true", help="the Gemma 4 demo tokenizer (tokenizer_gemma4.model)"
    )
    parser.add_argument("--output", type=Path, help=f"default {OUTPUT} or {OUTPUT_GEMMA4}")
    parser.add_argument(
        "--check", action="store_true", help="compare with --output instead of writing it"
    )
    args = parser.parse_args(argv)
    args.output = args.output or (OUTPUT_GEMMA4 if args.gemma4 else OUTPUT)
    model = train(gemma4=args.gemma4)
    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == model
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from a fresh training run'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    print(f"wrote {args.output} ({len(model)} bytes, {sp.vocab_size()} pieces)")
    shown = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<|turn>", "<turn|>"]
    for piece in shown[3:] if args.gemma4 else shown:
        print(f"  {sp.piece_to_id(piece):5d} {piece}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
