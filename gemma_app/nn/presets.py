"""Named presets: one per released Gemma 1/2/3/4 text decoder, plus `tiny_*` ones for tests.

Gemma 3 4B/12B/27B carry the SigLIP image encoder (`vision=gemma3_vision()`, spec §7.1);
Gemma 4 E2B/E4B the small ViT and the conformer, 31B/26B-A4B the large ViT.

Constants follow `shared/reference/gemma_spec.md` §1.1 (read from google-deepmind/gemma's config
classes; Gemma 1 from the repository's history). No math here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from gemma_app.nn.config import (
    GEMMA2_PATTERN,
    GEMMA3_PATTERN,
    AttentionType,
    AudioConfig,
    Gemma4VisionConfig,
    MoEConfig,
    TransformerConfig,
    VisionConfig,
    make_attention_layers_types,
)

GEMMA1_VOCAB = 256_128  # 256000 sentencepiece pieces, table padded to a multiple of 128
GEMMA3_VOCAB = 262_144
_L, _G = AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL
GEMMA4_E2B_PATTERN = (_L, _L, _L, _L, _G)


def _gemma1(name: str, *, layers: int, d: int, f: int, heads: int, kv_heads: int):
    return TransformerConfig(
        name=name,
        family=1,
        num_embed=GEMMA1_VOCAB,
        embed_dim=d,
        hidden_dim=f,
        num_heads=heads,
        head_dim=256,
        num_kv_heads=kv_heads,
        attention_types=(AttentionType.GLOBAL,) * layers,
        query_pre_attn_scalar=256,
        transpose_gating_einsum=False,
    )


def _gemma2(name: str, *, layers, d, f, heads, kv_heads, head_dim, qscalar, transpose):
    return TransformerConfig(
        name=name,
        family=2,
        num_embed=GEMMA1_VOCAB,
        embed_dim=d,
        hidden_dim=f,
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=kv_heads,
        attention_types=make_attention_layers_types(GEMMA2_PATTERN, num_layers=layers),
        sliding_window_size=4096,
        query_pre_attn_scalar=qscalar,
        attn_logits_soft_cap=50.0,
        final_logit_softcap=30.0,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        transpose_gating_einsum=transpose,
    )


def _gemma3(
    name: str, *, layers, d, f, heads, kv_heads, head_dim, window, qscalar, rope_scale, vision=None
):
    return TransformerConfig(
        name=name,
        family=3,
        num_embed=GEMMA3_VOCAB,
        embed_dim=d,
        hidden_dim=f,
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=kv_heads,
        attention_types=make_attention_layers_types(GEMMA3_PATTERN, num_layers=layers),
        sliding_window_size=window,
        query_pre_attn_scalar=qscalar,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        global_scale_factor=rope_scale,
        vision=vision,
    )


def gemma3_vision() -> VisionConfig:
    """SigLIP So400m/14 at 896 px: 64x64 patches, avg-pooled 4x4 to 256 soft tokens."""
    return VisionConfig(
        image_size=896, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16,
        num_mm_tokens_per_image=256,
    )  # fmt: skip


def gemma4_vision_small() -> Gemma4VisionConfig:
    """The E2B/E4B image encoder: 768 wide, 16 blocks, clipped linears (spec §2.1)."""
    return Gemma4VisionConfig(
        width=768, depth=16, num_heads=12, head_dim=64, mlp_dim=3072, use_clipped_linears=True
    )


def gemma4_vision_large() -> Gemma4VisionConfig:
    """The 31B/26B-A4B image encoder: 1152 wide, 27 blocks, standardized output."""
    return Gemma4VisionConfig(
        width=1152, depth=27, num_heads=16, head_dim=72, mlp_dim=4304, standardize=True
    )


def gemma4_audio() -> AudioConfig:
    """The E2B/E4B conformer: 12 layers of 1024, 8 heads, output 1536 (spec §8)."""
    return AudioConfig()


def tiny_gemma4_vision() -> Gemma4VisionConfig:
    """A toy Gemma 4 ViT with the real patch (16) and pooling (3) sizes and a 36-token budget."""
    return Gemma4VisionConfig(
        width=32, depth=2, num_heads=2, head_dim=16, mlp_dim=64, position_embedding_size=128,
        max_soft_tokens=36, use_clipped_linears=True,
    )  # fmt: skip


def tiny_gemma4_audio() -> AudioConfig:
    """A toy conformer with the real mel features, subsampling and attention context.

    `ffn_dim = 4 * width` and 128 first-stage channels, because HF's Gemma4AudioConfig
    hard-codes both (so the parity golden can be built in transformers).
    """
    return AudioConfig(
        width=32, depth=2, num_heads=2, ffn_dim=128, subsampling_channels=(128, 4), output_dim=48
    )


def _gemma4(name: str, *, layers, pattern, d, f, heads, kv_heads, window, **extra):
    """Gemma 4 constants shared by every size (spec §1.1 and §1.4)."""
    return TransformerConfig(
        name=name,
        family=4,
        num_embed=GEMMA3_VOCAB,
        embed_dim=d,
        hidden_dim=f,
        num_heads=heads,
        head_dim=256,
        num_kv_heads=kv_heads,
        attention_types=make_attention_layers_types(pattern, num_layers=layers),
        sliding_window_size=window,
        query_pre_attn_scalar=1.0,  # no query scaling
        final_logit_softcap=30.0,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        global_head_dim=512,
        global_rope_proportion=0.25,
        **extra,
    )


def gemma1_2b() -> TransformerConfig:
    return _gemma1("gemma1-2b", layers=18, d=2048, f=16384, heads=8, kv_heads=1)


def gemma1_7b() -> TransformerConfig:
    return _gemma1("gemma1-7b", layers=28, d=3072, f=24576, heads=16, kv_heads=16)


def gemma2_2b() -> TransformerConfig:
    return _gemma2(
        "gemma2-2b", layers=26, d=2304, f=9216, heads=8, kv_heads=4, head_dim=256,
        qscalar=256, transpose=False,
    )  # fmt: skip


def gemma2_9b() -> TransformerConfig:
    return _gemma2(
        "gemma2-9b", layers=42, d=3584, f=14336, heads=16, kv_heads=8, head_dim=256,
        qscalar=256, transpose=True,
    )  # fmt: skip


def gemma2_27b() -> TransformerConfig:
    # 27B scales queries by (embed_dim / num_heads) ** -0.5 = 144 ** -0.5, not head_dim.
    return _gemma2(
        "gemma2-27b", layers=46, d=4608, f=36864, heads=32, kv_heads=16, head_dim=128,
        qscalar=4608 // 32, transpose=True,
    )  # fmt: skip


def gemma3_270m() -> TransformerConfig:
    return _gemma3(
        "gemma3-270m", layers=18, d=640, f=2048, heads=4, kv_heads=1, head_dim=256,
        window=512, qscalar=256, rope_scale=1.0,
    )  # fmt: skip


def gemma3_1b() -> TransformerConfig:
    return _gemma3(
        "gemma3-1b", layers=26, d=1152, f=6912, heads=4, kv_heads=1, head_dim=256,
        window=512, qscalar=256, rope_scale=1.0,
    )  # fmt: skip


def gemma3_4b() -> TransformerConfig:
    return _gemma3(
        "gemma3-4b", layers=34, d=2560, f=10240, heads=8, kv_heads=4, head_dim=256,
        window=1024, qscalar=256, rope_scale=8.0, vision=gemma3_vision(),
    )  # fmt: skip


def gemma3_12b() -> TransformerConfig:
    return _gemma3(
        "gemma3-12b", layers=48, d=3840, f=15360, heads=16, kv_heads=8, head_dim=256,
        window=1024, qscalar=256, rope_scale=8.0, vision=gemma3_vision(),
    )  # fmt: skip


def gemma3_27b() -> TransformerConfig:
    # Like Gemma 2 27B: queries scaled by (5376 / 32) ** -0.5 = 168 ** -0.5.
    return _gemma3(
        "gemma3-27b", layers=62, d=5376, f=21504, heads=32, kv_heads=16, head_dim=128,
        window=1024, qscalar=5376 // 32, rope_scale=8.0, vision=gemma3_vision(),
    )  # fmt: skip


def gemma4_e2b() -> TransformerConfig:
    # Layers 15-34 reuse the K/V of layer 13 (local) / 14 (global), with a double-wide MLP.
    return _gemma4(
        "gemma4-e2b", layers=35, pattern=GEMMA4_E2B_PATTERN, d=1536, f=6144, heads=8,
        kv_heads=1, window=512, per_layer_input_dim=256, num_kv_shared_layers=20,
        shared_layer_hidden_dim=12_288, vision=gemma4_vision_small(), audio=gemma4_audio(),
    )  # fmt: skip


def gemma4_e4b() -> TransformerConfig:
    return _gemma4(
        "gemma4-e4b", layers=42, pattern=GEMMA3_PATTERN, d=2560, f=10_240, heads=8, kv_heads=2,
        window=512, per_layer_input_dim=256, num_kv_shared_layers=18,
        vision=gemma4_vision_small(), audio=gemma4_audio(),
    )  # fmt: skip


def gemma4_31b() -> TransformerConfig:
    return _gemma4(
        "gemma4-31b", layers=60, pattern=GEMMA3_PATTERN, d=5376, f=21_504, heads=32,
        kv_heads=16, window=1024, num_global_kv_heads=4, k_eq_v=True,
        vision=gemma4_vision_large(), bidirectional_vision=True,
    )  # fmt: skip


def gemma4_26b_a4b() -> TransformerConfig:
    # `hidden_dim` is the dense branch (`mlp2`) beside 128 experts of width 704, top 8.
    return _gemma4(
        "gemma4-26b-a4b", layers=30, pattern=GEMMA3_PATTERN, d=2816, f=2112, heads=16,
        kv_heads=8, window=1024, num_global_kv_heads=2, k_eq_v=True,
        moe=MoEConfig(num_experts=128, top_k=8, expert_hidden_dim=704),
        vision=gemma4_vision_large(), bidirectional_vision=True,
    )  # fmt: skip


# Tiny presets: every feature of the family switched on at toy sizes, for tests and the demo.
# Small windows and few layers still exercise local/global mixing on 10-20 token prompts.


def tiny_gemma1_mqa(num_embed: int = 256) -> TransformerConfig:
    return TransformerConfig(
        name="tiny-gemma1-mqa", family=1, num_embed=num_embed, embed_dim=64, hidden_dim=128,
        num_heads=4, head_dim=16, num_kv_heads=1, attention_types=(AttentionType.GLOBAL,) * 2,
        query_pre_attn_scalar=16, transpose_gating_einsum=False,
    )  # fmt: skip


def tiny_gemma1_mha(num_embed: int = 256) -> TransformerConfig:
    return TransformerConfig(
        name="tiny-gemma1-mha", family=1, num_embed=num_embed, embed_dim=64, hidden_dim=128,
        num_heads=4, head_dim=16, num_kv_heads=4, attention_types=(AttentionType.GLOBAL,) * 2,
        query_pre_attn_scalar=16, transpose_gating_einsum=False,
    )  # fmt: skip


def tiny_gemma2(num_embed: int = 256) -> TransformerConfig:
    return TransformerConfig(
        name="tiny-gemma2", family=2, num_embed=num_embed, embed_dim=64, hidden_dim=128,
        num_heads=4, head_dim=16, num_kv_heads=2,
        attention_types=make_attention_layers_types(GEMMA2_PATTERN, num_layers=4),
        sliding_window_size=4, query_pre_attn_scalar=24, attn_logits_soft_cap=50.0,
        final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True,
        transpose_gating_einsum=True,
    )  # fmt: skip


def tiny_gemma3(num_embed: int = 256) -> TransformerConfig:
    return TransformerConfig(
        name="tiny-gemma3", family=3, num_embed=num_embed, embed_dim=64, hidden_dim=128,
        num_heads=4, head_dim=16, num_kv_heads=2,
        attention_types=make_attention_layers_types(GEMMA3_PATTERN, num_layers=6),
        sliding_window_size=4, query_pre_attn_scalar=16, use_post_attn_norm=True,
        use_post_ffw_norm=True, use_qk_norm=True, transpose_gating_einsum=True,
        local_base_frequency=10_000, global_base_frequency=1_000_000, global_scale_factor=8.0,
    )  # fmt: skip


def tiny_vision() -> VisionConfig:
    """A toy SigLIP: 112 px / 14 = 8x8 patches pooled 4x4 (the real kernel) to 2x2 = 4 tokens."""
    return VisionConfig(
        image_size=112, patch_size=14, width=32, depth=2, mlp_dim=64, num_heads=2,
        num_mm_tokens_per_image=4,
    )  # fmt: skip


def tiny_gemma3_vision(num_embed: int = 256) -> TransformerConfig:
    """`tiny_gemma3` plus `tiny_vision`: the multimodal golden (tests/golden) architecture."""
    return dataclasses.replace(
        tiny_gemma3(num_embed), name="tiny-gemma3-vision", vision=tiny_vision()
    )


def _tiny_gemma4(name: str, *, num_embed, pattern, layers, kv_heads, hidden_dim, **extra):
    return TransformerConfig(
        name=name, family=4, num_embed=num_embed, embed_dim=64, hidden_dim=hidden_dim, num_heads=4,
        head_dim=16, num_kv_heads=kv_heads,
        attention_types=make_attention_layers_types(pattern, num_layers=layers),
        sliding_window_size=4, query_pre_attn_scalar=1.0, final_logit_softcap=30.0,
        use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        transpose_gating_einsum=True, local_base_frequency=10_000,
        global_base_frequency=1_000_000, global_head_dim=32, global_rope_proportion=0.25,
        **extra,
    )  # fmt: skip


def tiny_gemma4(num_embed: int = 256) -> TransformerConfig:
    """E2B-style: PLE, GQA, KV sharing (layers 5-7 reuse 4 (local) and 3 (global)) with a
    double-wide MLP, wider global heads with partial RoPE, toy image and audio encoders."""
    return _tiny_gemma4(
        "tiny-gemma4", num_embed=num_embed, pattern=(_L, _L, _L, _G), layers=8, kv_heads=2,
        hidden_dim=96, per_layer_input_dim=8, num_kv_shared_layers=3, shared_layer_hidden_dim=192,
        vision=tiny_gemma4_vision(), audio=tiny_gemma4_audio(),
    )  # fmt: skip


def tiny_gemma4_moe(num_embed: int = 256) -> TransformerConfig:
    """26B-A4B-style: k_eq_v global layers with fewer KV heads, 8 experts top-2 beside the
    dense MLP, bidirectional attention within images on local layers."""
    return _tiny_gemma4(
        "tiny-gemma4-moe", num_embed=num_embed, pattern=GEMMA3_PATTERN, layers=6, kv_heads=2,
        hidden_dim=96, num_global_kv_heads=1, k_eq_v=True,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=16),
        vision=tiny_gemma4_vision(), bidirectional_vision=True,
    )  # fmt: skip


DEMO_VOCAB = 4096  # size of the project's own sentencepiece model in assets/


def tiny_demo(num_embed: int = DEMO_VOCAB) -> TransformerConfig:
    """The built-in demo: Gemma 3 architecture, random weights, the project's tokenizer."""
    return TransformerConfig(
        name="demo-tiny-gemma3", family=3, num_embed=num_embed, embed_dim=128, hidden_dim=512,
        num_heads=4, head_dim=32, num_kv_heads=1,
        attention_types=make_attention_layers_types(GEMMA3_PATTERN, num_layers=6),
        sliding_window_size=64, query_pre_attn_scalar=32, use_post_attn_norm=True,
        use_post_ffw_norm=True, use_qk_norm=True, transpose_gating_einsum=True,
        local_base_frequency=10_000, global_base_frequency=1_000_000, global_scale_factor=1.0,
    )  # fmt: skip


def tiny_demo_vision(num_embed: int = DEMO_VOCAB) -> TransformerConfig:
    """The built-in demo with a toy SigLIP encoder, so image uploads work on any laptop."""
    return dataclasses.replace(
        tiny_demo(num_embed), name="demo-tiny-gemma3-vision", vision=tiny_vision()
    )


PRESETS: dict[str, Callable[[], TransformerConfig]] = {
    "gemma1-2b": gemma1_2b,
    "gemma1-7b": gemma1_7b,
    "gemma2-2b": gemma2_2b,
    "gemma2-9b": gemma2_9b,
    "gemma2-27b": gemma2_27b,
    "gemma3-270m": gemma3_270m,
    "gemma3-1b": gemma3_1b,
    "gemma3-4b": gemma3_4b,
    "gemma3-12b": gemma3_12b,
    "gemma3-27b": gemma3_27b,
    "gemma4-e2b": gemma4_e2b,
    "gemma4-e4b": gemma4_e4b,
    "gemma4-31b": gemma4_31b,
    "gemma4-26b-a4b": gemma4_26b_a4b,
}

TINY_PRESETS: dict[str, Callable[..., TransformerConfig]] = {
    "tiny-gemma1-mqa": tiny_gemma1_mqa,
    "tiny-gemma1-mha": tiny_gemma1_mha,
    "tiny-gemma2": tiny_gemma2,
    "tiny-gemma3": tiny_gemma3,
    "tiny-gemma3-vision": tiny_gemma3_vision,
    "tiny-gemma4": tiny_gemma4,
    "tiny-gemma4-moe": tiny_gemma4_moe,
    "demo": tiny_demo,
    "demo-vision": tiny_demo_vision,
}


def get_preset(name: str) -> TransformerConfig:
    """Looks a preset up by name (`gemma3-1b`, `tiny-gemma3`, `demo`, ...)."""
    table = {**PRESETS, **TINY_PRESETS}
    if name not in table:
        raise ValueError(
            f"Unknown model preset {name!r}. Known presets: {', '.join(sorted(table))}"
        )
    return table[name]()
