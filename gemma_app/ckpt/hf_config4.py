"""Our `TransformerConfig` from a Hugging Face Gemma 4 `config.json` (transformers 5.23).

`Gemma4ForConditionalGeneration` configs hold `text_config`, `vision_config` and
`audio_config` (the last two may be null); a `Gemma4ForCausalLM` config is the text config
itself. Missing fields take transformers' class defaults (`Gemma4TextConfig`,
`Gemma4VisionConfig`, `Gemma4AudioConfig`). Global layers get `global_head_dim` (default 512)
and, only when `attention_k_eq_v`, `num_global_key_value_heads` (HF's own rule); an explicit
`per_layer_config` table overrides both. Everything our model cannot run is collected and
raised at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gemma_app.nn.config import (
    AttentionType,
    AudioConfig,
    Gemma4VisionConfig,
    MoEConfig,
    TransformerConfig,
)

MODEL_TYPES = ("gemma4", "gemma4_text")
ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4Model")

TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, sliding_window=512,
    final_logit_softcapping=None, use_bidirectional_attention=None,
    vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256, attention_k_eq_v=False,
    num_kv_shared_layers=0, enable_moe_block=False, use_double_wide_mlp=False, num_experts=None,
    top_k_experts=None, moe_intermediate_size=None, attention_bias=False, global_head_dim=512,
    num_global_key_value_heads=None, tie_word_embeddings=True,
)  # fmt: skip
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
    num_key_value_heads=12, head_dim=64, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, pooling_kernel_size=3, patch_size=16, position_embedding_size=10_240,
    use_clipped_linears=False, standardize=False, rope_parameters=None,
)  # fmt: skip
AUDIO_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, hidden_act="silu",
    subsampling_conv_channels=[128, 32], conv_kernel_size=5, residual_weight=0.5,
    attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
    attention_logit_cap=50.0, use_clipped_linears=True, rms_norm_eps=1e-6,
    gradient_clipping=1e10, output_proj_dims=1536,
)  # fmt: skip
_LAYER_TYPES = {"sliding_attention": AttentionType.LOCAL_SLIDING,
                "full_attention": AttentionType.GLOBAL}  # fmt: skip
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_tanh")
HF_MEL_BINS = 128  # Gemma4AudioFeatureExtractor's feature_size; not in the model config


def is_gemma4(config_json: Mapping[str, Any]) -> bool:
    if config_json.get("model_type") in MODEL_TYPES:
        return True
    return any(arch in ARCHITECTURES for arch in config_json.get("architectures") or ())


def _layer_types(cfg: Mapping[str, Any], problems: list[str]) -> tuple[AttentionType, ...]:
    n = cfg["num_hidden_layers"]
    names = cfg.get("layer_types")
    if names is None:  # HF: 5 sliding, 1 full
        names = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    names = list(names)
    if len(names) != n or not set(names) <= set(_LAYER_TYPES):
        problems.append(f"layer_types {names} for {n} layers")
        return ()
    names[-1] = "full_attention"  # HF forces the last layer global (with a warning)
    return tuple(_LAYER_TYPES[name] for name in names)


def _rope(cfg: Mapping[str, Any], problems: list[str]) -> dict[str, float]:
    params = cfg.get("rope_parameters") or {}
    local = dict(params.get("sliding_attention") or {"rope_type": "default", "rope_theta": 1e4})
    full = dict(params.get("full_attention") or {"rope_type": "proportional",
                                                  "partial_rotary_factor": 0.25,
                                                  "rope_theta": 1e6})  # fmt: skip
    if local.get("rope_type", "default") != "default":
        problems.append(f"sliding-layer rope_type {local.get('rope_type')!r}")
    if full.get("rope_type", "default") not in ("default", "proportional"):
        problems.append(f"full-layer rope_type {full.get('rope_type')!r}")
    proportion = full.get("partial_rotary_factor", 1.0)
    if full.get("rope_type", "default") == "default":
        proportion = 1.0
    return {
        "local": float(local.get("rope_theta", 1e4)),
        "global": float(full.get("rope_theta", 1e6)),
        "proportion": float(proportion),
    }


def _global_overrides(cfg: Mapping[str, Any], types, problems: list[str]) -> tuple[int, int | None]:
    """(global head dim, global KV heads or None), from the fields or `per_layer_config`."""
    head_dim = cfg["global_head_dim"]
    kv = cfg["num_global_key_value_heads"] if cfg["attention_k_eq_v"] else None
    table = cfg.get("per_layer_config")
    if table:
        globals_ = {
            int(i): dict(v) for i, v in table.items() if types[int(i)] == AttentionType.GLOBAL
        }
        values = {
            (v.get("head_dim", head_dim), v.get("num_key_value_heads", kv))
            for v in globals_.values()
        }
        locals_ = [i for i in table if types[int(i)] != AttentionType.GLOBAL and table[i]]
        if len(values) > 1 or locals_:
            problems.append("per_layer_config that differs between layers of one type")
        elif values:
            head_dim, kv = values.pop()
    return head_dim, kv


def _check_text(cfg: Mapping[str, Any], top: Mapping[str, Any], problems: list[str]) -> None:
    if cfg["hidden_activation"] not in _TANH_GELU:
        problems.append(f"hidden_activation {cfg['hidden_activation']!r}")
    if cfg["rms_norm_eps"] != 1e-6:
        problems.append(f"rms_norm_eps={cfg['rms_norm_eps']}")
    if cfg["attention_bias"]:
        problems.append("attention_bias=True")
    if cfg["use_bidirectional_attention"] not in (None, "vision"):
        problems.append(f"use_bidirectional_attention={cfg['use_bidirectional_attention']!r}")
    if (
        cfg["hidden_size_per_layer_input"]
        and cfg["vocab_size_per_layer_input"] != cfg["vocab_size"]
    ):
        problems.append("vocab_size_per_layer_input differs from vocab_size")
    if not top.get("tie_word_embeddings", cfg["tie_word_embeddings"]):
        problems.append("tie_word_embeddings=False")


def vision_config_from_hf(vision: Mapping[str, Any] | None, problems: list[str]):
    """Our `Gemma4VisionConfig`, or None for a text-only checkpoint."""
    if vision is None:
        return None
    cfg = {**VISION_DEFAULTS, **vision}
    if cfg["hidden_activation"] not in _TANH_GELU:
        problems.append(f"vision hidden_activation {cfg['hidden_activation']!r}")
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        problems.append("vision num_key_value_heads != num_attention_heads")
    theta = ((cfg.get("rope_parameters") or {}).get("rope_theta")) or 100.0
    return Gemma4VisionConfig(
        width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], head_dim=cfg["head_dim"],
        mlp_dim=cfg["intermediate_size"], patch_size=cfg["patch_size"],
        pooling_kernel=cfg["pooling_kernel_size"],
        position_embedding_size=cfg["position_embedding_size"], rope_base=float(theta),
        # The soft-token budget is the processor's, not the model's: the default 280, capped
        # so that a whole-budget strip of patches fits the position table.
        max_soft_tokens=min(280, cfg["position_embedding_size"] // cfg["pooling_kernel_size"]),
        use_clipped_linears=bool(cfg["use_clipped_linears"]), standardize=bool(cfg["standardize"]),
    )  # fmt: skip


def audio_config_from_hf(audio: Mapping[str, Any] | None, problems: list[str]):
    """Our `AudioConfig`, or None for a checkpoint without the audio encoder."""
    if audio is None:
        return None
    cfg = {**AUDIO_DEFAULTS, **audio}
    if cfg["hidden_act"] not in ("silu", "swish"):
        problems.append(f"audio hidden_act {cfg['hidden_act']!r}")
    if cfg["residual_weight"] != 0.5:
        problems.append(f"audio residual_weight={cfg['residual_weight']}")
    c0, c1 = cfg["subsampling_conv_channels"]
    if c0 // 4 != HF_MEL_BINS // 4:  # HF sizes its input projection as (c0 // 4) * c1
        problems.append(f"audio subsampling_conv_channels[0]={c0} (HF needs {HF_MEL_BINS})")
    return AudioConfig(
        width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], ffn_dim=4 * cfg["hidden_size"],
        conv_kernel=cfg["conv_kernel_size"], subsampling_channels=(c0, c1),
        num_mel_bins=HF_MEL_BINS, chunk_size=cfg["attention_chunk_size"],
        context_left=cfg["attention_context_left"], context_right=cfg["attention_context_right"],
        logit_cap=float(cfg["attention_logit_cap"]), output_dim=cfg["output_proj_dims"],
        use_clipped_linears=bool(cfg["use_clipped_linears"]),
    )  # fmt: skip


def config_from_hf(config_json: Mapping[str, Any], name: str = "hf-gemma4") -> TransformerConfig:
    """Builds our Gemma 4 `TransformerConfig` (with its encoder configs) from a config.json.

    Raises:
      ValueError: listing every field our model does not support.
    """
    text = config_json.get("text_config") or config_json
    cfg = {**TEXT_DEFAULTS, **text}
    problems: list[str] = []
    _check_text(cfg, config_json, problems)
    types = _layer_types(cfg, problems)
    rope = _rope(cfg, problems)
    global_head_dim, global_kv = _global_overrides(cfg, types, problems) if types else (0, None)
    moe = None
    if cfg["enable_moe_block"]:
        moe = MoEConfig(num_experts=cfg["num_experts"], top_k=cfg["top_k_experts"],
                        expert_hidden_dim=cfg["moe_intermediate_size"])  # fmt: skip
    shared = cfg["num_kv_shared_layers"]
    vision = vision_config_from_hf(config_json.get("vision_config"), problems)
    audio = audio_config_from_hf(config_json.get("audio_config"), problems)
    if problems:
        raise ValueError(f"Unsupported Hugging Face Gemma 4 config: {'; '.join(problems)}")
    return TransformerConfig(
        name=name, family=4, num_embed=cfg["vocab_size"], embed_dim=cfg["hidden_size"],
        hidden_dim=cfg["intermediate_size"], num_heads=cfg["num_attention_heads"],
        head_dim=cfg["head_dim"], num_kv_heads=cfg["num_key_value_heads"],
        attention_types=types,
        sliding_window_size=(
            cfg["sliding_window"] if AttentionType.LOCAL_SLIDING in types else None
        ),
        query_pre_attn_scalar=1.0, final_logit_softcap=cfg["final_logit_softcapping"],
        use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        transpose_gating_einsum=True,
        local_base_frequency=_number(rope["local"]), global_base_frequency=_number(rope["global"]),
        global_rope_proportion=rope["proportion"], global_head_dim=global_head_dim,
        num_global_kv_heads=global_kv, k_eq_v=bool(cfg["attention_k_eq_v"]),
        per_layer_input_dim=cfg["hidden_size_per_layer_input"] or 0,
        num_kv_shared_layers=shared,
        shared_layer_hidden_dim=(
            2 * cfg["intermediate_size"] if cfg["use_double_wide_mlp"] and shared else None
        ),
        moe=moe, bidirectional_vision=cfg["use_bidirectional_attention"] == "vision",
        vision=vision, audio=audio,
    )  # fmt: skip


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
