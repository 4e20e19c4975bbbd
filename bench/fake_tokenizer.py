"""A Gemma-3-SHAPED SentencePiece model (262144 pieces) built from the project's demo tokenizer.

Random-weight Gemma 3 models emit any id below 262144, so a chat benchmark needs a tokenizer
that can decode every one of them. This takes `assets/tokenizer.model` (4096 pieces, Gemma 3
layout for ids 0..108: <pad> <eos> <bos> <unk> ... <start_of_turn>=105 <end_of_turn>=106
"\\n"=107) and pads it with never-matched filler pieces `<wN>` up to 262144, moving
<start_of_image>/<end_of_image> to Gemma 3's ids 255999/256000 (the ids `gemma` 3.3.0
hard-codes). Only ids, lengths and special tokens are faithful, not Gemma's tokenization.

Used by both our engine's chat phase and `gemma` 3.3.0's ChatSampler, so both see the same
prompts. Writes into the git-ignored bench/.envs/. Usage:

    python bench/fake_tokenizer.py [--out bench/.envs/fake_tokenizer/tokenizer.model]
"""

from __future__ import annotations

import argparse
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / ".envs" / "fake_tokenizer" / "tokenizer.model"
VOCAB = 262_144
IMAGE_IDS = {"<start_of_image>": 255_999, "<end_of_image>": 256_000}


def build(out: pathlib.Path = DEFAULT_OUT, source: pathlib.Path | None = None) -> pathlib.Path:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    source = source or ROOT / "assets" / "tokenizer.model"
    m = pb.ModelProto()
    m.ParseFromString(source.read_bytes())
    normal = pb.ModelProto.SentencePiece.NORMAL
    user = pb.ModelProto.SentencePiece.USER_DEFINED
    floor = min(p.score for p in m.pieces) - 10.0
    # Free the image pieces' old ids (they become filler) and re-add them at Gemma 3's ids.
    for i, p in enumerate(m.pieces):
        if p.piece in IMAGE_IDS:
            p.piece, p.type, p.score = f"<w{i}>", normal, floor
    while len(m.pieces) < VOCAB:
        i = len(m.pieces)
        p = m.pieces.add()
        name = next((k for k, v in IMAGE_IDS.items() if v == i), None)
        p.piece, p.type, p.score = (name, user, 0.0) if name else (f"<w{i}>", normal, floor)
    m.trainer_spec.vocab_size = len(m.pieces)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(m.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.GetPieceSize() == VOCAB, sp.GetPieceSize()
    expect = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
    for piece, pid in {**expect, **IMAGE_IDS}.items():
        assert sp.PieceToId(piece) == pid, (piece, sp.PieceToId(piece))
    assert sp.EncodeAsIds("<start_of_turn>user\n")[0] == 105
    return out


def ensure(out: pathlib.Path = DEFAULT_OUT) -> pathlib.Path:
    return out if out.exists() else build(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    print(f"wrote {build(a.out)}")
