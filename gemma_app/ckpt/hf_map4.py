"""Hugging Face Gemma 4 checkpoints <-> our parameter tree, in pure numpy.

The Gemma 4 counterpart of `hf_map` (which keeps Gemma 1/2/3): a declarative list of `Rule`s,
one per leaf of our tree (spec §2.1), each naming the HF tensors it is built from
(transformers 5.23 `modeling_gemma4.py`, `Gemma4ForConditionalGeneration` state dict). Names
below drop the `model.` prefix; `nn.Linear.weight` is `[out, in]`; D = embed, N = heads,
K = KV heads, H = head width (global layers: `global_head_dim`), F = MLP width, P = PLE width,
L = layers, E = experts, I = expert width.

Text decoder (`language_model.`; `model.` for a `Gemma4ForCausalLM`), layer `i`:

| HF `layers.{i}.`                                  | ours `layer_{i}/`                         |
|---------------------------------------------------|-------------------------------------------|
| `self_attn.q_proj` `(N*H, D)`                     | `attn/q_einsum/w` `(N, D, H)`             |
| `self_attn.{k,v}_proj` `(K*H, D)`                 | `attn/kv_einsum/w` `(2, K, D, H)`         |
| `self_attn.k_proj` (k_eq_v global layers)         | `attn/k_einsum/w` `(K, D, H)`             |
| `self_attn.o_proj` `(D, N*H)`                     | `attn/attn_vec_einsum/w` `(N, H, D)`      |
| `self_attn.q_norm` / `k_norm` `(H,)`              | `attn/query_norm/scale` / `key_norm`      |
| `input_layernorm` / `post_attention_layernorm`    | `pre_attention_norm` / `post_attention_norm` |
| `pre_feedforward_layernorm` / `post_feedforward_layernorm` | `pre_ffw_norm` / `post_ffw_norm` |
| `mlp.{gate,up}_proj` `(F, D)`, `mlp.down_proj`    | `mlp/gating_einsum` `(2, F, D)`, `mlp/linear` `(F, D)` |
| `layer_scalar` `(1,)`                             | `skip_scale` `(1,)`                       |
| `per_layer_input_gate` `(P, D)` / `per_layer_projection` `(D, P)` | `per_layer_input_gate/w` `(D, P)` / `per_layer_projection/w` `(P, D)` |
| `post_per_layer_input_norm`                       | `post_per_layer_input_norm/scale`         |

MoE layers (26B-A4B: every layer). HF's `mlp` is the dense branch (our `mlp2`), `_1` norms
belong to it and `_2` norms to the experts (spec §1.4 names the expert branch `mlp`):
`pre_feedforward_layernorm` = `pre_ffw2_norm`, `post_feedforward_layernorm_1` = `post_ffw2_norm`,
`pre_feedforward_layernorm_2` = `pre_ffw_norm`, `post_feedforward_layernorm_2` = `post_ffw1_norm`,
`router.proj` `(E, D)` = `mlp/router_logits/w` `(D, E)`, `router.scale` = `mlp/router_scale`,
`router.per_expert_scale` = `mlp/per_expert_scale`, `experts.gate_up_proj` `(E, 2I, D)` =
`mlp/gating_einsum/w` `(E, 2, I, D)` (gate rows first, as HF's `chunk(2)`), `experts.down_proj`
`(E, D, I)` = `mlp/linear/w` `(E, I, D)`.

Model level: `embed_tokens` = `embedder/input_embedding`, `norm` = `final_norm/scale`,
`embed_tokens_per_layer` `(V, L*P)` = `embedder/per_layer_embeddings` `(V, L, P)`,
`per_layer_model_projection` `(L*P, D)` = `embedder/per_layer_model_projection/w` `(D, L, P)`,
`per_layer_projection_norm` = `embedder/per_layer_projection_norm/scale`. Norm weights are the
plain multiplier on both sides (Gemma 4 has no `1 +`), so they are copied unchanged.

KV-shared layers (E2B/E4B, the last `num_kv_shared_layers`): HF stores no `k_proj`, `v_proj`,
`k_norm` for them; the official tree still has `kv_einsum` and `key_norm` there (spec §1.4),
which the computation never reads (K/V come from the source layer). Loading HF fills them with
zeros; writing HF drops them. This is the one place where a round trip HF -> ours -> HF is not
the identity in both directions.

Image encoder (`vision_tower.`) -> `vision_encoder/`: `patch_embedder.input_proj` `(d, 3p^2)` =
`entry/input_projection/w` `(3p^2, d)`; `patch_embedder.position_embedding_table` `(2, S, d)` =
`entry/pos_emb` `(S, 2, d)`; `std_bias` / `std_scale` = `standardize/bias` / `scale`; layer `l` of
`encoder.layers` is slice `l` of every `transformer/stacked_layers/block/` leaf: `self_attn.
{q,k,v,o}_proj.linear` and `mlp.{gate,up,down}_proj.linear` as in the text table, the norms
(`input_layernorm` = `pre_attention_norm`, ...), `q_norm`/`k_norm` = `attn/query_norm`/`key_norm`,
and each clipped linear's `input_min`, `input_max`, `output_min`, `output_max` scalars =
`<einsum>/clip_input_min`, ... (one set for `kv_einsum` and `gating_einsum`: HF's two copies
must be equal). `embed_vision.embedding_projection` `(D, d)` = `embedder/mm_input_projection/w`.

Audio encoder (`audio_tower.`) -> `audio_encoder/` (names of spec §2.1):
`subsample_conv_projection.layer{0,1}.conv` (OIHW) = `feature/subsampling_{0,1}/kernel` (HWIO),
`.norm` = `feature/norm_{0,1}/scale`, `input_proj_linear` `(W, F'*C)` = `feature/input_proj/kernel`
`(F', C, W)`; `layers.{i}.` -> `conformer/stacked_layers_{i}/`: `feed_forward{1,2}` =
`fflayer_{start,end}` (`ffw_layer_{1,2}` = `ffn_layer{1,2}`, `{pre,post}_layer_norm`),
`norm_pre_attn`/`norm_post_attn` = `trans_atten/{pre,post}_norm`, `self_attn.{q,k,v}_proj` =
`trans_atten/self_atten/{query,key,value}/kernel` `(W, N*H)`, `self_attn.per_dim_scale`,
`self_attn.relative_k_proj` = `.../relative_position_embedding/pos_proj/kernel` `(W, N, H)`,
`self_attn.post` = `trans_atten/post/kernel` `(N, H, W)`, `lconv1d.{pre_layer_norm,linear_start,
depthwise_conv1d,conv_norm,linear_end}` = `lconv/{ln,linear_start,depthwise_conv1d,conv_norm,
linear_end}`, `norm_out` = `final_ln`; `output_proj` = `output_projection/{kernel,bias}`;
`embed_audio.embedding_projection` `(D, 1536)` = `embedder/audio_input_projection/w`.
Clip scalars as for vision (shape `()` per layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from gemma_app.ckpt.errors import CheckpointMismatchError
from gemma_app.nn.config import AttentionType, TransformerConfig

TEXT_PREFIXES = ("model.language_model.", "model.")
VISION_PREFIX = "model.vision_tower."
AUDIO_PREFIX = "model.audio_tower."
VISION_EMBED = "model.embed_vision.embedding_projection.weight"
AUDIO_EMBED = "model.embed_audio.embedding_projection.weight"
_TEXT = "model.language_model."  # rules hold this prefix; `model.` files are renamed to it
CLIPS = ("input_min", "input_max", "output_min", "output_max")
_VISION_BLOCK = "vision_encoder/transformer/stacked_layers/block/"
Arrays = Sequence[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One leaf of our tree and the HF tensors it is built from.

    Attributes:
      ours: '/'-joined path in our tree.
      our_shape: its shape.
      hf: HF name -> shape, in the order `to_ours` takes them (empty: HF has no such tensor
        and the leaf is zero-filled, see the module docstring).
      to_ours: HF arrays -> our leaf.
      to_hf: our leaf -> HF arrays (same order as `hf`).
      copies: the HF tensors are copies of one leaf (clip bounds): loading checks them equal.
    """

    ours: str
    our_shape: tuple[int, ...]
    hf: dict[str, tuple[int, ...]]
    to_ours: Callable[[Arrays], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]
    copies: bool = False


def _one(ours, shape, name, hf_shape, f=lambda a: a, g=lambda a: a) -> Rule:
    return Rule(ours, tuple(shape), {name: tuple(hf_shape)}, lambda xs: f(xs[0]), lambda x: [g(x)])


def _stack(ours, shape, names, hf_shape, f=lambda a: a, g=lambda a: a) -> Rule:
    """Our leaf stacks the HF tensors `names` along a new leading axis (k/v, gate/up)."""
    hf = {name: tuple(hf_shape) for name in names}
    return Rule(ours, tuple(shape), hf, lambda xs: np.stack([f(x) for x in xs]),
                lambda x: [g(part) for part in x])  # fmt: skip


def _copies(ours, names, shape=()) -> Rule:
    """One leaf of ours stored as several equal HF tensors (a fused einsum's clip bound)."""
    hf = {name: tuple(shape) for name in names}
    return Rule(ours, tuple(shape), hf, lambda xs: xs[0], lambda x: [x] * len(names), copies=True)


def _zeros(ours, shape) -> Rule:
    return Rule(ours, tuple(shape), {}, lambda xs: np.zeros(shape, np.float32), lambda x: [])


def _by_layer(ours: str, per_layer: list[Rule]) -> Rule:
    """Our leaf `ours` stacks one rule per layer along a leading layer axis."""
    counts = [len(r.hf) for r in per_layer]
    hf = {name: shape for r in per_layer for name, shape in r.hf.items()}

    def to_ours(xs: Arrays) -> np.ndarray:
        out, start = [], 0
        for rule, n in zip(per_layer, counts, strict=True):
            out.append(rule.to_ours(xs[start : start + n]))
            start += n
        return np.stack(out)

    def to_hf(x: np.ndarray) -> list[np.ndarray]:
        return [a for rule, part in zip(per_layer, x, strict=True) for a in rule.to_hf(part)]

    shape = (len(per_layer), *per_layer[0].our_shape)
    return Rule(ours, shape, hf, to_ours, to_hf, copies=per_layer[0].copies)


def _heads_in(heads: int, head_dim: int):
    """HF `(heads*H, D)` <-> ours `(heads, D, H)`."""
    return (lambda w: w.reshape(heads, head_dim, -1).transpose(0, 2, 1),
            lambda w: w.transpose(0, 2, 1).reshape(heads * head_dim, -1))  # fmt: skip


def _heads_out(heads: int, head_dim: int):
    """HF `(D, N*H)` <-> ours `(N, H, D)`."""
    return (lambda w: w.T.reshape(heads, head_dim, -1),
            lambda w: w.reshape(heads * head_dim, -1).T)  # fmt: skip


_T = (lambda w: w.T, lambda w: w.T)


# --- the text decoder ---------------------------------------------------------------------


def _is_global(config: TransformerConfig, i: int) -> bool:
    return config.attention_types[i] == AttentionType.GLOBAL


def layer_head_dim(config: TransformerConfig, i: int) -> int:
    if _is_global(config, i) and config.global_head_dim is not None:
        return config.global_head_dim
    return config.head_dim


def layer_kv_heads(config: TransformerConfig, i: int) -> int:
    if _is_global(config, i) and config.num_global_kv_heads is not None:
        return config.num_global_kv_heads
    return config.num_kv_heads


def is_kv_shared(config: TransformerConfig, i: int) -> bool:
    """True for the last `num_kv_shared_layers` layers (they reuse an earlier layer's K/V)."""
    return i >= config.num_layers - config.num_kv_shared_layers


def layer_hidden_dim(config: TransformerConfig, i: int) -> int:
    if is_kv_shared(config, i) and config.shared_layer_hidden_dim is not None:
        return config.shared_layer_hidden_dim
    return config.hidden_dim


def _attention_rules(config: TransformerConfig, i: int, hf: str, ours: str) -> list[Rule]:
    d, n = config.embed_dim, config.num_heads
    h, k = layer_head_dim(config, i), layer_kv_heads(config, i)
    rules = [
        _one(f"{ours}q_einsum/w", (n, d, h), f"{hf}q_proj.weight", (n * h, d), *_heads_in(n, h)),
        _one(
            f"{ours}attn_vec_einsum/w",
            (n, h, d),
            f"{hf}o_proj.weight",
            (d, n * h),
            *_heads_out(n, h),
        ),  # fmt: skip
        _one(f"{ours}query_norm/scale", (h,), f"{hf}q_norm.weight", (h,)),
    ]
    k_eq_v = config.k_eq_v and _is_global(config, i)
    if k_eq_v:
        kv = _one(f"{ours}k_einsum/w", (k, d, h), f"{hf}k_proj.weight", (k * h, d),
                  *_heads_in(k, h))  # fmt: skip
    else:
        names = [f"{hf}k_proj.weight", f"{hf}v_proj.weight"]
        kv = _stack(f"{ours}kv_einsum/w", (2, k, d, h), names, (k * h, d), *_heads_in(k, h))
    key_norm = _one(f"{ours}key_norm/scale", (h,), f"{hf}k_norm.weight", (h,))
    if is_kv_shared(config, i):
        kv, key_norm = _zeros(kv.ours, kv.our_shape), _zeros(key_norm.ours, (h,))
    return [*rules, kv, key_norm]


def _dense_mlp(ours: str, hf: str, f: int, d: int) -> list[Rule]:
    gate_up = [f"{hf}gate_proj.weight", f"{hf}up_proj.weight"]
    return [
        _stack(f"{ours}gating_einsum", (2, f, d), gate_up, (f, d)),
        _one(f"{ours}linear", (f, d), f"{hf}down_proj.weight", (d, f), *_T),
    ]


def _moe_rules(config: TransformerConfig, hf: str, ours: str) -> list[Rule]:
    d, e, i = config.embed_dim, config.moe.num_experts, config.moe.expert_hidden_dim
    return [
        _one(f"{ours}mlp/router_logits/w", (d, e), f"{hf}router.proj.weight", (e, d), *_T),
        _one(f"{ours}mlp/router_scale", (d,), f"{hf}router.scale", (d,)),
        _one(f"{ours}mlp/per_expert_scale", (e,), f"{hf}router.per_expert_scale", (e,)),
        _one(
            f"{ours}mlp/gating_einsum/w",
            (e, 2, i, d),
            f"{hf}experts.gate_up_proj",
            (e, 2 * i, d),
            lambda w: w.reshape(e, 2, i, d),
            lambda w: w.reshape(e, 2 * i, d),
        ),  # fmt: skip
        _one(
            f"{ours}mlp/linear/w",
            (e, i, d),
            f"{hf}experts.down_proj",
            (e, d, i),
            lambda w: w.transpose(0, 2, 1),
            lambda w: w.transpose(0, 2, 1),
        ),  # fmt: skip
    ]


def _layer_rules(config: TransformerConfig, i: int) -> list[Rule]:
    d, p = config.embed_dim, config.per_layer_input_dim
    hf, ours = f"{_TEXT}layers.{i}.", f"layer_{i}/"
    rules = _attention_rules(config, i, f"{hf}self_attn.", f"{ours}attn/")

    def norm(our_name: str, hf_name: str) -> None:
        rules.append(_one(f"{ours}{our_name}/scale", (d,), f"{hf}{hf_name}.weight", (d,)))

    norm("pre_attention_norm", "input_layernorm")
    norm("post_attention_norm", "post_attention_layernorm")
    norm("post_ffw_norm", "post_feedforward_layernorm")
    rules.append(_one(f"{ours}skip_scale", (1,), f"{hf}layer_scalar", (1,)))
    f = layer_hidden_dim(config, i)
    if config.moe is None:
        norm("pre_ffw_norm", "pre_feedforward_layernorm")
        rules += _dense_mlp(f"{ours}mlp/", f"{hf}mlp.", f, d)
    else:
        norm("pre_ffw2_norm", "pre_feedforward_layernorm")
        norm("post_ffw2_norm", "post_feedforward_layernorm_1")
        norm("pre_ffw_norm", "pre_feedforward_layernorm_2")
        norm("post_ffw1_norm", "post_feedforward_layernorm_2")
        rules += _dense_mlp(f"{ours}mlp2/", f"{hf}mlp.", f, d)
        rules += _moe_rules(config, hf, ours)
    if p:
        rules += [
            _one(
                f"{ours}per_layer_input_gate/w",
                (d, p),
                f"{hf}per_layer_input_gate.weight",
                (p, d),
                *_T,
            ),  # fmt: skip
            _one(
                f"{ours}per_layer_projection/w",
                (p, d),
                f"{hf}per_layer_projection.weight",
                (d, p),
                *_T,
            ),  # fmt: skip
        ]
        norm("post_per_layer_input_norm", "post_per_layer_input_norm")
    return rules


def text_rules(config: TransformerConfig) -> list[Rule]:
    """Every leaf of the Gemma 4 text decoder of `config`, with its HF tensors."""
    v, d, n, p = config.num_embed, config.embed_dim, config.num_layers, config.per_layer_input_dim
    rules = [_one("embedder/input_embedding", (v, d), f"{_TEXT}embed_tokens.weight", (v, d))]
    if p:
        rules += [
            _one("embedder/per_layer_embeddings", (v, n, p), f"{_TEXT}embed_tokens_per_layer.weight",
                 (v, n * p), lambda w: w.reshape(v, n, p), lambda w: w.reshape(v, n * p)),
            _one("embedder/per_layer_model_projection/w", (d, n, p),
                 f"{_TEXT}per_layer_model_projection.weight", (n * p, d),
                 lambda w: w.T.reshape(d, n, p), lambda w: w.reshape(d, n * p).T),
            _one("embedder/per_layer_projection_norm/scale", (p,),
                 f"{_TEXT}per_layer_projection_norm.weight", (p,)),
        ]  # fmt: skip
    for i in range(n):
        rules += _layer_rules(config, i)
    rules.append(_one("final_norm/scale", (d,), f"{_TEXT}norm.weight", (d,)))
    return rules


# --- the image encoder --------------------------------------------------------------------


def _clipped(ours: str, hf_names: list[str], clipped: bool) -> list[Rule]:
    """The clip-bound scalars of one clipped einsum fed by the HF linears `hf_names`."""
    if not clipped:
        return []
    return [_copies(f"{ours}clip_{c}", [f"{name}.{c}" for name in hf_names]) for c in CLIPS]


def _vision_layer(vc, hf: str) -> dict[str, Rule]:
    """Rules of one encoder block, keyed by our path under `transformer/stacked_layers/block/`."""
    w, n, h, f = vc.width, vc.num_heads, vc.head_dim, vc.mlp_dim
    a, m, clipped = f"{hf}self_attn.", f"{hf}mlp.", vc.use_clipped_linears
    rules = [
        _one("attn/q_einsum/w", (n, w, h), f"{a}q_proj.linear.weight", (n * h, w),
             *_heads_in(n, h)),
        _stack("attn/kv_einsum/w", (2, n, w, h), [f"{a}k_proj.linear.weight",
               f"{a}v_proj.linear.weight"], (n * h, w), *_heads_in(n, h)),
        _one("attn/attn_vec_einsum/w", (n, h, w), f"{a}o_proj.linear.weight", (w, n * h),
             *_heads_out(n, h)),
        _one("attn/query_norm/scale", (h,), f"{a}q_norm.weight", (h,)),
        _one("attn/key_norm/scale", (h,), f"{a}k_norm.weight", (h,)),
        _stack("mlp/gating_einsum/w", (2, f, w), [f"{m}gate_proj.linear.weight",
               f"{m}up_proj.linear.weight"], (f, w)),
        _one("mlp/linear/w", (f, w), f"{m}down_proj.linear.weight", (w, f), *_T),
    ]  # fmt: skip
    for ours, hf_name in (("pre_attention_norm", "input_layernorm"),
                          ("post_attention_norm", "post_attention_layernorm"),
                          ("pre_ffw_norm", "pre_feedforward_layernorm"),
                          ("post_ffw_norm", "post_feedforward_layernorm")):  # fmt: skip
        rules.append(_one(f"{ours}/scale", (w,), f"{hf}{hf_name}.weight", (w,)))
    rules += _clipped("attn/q_einsum/", [f"{a}q_proj"], clipped)
    rules += _clipped("attn/kv_einsum/", [f"{a}k_proj", f"{a}v_proj"], clipped)
    rules += _clipped("attn/attn_vec_einsum/", [f"{a}o_proj"], clipped)
    rules += _clipped("mlp/gating_einsum/", [f"{m}gate_proj", f"{m}up_proj"], clipped)
    rules += _clipped("mlp/linear/", [f"{m}down_proj"], clipped)
    return {r.ours: r for r in rules}


def vision_rules(config: TransformerConfig) -> list[Rule]:
    """Every leaf of `vision_encoder/` and `embedder/mm_input_projection/w` (Gemma 4 ViT)."""
    vc, d = config.vision, config.embed_dim
    w, s, patch = vc.width, vc.position_embedding_size, 3 * vc.patch_size**2
    hf = VISION_PREFIX
    rules = [
        _one("vision_encoder/entry/input_projection/w", (patch, w),
             f"{hf}patch_embedder.input_proj.weight", (w, patch), *_T),
        _one("vision_encoder/entry/pos_emb", (s, 2, w),
             f"{hf}patch_embedder.position_embedding_table", (2, s, w),
             lambda t: t.transpose(1, 0, 2), lambda t: t.transpose(1, 0, 2)),
    ]  # fmt: skip
    layers = [_vision_layer(vc, f"{hf}encoder.layers.{layer}.") for layer in range(vc.depth)]
    for path in layers[0]:
        rules.append(_by_layer(_VISION_BLOCK + path, [layer[path] for layer in layers]))
    if vc.standardize:
        rules.append(_one("vision_encoder/standardize/bias", (w,), f"{hf}std_bias", (w,)))
        rules.append(_one("vision_encoder/standardize/scale", (w,), f"{hf}std_scale", (w,)))
    rules.append(_one("embedder/mm_input_projection/w", (w, d), VISION_EMBED, (d, w), *_T))
    return rules


# --- the audio encoder --------------------------------------------------------------------


def _conv2d():  # HF OIHW <-> ours HWIO
    return (lambda k: k.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def _audio_layer(ac, i: int) -> list[Rule]:
    w, n, f = ac.width, ac.num_heads, ac.ffn_dim
    h, clipped = w // n, ac.use_clipped_linears
    hf, ours = f"{AUDIO_PREFIX}layers.{i}.", f"audio_encoder/conformer/stacked_layers_{i}/"
    rules: list[Rule] = []

    def norm(our_name: str, hf_name: str) -> None:
        rules.append(_one(f"{ours}{our_name}/scale", (w,), f"{hf}{hf_name}.weight", (w,)))

    def linear(our_name: str, hf_name: str, shape: tuple, hf_shape: tuple, *convert) -> None:
        convert = convert or _T
        rules.append(_one(f"{ours}{our_name}/kernel", shape, f"{hf}{hf_name}.linear.weight",
                          hf_shape, *convert))  # fmt: skip
        rules.extend(_clipped(f"{ours}{our_name}/", [f"{hf}{hf_name}"], clipped))

    for our_ff, hf_ff in (("fflayer_start", "feed_forward1"), ("fflayer_end", "feed_forward2")):
        norm(f"{our_ff}/pre_layer_norm", f"{hf_ff}.pre_layer_norm")
        norm(f"{our_ff}/post_layer_norm", f"{hf_ff}.post_layer_norm")
        linear(f"{our_ff}/ffn_layer1", f"{hf_ff}.ffw_layer_1", (w, f), (f, w))
        linear(f"{our_ff}/ffn_layer2", f"{hf_ff}.ffw_layer_2", (f, w), (w, f))
    norm("trans_atten/pre_norm", "norm_pre_attn")
    norm("trans_atten/post_norm", "norm_post_attn")
    for our_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        linear(f"trans_atten/self_atten/{our_name}", f"self_attn.{hf_name}", (w, n * h), (n * h, w))
    linear("trans_atten/post", "self_attn.post", (n, h, w), (w, n * h), *_heads_out(n, h))
    rules.append(_one(f"{ours}trans_atten/self_atten/per_dim_scale", (h,),
                      f"{hf}self_attn.per_dim_scale", (h,)))  # fmt: skip
    rules.append(_one(f"{ours}trans_atten/self_atten/relative_position_embedding/pos_proj/kernel",
                      (w, n, h), f"{hf}self_attn.relative_k_proj.weight", (n * h, w),
                      lambda k: k.T.reshape(w, n, h), lambda k: k.reshape(w, n * h).T))  # fmt: skip
    norm("lconv/ln", "lconv1d.pre_layer_norm")
    linear("lconv/linear_start", "lconv1d.linear_start", (w, 2 * w), (2 * w, w))
    k = ac.conv_kernel
    rules.append(_one(f"{ours}lconv/depthwise_conv1d/kernel", (k, 1, w),
                      f"{hf}lconv1d.depthwise_conv1d.weight", (w, 1, k),
                      lambda c: c.transpose(2, 1, 0), lambda c: c.transpose(2, 1, 0)))  # fmt: skip
    norm("lconv/conv_norm", "lconv1d.conv_norm")
    linear("lconv/linear_end", "lconv1d.linear_end", (w, w), (w, w))
    norm("final_ln", "norm_out")
    return rules


def audio_rules(config: TransformerConfig) -> list[Rule]:
    """Every leaf of `audio_encoder/` and `embedder/audio_input_projection/w`."""
    ac, d = config.audio, config.embed_dim
    w, (c0, c1), o = ac.width, ac.subsampling_channels, ac.output_dim
    freq = ac.num_mel_bins // 4  # two stride-2 convolutions
    hf, ours = f"{AUDIO_PREFIX}subsample_conv_projection.", "audio_encoder/feature/"
    rules = [
        _one(f"{ours}subsampling_0/kernel", (3, 3, 1, c0), f"{hf}layer0.conv.weight",
             (c0, 1, 3, 3), *_conv2d()),
        _one(f"{ours}norm_0/scale", (c0,), f"{hf}layer0.norm.weight", (c0,)),
        _one(f"{ours}subsampling_1/kernel", (3, 3, c0, c1), f"{hf}layer1.conv.weight",
             (c1, c0, 3, 3), *_conv2d()),
        _one(f"{ours}norm_1/scale", (c1,), f"{hf}layer1.norm.weight", (c1,)),
        # HF flattens (freq, channel) with the channel fastest: row f*C + c.
        _one(f"{ours}input_proj/kernel", (freq, c1, w), f"{hf}input_proj_linear.weight",
             (w, freq * c1), lambda k: k.T.reshape(freq, c1, w),
             lambda k: k.reshape(freq * c1, w).T),
    ]  # fmt: skip
    for i in range(ac.depth):
        rules += _audio_layer(ac, i)
    rules += [
        _one("audio_encoder/output_projection/kernel", (w, o), f"{AUDIO_PREFIX}output_proj.weight",
             (o, w), *_T),
        _one("audio_encoder/output_projection/bias", (o,), f"{AUDIO_PREFIX}output_proj.bias", (o,)),
        _one("embedder/audio_input_projection/w", (o, d), AUDIO_EMBED, (d, o), *_T),
    ]  # fmt: skip
    return rules


# --- conversions --------------------------------------------------------------------------


def rules(config: TransformerConfig, *, vision: bool = False, audio: bool = False) -> list[Rule]:
    """Text rules, plus the encoders' when asked for (and `config` has them)."""
    out = text_rules(config)
    if vision and config.vision is not None:
        out += vision_rules(config)
    if audio and config.audio is not None:
        out += audio_rules(config)
    return out


def text_prefix(names: Iterable[str]) -> str | None:
    """`model.language_model.` (Gemma4ForConditionalGeneration) or `model.` (ForCausalLM)."""
    names = set(names)
    return next((p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in names), None)


def hf_name(rule_name: str, prefix: str) -> str:
    """A rule's HF name in a checkpoint whose text tensors start with `prefix`."""
    if rule_name.startswith(_TEXT):
        return prefix + rule_name.removeprefix(_TEXT)
    return rule_name


def is_encoder_tensor(name: str) -> bool:
    """HF tensors of the image / audio towers and their projections."""
    return name.startswith((VISION_PREFIX, AUDIO_PREFIX, "model.embed_vision.",
                            "model.embed_audio."))  # fmt: skip


def check(
    shapes: dict[str, tuple[int, ...]], config: TransformerConfig, *, vision: bool, audio: bool
) -> tuple[str | None, list[str]]:
    """(text prefix, every missing / unexpected / wrongly shaped tensor); reads nothing.

    Encoder tensors of an encoder that is not loaded are not "unexpected" (they are skipped).
    """
    prefix = text_prefix(shapes)
    if prefix is None:
        tried = ", ".join(f"{p}embed_tokens.weight" for p in TEXT_PREFIXES)
        return None, [f"none of {tried} found"]
    left = dict(shapes)
    problems = []
    for rule in rules(config, vision=vision, audio=audio):
        for name, shape in rule.hf.items():
            name = hf_name(name, prefix)
            if name not in left:
                problems.append(f"missing {name} (expected {shape})")
            elif (found := tuple(left.pop(name))) != shape:
                problems.append(f"{name}: shape {found}, expected {shape}")
    left.pop("lm_head.weight", None)  # tied: checked against the embedding by the loader
    problems += [
        f"unexpected {name} {tuple(shape)}"
        for name, shape in left.items()
        if not (is_encoder_tensor(name) and not _loaded(name, vision, audio))
    ]
    return prefix, problems


def _loaded(name: str, vision: bool, audio: bool) -> bool:
    if name.startswith((VISION_PREFIX, "model.embed_vision.")):
        return vision
    return audio


def convert_rule(rule: Rule, arrays: Arrays) -> np.ndarray:
    """Our leaf from its HF arrays; copies of one bound must be equal."""
    if rule.copies:
        per_layer = len(rule.hf) // (rule.our_shape[0] if rule.our_shape else 1)
        groups = [arrays[j : j + per_layer] for j in range(0, len(arrays), per_layer)]
        unequal = [j for j, group in enumerate(groups) if any(
            not np.array_equal(group[0], other) for other in group[1:])]  # fmt: skip
        if unequal:
            names = list(rule.hf)[unequal[0] * per_layer : (unequal[0] + 1) * per_layer]
            raise CheckpointMismatchError(
                f"{rule.ours} is one value in our model",
                [f"HF stores different values in {', '.join(names)}"],
            )
    leaf = rule.to_ours([np.asarray(a) for a in arrays])
    if leaf.shape != rule.our_shape:  # a bug in a rule, not in the checkpoint
        raise AssertionError(f"{rule.ours}: built {leaf.shape}, expected {rule.our_shape}")
    return leaf


def to_hf(
    flat: dict[str, np.ndarray], config: TransformerConfig, *, prefix: str = _TEXT,
    vision: bool = False, audio: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Our flat leaves -> HF state dict (without the tied `lm_head.weight`).

    Raises:
      CheckpointMismatchError: listing every missing or wrongly shaped leaf.
    """
    problems, state = [], {}
    for rule in rules(config, vision=vision, audio=audio):
        if rule.ours not in flat:
            problems.append(f"missing {rule.ours} (expected {rule.our_shape})")
            continue
        leaf = np.asarray(flat[rule.ours])
        if leaf.shape != rule.our_shape:
            problems.append(f"{rule.ours}: shape {leaf.shape}, expected {rule.our_shape}")
            continue
        for name, array in zip(rule.hf, rule.to_hf(leaf), strict=True):
            state[hf_name(name, prefix)] = np.asarray(array, order="C")  # keeps 0-d bounds
    if problems:
        raise CheckpointMismatchError(f"Parameters do not match {config.name}", problems)
    return state
