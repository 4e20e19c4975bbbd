"""Writes checkpoint fixtures in the official on-disk layouts, with random tiny weights.

    python scripts/make_checkpoints.py OUT_DIR

The tests call `make_all(tmp_dir)` once per session (nothing here is committed). OUT_DIR gets:

    orbax/<preset>/<LAYOUT>/        random bf16 weights of tiny-gemma2 / tiny-gemma3 in the
                                    FLAT (official), NESTED, STACKED and KAULDRON layouts
    orbax/tiny-gemma3/FLAT-vision/  FLAT plus 5 fake SigLIP + embedder mm_* leaves (text-only
                                    loading skips them; vision loading lists them all)
    orbax/tiny-gemma3/FLAT-f32/     float32 on disk (cast to bf16 on load)
    kaggle_files/                   what Kaggle serves for google/gemma-3/flax/gemma3-1b-it:
                                    gemma3-1b-it/ (orbax, FLAT, "demo" preset, the vocabulary of
                                    assets/tokenizer.model) + tokenizer.model
    kaggle_cache/                   a kagglehub cache holding it as version 1, so that
                                    kagglehub.model_download("google/gemma-3/flax/gemma3-1b-it/1")
                                    with KAGGLEHUB_CACHE=kaggle_cache resolves offline
    hf/tiny-gemma2/, hf/tiny-gemma3/  Hugging Face layout (config.json + safetensors) of the
                                    golden weights in tests/golden/*.npz, whose transformers
                                    logits are known (tiny-gemma3 as a sharded
                                    Gemma3ForConditionalGeneration with a fake two-tensor vision
                                    tower under a valid `vision_config`)
    hf/demo/                        a HF Gemma3ForCausalLM (bf16, older config.json format)
                                    with tokenizer.model, for load_engine

and the image-encoder fixtures ("demo-vision" = the demo text model + `tiny_vision`, random
weights; text bf16, vision values exact in bf16 so every layout holds the same numbers):

    orbax/demo-vision/<LAYOUT>/     FLAT (vision under `SigLiPFromPatches_0/...`, all bf16 on
                                    disk, as the official releases), NESTED, STACKED and
                                    KAULDRON (vision float32 on disk); tokenizer.model in
                                    orbax/demo-vision/
    kaggle_cache/                   also holds the FLAT one as google/gemma-3/flax/gemma3-4b-it/1
    hf/demo-vision/                 a HF Gemma3ForConditionalGeneration (bf16, vision tower in
                                    the published safetensors names) with tokenizer.model
    hf/tiny-gemma3-vision/          the vision golden (tests/golden/tiny-gemma3-vision.npz),
                                    float32, whose transformers vision tower output and logits
                                    are known

Gemma 4 (`make_gemma4(root)`, tests/test_ckpt_gemma4.py; not part of `make_all`), with the
text weights of the HF golden tests/golden/tiny-gemma4*.npz (float32, exact) and random toy
encoders (`tiny_gemma4_vision`, `tiny_gemma4_audio`):

    orbax/tiny-gemma4/<LAYOUT>/     FLAT (dense MLP as `mlp/gating_einsum/w` dicts, encoders
                                    under `vision_encoder/...`, `audio_encoder/...`), NESTED,
                                    KAULDRON; FLAT-bf16 (everything bf16 on disk);
                                    NESTED-root (under a `transformer` root, norms spelled
                                    `_query_norm` / `_key_norm`)
    orbax/tiny-gemma4-moe/<LAYOUT>/ NESTED (MoE leaves `mlp/gating_einsum/w` ...), FLAT, STACKED
    hf/tiny-gemma4/                 Gemma4ForConditionalGeneration (text + vision + audio)
    hf/tiny-gemma4-moe/             Gemma4ForCausalLM (`model.` prefix, text only)
    kaggle_cache/                   google/gemma-4/flax/gemma-4-e2b-it/1: FLAT checkpoint at the
                                    download root (spec §3, unverified) + tokenizer.model
                                    (assets/tokenizer_gemma4.model), "tiny-gemma4" sized for it

config.json files are written literally (hf_map has no config -> config.json direction); the
Gemma 4 ones were checked to load in transformers 5.23 (`Gemma4Config`, strict state dict).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys

import ml_dtypes
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script

from gemma_app.ckpt import hf as hf_io  # noqa: E402
from gemma_app.ckpt import hf_map4, kaggle, layouts, orbax_io  # noqa: E402
from gemma_app.ckpt.hf_map import (  # noqa: E402
    flatten_params,
    param_shapes,
    params_to_hf,
    unflatten_params,
    vision_param_shapes,
    vision_params_to_hf,
)
from gemma_app.nn import presets  # noqa: E402
from gemma_app.nn.config import TransformerConfig  # noqa: E402
from gemma_app.nn.presets import get_preset  # noqa: E402

TOKENIZER = ROOT / "assets" / "tokenizer.model"
GOLDEN_DIR = ROOT / "tests" / "golden"
ORBAX_PRESETS = ("tiny-gemma2", "tiny-gemma3")
ORBAX_LAYOUTS = (layouts.FLAT, layouts.NESTED, layouts.STACKED, layouts.KAULDRON)
KAGGLE_HANDLE = "google/gemma-3/flax/gemma3-1b-it"
KAGGLE_VERSION = 1
KAGGLE_PRESET = "demo"  # Gemma 3 architecture sized for assets/tokenizer.model (4096 pieces)

# tiny_demo + tiny_vision: an image model for the project's 4096-piece tokenizer.
VISION_PRESET = "demo-vision"
VISION_LAYOUTS = (layouts.FLAT, layouts.NESTED, layouts.STACKED, layouts.KAULDRON)
KAGGLE_VISION_HANDLE = "google/gemma-3/flax/gemma3-4b-it"  # holds "demo-vision" weights here

L, G = "sliding_attention", "full_attention"
# `tiny_vision()` as a transformers SiglipVisionConfig (every field a Gemma 3 file names).
TINY_VISION_CONFIG = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "vision_use_head": False,
}  # fmt: skip
# Image-token fields of a Gemma3Config (ids of the golden's vocab-256 tokenizer; ignored by us).
TINY_MM_FIELDS = {
    "mm_tokens_per_image": 4, "boi_token_index": 109, "eoi_token_index": 110,
    "image_token_index": 256,
}  # fmt: skip
TINY_GEMMA2_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06,
    "layer_types": [L, G, L, G], "sliding_window": 4, "query_pre_attn_scalar": 24,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": True, "dtype": "float32",
}  # fmt: skip
TINY_GEMMA3_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06, "layer_types": [L, L, L, L, L, G], "sliding_window": 4,
        "query_pre_attn_scalar": 16,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    },
    "vision_config": TINY_VISION_CONFIG, **TINY_MM_FIELDS,
    "tie_word_embeddings": True, "dtype": "float32",
}  # fmt: skip
DEMO_CONFIG = {  # the pre-transformers-5 format: rope_theta + rope_local_base_freq + pattern
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 4096,
    "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
    "query_pre_attn_scalar": 32, "sliding_window": 64, "sliding_window_pattern": 6,
    "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06, "torch_dtype": "bfloat16",
}  # fmt: skip
HF_CONFIGS = {"tiny-gemma2": TINY_GEMMA2_CONFIG, "tiny-gemma3": TINY_GEMMA3_CONFIG}
DEMO_VISION_CONFIG = {  # the published gemma-3-4b-it config.json format, demo-sized
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text", "vocab_size": 4096, "hidden_size": 128,
        "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
        "sliding_window": 64, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "rope_scaling": None,
    },
    "vision_config": TINY_VISION_CONFIG, "mm_tokens_per_image": 4,
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "torch_dtype": "bfloat16",
}  # fmt: skip
TINY_GEMMA3_VISION_CONFIG = {**TINY_GEMMA3_CONFIG}  # the vision golden: same text, real tower


def vision_preset() -> TransformerConfig:
    """The "demo-vision" architecture: the demo text model with the tiny SigLIP encoder."""
    return dataclasses.replace(presets.tiny_demo(), vision=presets.tiny_vision())


@dataclasses.dataclass
class Fixtures:
    """Where `make_all` wrote what, and the exact arrays it wrote (flat, numpy)."""

    root: pathlib.Path
    orbax: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)  # "preset/LAYOUT"
    params: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    hf: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    kaggle_files: pathlib.Path | None = None
    kaggle_cache: pathlib.Path | None = None


def random_params(preset: str, seed: int, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """Random normal values for every leaf (norm scales too, so zeros prove nothing)."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(get_preset(preset))
    return {p: (0.5 * rng.standard_normal(s, np.float32)).astype(dtype) for p, s in shapes.items()}


def vision_leaves(seed: int) -> dict[str, np.ndarray]:
    """A few SigLIP and embedder `mm_*` leaves, as Gemma 3 4B+ checkpoints carry them."""
    rng = np.random.default_rng(seed)
    shapes = {
        "vision_encoder/siglip_encoder/embedding/kernel": (2, 2, 3, 8),
        "vision_encoder/siglip_encoder/embedding/bias": (8,),
        "vision_encoder/siglip_encoder/Transformer/encoder_norm/scale": (8,),
        "embedder/mm_input_projection/w": (8, 64),
        "embedder/mm_soft_embedding_norm/scale": (8,),
    }
    return {p: rng.standard_normal(s, np.float32) for p, s in shapes.items()}


def write_orbax(fx: Fixtures, preset: str, layout: str, flat: dict, tag: str = "") -> None:
    path = fx.root / "orbax" / preset / f"{layout}{tag}"
    config = vision_preset() if preset == VISION_PRESET else get_preset(preset)
    pattern_len = layouts.pattern_length(config.attention_types)
    orbax_io.save(path, flat, layout, pattern_len=pattern_len)
    fx.orbax[f"{preset}/{layout}{tag}"] = path


def random_vision_params(config: TransformerConfig, seed: int) -> dict[str, np.ndarray]:
    """Random float32 values for every vision leaf (encoder + embedder `mm_*`), each exactly
    representable in bfloat16 so that bf16 and fp32 files hold the same numbers. Scaled by
    fan-in so the encoder's activations stay O(1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in vision_param_shapes(config).items():
        scale = 0.5 if len(shape) == 1 else float(np.prod(shape[:-1])) ** -0.5
        if path.endswith("pos_embedding"):
            scale = 0.5
        value = scale * rng.standard_normal(shape, np.float32)
        flat[path] = value.astype(ml_dtypes.bfloat16).astype(np.float32)
    return flat


def write_vision(fx: Fixtures) -> None:
    """The "demo-vision" model in the orbax layouts, as a Kaggle download and as HF files."""
    config = vision_preset()
    text = random_params("demo", seed=5)
    image = random_vision_params(config, seed=6)
    fx.params[VISION_PRESET] = {**text, **image}
    bf16 = {p: v.astype(ml_dtypes.bfloat16) for p, v in image.items()}
    for layout in VISION_LAYOUTS:  # FLAT as released (all bf16); the others keep f32 vision
        encoder = bf16 if layout == layouts.FLAT else image
        write_orbax(fx, VISION_PRESET, layout, {**text, **encoder})
    shutil.copy(TOKENIZER, fx.root / "orbax" / VISION_PRESET / "tokenizer.model")

    files = fx.root / "kaggle_vision_files"
    shutil.copytree(fx.orbax[f"{VISION_PRESET}/FLAT"], files / "gemma3-4b-it")
    shutil.copy(TOKENIZER, files / "tokenizer.model")
    fx.kaggle_cache = fx.kaggle_cache or fx.root / "kaggle_cache"
    kaggle.install_into_cache(fx.kaggle_cache, KAGGLE_VISION_HANDLE, KAGGLE_VERSION, files)

    state = params_to_hf(unflatten_params(text), config, prefix="language_model.model.")
    state |= vision_params_to_hf(unflatten_params(bf16), config)
    fx.hf[VISION_PRESET] = fx.root / "hf" / VISION_PRESET
    hf_io.save(fx.hf[VISION_PRESET], state, DEMO_VISION_CONFIG, shards=2)
    shutil.copy(TOKENIZER, fx.hf[VISION_PRESET] / "tokenizer.model")


def write_hf_vision_golden(fx: Fixtures) -> None:
    """The vision golden's float32 weights as a HF Gemma3ForConditionalGeneration directory."""
    config = presets.tiny_gemma3_vision()
    flat = {p: v.astype(np.float32) for p, v in golden_params("tiny-gemma3-vision").items()}
    image = set(vision_param_shapes(config))
    text = unflatten_params({p: v for p, v in flat.items() if p not in image})
    state = params_to_hf(text, config, prefix="language_model.model.")
    state |= vision_params_to_hf(unflatten_params(flat), config)
    fx.hf["tiny-gemma3-vision"] = fx.root / "hf" / "tiny-gemma3-vision"
    hf_io.save(fx.hf["tiny-gemma3-vision"], state, TINY_GEMMA3_VISION_CONFIG)
    fx.params["tiny-gemma3-vision"] = flat


def write_kaggle(fx: Fixtures) -> None:
    """The download of google/gemma-3/flax/gemma3-1b-it, and a kagglehub cache holding it."""
    files = fx.root / "kaggle_files"
    flat = random_params(KAGGLE_PRESET, seed=3)
    orbax_io.save(files / KAGGLE_HANDLE.rsplit("/", 1)[-1], flat, layouts.FLAT)
    shutil.copy(TOKENIZER, files / "tokenizer.model")
    fx.kaggle_files, fx.params[KAGGLE_PRESET] = files, flat
    fx.kaggle_cache = fx.root / "kaggle_cache"
    kaggle.install_into_cache(fx.kaggle_cache, KAGGLE_HANDLE, KAGGLE_VERSION, files)


def golden_params(preset: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / f"{preset}.npz") as data:
        return {k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")}


def write_hf(fx: Fixtures) -> None:
    """HF directories of the golden weights (float32, exact) and of a bf16 demo model."""
    for preset, config_json in HF_CONFIGS.items():
        config = get_preset(preset)
        multimodal = "text_config" in config_json
        prefix = "language_model.model." if multimodal else "model."
        state = params_to_hf(unflatten_params(golden_params(preset)), config, prefix=prefix)
        if multimodal:  # skipped by the text-only loader
            state["vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
            state["multi_modal_projector.mm_input_projection_weight"] = np.ones((8, 64), np.float32)
        hf_io.save(fx.root / "hf" / preset, state, config_json, shards=2 if multimodal else 1)
        fx.hf[preset] = fx.root / "hf" / preset
    flat = random_params(KAGGLE_PRESET, seed=4)
    state = params_to_hf(unflatten_params(flat), get_preset(KAGGLE_PRESET))
    fx.hf["demo"] = fx.root / "hf" / "demo"
    hf_io.save(fx.hf["demo"], state, DEMO_CONFIG)
    shutil.copy(TOKENIZER, fx.hf["demo"] / "tokenizer.model")
    fx.params["hf-demo"] = flat


def make_vision(root: pathlib.Path) -> Fixtures:
    """Writes only the image-encoder fixtures under `root` (tests/test_ckpt_vision.py); ~1 s."""
    fx = Fixtures(root=pathlib.Path(root))
    write_vision(fx)
    write_hf_vision_golden(fx)
    return fx


def make_all(root: pathlib.Path) -> Fixtures:
    """Writes every fixture under `root` (a fresh directory); takes ~3 s."""
    fx = Fixtures(root=pathlib.Path(root))
    for seed, preset in enumerate(ORBAX_PRESETS):
        flat = fx.params[preset] = random_params(preset, seed)
        for layout in ORBAX_LAYOUTS:
            write_orbax(fx, preset, layout, flat)
    gemma3 = fx.params["tiny-gemma3"]
    write_orbax(fx, "tiny-gemma3", layouts.FLAT, {**gemma3, **vision_leaves(7)}, "-vision")
    fx.params["tiny-gemma3-f32"] = random_params("tiny-gemma3", 9, np.float32)
    write_orbax(fx, "tiny-gemma3", layouts.FLAT, fx.params["tiny-gemma3-f32"], "-f32")
    write_kaggle(fx)
    write_hf(fx)
    write_vision(fx)
    write_hf_vision_golden(fx)
    return fx


# --- Gemma 4 -----------------------------------------------------------------------------

TOKENIZER_GEMMA4 = ROOT / "assets" / "tokenizer_gemma4.model"
# tiny-gemma4 cannot be STACKED: its KV-shared layers have a wider MLP than the layers at the
# same place in the attention pattern (as E2B's); tiny-gemma4-moe can.
GEMMA4_LAYOUTS = {
    "tiny-gemma4": (layouts.FLAT, layouts.NESTED, layouts.KAULDRON),
    "tiny-gemma4-moe": (layouts.NESTED, layouts.FLAT, layouts.STACKED),
}
KAGGLE_GEMMA4_HANDLE = "google/gemma-4/flax/gemma-4-e2b-it"
_ROPE4 = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1000000.0},
}  # fmt: skip
TINY_GEMMA4_TEXT = {  # presets.tiny_gemma4() as a Gemma4TextConfig
    "model_type": "gemma4_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "global_head_dim": 32, "layer_types": [L, L, L, G] * 2, "sliding_window": 4,
    "final_logit_softcapping": 30.0, "rope_parameters": _ROPE4,
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 256,
    "num_kv_shared_layers": 3, "use_double_wide_mlp": True,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
}  # fmt: skip
TINY_GEMMA4_CONFIG = {
    "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
    "text_config": TINY_GEMMA4_TEXT,
    "vision_config": {
        "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 16, "patch_size": 16, "pooling_kernel_size": 3,
        "position_embedding_size": 128, "use_clipped_linears": True, "standardize": False,
    },
    "audio_config": {
        "model_type": "gemma4_audio", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "subsampling_conv_channels": [128, 4],
        "conv_kernel_size": 5, "output_proj_dims": 48, "use_clipped_linears": True,
    },
    "tie_word_embeddings": True, "dtype": "float32",
}  # fmt: skip
TINY_GEMMA4_MOE_CONFIG = {  # presets.tiny_gemma4_moe() text-only, as a Gemma4ForCausalLM
    "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
    "num_global_key_value_heads": 1, "attention_k_eq_v": True,
    "layer_types": [L, L, L, L, L, G], "sliding_window": 4, "final_logit_softcapping": 30.0,
    "rope_parameters": _ROPE4, "hidden_size_per_layer_input": 0,
    "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
    "moe_intermediate_size": 16, "use_bidirectional_attention": "vision",
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True, "dtype": "float32",
}  # fmt: skip


def gemma4_encoders(config: TransformerConfig, seed: int) -> dict[str, np.ndarray]:
    """Random float32 encoder leaves of `config` (image and audio + their projections), each
    exact in bfloat16 so that bf16 files hold the same numbers; clip bounds are wide."""
    rng = np.random.default_rng(seed)
    rules = [*hf_map4.vision_rules(config)]
    rules += hf_map4.audio_rules(config) if config.audio is not None else []
    flat = {}
    for rule in rules:
        value = 0.5 * rng.standard_normal(rule.our_shape, np.float32)
        if "clip_" in rule.ours:  # scalars: min < 0 < max, as trained bounds are
            sign = -1.0 if rule.ours.endswith("_min") else 1.0
            value = sign * (1.0 + np.abs(value))
        flat[rule.ours] = np.asarray(value, ml_dtypes.bfloat16).astype(np.float32)  # 0-d too
    return flat


def _underscore_norms(flat: dict) -> dict:
    return {p.replace("/query_norm/", "/_query_norm/").replace("/key_norm/", "/_key_norm/"): v
            for p, v in flat.items()}  # fmt: skip


def write_gemma4(fx: Fixtures) -> None:
    """tiny-gemma4 (+ encoders) and tiny-gemma4-moe in the orbax layouts and as HF dirs."""
    for preset, encoder_seed in (("tiny-gemma4", 11), ("tiny-gemma4-moe", 12)):
        config = get_preset(preset)
        text = {p: v.astype(np.float32) for p, v in golden_params(preset).items()}
        flat = fx.params[preset] = {**text, **gemma4_encoders(config, encoder_seed)}
        pattern_len = layouts.pattern_length(config.attention_types)
        for layout in GEMMA4_LAYOUTS[preset]:
            path = fx.root / "orbax" / preset / layout
            orbax_io.save(path, flat, layout, pattern_len=pattern_len)
            fx.orbax[f"{preset}/{layout}"] = path
    flat = fx.params["tiny-gemma4"]
    path = fx.orbax["tiny-gemma4/FLAT-bf16"] = fx.root / "orbax" / "tiny-gemma4" / "FLAT-bf16"
    orbax_io.save(
        path, {p: np.asarray(v, ml_dtypes.bfloat16) for p, v in flat.items()}, layouts.FLAT
    )
    path = fx.orbax["tiny-gemma4/NESTED-root"] = fx.root / "orbax" / "tiny-gemma4" / "NESTED-root"
    import orbax.checkpoint as ocp

    tree = {"transformer": unflatten_params(_underscore_norms(flat))}
    ocp.PyTreeCheckpointer().save(path, tree)

    config = get_preset("tiny-gemma4")
    state = hf_map4.to_hf(flat, config, vision=True, audio=True)
    fx.hf["tiny-gemma4"] = fx.root / "hf" / "tiny-gemma4"
    hf_io.save(fx.hf["tiny-gemma4"], state, TINY_GEMMA4_CONFIG, shards=2)
    moe = get_preset("tiny-gemma4-moe")
    state = hf_map4.to_hf(fx.params["tiny-gemma4-moe"], moe, prefix="model.")
    fx.hf["tiny-gemma4-moe"] = fx.root / "hf" / "tiny-gemma4-moe"
    hf_io.save(fx.hf["tiny-gemma4-moe"], state, TINY_GEMMA4_MOE_CONFIG)


def write_kaggle_gemma4(fx: Fixtures) -> None:
    """google/gemma-4/flax/gemma-4-e2b-it/1 as spec §3 describes it: the orbax checkpoint at
    the download root next to tokenizer.model; tiny-gemma4 sized for the Gemma 4 tokenizer."""
    config = presets.tiny_gemma4(num_embed=4096)
    rng = np.random.default_rng(13)
    text = {p: (0.5 * rng.standard_normal(s, np.float32)) for p, s in param_shapes(config).items()}
    flat = fx.params["kaggle-gemma4"] = {
        p: v.astype(ml_dtypes.bfloat16).astype(np.float32)
        for p, v in {**text, **gemma4_encoders(config, 14)}.items()
    }
    files = fx.root / "kaggle_gemma4_files"
    orbax_io.save(
        files, {p: np.asarray(v, ml_dtypes.bfloat16) for p, v in flat.items()}, layouts.FLAT
    )
    shutil.copy(TOKENIZER_GEMMA4, files / "tokenizer.model")
    fx.kaggle_cache = fx.kaggle_cache or fx.root / "kaggle_cache"
    kaggle.install_into_cache(fx.kaggle_cache, KAGGLE_GEMMA4_HANDLE, KAGGLE_VERSION, files)


def make_gemma4(root: pathlib.Path) -> Fixtures:
    """Writes only the Gemma 4 fixtures under `root` (tests/test_ckpt_gemma4.py); ~3 s."""
    fx = Fixtures(root=pathlib.Path(root))
    write_gemma4(fx)
    write_kaggle_gemma4(fx)
    return fx


def tiny_gemma4_config_json(config: TransformerConfig) -> dict:
    """`TINY_GEMMA4_CONFIG` for a tiny-gemma4 that differs only in its vocabulary and sliding
    window (the demo engine's model: 4096 pieces, window 128)."""
    text = {
        **TINY_GEMMA4_TEXT, "vocab_size": config.num_embed,
        "vocab_size_per_layer_input": config.num_embed,
        "sliding_window": config.sliding_window_size,
    }  # fmt: skip
    return {**TINY_GEMMA4_CONFIG, "text_config": text}


def write_hf_gemma4(
    model_dir: pathlib.Path, config: TransformerConfig, params: dict
) -> pathlib.Path:
    """`params` (our nested tree, text + both encoders) of a tiny-gemma4-shaped `config` as a
    HF Gemma4ForConditionalGeneration directory: config.json, model.safetensors (float32) and
    tokenizer.model (assets/tokenizer_gemma4.model). KV-shared layers' K/V are not written."""
    flat = {p: np.asarray(v, np.float32) for p, v in flatten_params(params).items()}
    state = hf_map4.to_hf(flat, config, vision=True, audio=True)
    hf_io.save(model_dir, state, tiny_gemma4_config_json(config))
    shutil.copy(TOKENIZER_GEMMA4, pathlib.Path(model_dir) / "tokenizer.model")
    return pathlib.Path(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="a new (or empty) directory")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty")
    fx = make_all(args.out)
    gemma4 = make_gemma4(args.out)
    for name, path in {**fx.orbax, **fx.hf, **gemma4.orbax, **gemma4.hf}.items():
        print(f"{name:28s} {path}")
    handles = f"{KAGGLE_HANDLE}/1, {KAGGLE_VISION_HANDLE}/1"
    print(f"{'kaggle cache':28s} {fx.kaggle_cache}  (KAGGLEHUB_CACHE; handles {handles})")


if __name__ == "__main__":
    main()
