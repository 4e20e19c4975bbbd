"""Regenerates `tests/golden/tiny-gemma4-mm*.npz`: whole-model HF Gemma 4 with image and audio.

Run in the reference venv (torch + transformers 5.23 with `models.gemma4`):

    bench/.envs/ref/bin/python scripts/make_golden_gemma4_mm.py [tiny-gemma4-mm] [tiny-gemma4-moe-mm]
        [tiny-gemma4-mm2]

Where `make_golden_gemma4.py` replays the text model on hand-made soft tokens, this runs the
whole `Gemma4ForConditionalGeneration` (float32, eager attention) on a processor-style prompt,
so the image processor, vision tower, audio feature extractor, audio tower, both
`Gemma4MultimodalEmbedder`s, the placeholder scatter, the PLE lookup of soft positions and the
mask built from `mm_token_type_ids` are all HF's own code:

    tiny-gemma4-mm       `tiny_gemma4` (E2B-style: PLE, KV sharing) with `tiny_gemma4_vision`
                         and `tiny_gemma4_audio`; prompt = text, <boi> 36 x <image> <eoi>, text,
                         <boa> 25 x <audio> <eoa>, text (78 tokens)
    tiny-gemma4-moe-mm   `tiny_gemma4_moe` (26B-A4B-style, `use_bidirectional_attention=
                         "vision"`) with `tiny_gemma4_vision`; the same prompt without audio
    tiny-gemma4-mm2      as tiny-gemma4-mm, on two images (224x224 -> 36 tokens, 100x300 -> 30)
                         and two clips (1 s -> 25 tokens, 0.6 s -> 15), each kind preprocessed
                         as one padded batch; prompt = text, <boi> 36 <eoi>, text, <boi> 30
                         <eoi>, text, <boa> 25 <eoa>, text, <boa> 15 <eoa>, text (132 tokens);
                         its own, smaller set of saved arrays: see `make_golden_two`

The tiny vocabulary has 256 ids, so the multimodal ids of `Gemma4Config` are moved into it
(`TOKEN_IDS`); HF swaps placeholders for the pad id 0 before any lookup, so only <boi>, <eoi>,
<boa>, <eoa> are real embeddings. `mm_token_type_ids` is what `ProcessorMixin.
create_mm_token_type_ids` returns (1 image, 3 audio, 0 text: the brackets are text).

Weights: to keep this file small (the whole E-style tree alone is ~0.9 MB in float16) it stores
none. The model is made of the `params/` of the part goldens, which already hold random,
float16-exact trees of exactly these architectures: `tiny-gemma4.npz` / `tiny-gemma4-moe.npz`
(text), `tiny-gemma4-vision.npz` (`vision_encoder/`, `embedder/mm_input_projection/w`) and
`tiny-gemma4-audio.npz` (`audio_encoder/`, `embedder/audio_input_projection/w`; its clip bounds
were fitted to other clips, and still clip here). Their union, our tree, goes into
`Gemma4ForConditionalGeneration` through `gemma_app.ckpt.hf_map4.to_hf` (strict: every HF
tensor but the tied `lm_head.weight` comes from it), and a sha256 of it is saved, so that a
regenerated part golden fails the test loudly instead of silently (then rerun this script).
Saved (float32 unless said):

    preset                      "tiny-gemma4" / "tiny-gemma4-moe" (the text preset)
    input_ids                   int32 [1, T]
    mm_token_type_ids           int32 [1, T]
    image                       uint8 [224, 224, 3] the input image
    pixel_values_x255           uint8 [1, 324, 768] the processor's patches * 255 (exact)
    image_position_ids          int32 [1, 324, 2]
    waveform                    float32 [16000] (E-style only) 1 s at 16 kHz
    input_features              float32 [1, 99, 128], input_features_mask bool [1, 99]
    hf/image_tokens             [36, D] the projected image soft tokens HF scattered in
    hf/audio_tokens             [25, D] the projected audio soft tokens (E-style only)
    hf/logits                   [1, T, 256] `Gemma4ForConditionalGeneration` logits (softcapped)
    hf/logits_f64               [1, T, 256] the same model run in float64 (audio tower excepted,
                                see `hf_forward_f64`), stored as float32: how far float32
                                rounding alone moves HF's logits on this prompt
    weights/sources             str [k] the part goldens the weights come from, in order
    weights/sha256              str `fingerprint` of their merged `params/` (float16 bytes)
    meta/<package>              torch / transformers versions
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script
sys.path.insert(0, str(ROOT / "scripts"))  # reuse the per-part golden builders

import make_golden_gemma4 as text_golden  # noqa: E402
import make_golden_gemma4_audio as audio_golden  # noqa: E402
import make_golden_gemma4_vision as vision_golden  # noqa: E402

from gemma_app.ckpt import hf_map4  # noqa: E402
from gemma_app.nn.config import TransformerConfig  # noqa: E402
from gemma_app.nn.presets import TINY_PRESETS  # noqa: E402

GOLDEN_DIR = ROOT / "tests" / "golden"
SEED = 20260420
VARIANTS = {
    "tiny-gemma4-mm": "tiny-gemma4",
    "tiny-gemma4-moe-mm": "tiny-gemma4-moe",
    "tiny-gemma4-mm2": "tiny-gemma4",  # two images + two clips (`make_golden_two`)
}
TOKEN_IDS = dict(
    image_token_id=250, audio_token_id=251, boi_token_id=252, eoi_token_id=253,
    boa_token_id=254, eoa_token_index=255, video_token_id=249,
)  # fmt: skip
BOS = 2
IMAGE_SIZE = (224, 224)  # -> 288 x 288 px, 36 soft tokens at the tiny budget
AUDIO_SAMPLES = 16_000  # 1 s -> 99 mel frames -> 25 soft tokens
TWO_IMAGE_SIZES = ((224, 224), (100, 300))  # -> 288 x 288 and 144 x 480 px: 36 and 30 tokens
TWO_AUDIO_SAMPLES = (16_000, 9_600)  # 1 s and 0.6 s -> 99 and 59 mel frames: 25 and 15 tokens


def hf_config(config: TransformerConfig) -> transformers.Gemma4Config:
    vision = vision_golden.hf_config(config.vision)
    audio = None if config.audio is None else audio_golden.hf_audio_config(config.audio)
    if audio is not None:
        audio._attn_implementation = "eager"
    return transformers.Gemma4Config(
        text_config=text_golden.hf_config(config), vision_config=vision, audio_config=audio,
        tie_word_embeddings=True, attn_implementation="eager", dtype=torch.float32, **TOKEN_IDS,
    )  # fmt: skip


def prompt(
    config: TransformerConfig, n_image: int, n_audio: int, rng: np.random.Generator
) -> np.ndarray:
    """input_ids [1, T] as the processor lays them out (placeholders between brackets)."""

    def text(n):
        return list(rng.integers(5, min(TOKEN_IDS.values()), n))

    ids = [BOS, *text(5), TOKEN_IDS["boi_token_id"], *[TOKEN_IDS["image_token_id"]] * n_image]
    ids += [TOKEN_IDS["eoi_token_id"], *text(4)]
    if config.audio is not None:
        ids += [TOKEN_IDS["boa_token_id"], *[TOKEN_IDS["audio_token_id"]] * n_audio]
        ids += [TOKEN_IDS["eoa_token_index"], *text(3)]
    return np.asarray([ids], np.int32)


def mm_token_type_ids(input_ids: np.ndarray) -> np.ndarray:
    """`ProcessorMixin.create_mm_token_type_ids`: 1 image, 2 video, 3 audio, else 0."""
    types = np.zeros_like(input_ids)
    types[input_ids == TOKEN_IDS["image_token_id"]] = 1
    types[input_ids == TOKEN_IDS["video_token_id"]] = 2
    types[input_ids == TOKEN_IDS["audio_token_id"]] = 3
    return types.astype(np.int32)


def weight_sources(config: TransformerConfig) -> list[str]:
    """The part goldens whose `params/` make up the whole model of `config`."""
    sources = [config.name, "tiny-gemma4-vision"]
    return sources + (["tiny-gemma4-audio"] if config.audio is not None else [])


def load_weights(config: TransformerConfig, golden_dir: Path = GOLDEN_DIR):
    """(our flat tree in float32, sha256 of it) from the part goldens; no path in two files."""
    flat: dict[str, np.ndarray] = {}
    for source in weight_sources(config):
        with np.load(golden_dir / f"{source}.npz") as data:
            part = {
                k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")
            }
        assert not set(part) & set(flat), f"{source} repeats {sorted(set(part) & set(flat))[:3]}"
        flat.update(part)
    return {k: v.astype(np.float32) for k, v in flat.items()}, fingerprint(flat)


def fingerprint(flat: dict[str, np.ndarray]) -> str:
    """sha256 over every leaf's path, shape and float16 bytes (in path order)."""
    digest = hashlib.sha256()
    for path in sorted(flat):
        leaf = np.ascontiguousarray(flat[path], np.float16)
        digest.update(f"{path}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def load_ours(model, flat: dict[str, np.ndarray], config: TransformerConfig) -> None:
    """Every HF tensor from our tree through `hf_map4.to_hf` (the tied head excepted)."""
    state = hf_map4.to_hf(flat, config, vision=True, audio=config.audio is not None)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == ["lm_head.weight"], (missing, unexpected)
    assert (
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    )


@torch.no_grad()
def hf_forward(model, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [1, T, V], image tokens [n, D], audio tokens [m, D] or empty)."""
    kwargs = {
        "input_ids": torch.from_numpy(inputs["input_ids"].astype(np.int64)),
        "mm_token_type_ids": torch.from_numpy(inputs["mm_token_type_ids"].astype(np.int64)),
        "pixel_values": torch.from_numpy(inputs["pixel_values"]),
        "image_position_ids": torch.from_numpy(inputs["image_position_ids"].astype(np.int64)),
    }
    if "input_features" in inputs:
        kwargs["input_features"] = torch.from_numpy(inputs["input_features"])
        kwargs["input_features_mask"] = torch.from_numpy(inputs["input_features_mask"])
    out = model(**kwargs, use_cache=False)
    audio = out.audio_hidden_states
    audio = np.zeros((0,)) if audio is None else audio.numpy().reshape(-1, audio.shape[-1])
    return out.logits.numpy().astype(np.float32), out.image_hidden_states.numpy(), audio


def make_inputs(config: TransformerConfig, rng: np.random.Generator) -> dict:
    image = vision_golden.make_images(rng)[0]
    assert image.shape[:2] == IMAGE_SIZE
    pre = vision_golden.hf_preprocess([image], config.vision)
    inputs = {
        "image": image,
        "pixel_values": pre["pixel_values"],
        "image_position_ids": pre["position_ids"],
    }
    n_audio = 0
    if config.audio is not None:
        wave = audio_golden.clips(rng)[0][:AUDIO_SAMPLES]
        batch = Gemma4AudioFeatureExtractor()([wave], return_tensors="np")
        inputs["waveform"] = wave
        inputs["input_features"] = batch["input_features"].astype(np.float32)
        inputs["input_features_mask"] = batch["input_features_mask"].astype(bool)
        n_audio = processing_token_count(inputs["input_features_mask"][0])
    inputs["input_ids"] = prompt(config, int(pre["num_soft_tokens"][0]), n_audio, rng)
    inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"])
    return inputs


def processing_token_count(mask: np.ndarray) -> int:
    """`Gemma4Processor.replace_audio_token`: the mask through two stride-2 convolutions."""
    for _ in range(2):
        mask = mask[::2][: (len(mask) + 2 - 3) // 2 + 1]
    return int(mask.sum())


def hf_forward_f64(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """HF's logits in float64 (turns `model` to float64): the yardstick of float32 rounding.

    The audio tower stays float32 (HF's relative-position attention hard-codes float32); its
    tokens are cast to float64 when they are scattered in; MoE experts run HF's "eager"
    loop (its default `grouped_mm` has no float64 kernel).
    """
    model.config.get_text_config()._experts_implementation = "eager"
    model.double()
    if model.model.audio_tower is not None:
        model.model.audio_tower.float()
        model.model.embed_audio.float()
    pixels = inputs["pixel_values"].astype(np.float64)
    return hf_forward(model, {**inputs, "pixel_values": pixels})[0]


def _sensitivity(model, inputs, logits, config) -> None:
    """Max |change| of HF's logits when one input is changed: proof that each part matters."""
    changes = {
        "image pixels inverted": {**inputs, "pixel_values": 1.0 - inputs["pixel_values"]},
    }
    if config.audio is not None:
        changes["audio features negated"] = {**inputs, "input_features": -inputs["input_features"]}
    if config.bidirectional_vision:
        text_only = np.zeros_like(inputs["mm_token_type_ids"])
        changes["causal image block"] = {**inputs, "mm_token_type_ids": text_only}
    for what, other in changes.items():
        delta = float(np.abs(hf_forward(model, other)[0] - logits).max())
        print(f"    {what:24s} {delta:.3g}")
        assert delta > 1e-2, f"{config.name}: golden does not exercise '{what}'"


def make_golden(name: str, out_dir: Path = GOLDEN_DIR) -> Path:
    if name == "tiny-gemma4-mm2":
        return make_golden_two(name, out_dir)
    config = TINY_PRESETS[VARIANTS[name]]()
    rng = np.random.default_rng([SEED, list(VARIANTS).index(name)])
    torch.manual_seed(SEED)
    model = transformers.Gemma4ForConditionalGeneration(hf_config(config)).eval()
    assert model.config.get_text_config()._attn_implementation == "eager"
    flat, sha = load_weights(config)
    inputs = make_inputs(config, rng)
    load_ours(model, flat, config)
    logits, image_tokens, audio_tokens = hf_forward(model, inputs)
    t = inputs["input_ids"].shape[1]
    print(f"{name}: T={t}, image tokens {image_tokens.shape}, audio tokens {audio_tokens.shape}, "
          f"|logits| max {np.abs(logits).max():.2f}; change when:")  # fmt: skip
    _sensitivity(model, inputs, logits, config)
    logits_f64 = hf_forward_f64(model, inputs)
    print(f"    float32 error of HF itself: max |logits - float64 logits| "
          f"{np.abs(logits - logits_f64).max():.3g}")  # fmt: skip
    codes = np.round(inputs["pixel_values"] * 255).astype(np.uint8)
    assert np.array_equal(codes.astype(np.float32) / np.float32(255), inputs["pixel_values"])
    arrays = {
        "preset": np.array(config.name),
        "input_ids": inputs["input_ids"],
        "mm_token_type_ids": inputs["mm_token_type_ids"],
        "image": inputs["image"],
        "pixel_values_x255": codes,
        "image_position_ids": inputs["image_position_ids"].astype(np.int32),
        "hf/image_tokens": image_tokens.astype(np.float32),
        "hf/logits": logits,
        "hf/logits_f64": logits_f64.astype(np.float32),
        "weights/sources": np.array(weight_sources(config)),
        "weights/sha256": np.array(sha),
        **{f"meta/{pkg}": np.array(importlib.metadata.version(pkg)) for pkg in ("torch", "transformers")},
    }  # fmt: skip
    if config.audio is not None:
        arrays.update({
            "waveform": inputs["waveform"],
            "input_features": inputs["input_features"],
            "input_features_mask": inputs["input_features_mask"],
            "hf/audio_tokens": audio_tokens.astype(np.float32),
        })  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"    wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def prompt_two(n_images: list[int], n_clips: list[int], rng: np.random.Generator) -> np.ndarray:
    """input_ids [1, T]: text, then each image and each clip between its brackets, then text."""

    def text(n):
        return list(rng.integers(5, min(TOKEN_IDS.values()), n))

    ids = [BOS, *text(5)]
    for n in n_images:
        ids += [TOKEN_IDS["boi_token_id"], *[TOKEN_IDS["image_token_id"]] * n]
        ids += [TOKEN_IDS["eoi_token_id"], *text(3)]
    for n in n_clips:
        ids += [TOKEN_IDS["boa_token_id"], *[TOKEN_IDS["audio_token_id"]] * n]
        ids += [TOKEN_IDS["eoa_token_index"], *text(3)]
    return np.asarray([ids], np.int32)


def make_inputs_two(config: TransformerConfig, rng: np.random.Generator) -> dict:
    """Two images of different aspect ratios and two clips of different lengths, each batch
    preprocessed in one call as `Gemma4Processor` does (patches and features padded)."""
    images = vision_golden.make_images(rng)[: len(TWO_IMAGE_SIZES)]
    assert tuple(i.shape[:2] for i in images) == TWO_IMAGE_SIZES
    pre = vision_golden.hf_preprocess(images, config.vision)
    # float16-exact samples, stored as float16: keeps the file under 600 KB
    clips = zip(audio_golden.clips(rng), TWO_AUDIO_SAMPLES, strict=True)
    waves = [audio_golden.f16(c[:n]) for c, n in clips]
    batch = Gemma4AudioFeatureExtractor()(waves, return_tensors="np")
    inputs = {
        "images": images,
        "pixel_values": pre["pixel_values"],
        "image_position_ids": pre["position_ids"],
        "waveforms": waves,
        "input_features": batch["input_features"].astype(np.float32),
        "input_features_mask": batch["input_features_mask"].astype(bool),
    }
    n_clips = [processing_token_count(m) for m in inputs["input_features_mask"]]
    inputs["input_ids"] = prompt_two(pre["num_soft_tokens"].tolist(), n_clips, rng)
    inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"])
    return inputs


def make_golden_two(name: str, out_dir: Path = GOLDEN_DIR) -> Path:
    """`tiny-gemma4-mm2`: the E-style model on two images and two clips in one prompt.

    Stores no processor output but the patch positions and the feature mask (the patches and
    features of `tiny-gemma4-mm` already pin our preprocessing; these would double the file):

        images/0, images/1      uint8 [224, 224, 3], [100, 300, 3]
        image_position_ids      int32 [2, 324, 2] (the second image padded with -1)
        waveforms/0, /1         float16 [16000], [9600] (the clips are float16-exact)
        input_features_mask     bool [2, 99] (the short clip's row padded with False)
        input_ids, mm_token_type_ids, hf/image_tokens [66, D], hf/audio_tokens [40, D],
        hf/logits, hf/logits_f64, weights/sources, weights/sha256, meta/<package> as above
    """
    config = TINY_PRESETS[VARIANTS[name]]()
    rng = np.random.default_rng([SEED, list(VARIANTS).index(name)])
    torch.manual_seed(SEED)
    model = transformers.Gemma4ForConditionalGeneration(hf_config(config)).eval()
    flat, sha = load_weights(config)
    inputs = make_inputs_two(config, rng)
    load_ours(model, flat, config)
    logits, image_tokens, audio_tokens = hf_forward(model, inputs)
    print(f"{name}: T={inputs['input_ids'].shape[1]}, image tokens {image_tokens.shape}, "
          f"audio tokens {audio_tokens.shape}; change when:")  # fmt: skip
    _sensitivity(model, inputs, logits, config)
    logits_f64 = hf_forward_f64(model, inputs)
    print(f"    float32 error of HF itself: max |logits - float64 logits| "
          f"{np.abs(logits - logits_f64).max():.3g}")  # fmt: skip
    arrays = {
        "preset": np.array(config.name),
        "input_ids": inputs["input_ids"],
        "mm_token_type_ids": inputs["mm_token_type_ids"],
        **{f"images/{i}": image for i, image in enumerate(inputs["images"])},
        "image_position_ids": inputs["image_position_ids"].astype(np.int32),
        **{f"waveforms/{i}": w.astype(np.float16) for i, w in enumerate(inputs["waveforms"])},
        "input_features_mask": inputs["input_features_mask"],
        "hf/image_tokens": image_tokens.astype(np.float32),
        "hf/audio_tokens": audio_tokens.astype(np.float32),
        "hf/logits": logits,
        "hf/logits_f64": logits_f64.astype(np.float32),
        "weights/sources": np.array(weight_sources(config)),
        "weights/sha256": np.array(sha),
        **{f"meta/{pkg}": np.array(importlib.metadata.version(pkg)) for pkg in ("torch", "transformers")},
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"    wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"some of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible reductions
    for name in args.variants or VARIANTS:
        make_golden(name, args.out)


if __name__ == "__main__":
    main()
