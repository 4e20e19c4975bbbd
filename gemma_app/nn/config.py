"""Model configuration: one frozen dataclass describes every Gemma 1/2/3 text decoder.

Values that can be derived (number of layers, query scale, whether Q/K/V share one einsum)
are properties, not stored fields, so a preset cannot contradict itself.
"""

from __future__ import annotations

import dataclasses
import enum
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
