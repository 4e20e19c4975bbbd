"""Regenerates `tests/golden/tiny-gemma4-vision*.npz`: HF Gemma 4 image path on random weights.

Run in the reference venv (torch + transformers 5.23 with `models.gemma4`):

    bench/.envs/ref/bin/python scripts/make_golden_gemma4_vision.py

Two goldens, both from transformers' `Gemma4ImageProcessorPil` + `Gemma4VisionModel` +
the `embed_vision` projection (`Gemma4MultimodalEmbedder`), float32, eager attention:

    tiny-gemma4-vision.npz      the `tiny_gemma4_vision()` preset (clipped linears, like E2B)
    tiny-gemma4-vision-std.npz  the same with `standardize=True`, no clipping (like 31B/26B);
                                same images, so it stores only outputs and params (the
                                inputs `image_*`, `hf/pixel_values_x255`, `hf/position_ids`,
                                `hf/num_soft_tokens` and `hf/encoder_hidden` are in the first)

The preset's budget (36 soft tokens = 324 patches) is not one transformers accepts
({70, 140, 280, 560, 1120}); the script widens that list for the processor, nothing else.
Weights are float16-exact random values in our tree (norm scales around 1, position table
and standardize clearly non-trivial, clip bounds tight enough that switching clipping off
moves the output), converted to transformers' names with `params_to_hf` below. Three images:
224x224 (-> 288x288, 36 tokens), 100x300 (-> 144x480, 30 tokens) and 20x1000 (an extreme
aspect ratio: the "side rounds to 0" branch, -> 48x1728, 36 tokens). Saved:

    image_<i>                 uint8 [H, W, 3] the input images
    hf/pixel_values_x255      uint8 [3, 324, 768] the processor's patches (padded) times 255:
                              its float32 output is exactly `float32(u) / float32(255)`
                              (checked), so this stores it losslessly in a quarter of the space
    hf/position_ids           int32 [3, 324, 2] (x, y); (-1, -1) for padding
    hf/num_soft_tokens        int32 [3]
    hf/encoder_hidden         float32 [3, 324, W] encoder output before pooling
    hf/pooled                 float32 [3, 36, W] pooler output (after * sqrt(W)), all cells
    hf/pooled_mask            bool [3, 36] the pooler's valid cells
    hf/soft                   float32 [sum tokens, W] model output (valid cells, standardized)
    hf/projected              float32 [sum tokens, D] after `embed_vision`, D = 64
    params/<path>             our tree (`vision_encoder/...`, `embedder/mm_input_projection/w`),
                              float16 (exact; cast to float32 to use)
    meta/<package>            versions of torch and transformers

Name mapping, our tree (spec §2.1) <-> transformers (`model.vision_tower.` /
`model.embed_vision.` inside `Gemma4ForConditionalGeneration`); l = layer, `W^T` = transpose,
`stacked[l]` = our leaf's row l:

    entry/input_projection/w (768, W)        patch_embedder.input_proj.weight = w^T
    entry/pos_emb (S, 2, W)                  patch_embedder.position_embedding_table (2, S, W)
                                             = pos_emb.transpose(1, 0, 2)
    .../block/pre_attention_norm/scale       encoder.layers.l.input_layernorm.weight
    .../block/post_attention_norm/scale      encoder.layers.l.post_attention_layernorm.weight
    .../block/pre_ffw_norm/scale             encoder.layers.l.pre_feedforward_layernorm.weight
    .../block/post_ffw_norm/scale            encoder.layers.l.post_feedforward_layernorm.weight
    .../block/attn/q_einsum/w (N, W, H)      self_attn.q_proj.linear.weight (N*H, W)
                                             = w.transpose(0, 2, 1).reshape(N*H, W)
    .../block/attn/kv_einsum/w (2, N, W, H)  self_attn.{k,v}_proj.linear.weight, from w[0], w[1]
                                             as for q
    .../block/attn/attn_vec_einsum/w (N,H,W) self_attn.o_proj.linear.weight (W, N*H)
                                             = w.reshape(N*H, W)^T
    .../block/attn/query_norm/scale (H,)     self_attn.q_norm.weight   (k: key_norm / k_norm;
                                             v_norm has no weight)
    .../block/mlp/gating_einsum/w (2, F, W)  mlp.gate_proj.linear.weight = w[0],
                                             mlp.up_proj.linear.weight = w[1]
    .../block/mlp/linear/w (F, W)            mlp.down_proj.linear.weight = w^T
    .../<einsum>/clip_input_min etc. (L,)    <proj>.input_min / input_max / output_min /
                                             output_max (0-d buffers); q_einsum -> q_proj,
                                             kv_einsum -> k_proj AND v_proj (shared bounds),
                                             attn_vec_einsum -> o_proj, gating_einsum ->
                                             gate_proj AND up_proj, linear -> down_proj
    standardize/bias, standardize/scale (W,) std_bias, std_scale
    embedder/mm_input_projection/w (W, D)    embed_vision.embedding_projection.weight = w^T

(`.../block/` is `vision_encoder/transformer/stacked_layers/block/`; HF keys above are
relative to `model.vision_tower.` unless they start with `embed_vision`.) transformers'
`Gemma4RMSNorm` is `normed * weight`, like ours, so norm scales copy unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from transformers.models.gemma4 import image_processing_pil_gemma4, modeling_gemma4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script

from gemma_app.nn.config import Gemma4VisionConfig  # noqa: E402
from gemma_app.nn.presets import tiny_gemma4_vision  # noqa: E402

GOLDEN_DIR = ROOT / "tests" / "golden"
SEED = 20260417
EMBED_DIM = 64  # text width D of the projection
IMAGE_SIZES = ((224, 224), (100, 300), (20, 1000))
BLOCK = "vision_encoder/transformer/stacked_layers/block/"
CLIP_NAMES = ("clip_input_min", "clip_input_max", "clip_output_min", "clip_output_max")
# our einsum -> transformers linears sharing its weight rows and clip bounds
CLIP_TARGETS = {
    "attn/q_einsum": ("self_attn.q_proj",),
    "attn/kv_einsum": ("self_attn.k_proj", "self_attn.v_proj"),
    "attn/attn_vec_einsum": ("self_attn.o_proj",),
    "mlp/gating_einsum": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp/linear": ("mlp.down_proj",),
}
NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn/query_norm": "self_attn.q_norm",
    "attn/key_norm": "self_attn.k_norm",
}


def variants() -> dict[str, Gemma4VisionConfig]:
    base = tiny_gemma4_vision()
    std = dataclasses.replace(base, use_clipped_linears=False, standardize=True)
    return {"tiny-gemma4-vision": base, "tiny-gemma4-vision-std": std}


def hf_config(vc: Gemma4VisionConfig) -> transformers.Gemma4VisionConfig:
    return transformers.Gemma4VisionConfig(
        hidden_size=vc.width,
        intermediate_size=vc.mlp_dim,
        num_hidden_layers=vc.depth,
        num_attention_heads=vc.num_heads,
        num_key_value_heads=vc.num_heads,
        head_dim=vc.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        pooling_kernel_size=vc.pooling_kernel,
        patch_size=vc.patch_size,
        position_embedding_size=vc.position_embedding_size,
        use_clipped_linears=vc.use_clipped_linears,
        standardize=vc.standardize,
        rope_parameters={"rope_type": "axial", "rope_theta": vc.rope_base},
        attn_implementation="eager",
        dtype=torch.float32,
    )


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float32)


def random_params(vc: Gemma4VisionConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Our flat tree, float16-exact random values."""
    w, n, h, f, lv = vc.width, vc.num_heads, vc.head_dim, vc.mlp_dim, vc.depth
    p = {
        "vision_encoder/entry/input_projection/w": rng.standard_normal((vc.patch_dim, w))
        / np.sqrt(vc.patch_dim),
        "vision_encoder/entry/pos_emb": 0.5
        * rng.standard_normal((vc.position_embedding_size, 2, w)),
        BLOCK + "attn/q_einsum/w": rng.standard_normal((lv, n, w, h)) / np.sqrt(w),
        BLOCK + "attn/kv_einsum/w": rng.standard_normal((lv, 2, n, w, h)) / np.sqrt(w),
        BLOCK + "attn/attn_vec_einsum/w": rng.standard_normal((lv, n, h, w)) / np.sqrt(n * h),
        BLOCK + "mlp/gating_einsum/w": rng.standard_normal((lv, 2, f, w)) / np.sqrt(w),
        BLOCK + "mlp/linear/w": rng.standard_normal((lv, f, w)) / np.sqrt(f),
        "embedder/mm_input_projection/w": rng.standard_normal((w, EMBED_DIM)) / np.sqrt(w),
    }
    for ours in NORMS:
        dim = h if ours.startswith("attn/") else w
        p[BLOCK + ours + "/scale"] = 1.0 + 0.3 * rng.standard_normal((lv, dim))
    if vc.use_clipped_linears:
        for einsum in CLIP_TARGETS:  # tight enough that a few percent of values are clipped
            p[BLOCK + einsum + "/clip_input_min"] = -rng.uniform(1.0, 1.6, lv)
            p[BLOCK + einsum + "/clip_input_max"] = rng.uniform(1.0, 1.6, lv)
            p[BLOCK + einsum + "/clip_output_min"] = -rng.uniform(1.0, 1.6, lv)
            p[BLOCK + einsum + "/clip_output_max"] = rng.uniform(1.0, 1.6, lv)
    if vc.standardize:
        p["vision_encoder/standardize/bias"] = 0.5 * rng.standard_normal(w)
        p["vision_encoder/standardize/scale"] = 1.0 + 0.3 * rng.standard_normal(w)
    return {k: _f16(v) for k, v in p.items()}


def params_to_hf(flat: dict[str, np.ndarray], vc: Gemma4VisionConfig) -> dict[str, np.ndarray]:
    """Our flat tree -> transformers state dict (`vision_tower.*`, `embed_vision.*`)."""
    n, h, w = vc.num_heads, vc.head_dim, vc.width
    t = "vision_tower."
    out = {
        t + "patch_embedder.input_proj.weight": flat["vision_encoder/entry/input_projection/w"].T,
        t + "patch_embedder.position_embedding_table": flat[
            "vision_encoder/entry/pos_emb"
        ].transpose(1, 0, 2),
        "embed_vision.embedding_projection.weight": flat["embedder/mm_input_projection/w"].T,
    }
    if vc.standardize:
        out[t + "std_bias"] = flat["vision_encoder/standardize/bias"]
        out[t + "std_scale"] = flat["vision_encoder/standardize/scale"]

    def heads_in(x):  # (N, W, H) -> (N*H, W)
        return x.transpose(0, 2, 1).reshape(n * h, w)

    for layer in range(vc.depth):
        pre = f"{t}encoder.layers.{layer}."

        def leaf(name, layer=layer):
            return flat[BLOCK + name][layer]

        for ours, theirs in NORMS.items():
            out[pre + theirs + ".weight"] = leaf(ours + "/scale")
        kv = leaf("attn/kv_einsum/w")
        gating = leaf("mlp/gating_einsum/w")
        out[pre + "self_attn.q_proj.linear.weight"] = heads_in(leaf("attn/q_einsum/w"))
        out[pre + "self_attn.k_proj.linear.weight"] = heads_in(kv[0])
        out[pre + "self_attn.v_proj.linear.weight"] = heads_in(kv[1])
        out[pre + "self_attn.o_proj.linear.weight"] = (
            leaf("attn/attn_vec_einsum/w").reshape(n * h, w).T
        )
        out[pre + "mlp.gate_proj.linear.weight"] = gating[0]
        out[pre + "mlp.up_proj.linear.weight"] = gating[1]
        out[pre + "mlp.down_proj.linear.weight"] = leaf("mlp/linear/w").T
        if vc.use_clipped_linears:
            for einsum, targets in CLIP_TARGETS.items():
                for clip in CLIP_NAMES:
                    for target in targets:
                        hf_name = clip.removeprefix("clip_")
                        out[f"{pre}{target}.{hf_name}"] = np.asarray(leaf(f"{einsum}/{clip}"))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def build_hf(vc: Gemma4VisionConfig, flat: dict[str, np.ndarray]):
    """(vision model, projection) with our weights loaded strictly."""
    config = hf_config(vc)
    tower = modeling_gemma4.Gemma4VisionModel(config).eval()
    embed = modeling_gemma4.Gemma4MultimodalEmbedder(
        config, types.SimpleNamespace(hidden_size=EMBED_DIM)
    ).eval()
    state = params_to_hf(flat, vc)
    for prefix, module in (("vision_tower.", tower), ("embed_vision.", embed)):
        sub = {k.removeprefix(prefix): torch.from_numpy(v) for k, v in state.items()}
        sub = {k: v for k, v in sub.items() if k in module.state_dict()}
        missing, unexpected = module.load_state_dict(sub, strict=False)
        assert not missing and not unexpected, (prefix, missing, unexpected)
    assert len(state) == len(tower.state_dict()) + len(embed.state_dict())
    assert tower.config._attn_implementation == "eager"
    return tower, embed


def make_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Smooth random images (coarse noise upsampled, plus fine noise) so resizing matters."""
    images = []
    for h, w in IMAGE_SIZES:
        coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        smooth = np.asarray(PIL.Image.fromarray(coarse).resize((w, h), PIL.Image.BILINEAR))
        noise = rng.integers(-3, 4, (h, w, 3))
        images.append(np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8))
    return images


def hf_preprocess(images: list[np.ndarray], vc: Gemma4VisionConfig) -> dict[str, np.ndarray]:
    if vc.max_soft_tokens not in image_processing_pil_gemma4._SUPPORTED_SOFT_TOKENS:
        image_processing_pil_gemma4._SUPPORTED_SOFT_TOKENS += (vc.max_soft_tokens,)
    processor = image_processing_pil_gemma4.Gemma4ImageProcessorPil(
        max_soft_tokens=vc.max_soft_tokens,
        patch_size=vc.patch_size,
        pooling_kernel_size=vc.pooling_kernel,
    )
    assert processor.resample == PIL.Image.Resampling.BICUBIC
    out = processor(images=[PIL.Image.fromarray(i) for i in images], return_tensors="np")
    return {
        "pixel_values": np.asarray(out["pixel_values"], np.float32),
        "position_ids": np.asarray(out["image_position_ids"], np.int32),
        "num_soft_tokens": np.asarray(out["num_soft_tokens_per_image"], np.int32),
    }


@torch.no_grad()
def run_hf(tower, embed, pixel_values, position_ids) -> dict[str, np.ndarray]:
    captured = {}

    def keep(name, pick):
        def hook(_module, _inputs, output):
            captured[name] = pick(output)

        return hook

    handles = [
        tower.encoder.register_forward_hook(
            keep("encoder_hidden", lambda o: o.last_hidden_state.numpy().copy())
        ),
        tower.pooler.register_forward_hook(keep("pooled", lambda o: o[0].numpy().copy())),
        tower.pooler.register_forward_hook(keep("pooled_mask", lambda o: o[1].numpy().copy())),
    ]
    try:
        soft = tower(
            pixel_values=torch.from_numpy(pixel_values),
            pixel_position_ids=torch.from_numpy(position_ids.astype(np.int64)),
        ).last_hidden_state
        projected = embed(soft)
    finally:
        for handle in handles:
            handle.remove()
    return {**captured, "soft": soft.numpy(), "projected": projected.numpy()}


def _checks(tower, embed, vc, pre, hf, flat) -> None:
    """The golden exercises what it claims: clipping matters, padding does not."""
    valid = pre["position_ids"][..., 0] >= 0
    noisy = pre["pixel_values"].copy()
    noisy[~valid] = np.random.default_rng(0).uniform(0, 1, noisy[~valid].shape)
    other = run_hf(tower, embed, noisy, pre["position_ids"])
    delta = float(np.abs(other["soft"] - hf["soft"]).max())
    print(f"    padding patches changed: soft tokens move by {delta:.3g} (must be ~0)")
    assert delta < 1e-6
    if vc.use_clipped_linears:
        loose = {k: (np.sign(v) * np.inf if "/clip_" in k else v) for k, v in flat.items()}
        free, _ = build_hf(vc, loose)
        unclipped = run_hf(free, embed, pre["pixel_values"], pre["position_ids"])
        delta = float(np.abs(unclipped["soft"] - hf["soft"]).max())
        print(f"    clipping switched off: soft tokens move by {delta:.3g} (must be > 1e-2)")
        assert delta > 1e-2


def make_golden(
    name: str, vc: Gemma4VisionConfig, out_dir: Path = GOLDEN_DIR, *, store_inputs: bool = True
) -> Path:
    flat = random_params(vc, np.random.default_rng(SEED))
    images = make_images(np.random.default_rng(SEED + 1))  # the same for every variant
    tower, embed = build_hf(vc, flat)
    pre = hf_preprocess(images, vc)
    hf = run_hf(tower, embed, pre["pixel_values"], pre["position_ids"])
    assert hf["soft"].shape[0] == pre["num_soft_tokens"].sum() == hf["pooled_mask"].sum()
    print(f"{name}: tokens {pre['num_soft_tokens'].tolist()}, |soft| max "
          f"{np.abs(hf['soft']).max():.2f}")  # fmt: skip
    _checks(tower, embed, vc, pre, hf, flat)
    codes = np.round(pre["pixel_values"] * 255).astype(np.uint8)
    assert np.array_equal(codes.astype(np.float32) / np.float32(255), pre["pixel_values"])
    inputs = {
        **{f"image_{i}": image for i, image in enumerate(images)},
        "hf/pixel_values_x255": codes,
        **{f"hf/{k}": v for k, v in pre.items() if k != "pixel_values"},
        "hf/encoder_hidden": hf.pop("encoder_hidden"),
    }
    arrays = {
        **(inputs if store_inputs else {}),
        **{f"hf/{k}": v for k, v in hf.items()},
        **{f"params/{k}": v.astype(np.float16) for k, v in flat.items()},
        **{
            f"meta/{pkg}": np.array(importlib.metadata.version(pkg))
            for pkg in ("torch", "transformers")
        },
    }
    path = out_dir / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"    wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=GOLDEN_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible reductions
    for i, (name, vc) in enumerate(variants().items()):
        make_golden(name, vc, args.out_dir, store_inputs=i == 0)


if __name__ == "__main__":
    main()
