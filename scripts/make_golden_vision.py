"""Regenerates `tests/golden/tiny-gemma3-vision.npz`: HF Gemma 3 image path on random weights.

Run in the reference venv (torch + transformers, see requirements-reference.txt):

    bench/.envs/ref/bin/python scripts/make_golden_vision.py

Builds `Gemma3ForConditionalGeneration` for the `tiny-gemma3-vision` preset (the text decoder
of `tiny-gemma3`, vocab 256, window 4; a 2-block SigLIP of width 32 on 112 px images, 8x8
patches pooled 4x4 to 4 soft tokens, like the real 64x64 -> 16x16), float32 and eager
attention, fills it with float16-exact random weights from a fixed seed, encodes two random
images and runs one forward over a 33-token prompt holding both. Saved:

    preset                     "tiny-gemma3-vision"
    images_uint8               uint8 [2, 112, 112, 3] the two images (HWC, RGB); the model
                               input is `(x - 127.5) / 127.5` in float32 (HF gets it NCHW)
    vision/last_hidden_state   float32 [2, 64, 32] SigLIP output after `post_layernorm`
    vision/pooled              float32 [2, 4, 32] after the 4x4 average pool
    vision/projected           float32 [2, 4, 64] after `mm_soft_emb_norm` and the projection
    input_ids                  int32 [1, 33] with IMAGE_TOKEN (256) in the soft-token slots
    token_type_ids             int32 [1, 33] 1 at soft-token slots, else 0 (HF processor's)
    positions                  int32 [1, 33] 0..32: every soft token has its own position
    mask/full_attention        bool [33, 33] HF's mask of the global layers (query, key)
    mask/sliding_attention     bool [33, 33] HF's mask of the local (window 4) layers
    logits                     float32 [1, 33, 256] HF's output
    hf_hidden/embed            float32 [1, 33, 64] decoder input: text embeddings * sqrt(D),
                               soft-token slots replaced by `vision/projected`
    hf_hidden/layer_<i>        output of decoder layer i; hf_hidden/final_norm
    ids/<name>                 the special ids used (see below)
    params/<path>              our tree (text + vision + embedder/mm_*), float16 (exact: the
                               values are float16-representable; cast to float32 to use)
    meta/<package>             versions of torch and transformers

Token ids: the project's demo tokenizer layout, which is Gemma 3's below 256: BOS 2,
`<start_of_turn>` 105, `<end_of_turn>` 106, `\n\n` 108, `<start_of_image>` 109,
`<end_of_image>` 110 (real Gemma 3: 108, 255999, 256000). The soft-token placeholder is
IMAGE_TOKEN = 256 = the vocabulary size, one past the table as the real 262144 is for the
Flax checkpoints' 262144-row table; HF looks it up as id 0 and overwrites the result.

Each image is `\n\n <start_of_image> [4 soft tokens] <end_of_image> \n\n` in the prompt
(Gemma3Processor's `full_image_sequence`). How HF masks the decoder (transformers 5.23,
`create_masks_for_vision_model`): the soft tokens of one image (a maximal run of
`token_type_ids == 1`) form a block;
  global layers:  key k visible from query q  iff  k <= q  or  same_block(q, k)
  sliding layers: iff  (k <= q  or  same_block(q, k))  and  k > q - window
so the window also cuts image tokens, but only on the past side: a soft token sees every
later soft token of its image however far ahead. (google-deepmind/gemma cuts both sides,
|q - k| < window; the two agree whenever an image has at most `window` soft tokens, as here
(4 <= 4) and in every real model (256 <= 1024).) The boundary tokens `<start_of_image>`,
`<end_of_image>` and `\n\n` are ordinary causal text.

The script checks its own claims: HF's masks equal that rule, and switching off each part
of it (bidirectional blocks on global / sliding layers, the window for image queries) moves
the logits by more than 1e-2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script
sys.path.insert(0, str(ROOT / "scripts"))

import make_golden as text_golden  # noqa: E402  (the text golden: HF config, random weights)

from gemma_app.ckpt.hf_map import (  # noqa: E402
    flatten_params,
    hf_vision_param_shapes,
    hf_vision_to_params,
    params_to_hf,
    unflatten_params,
    vision_param_shapes,
    vision_params_to_hf,
)
from gemma_app.nn.config import TransformerConfig  # noqa: E402
from gemma_app.nn.presets import tiny_gemma3_vision  # noqa: E402

GOLDEN_PATH = ROOT / "tests" / "golden" / "tiny-gemma3-vision.npz"
PRESET = "tiny-gemma3-vision"
SEED = 20240522
NUM_IMAGES = 2
IDS = {
    "bos": 2,
    "start_of_turn": 105,
    "end_of_turn": 106,
    "double_newline": 108,
    "start_of_image": 109,
    "end_of_image": 110,
    "image_token": 256,
}


def hf_config(config: TransformerConfig) -> transformers.Gemma3Config:
    """`Gemma3Config` of `config` (text + SigLIP), float32, eager attention everywhere."""
    vc = config.vision
    vision = transformers.SiglipVisionConfig(
        hidden_size=vc.width,
        intermediate_size=vc.mlp_dim,
        num_hidden_layers=vc.depth,
        num_attention_heads=vc.num_heads,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return transformers.Gemma3Config(
        text_config=text_golden.hf_config(config),
        vision_config=vision,
        mm_tokens_per_image=vc.num_mm_tokens_per_image,
        boi_token_index=IDS["start_of_image"],
        eoi_token_index=IDS["end_of_image"],
        image_token_index=IDS["image_token"],
        tie_word_embeddings=True,
        attn_implementation="eager",
        dtype=torch.float32,
    )


def build_hf_model(config: TransformerConfig, params: dict) -> torch.nn.Module:
    model = transformers.Gemma3ForConditionalGeneration(hf_config(config)).eval()
    text = {p: v for p, v in flatten_params(params).items() if p not in vision_param_shapes(config)}
    state = params_to_hf(unflatten_params(text), config, prefix="model.language_model.")
    state |= vision_params_to_hf(params, config, layout="transformers")
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    inner = model.model
    assert model.lm_head.weight.data_ptr() == inner.language_model.embed_tokens.weight.data_ptr()
    assert inner.vision_tower.config._attn_implementation == "eager"
    assert inner.language_model.config._attn_implementation == "eager"
    return model


def random_params(config: TransformerConfig, rng: np.random.Generator) -> dict:
    """Text weights as in make_golden.py, plus vision/projector weights, float16-exact.

    LayerNorm scales are around 1 (plain multipliers), biases clearly non-zero, q/k 2x the
    usual scale so attention is far from uniform, positions large enough to matter.
    """
    params = text_golden.random_params(config, rng)
    state_dict = {}
    for name, shape in hf_vision_param_shapes(config).items():
        if "mm_soft_emb_norm" in name:  # (1 + w) form
            values = 0.3 * rng.standard_normal(shape)
        elif "layer_norm" in name or "layernorm" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            values = base + 0.3 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            values = 0.2 * rng.standard_normal(shape)
        elif "position_embedding" in name:
            values = 0.5 * rng.standard_normal(shape)
        elif "patch_embedding" in name:
            values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "mm_input_projection" in name:  # [W, D], used as x @ w
            values = rng.standard_normal(shape) / np.sqrt(shape[0])
        else:  # nn.Linear [out, in]
            scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            values = scale * rng.standard_normal(shape) / np.sqrt(shape[1])
        state_dict[name] = values.astype(np.float16).astype(np.float32)
    vision = hf_vision_to_params(state_dict, config)
    params["vision_encoder"] = vision["vision_encoder"]
    params["embedder"].update(vision["embedder"])
    return params


def pixel_values_of(images: np.ndarray) -> np.ndarray:
    """uint8 [B, R, R, 3] -> float32 in [-1, 1]: HF's rescale + normalize (mean = std = 0.5)."""
    return (images.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


def prompt(config: TransformerConfig, rng: np.random.Generator) -> np.ndarray:
    """[1, 33]: a chat-like prompt with two images, text ids drawn from 111..255."""
    m = config.vision.num_mm_tokens_per_image

    def text(n):
        return list(rng.integers(111, config.num_embed, size=n))

    image = [IDS["double_newline"], IDS["start_of_image"], *[IDS["image_token"]] * m]
    image += [IDS["end_of_image"], IDS["double_newline"]]
    ids = [IDS["bos"], IDS["start_of_turn"], *text(3), *image, *text(3), *image, *text(4)]
    ids += [IDS["end_of_turn"], *text(1), IDS["start_of_turn"], *text(2)]
    return np.asarray([ids], np.int32)


def expected_masks(token_type_ids: np.ndarray, window: int) -> dict[str, np.ndarray]:
    """The rule stated in the module docstring, [T, T] bool (query, key), for one row."""
    is_image = token_type_ids[0] == 1
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    block = np.where(is_image, np.cumsum(starts) - 1, -1)
    q, k = np.arange(len(block))[:, None], np.arange(len(block))[None, :]
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    full = (k <= q) | same
    return {"full_attention": full, "sliding_attention": full & (k > q - window)}


@torch.no_grad()
def run_hf(model, pixel_values, input_ids, token_type_ids, masks=None):
    """(logits, captured tensors); `masks` (bool [T, T] per layer type) overrides HF's."""
    captured: dict[str, np.ndarray] = {}
    inner = model.model
    lm = inner.language_model
    types = lm.config.layer_types

    def keep(name, pick=lambda out: out[0] if isinstance(out, tuple) else out):
        def hook(_module, _inputs, output):
            captured[name] = pick(output).detach().numpy().copy()

        return hook

    def keep_input(i):
        def hook(_module, args, kwargs):
            if i == 0:
                captured["embed"] = args[0].detach().numpy().copy()
            mask = kwargs["attention_mask"]
            captured[f"mask/{types[i]}"] = (mask[0, 0] == 0).numpy().copy()

        return hook

    handles = [
        inner.vision_tower.register_forward_hook(
            keep("vision/last_hidden_state", lambda out: out.last_hidden_state)
        ),
        inner.multi_modal_projector.avg_pool.register_forward_hook(
            keep("vision/pooled", lambda out: out.flatten(2).transpose(1, 2))
        ),
        inner.multi_modal_projector.register_forward_hook(keep("vision/projected")),
        lm.norm.register_forward_hook(keep("final_norm")),
    ]
    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_hook(keep(f"layer_{i}")))
        handles.append(layer.register_forward_pre_hook(keep_input(i), with_kwargs=True))
    attention_mask = None
    if masks is not None:
        neg = torch.finfo(torch.float32).min
        attention_mask = {
            name: torch.where(torch.from_numpy(m), 0.0, neg)[None, None]
            for name, m in masks.items()
        }
    try:
        logits = model(
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),
            pixel_values=torch.from_numpy(pixel_values.transpose(0, 3, 1, 2).copy()),
            token_type_ids=torch.from_numpy(token_type_ids.astype(np.int64)),
            attention_mask=attention_mask,
            use_cache=False,
        ).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits.numpy().astype(np.float32), captured


def _sensitivity(model, config, pixel_values, input_ids, token_type_ids, logits):
    """Max |change| of the logits when one part of the image mask is switched off."""
    window = config.sliding_window_size
    rule = expected_masks(token_type_ids, window)
    causal = expected_masks(np.zeros_like(token_type_ids), window)
    is_image_query = (token_type_ids[0] == 1)[:, None]
    no_window_for_images = np.where(
        is_image_query, rule["full_attention"], rule["sliding_attention"]
    )
    ablations = {
        "no bidirectional blocks": causal,
        "blocks on global layers only": {**rule, "sliding_attention": causal["sliding_attention"]},
        "blocks on sliding layers only": {**rule, "full_attention": causal["full_attention"]},
        "no window for image queries": {**rule, "sliding_attention": no_window_for_images},
    }
    result = {}
    same, _ = run_hf(model, pixel_values, input_ids, token_type_ids, masks=rule)
    result["explicit rule masks (must be 0)"] = float(np.abs(same - logits).max())
    for what, masks in ablations.items():
        other, _ = run_hf(model, pixel_values, input_ids, token_type_ids, masks=masks)
        result[what] = float(np.abs(other - logits).max())
    return result


def make_golden(path: Path = GOLDEN_PATH) -> Path:
    config = tiny_gemma3_vision()
    vc = config.vision
    rng = np.random.default_rng(SEED)
    params = random_params(config, rng)
    size = vc.image_size
    images = rng.integers(0, 256, size=(NUM_IMAGES, size, size, 3), dtype=np.uint8)
    pixel_values = pixel_values_of(images)
    input_ids = prompt(config, rng)
    token_type_ids = (input_ids == IDS["image_token"]).astype(np.int32)
    assert token_type_ids.sum() == NUM_IMAGES * vc.num_mm_tokens_per_image

    model = build_hf_model(config, params)
    logits, captured = run_hf(model, pixel_values, input_ids, token_type_ids)
    rule = expected_masks(token_type_ids, config.sliding_window_size)
    for name, mask in rule.items():
        np.testing.assert_array_equal(captured[f"mask/{name}"], mask, err_msg=name)
    # The projector saw both images; its output replaced the soft-token embeddings.
    slots = token_type_ids[0] == 1
    np.testing.assert_array_equal(
        captured["embed"][0, slots], captured["vision/projected"].reshape(-1, config.embed_dim)
    )

    sensitivity = _sensitivity(model, config, pixel_values, input_ids, token_type_ids, logits)
    print(f"{PRESET}: |logits| max {np.abs(logits).max():.2f}; change when switched off:")
    for what, delta in sensitivity.items():
        print(f"    {what:34s} {delta:.3g}")
        if what.startswith("explicit"):
            assert delta == 0.0, "HF's masks are not the documented rule"
        else:
            assert delta > 1e-2, f"golden does not exercise '{what}'"

    flat = flatten_params(params)
    for leaf in flat.values():  # float16-exact, so storing float16 loses nothing
        assert np.array_equal(leaf.astype(np.float16).astype(np.float32), leaf)
    arrays = {
        "preset": np.array(PRESET),
        "images_uint8": images,
        **{k: v for k, v in captured.items() if k.startswith(("vision/", "mask/"))},
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "positions": np.arange(input_ids.shape[1], dtype=np.int32)[None],
        "logits": logits,
        **{f"hf_hidden/{k}": v for k, v in captured.items() if "/" not in k},
        **{f"ids/{k}": np.array(v, np.int32) for k, v in IDS.items()},
        **{f"params/{p}": v.astype(np.float16) for p, v in flat.items()},
        **{
            f"meta/{pkg}": np.array(importlib.metadata.version(pkg))
            for pkg in ("torch", "transformers")
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"    wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def load_params(arrays) -> dict:
    """Our nested float32 tree from a golden's `params/...` arrays."""
    flat = {
        k.removeprefix("params/"): np.asarray(v, np.float32)
        for k, v in arrays.items()
        if k.startswith("params/")
    }
    return unflatten_params(flat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN_PATH)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible reductions
    make_golden(args.out)


if __name__ == "__main__":
    main()
