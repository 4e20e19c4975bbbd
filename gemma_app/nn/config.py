"""Model configuration: one frozen dataclass describes every Gemma 1/2/3/4 text decoder.

`VisionConfig` describes the Gemma 3 SigLIP image encoder, `Gemma4VisionConfig` the Gemma 4
variable-aspect ViT and `AudioConfig` the Gemma 4 conformer; a `TransformerConfig` with
`vision=None` / `audio=None` is text-only (`dataclasses.replace(config, vision=None)` drops
the encoder).

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
class Gemma4VisionConfig:
    """Architecture of the Gemma 4 variable-aspect ViT (spec §7.2-7.3).

    Images keep their aspect ratio: they are resized to multiples of
    `patch_size * pooling_kernel` px so that at most `max_soft_tokens` soft tokens come out,
    cut into `patch_size` patches with 2-D positions, and pooled `pooling_kernel` x
    `pooling_kernel` by position.

    Attributes:
      width: ViT width d_v (768 on E2B/E4B, 1152 on 31B/26B); also the soft-token width.
      depth: encoder blocks (16 / 27).
      num_heads: attention heads.
      head_dim: per-head width (64 / 72).
      mlp_dim: GeGLU hidden width (3072 / 4304).
      patch_size: side of one patch in pixels (16).
      pooling_kernel: side of the position-based pooling window (3).
      position_embedding_size: rows of the factorized position table (10240).
      max_soft_tokens: soft-token budget per image (280).
      rope_base: base of the 2-D RoPE (100).
      use_clipped_linears: every linear clips its input and output to learned bounds (E2B/E4B).
      standardize: `(x - bias) * scale` on the pooled tokens (31B/26B).

    The encoder always sees `max_patches = max_soft_tokens * pooling_kernel**2` patches per
    image (real ones first, then padding) and pools them to `max_soft_tokens` cells, so the
    output length follows the budget (transformers' `output_length = patches // k**2`); the
    reference library's fixed `output_length=280` with a 1120 budget (spec §7.3) cannot happen.
    """

    width: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    patch_size: int = 16
    pooling_kernel: int = 3
    position_embedding_size: int = 10_240
    max_soft_tokens: int = 280
    rope_base: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False

    def __post_init__(self):
        problems = []
        if self.head_dim % 4:
            problems.append(f"head_dim={self.head_dim} is not a multiple of 4 (2-D RoPE)")
        if min(self.patch_size, self.pooling_kernel, self.max_soft_tokens) < 1:
            problems.append("patch_size, pooling_kernel and max_soft_tokens must be positive")
        elif self.max_patches_per_side > self.position_embedding_size:
            problems.append(
                f"a {self.max_patches_per_side}-patch side does not fit the "
                f"{self.position_embedding_size}-row position table"
            )
        if problems:
            raise ValueError(f"Bad Gemma4VisionConfig: {'; '.join(problems)}")

    @property
    def max_patches(self) -> int:
        """Patches per image the encoder sees (real + padding): `max_soft_tokens * k**2`."""
        return self.max_soft_tokens * self.pooling_kernel**2

    @property
    def patch_dim(self) -> int:
        """Values in one flattened RGB patch (768)."""
        return 3 * self.patch_size**2

    @property
    def max_patches_per_side(self) -> int:
        """Longest possible side in patches (a 1-cell-high strip of the whole budget)."""
        return self.max_soft_tokens * self.pooling_kernel


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Architecture of the Gemma 4 (E2B/E4B) conformer audio encoder (spec §8).

    Attributes:
      width: conformer width (1024).
      depth: conformer layers (12).
      num_heads: attention heads (8 x 128).
      ffn_dim: hidden width of the macaron feed-forward halves (4096).
      conv_kernel: causal depthwise convolution width (5).
      subsampling_channels: channels of the two stride-2 convolutions (128, 32). HF sizes
        `input_proj` as `(channels[0] // 4) * channels[1]`, so HF can only build configs
        whose first channel count equals `num_mel_bins`.
      num_mel_bins: log-mel features per frame (128).
      chunk_size / context_left / context_right: local attention blocks and their context
        (the checkpoint's names; see `attention_window` for the keys a frame sees).
      logit_cap: attention logit soft-cap (50).
      output_dim: width of the encoder output before the text-side projection (1536).
      use_clipped_linears: every linear clips its input and output to learned bounds.
      sample_rate: expected waveform rate in Hz (16000).
      max_tokens: soft tokens per clip at most (750, about 30 s).
    """

    width: int = 1024
    depth: int = 12
    num_heads: int = 8
    ffn_dim: int = 4096
    conv_kernel: int = 5
    subsampling_channels: tuple[int, int] = (128, 32)
    num_mel_bins: int = 128
    chunk_size: int = 12
    context_left: int = 13
    context_right: int = 0
    logit_cap: float = 50.0
    output_dim: int = 1536
    use_clipped_linears: bool = True
    sample_rate: int = 16_000
    max_tokens: int = 750

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"Bad AudioConfig: width={self.width} is not a multiple of num_heads")
        if self.context_right or self.context_left < 2:
            raise ValueError(
                "Bad AudioConfig: the local attention needs context_left >= 2, right 0"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def attention_window(self) -> int:
        """Keys per query, itself included: `context_left - 1` (12).

        Hugging Face keeps keys with `0 <= q - k < context_left - 1`; google-deepmind/gemma
        keeps one more (`<= context_left - 1`). We follow HF (see `gemma_app.nn.audio`).
        """
        return self.context_left - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The Gemma 4 26B-A4B mixture of experts that runs beside each layer's dense MLP.

    Attributes:
      num_experts: experts per layer (128).
      top_k: experts each token is routed to (8).
      expert_hidden_dim: GeGLU hidden width of one expert (704).
    """

    num_experts: int
    top_k: int
    expert_hidden_dim: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of a Gemma 1/2/3/4 text decoder.

    Attributes:
      name: preset name, e.g. "gemma3-1b".
      family: Gemma generation (1, 2, 3 or 4); selects the architecture, chat template and
        tokenizer tokens.
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
      vision: the image encoder (Gemma 3 4B/12B/27B: SigLIP; Gemma 4: `Gemma4VisionConfig`),
        or None for a text-only model.

    Gemma 4 only (family 4; spec §1.4). Norms there are `normed * scale` (no `1 +`), there is
    a value norm, no query scaling (`query_pre_attn_scalar=1.0`) and a learned per-layer
    `skip_scale`; these follow from `family` and are not separate fields.
      global_head_dim: head width of global layers (512); None = `head_dim`.
      num_global_kv_heads: KV heads of global layers; None = `num_kv_heads`.
      global_rope_proportion: fraction of the rotation pairs RoPE turns on global layers (0.25).
      k_eq_v: global layers have one `k_einsum` used for both keys and values (31B, 26B).
      per_layer_input_dim: width of the per-layer embeddings (PLE, 256 on E2B/E4B); 0 = none.
      num_kv_shared_layers: the last this-many layers reuse the KV cache of the last earlier
        layer of the same attention type (E2B: 20, E4B: 18).
      shared_layer_hidden_dim: MLP width of the KV-shared layers when it differs from
        `hidden_dim` (E2B's "double-wide" 12288); None = `hidden_dim`.
      moe: mixture of experts beside the dense MLP (26B-A4B), or None.
      bidirectional_vision: soft tokens of one image see each other on local layers (31B,
        26B); otherwise Gemma 4 attention is purely causal.
      audio: the conformer audio encoder (E2B/E4B), or None.
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
    vision: VisionConfig | Gemma4VisionConfig | None = None
    global_head_dim: int | None = None
    num_global_kv_heads: int | None = None
    global_rope_proportion: float = 1.0
    k_eq_v: bool = False
    per_layer_input_dim: int = 0
    num_kv_shared_layers: int = 0
    shared_layer_hidden_dim: int | None = None
    moe: MoEConfig | None = None
    bidirectional_vision: bool = False
    audio: AudioConfig | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if AttentionType.LOCAL_SLIDING in self.attention_types and not self.sliding_window_size:
            raise ValueError(f"{self.name}: local layers need a sliding_window_size")
        if self.family == 4:
            self._check_gemma4()

    def _check_gemma4(self):
        """Gemma 4 fields that cannot work together (collected, raised once)."""
        problems = []
        if self.num_heads % self.layer_kv_heads(AttentionType.GLOBAL):
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_global_kv_heads")
        if not 0.0 <= self.global_rope_proportion <= 1.0:
            problems.append(f"global_rope_proportion={self.global_rope_proportion} not in [0, 1]")
        if self.query_pre_attn_scalar != 1.0 or self.attn_logits_soft_cap is not None:
            problems.append("Gemma 4 has no query scaling and no attention softcap")
        if not (0 <= self.num_kv_shared_layers < self.num_layers):
            problems.append(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range")
        else:
            first_shared = self.num_layers - self.num_kv_shared_layers
            unshared = set(self.attention_types[:first_shared])
            if self.num_kv_shared_layers and unshared != set(self.attention_types):
                problems.append("every attention type of a KV-shared layer needs an earlier layer")
        if self.per_layer_input_dim < 0:
            problems.append(f"per_layer_input_dim={self.per_layer_input_dim} < 0")
        if self.moe is not None and not 0 < self.moe.top_k <= self.moe.num_experts:
            problems.append(f"top_k={self.moe.top_k} not in [1, {self.moe.num_experts}]")
        if problems:
            raise ValueError(f"{self.name}: {'; '.join(problems)}")

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

    def layer_head_dim(self, attn_type: AttentionType) -> int:
        """Head width H of one layer type (Gemma 4 global layers may be wider)."""
        if attn_type == AttentionType.GLOBAL and self.global_head_dim is not None:
            return self.global_head_dim
        return self.head_dim

    def layer_kv_heads(self, attn_type: AttentionType) -> int:
        """KV heads K of one layer type (Gemma 4 31B/26B global layers have fewer)."""
        if attn_type == AttentionType.GLOBAL and self.num_global_kv_heads is not None:
            return self.num_global_kv_heads
        return self.num_kv_heads

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V `layer` attends over: itself, or for the last
        `num_kv_shared_layers` layers the last earlier unshared layer of the same type."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.attention_types[layer]
        return max(j for j in range(first_shared) if self.attention_types[j] == kind)

    def layer_hidden_dim(self, layer: int) -> int:
        """MLP width F of one layer (E2B's KV-shared layers are double-wide)."""
        if self.shared_layer_hidden_dim is not None and self.kv_source(layer) != layer:
            return self.shared_layer_hidden_dim
        return self.hidden_dim

    def rope_base_and_scale(self, attn_type: AttentionType) -> tuple[int, float]:
        if attn_type == AttentionType.LOCAL_SLIDING:
            return self.local_base_frequency, self.local_scale_factor
        return self.global_base_frequency, self.global_scale_factor
