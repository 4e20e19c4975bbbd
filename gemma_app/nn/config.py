"""Model configuration: one frozen dataclass describes every Gemma 1/2/3 text decoder.

`VisionConfig` describes the Gemma 3 SigLIP image encoder; a `TransformerConfig` with
`vision=None` is text-only (`dataclasses.replace(config, vision=None)` drops the encoder).

Values that can be derived (number of layers, query scale, whether Q/K/V share one einsum)
are properties, not stored fields, so a preset cannot contradict itself.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence


class AttentionType(enum.Enum):
    GLOBAL = "global"
    LOCAL_SLIDING = "local_sliding"


def make_attention_layers_types(
    pattern: Sequence[AttentionType], *, num_layers: int
) -> tuple[AttentionType, ...]:
    """Tiles `pattern` over `num_layers` (the last repetition may be cut short)."""
    pattern = tuple(pattern)
    reps, rest = divmod(num_layers, len(pattern))
    return pattern * reps + pattern[:rest]


L = AttentionType.LOCAL_SLIDING
G = AttentionType.GLOBAL
GEMMA2_PATTERN = (L, G)
GEMMA3_PATTERN = (L, L, L, L, L, G)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Architecture of the Gemma 3 SigLIP ViT image encoder and its soft-token pooling.

    The encoder sees a square `image_size` image as a `patches_per_side`**2 grid of
    `patch_size` patches, and `avg_pool`s the output grid down to `num_mm_tokens_per_image`
    soft tokens (Gemma 3: 896 px / 14 = 64x64 patches, pooled 4x4 to 16x16 = 256 tokens).

    Attributes:
      image_size: side of the square input image in pixels.
      patch_size: side of one square patch in pixels.
      width: ViT width, also the width of the soft tokens (1152 for So400m).
      depth: number of encoder blocks.
      mlp_dim: hidden width of each block's MLP.
      num_heads: attention heads; head width is `width // num_heads`.
      num_mm_tokens_per_image: soft tokens per image after pooling (a square number).
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_mm_tokens_per_image: int

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size")
        if self.width % self.num_heads:
            problems.append(f"width={self.width} is not a multiple of num_heads")
        side = math.isqrt(self.num_mm_tokens_per_image)
        if side * side != self.num_mm_tokens_per_image:
            problems.append(f"num_mm_tokens_per_image={self.num_mm_tokens_per_image} is not square")
        elif side == 0 or (self.image_size // self.patch_size) % side:
            problems.append(
                f"{self.image_size // self.patch_size} patches per side do not pool evenly to "
                f"{side} tokens per side"
            )
        if problems:
            raise ValueError(f"Bad VisionConfig: {'; '.join(problems)}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.num_mm_tokens_per_image)

    @property
    def pool_size(self) -> int:
        """Side of the avg-pool window (and its stride), in patches."""
        return self.patches_per_side // self.tokens_per_side


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of a Gemma 1/2/3 text decoder.

    Attributes:
      name: preset name, e.g. "gemma3-1b".
      family: Gemma generation (1, 2 or 3); selects the chat template and tokenizer tokens.
      num_embed: rows of the (tied) embedding table, V.
      embed_dim: model width, D.
      hidden_dim: GeGLU hidden width, F.
      num_heads: query heads, N.
      head_dim: per-head width, H.
      num_kv_heads: key/value heads, K (1 = MQA, N = MHA with a fused `qkv_einsum`).
      attention_types: one entry per layer.
      sliding_window_size: window W of local layers: a query sees itself and W-1 earlier tokens.
      query_pre_attn_scalar: queries are multiplied by `query_pre_attn_scalar ** -0.5`.
      attn_logits_soft_cap: `c * tanh(logits / c)` on attention logits (Gemma 2).
      final_logit_softcap: the same on the output logits (Gemma 2).
      use_post_attn_norm / use_post_ffw_norm: RMSNorm after attention / MLP (Gemma 2/3).
      use_qk_norm: RMSNorm of q and k over head_dim (Gemma 3).
      transpose_gating_einsum: MLP gate stored as (2, F, D) instead of (2, D, F).
      local_base_frequency / global_base_frequency: RoPE bases of local / global layers.
      local_scale_factor / global_scale_factor: RoPE positions are divided by this factor.
      vision: the SigLIP image encoder (Gemma 3 4B/12B/27B), or None for a text-only model.
    """

    name: str
    family: int
    num_embed: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    attention_types: tuple[AttentionType, ...]
    sliding_window_size: int | None = None
    query_pre_attn_scalar: float
    attn_logits_soft_cap: float | None = None
    final_logit_softcap: float | None = None
    use_post_attn_norm: bool = False
    use_post_ffw_norm: bool = False
    use_qk_norm: bool = False
    transpose_gating_einsum: bool = True
    local_base_frequency: int = 10_000
    global_base_frequency: int = 10_000
    local_scale_factor: float = 1.0
    global_scale_factor: float = 1.0
    vision: VisionConfig | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if AttentionType.LOCAL_SLIDING in self.attention_types and not self.sliding_window_size:
            raise ValueError(f"{self.name}: local layers need a sliding_window_size")

    @property
    def num_layers(self) -> int:
        return len(self.attention_types)

    @property
    def use_qkv_einsum(self) -> bool:
        """Official checkpoints fuse Q/K/V into one `qkv_einsum` whenever K == N."""
        return self.num_kv_heads == self.num_heads

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def rope_base_and_scale(self, attn_type: AttentionType) -> tuple[int, float]:
        if attn_type == AttentionType.LOCAL_SLIDING:
            return self.local_base_frequency, self.local_scale_factor
        return self.global_base_frequency, self.global_scale_factor
