"""Hugging Face Gemma 1/2/3 checkpoints <-> our parameter tree, in pure numpy.

Hugging Face (`transformers`) stores a Gemma causal LM as a flat state dict of `nn.Linear`
weights; we use the official nested tree of google-deepmind/gemma (spec §2.1). This module is
the declarative key map between the two, shared by the golden-file script
(`scripts/make_golden.py`) and the safetensors loader.

Per layer `i` (HF names under `model.layers.{i}.`, ours under `layer_{i}/`), with
D = embed, N = heads, K = kv heads, H = head_dim, F = FFN hidden:

| HF (`nn.Linear.weight` is `[out, in]`)          | ours                                      |
|--------------------------------------------------|-------------------------------------------|
| `self_attn.q_proj` `(N*H, D)`                    | `attn/q_einsum/w` `(N, D, H)`             |
| `self_attn.{k,v}_proj` `(K*H, D)`                | `attn/kv_einsum/w` `(2, K, D, H)`         |
| `self_attn.{q,k,v}_proj` when K == N             | `attn/qkv_einsum/w` `(3, N, D, H)`        |
| `self_attn.o_proj` `(D, N*H)`                    | `attn/attn_vec_einsum/w` `(N, H, D)`      |
| `self_attn.q_norm` / `k_norm` `(H,)` (Gemma 3)   | `attn/_query_norm/scale` / `_key_norm`    |
| `input_layernorm`                                | `pre_attention_norm/scale`                |
| `post_attention_layernorm` (Gemma 2/3)           | `post_attention_norm/scale`               |
| `pre_feedforward_layernorm` (Gemma 2/3)          | `pre_ffw_norm/scale`                      |
| `post_attention_layernorm` (**Gemma 1**)         | `pre_ffw_norm/scale`                      |
| `post_feedforward_layernorm` (Gemma 2/3)         | `post_ffw_norm/scale`                     |
| `mlp.{gate,up}_proj` `(F, D)`                    | `mlp/gating_einsum` `(2, F, D)` / `(2, D, F)` |
| `mlp.down_proj` `(D, F)`                         | `mlp/linear` `(F, D)`                     |

plus `model.embed_tokens` = `embedder/input_embedding` `(V, D)` and `model.norm` =
`final_norm/scale`. Heads are the leading factor of HF's `N*H` axis (row `n*H + h`), as in
`transformers`' `view(..., -1, head_dim)`. Both sides store RMSNorm scales in the `(1 + scale)`
form, so norms are copied unchanged. HF never stores `lm_head.weight` for Gemma (tied to
`embed_tokens`); one that is present must equal the embedding.

State-dict prefixes accepted: `model.` (`Gemma*ForCausalLM`), `model.language_model.`
(`Gemma3ForConditionalGeneration` in memory) and `language_model.model.` (its original
safetensors layout). Vision-tower and projector weights are skipped here; their own map is the
last section of this module (`hf_vision_tensors_to_params`), and `check_hf_tensors` checks both
at once before anything is read.

Arrays keep their dtype (bf16 from `ml_dtypes` works); nothing here imports torch or jax.
Every problem (missing, unexpected, wrongly shaped key) is collected and raised once as a
`CheckpointMismatchError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from gemma_app.ckpt import hf_map4
from gemma_app.ckpt.errors import CheckpointMismatchError
from gemma_app.nn.config import AttentionType, TransformerConfig, VisionConfig

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
_SKIPPED_PREFIXES = (
    "model.vision_tower.",
    "vision_tower.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
)


# --- the key map --------------------------------------------------------------------------


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _heads_in(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """HF `(heads*H, D)` projections <-> ours `(heads, D, H)`."""

    def to_ours(w):
        return w.reshape(heads, head_dim, -1).transpose(0, 2, 1)

    def to_hf(w):
        return w.transpose(0, 2, 1).reshape(heads * head_dim, -1)

    return to_ours, to_hf


def _heads_out(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """HF `o_proj` `(D, N*H)` <-> ours `attn_vec_einsum` `(N, H, D)`."""

    def to_ours(w):
        return w.T.reshape(heads, head_dim, -1)

    def to_hf(w):
        return w.reshape(heads * head_dim, -1).T

    return to_ours, to_hf


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One leaf of our tree and the HF tensor(s) it comes from.

    Several HF tensors (k/v, gate/up) are stacked along a new leading axis of our leaf.
    """

    ours: str  # '/'-joined path in our tree
    our_shape: tuple[int, ...]
    hf: tuple[str, ...]  # HF names without the `model.` prefix
    hf_shape: tuple[int, ...]  # shape of each HF tensor
    to_ours: Callable[[np.ndarray], np.ndarray] = _same  # applied per HF tensor
    to_hf: Callable[[np.ndarray], np.ndarray] = _same  # its inverse


def _layer_rules(config: TransformerConfig, i: int) -> list[_Rule]:
    d, f, h = config.embed_dim, config.hidden_dim, config.head_dim
    n, k = config.num_heads, config.num_kv_heads
    rules: list[_Rule] = []

    def add(ours: str, our_shape: tuple, hf: Iterable[str], hf_shape: tuple, *convert) -> None:
        hf = tuple(f"layers.{i}.{name}.weight" for name in hf)
        rules.append(_Rule(f"layer_{i}/{ours}", our_shape, hf, hf_shape, *convert))

    def norm(ours: str, hf: str, dim: int = d) -> None:
        add(f"{ours}/scale", (dim,), [hf], (dim,))

    if config.use_qkv_einsum:
        qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        add("attn/qkv_einsum/w", (3, n, d, h), qkv, (n * h, d), *_heads_in(n, h))
    else:
        add("attn/q_einsum/w", (n, d, h), ["self_attn.q_proj"], (n * h, d), *_heads_in(n, h))
        kv = ["self_attn.k_proj", "self_attn.v_proj"]
        add("attn/kv_einsum/w", (2, k, d, h), kv, (k * h, d), *_heads_in(k, h))
    o_proj = ["self_attn.o_proj"]
    add("attn/attn_vec_einsum/w", (n, h, d), o_proj, (d, n * h), *_heads_out(n, h))
    if config.use_qk_norm:
        norm("attn/_query_norm", "self_attn.q_norm", h)
        norm("attn/_key_norm", "self_attn.k_norm", h)
    norm("pre_attention_norm", "input_layernorm")
    if config.use_post_attn_norm:  # Gemma 2/3: four norms per layer
        norm("post_attention_norm", "post_attention_layernorm")
        norm("pre_ffw_norm", "pre_feedforward_layernorm")
    else:  # Gemma 1: HF's "post_attention_layernorm" is the norm *before* the MLP
        norm("pre_ffw_norm", "post_attention_layernorm")
    if config.use_post_ffw_norm:
        norm("post_ffw_norm", "post_feedforward_layernorm")
    gate_up = ["mlp.gate_proj", "mlp.up_proj"]
    if config.transpose_gating_einsum:
        add("mlp/gating_einsum", (2, f, d), gate_up, (f, d))
    else:
        add("mlp/gating_einsum", (2, d, f), gate_up, (f, d), _transpose, _transpose)
    add("mlp/linear", (f, d), ["mlp.down_proj"], (d, f), _transpose, _transpose)
    return rules


def _rules(config: TransformerConfig) -> list[_Rule]:
    v, d = config.num_embed, config.embed_dim
    rules = [_Rule("embedder/input_embedding", (v, d), ("embed_tokens.weight",), (v, d))]
    for i in range(config.num_layers):
        rules += _layer_rules(config, i)
    rules.append(_Rule("final_norm/scale", (d,), ("norm.weight",), (d,)))
    return rules


def hf_param_shapes(config: TransformerConfig, prefix: str = "model.") -> dict[str, tuple]:
    """Every HF tensor name a checkpoint for `config` holds, with its shape."""
    return {f"{prefix}{name}": r.hf_shape for r in _rules(config) for name in r.hf}


def param_shapes(config: TransformerConfig) -> dict[str, tuple]:
    """Every text-decoder leaf of our tree for `config`, as flat '/'-joined paths, with its
    shape (Gemma 4: from `hf_map4.text_rules`)."""
    if config.family == 4:
        return {r.ours: r.our_shape for r in hf_map4.text_rules(config)}
    return {r.ours: r.our_shape for r in _rules(config)}


# --- tree helpers -------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a/b": x}`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a/b": x}` -> `{"a": {"b": x}}`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


# --- conversions --------------------------------------------------------------------------


def _text_prefix(names: Iterable[str]) -> str | None:
    names = set(names)
    return next((p for p in _TEXT_PREFIXES if f"{p}embed_tokens.weight" in names), None)


def hf_to_params(state_dict: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
    """Converts a Hugging Face Gemma state dict to our nested parameter tree.

    Args:
      state_dict: HF name -> array (numpy, or anything `np.asarray` takes).
      config: the architecture the checkpoint must match (see `config_from_hf`).

    Returns:
      The nested tree of spec §2.1, e.g. `params["layer_0"]["attn"]["q_einsum"]["w"]`.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or wrongly shaped tensor.
    """
    shapes = {name: tuple(np.shape(value)) for name, value in state_dict.items()}
    return hf_tensors_to_params(shapes, lambda name: np.asarray(state_dict[name]), config)


def hf_tensors_to_params(
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    config: TransformerConfig,
    *,
    convert: Callable[[str, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """`hf_to_params` over tensors read one at a time, for checkpoints larger than memory.

    Every name and shape is checked before any data is read, so a checkpoint of another
    model fails fast. Then each leaf of our tree is built from its HF tensor(s) and handed to
    `convert` (e.g. cast + device transfer) before the next one is read: at most one leaf's
    HF tensors are alive at a time besides what `convert` keeps.

    Args:
      shapes: HF name -> shape, for every tensor of the checkpoint.
      read: HF name -> numpy array (e.g. one `safetensors` `get_tensor`).
      config: the architecture the checkpoint must match.
      convert: `(our_path, numpy_leaf) -> leaf`; identity by default.

    Returns:
      Our nested tree of `convert`ed leaves.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or wrongly shaped tensor.
    """
    prefix, problems = _text_problems(shapes, read, config)
    if prefix is None:
        raise CheckpointMismatchError("Not a Gemma text checkpoint", problems)
    if problems:
        raise CheckpointMismatchError(f"HF state dict does not match {config.name}", problems)

    convert = convert or (lambda path, leaf: leaf)
    flat = {}
    for rule in _rules(config):
        arrays = [rule.to_ours(np.asarray(read(f"{prefix}{name}"))) for name in rule.hf]
        flat[rule.ours] = convert(rule.ours, arrays[0] if len(arrays) == 1 else np.stack(arrays))
    return unflatten_params(flat)


def _text_problems(
    shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], np.ndarray], config
) -> tuple[str | None, list[str]]:
    """(state-dict prefix, every problem of the text tensors); reads only a tied lm_head."""
    prefix = _text_prefix(shapes)
    if prefix is None:
        tried = ", ".join(f"{p}embed_tokens.weight" for p in _TEXT_PREFIXES)
        return None, [f"none of {tried} found"]
    problems: list[str] = []
    text, lm_head = {}, None
    for name, shape in shapes.items():
        if name.startswith(prefix):
            text[name[len(prefix) :]] = tuple(shape)
        elif name in _LM_HEAD_KEYS:
            lm_head = name
        elif not name.startswith(_SKIPPED_PREFIXES):
            problems.append(f"unexpected {name} {tuple(shape)}")

    embedding_ok = False
    for rule in _rules(config):
        ok = True
        for name in rule.hf:
            if name not in text:
                problems.append(f"missing {prefix}{name} (expected {rule.hf_shape})")
                ok = False
            elif (shape := text.pop(name)) != rule.hf_shape:
                problems.append(f"{prefix}{name}: shape {shape}, expected {rule.hf_shape}")
                ok = False
        embedding_ok |= ok and rule.ours == "embedder/input_embedding"
    problems += [f"unexpected {prefix}{n} {s}" for n, s in text.items()]
    embedding = f"{prefix}embed_tokens.weight"
    if lm_head and embedding_ok and not np.array_equal(read(lm_head), read(embedding)):
        problems.append("lm_head.weight differs from embed_tokens: our model ties them")
    return prefix, problems


def params_to_hf(
    params: Mapping[str, Any], config: TransformerConfig, prefix: str = "model."
) -> dict[str, np.ndarray]:
    """Converts our nested parameter tree to a Hugging Face Gemma state dict.

    Args:
      params: our nested tree (numpy or jax leaves).
      config: its architecture.
      prefix: `"model."` for `Gemma*ForCausalLM`, `"model.language_model."` for
        `Gemma3ForConditionalGeneration`.

    Returns:
      HF name -> C-contiguous numpy array, without the tied `lm_head.weight`.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or wrongly shaped leaf.
    """
    flat = flatten_params(params)
    problems: list[str] = []
    state_dict = {}
    for rule in _rules(config):
        if rule.ours not in flat:
            problems.append(f"missing {rule.ours} (expected {rule.our_shape})")
            continue
        leaf = np.asarray(flat.pop(rule.ours))
        if leaf.shape != rule.our_shape:
            problems.append(f"{rule.ours}: shape {leaf.shape}, expected {rule.our_shape}")
            continue
        parts = [leaf] if len(rule.hf) == 1 else list(leaf)
        for name, part in zip(rule.hf, parts, strict=True):
            state_dict[f"{prefix}{name}"] = np.ascontiguousarray(rule.to_hf(part))
    problems += [f"unexpected {path} {tuple(np.shape(v))}" for path, v in flat.items()]
    if problems:
        raise CheckpointMismatchError(f"Parameters do not match {config.name}", problems)
    return state_dict


# --- config.json --------------------------------------------------------------------------

# Class defaults of transformers 5.23 (`GemmaConfig`, `Gemma2Config`, `Gemma3TextConfig`):
# published config.json files omit fields equal to these (gemma-3-4b-it's `text_config` names
# only hidden size, FFN size, layers, window and rope scaling).
_HF_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(
        vocab_size=256_000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, rope_theta=10_000.0,
    ),
    2: dict(
        vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rope_theta=10_000.0,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    3: dict(
        vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
        sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
    ),
}  # fmt: skip
_FAMILIES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}
_ARCHITECTURES = {
    "GemmaForCausalLM": 1,
    "Gemma2ForCausalLM": 2,
    "Gemma3ForCausalLM": 3,
    "Gemma3ForConditionalGeneration": 3,
}
_LAYER_TYPES = {
    "sliding_attention": AttentionType.LOCAL_SLIDING,
    "full_attention": AttentionType.GLOBAL,
}


def _family(config_json: Mapping[str, Any]) -> int:
    if config_json.get("model_type") in _FAMILIES:
        return _FAMILIES[config_json["model_type"]]
    for arch in config_json.get("architectures") or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise ValueError(
        f"Not a Gemma 1/2/3 config: model_type={config_json.get('model_type')!r}, "
        f"architectures={config_json.get('architectures')!r}"
    )


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _rope(spec: Mapping[str, Any] | None, default_theta: float) -> tuple[int | float, float]:
    """(base, position scale factor) of one HF rope-parameters dict."""
    spec = dict(spec or {})
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"Unsupported rope_type {kind!r} (only 'default' and 'linear')")
    factor = float(spec.get("factor", 1.0)) if kind == "linear" else 1.0
    return _number(spec.get("rope_theta", default_theta)), factor


def _rope_bases(family: int, cfg: Mapping[str, Any]) -> dict[str, tuple[int | float, float]]:
    """RoPE (base, scale) for local and global layers, from either config format.

    Newer configs hold `rope_parameters` (Gemma 3: one dict per layer type); older ones hold
    `rope_theta` (+ Gemma 3's `rope_local_base_freq`) and `rope_scaling`, which HF applies to
    the global (`full_attention`) layers only.
    """
    params = cfg.get("rope_parameters") or {}
    if family == 3 and "full_attention" in params:
        local = _rope(params.get("sliding_attention"), cfg["rope_local_base_freq"])
        return {"local": local, "global": _rope(params["full_attention"], cfg["rope_theta"])}
    scaled = _rope(params or cfg.get("rope_scaling"), cfg["rope_theta"])
    if family < 3:  # one RoPE for every layer
        return {"local": scaled, "global": scaled}
    return {"local": _rope(None, cfg["rope_local_base_freq"]), "global": scaled}


def _layer_types(family: int, cfg: Mapping[str, Any]) -> tuple[AttentionType, ...]:
    n = cfg["num_hidden_layers"]
    names = cfg.get("layer_types")
    if names is None and family == 1:
        names = ["full_attention"] * n
    elif names is None:  # HF's rule: every `pattern`-th layer is global (Gemma 2: pattern 2)
        pattern = 2 if family == 2 else cfg["sliding_window_pattern"]
        names = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(names) != n or not set(names) <= set(_LAYER_TYPES):
        raise ValueError(f"Bad layer_types for {n} layers: {names}")
    return tuple(_LAYER_TYPES[name] for name in names)


def _check_supported(cfg: Mapping[str, Any], top: Mapping[str, Any]) -> None:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    # Gemma 1 configs say "gelu", which HF itself reads as the tanh approximation.
    problems = [f"activation {act!r}"] if act not in ("gelu", "gelu_pytorch_tanh") else []
    if cfg.get("rms_norm_eps", 1e-6) != 1e-6:
        problems.append(f"rms_norm_eps={cfg['rms_norm_eps']}")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=True")
    if cfg.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=True")
    if not top.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)):
        problems.append("tie_word_embeddings=False")
    if problems:
        raise ValueError(f"Unsupported Hugging Face Gemma config: {', '.join(problems)}")


def config_from_hf(
    config_json: Mapping[str, Any], *, transpose_gating_einsum: bool | None = None
) -> TransformerConfig:
    """Builds our `TransformerConfig` from a Hugging Face Gemma/Gemma2/Gemma3 `config.json`.

    Args:
      config_json: the parsed `config.json` (a `Gemma3ForConditionalGeneration` config is read
        from its `text_config`). Missing fields take transformers' class defaults.
      transpose_gating_einsum: layout of our `mlp/gating_einsum` leaf. HF does not have one;
        by default we follow the official Flax checkpoints: `(2, D, F)` for Gemma 1 and
        Gemma 2 2B (D = 2304), `(2, F, D)` otherwise.

    Returns:
      A config named `hf-gemma{1,2,3}`. `num_embed` is HF's `vocab_size`, which can differ
      from the Flax checkpoints (Gemma 1/2: 256000 vs 256128; Gemma 3 4B+: 262208 vs 262144).

    Raises:
      ValueError: not a Gemma 1/2/3 text config, or a feature our model lacks.
    """
    family = _family(config_json)
    text = config_json.get("text_config") or config_json
    cfg = {**_HF_DEFAULTS[family], **{k: v for k, v in text.items() if k != "rope_scaling"}}
    cfg["rope_scaling"] = text.get("rope_scaling")
    _check_supported(cfg, config_json)
    rope = _rope_bases(family, cfg)
    if transpose_gating_einsum is None:
        transpose_gating_einsum = not (family == 1 or (family == 2 and cfg["hidden_size"] == 2304))
    attention_types = _layer_types(family, cfg)
    local = AttentionType.LOCAL_SLIDING in attention_types
    # HF's Gemma 3 never applies attn_logit_softcapping, and its multimodal model never applies
    # final_logit_softcapping; mirror that instead of what the config says.
    multimodal = "text_config" in config_json
    return TransformerConfig(
        name=f"hf-gemma{family}",
        family=family,
        num_embed=cfg["vocab_size"],
        embed_dim=cfg["hidden_size"],
        hidden_dim=cfg["intermediate_size"],
        num_heads=cfg["num_attention_heads"],
        head_dim=cfg["head_dim"],
        num_kv_heads=cfg["num_key_value_heads"],
        attention_types=attention_types,
        sliding_window_size=cfg.get("sliding_window") if local else None,
        # Gemma 1 scales queries by head_dim ** -0.5 (HF: `self.scaling = head_dim**-0.5`).
        query_pre_attn_scalar=cfg["head_dim"] if family == 1 else cfg["query_pre_attn_scalar"],
        attn_logits_soft_cap=cfg.get("attn_logit_softcapping") if family == 2 else None,
        final_logit_softcap=(
            None if family == 1 or multimodal else cfg.get("final_logit_softcapping")
        ),
        use_post_attn_norm=family >= 2,
        use_post_ffw_norm=family >= 2,
        use_qk_norm=family == 3,
        transpose_gating_einsum=transpose_gating_einsum,
        local_base_frequency=rope["local"][0],
        global_base_frequency=rope["global"][0],
        local_scale_factor=rope["local"][1],
        global_scale_factor=rope["global"][1],
        vision=vision_config_from_hf(config_json),
    )


# ==========================================================================================
# --- vision tower (Gemma 3 SigLIP) and the multimodal projector ----------------------------
# ==========================================================================================
#
# A separate map: the text functions above skip these tensors, so text-only loading never
# reads them. A full multimodal load is `hf_to_params` + `hf_vision_to_params`, merged:
#
#   params = hf_to_params(sd, config)
#   vision = hf_vision_to_params(sd, config)
#   params["vision_encoder"] = vision["vision_encoder"]
#   params["embedder"].update(vision["embedder"])
#
# HF names under `vision_tower.vision_model.` (SigLIP), W = width, N = heads, H = head width,
# F = MLP width, P = patch, G*G = patches; ours under `vision_encoder/siglip_encoder/`:
#
# | HF                                                 | ours                                     |
# |----------------------------------------------------|------------------------------------------|
# | `embeddings.patch_embedding.weight` `(W, 3, P, P)` | `embedding/kernel` `(P, P, 3, W)` (HWIO) |
# | `embeddings.patch_embedding.bias` `(W,)`           | `embedding/bias`                         |
# | `embeddings.position_embedding.weight` `(G*G, W)`  | `pos_embedding` `(1, G*G, W)`            |
# | `encoder.layers.{i}.layer_norm1.{weight,bias}`     | `Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}` |
# | `...self_attn.{q,k,v}_proj.weight` `(N*H, W)`      | `.../MultiHeadDotProductAttention_0/{query,key,value}/kernel` `(W, N, H)` |
# | `...self_attn.{q,k,v}_proj.bias` `(N*H,)`          | `.../{query,key,value}/bias` `(N, H)`    |
# | `...self_attn.out_proj.weight` `(W, N*H)`          | `.../out/kernel` `(N, H, W)`             |
# | `...self_attn.out_proj.bias` `(W,)`                | `.../out/bias`                           |
# | `...layer_norm2.{weight,bias}`                     | `.../LayerNorm_1/{scale,bias}`           |
# | `...mlp.fc1.weight` `(F, W)`, `.bias`              | `.../MlpBlock_0/Dense_0/kernel` `(W, F)`, `bias` |
# | `...mlp.fc2.weight` `(W, F)`, `.bias`              | `.../MlpBlock_0/Dense_1/kernel` `(F, W)`, `bias` |
# | `post_layernorm.{weight,bias}`                     | `Transformer/encoder_norm/{scale,bias}`  |
#
# and under `multi_modal_projector.`: `mm_input_projection_weight` `(W, D)` (used as
# `x @ weight`, not an `nn.Linear`) = `embedder/mm_input_projection/w` unchanged, and
# `mm_soft_emb_norm.weight` `(W,)` = `embedder/mm_soft_embedding_norm/scale` (both `(1 + w)`).
# LayerNorm weights are plain multipliers on both sides (no `1 +`).
#
# The roots of these names differ between the published files and transformers versions;
# `VISION_LAYOUTS` names them (SigLIP root, projector root). Rules hold the "safetensors" form.

VISION_LAYOUTS: dict[str, tuple[str, str]] = {
    # Published Gemma 3 safetensors (and transformers 4.50/4.51 in memory).
    "safetensors": ("vision_tower.vision_model.", "multi_modal_projector."),
    # `Gemma3ForConditionalGeneration.state_dict()` in transformers 4.52 - 4.x.
    "transformers4": ("model.vision_tower.vision_model.", "model.multi_modal_projector."),
    # ... and in transformers 5 (SiglipVisionModel lost its inner `vision_model`).
    "transformers": ("model.vision_tower.", "model.multi_modal_projector."),
}
_SIGLIP, _PROJECTOR = VISION_LAYOUTS["safetensors"]
_OUR_SIGLIP = "vision_encoder/siglip_encoder/"


def _in_layout(name: str, layout: str) -> str:
    """A rule's (safetensors-form) HF name under another layout's roots."""
    siglip, projector = VISION_LAYOUTS[layout]
    if name.startswith(_SIGLIP):
        return siglip + name.removeprefix(_SIGLIP)
    return projector + name.removeprefix(_PROJECTOR)


def _vision_config(config: TransformerConfig):
    if config.vision is None:
        raise ValueError(f"{config.name} has no vision encoder (config.vision is None)")
    return config.vision


def _conv_kernel(w: np.ndarray) -> np.ndarray:  # HF OIHW -> HWIO
    return w.transpose(2, 3, 1, 0)


def _conv_kernel_hf(w: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
    return w.transpose(3, 2, 0, 1)


def _vision_rules(config: TransformerConfig) -> list[_Rule]:
    """One rule per leaf of `vision_encoder/...` and the two `embedder/mm_*` leaves."""
    vc = _vision_config(config)
    w, n, h, f, p = vc.width, vc.num_heads, vc.head_dim, vc.mlp_dim, vc.patch_size
    rules: list[_Rule] = []

    def add(ours: str, our_shape: tuple, hf: str, hf_shape: tuple, *convert) -> None:
        rules.append(_Rule(_OUR_SIGLIP + ours, our_shape, (_SIGLIP + hf,), hf_shape, *convert))

    def layer_norm(ours: str, hf: str) -> None:
        add(f"{ours}/scale", (w,), f"{hf}.weight", (w,))
        add(f"{ours}/bias", (w,), f"{hf}.bias", (w,))

    def reshape(ours: tuple, hf: tuple) -> tuple[Callable, Callable]:
        return (lambda a: a.reshape(ours)), (lambda a: a.reshape(hf))

    heads_in = (lambda a: a.T.reshape(w, n, h)), (lambda a: a.reshape(w, n * h).T)
    heads_out = (lambda a: a.T.reshape(n, h, w)), (lambda a: a.reshape(n * h, w).T)

    add("embedding/kernel", (p, p, 3, w), "embeddings.patch_embedding.weight", (w, 3, p, p),
        _conv_kernel, _conv_kernel_hf)  # fmt: skip
    add("embedding/bias", (w,), "embeddings.patch_embedding.bias", (w,))
    add("pos_embedding", (1, vc.num_patches, w), "embeddings.position_embedding.weight",
        (vc.num_patches, w), *reshape((1, vc.num_patches, w), (vc.num_patches, w)))  # fmt: skip
    for i in range(vc.depth):
        ours, hf = f"Transformer/encoderblock_{i}/", f"encoder.layers.{i}."
        attn = ours + "MultiHeadDotProductAttention_0/"
        layer_norm(ours + "LayerNorm_0", hf + "layer_norm1")
        for our_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            add(f"{attn}{our_name}/kernel", (w, n, h), f"{hf}self_attn.{hf_name}.weight",
                (n * h, w), *heads_in)  # fmt: skip
            add(f"{attn}{our_name}/bias", (n, h), f"{hf}self_attn.{hf_name}.bias", (n * h,),
                *reshape((n, h), (n * h,)))  # fmt: skip
        add(f"{attn}out/kernel", (n, h, w), f"{hf}self_attn.out_proj.weight", (w, n * h),
            *heads_out)  # fmt: skip
        add(f"{attn}out/bias", (w,), f"{hf}self_attn.out_proj.bias", (w,))
        layer_norm(ours + "LayerNorm_1", hf + "layer_norm2")
        for dense, fc, shape in (("Dense_0", "fc1", (w, f)), ("Dense_1", "fc2", (f, w))):
            add(f"{ours}MlpBlock_0/{dense}/kernel", shape, f"{hf}mlp.{fc}.weight", shape[::-1],
                _transpose, _transpose)  # fmt: skip
            add(f"{ours}MlpBlock_0/{dense}/bias", shape[1:], f"{hf}mlp.{fc}.bias", shape[1:])
    layer_norm("Transformer/encoder_norm", "post_layernorm")

    d = config.embed_dim
    rules.append(_Rule("embedder/mm_input_projection/w", (w, d),
                       (_PROJECTOR + "mm_input_projection_weight",), (w, d)))  # fmt: skip
    rules.append(_Rule("embedder/mm_soft_embedding_norm/scale", (w,),
                       (_PROJECTOR + "mm_soft_emb_norm.weight",), (w,)))  # fmt: skip
    return rules


def vision_param_shapes(config: TransformerConfig) -> dict[str, tuple]:
    """Our flat paths of every vision leaf (`vision_encoder/...`, `embedder/mm_*`) and shapes."""
    return {r.ours: r.our_shape for r in _vision_rules(config)}


def hf_vision_param_shapes(
    config: TransformerConfig, layout: str = "safetensors"
) -> dict[str, tuple]:
    """Every HF vision-tower / projector tensor of `config` with its shape.

    `layout` is a key of `VISION_LAYOUTS`: "safetensors" for the published files,
    "transformers" for a transformers 5 `Gemma3ForConditionalGeneration.state_dict()`.
    """
    return {_in_layout(r.hf[0], layout): r.hf_shape for r in _vision_rules(config)}


def _vision_layout(names: Iterable[str]) -> str | None:
    """The `VISION_LAYOUTS` key of a state dict: the one holding the patch embedding, else
    the first whose roots start any name (a partial tower is then listed, not "not found")."""
    names = set(names)
    probe = _SIGLIP + "embeddings.patch_embedding.weight"
    found = next((lay for lay in VISION_LAYOUTS if _in_layout(probe, lay) in names), None)
    return found or next(
        (lay for lay, roots in VISION_LAYOUTS.items() if any(n.startswith(roots) for n in names)),
        None,
    )


def hf_vision_to_params(state_dict: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
    """The vision part of a HF Gemma 3 state dict as our nested tree.

    Args:
      state_dict: HF name -> array; text tensors are ignored.
      config: a config with `config.vision` set.

    Returns:
      `{"vision_encoder": {"siglip_encoder": ...}, "embedder": {"mm_input_projection": ...,
      "mm_soft_embedding_norm": ...}}`.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or wrongly shaped tensor.
    """
    shapes = {name: tuple(np.shape(value)) for name, value in state_dict.items()}
    return hf_vision_tensors_to_params(shapes, lambda name: np.asarray(state_dict[name]), config)


def hf_vision_tensors_to_params(
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    config: TransformerConfig,
    *,
    convert: Callable[[str, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """`hf_vision_to_params` over tensors read one at a time (see `hf_tensors_to_params`)."""
    layout, problems = _vision_problems(shapes, config)
    if layout is None:
        raise CheckpointMismatchError("No Gemma 3 vision tower found", problems)
    if problems:
        raise CheckpointMismatchError(f"HF vision tower does not match {config.name}", problems)
    convert = convert or (lambda path, leaf: leaf)
    flat = {}
    for r in _vision_rules(config):
        flat[r.ours] = convert(r.ours, r.to_ours(np.asarray(read(_in_layout(r.hf[0], layout)))))
    return unflatten_params(flat)


def _vision_problems(
    shapes: Mapping[str, tuple[int, ...]], config: TransformerConfig
) -> tuple[str | None, list[str]]:
    """(key of `VISION_LAYOUTS`, every problem of the vision tensors); reads nothing."""
    layout = _vision_layout(shapes)
    if layout is None:
        probe = _SIGLIP + "embeddings.patch_embedding.weight"
        tried = ", ".join(_in_layout(probe, lay) for lay in VISION_LAYOUTS)
        return None, [f"none of {tried}"]
    roots = VISION_LAYOUTS[layout]
    ours = {n: tuple(s) for n, s in shapes.items() if n.startswith(roots)}
    problems: list[str] = []
    for rule in _vision_rules(config):
        name = _in_layout(rule.hf[0], layout)
        if name not in ours:
            problems.append(f"missing {name} (expected {rule.hf_shape})")
        elif (shape := ours.pop(name)) != rule.hf_shape:
            problems.append(f"{name}: shape {shape}, expected {rule.hf_shape}")
    # e.g. SigLIP's attention-pooling `head.*`, which Gemma 3 does not have.
    problems += [f"unexpected {n} {s}" for n, s in ours.items()]
    return layout, problems


def has_hf_vision(names: Iterable[str]) -> bool:
    """True if a HF state dict holds any vision-tower or projector tensor (any layout)."""
    return any(name.startswith(_SKIPPED_PREFIXES) for name in names)


def check_hf_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    config: TransformerConfig,
    *,
    vision: bool = False,
) -> None:
    """Checks a whole HF checkpoint (text, and the vision tower when `vision`) before loading.

    Raises:
      CheckpointMismatchError: every problem of the text and vision tensors, in one list.
    """
    _, problems = _text_problems(shapes, read, config)
    if vision:
        _, vision_problems = _vision_problems(shapes, config)
        problems += vision_problems
    if problems:
        raise CheckpointMismatchError(f"HF checkpoint does not match {config.name}", problems)


def vision_params_to_hf(
    params: Mapping[str, Any], config: TransformerConfig, layout: str = "safetensors"
) -> dict[str, np.ndarray]:
    """Our vision leaves (`vision_encoder/...`, `embedder/mm_*`) as HF tensors.

    Other leaves of `params` (the text decoder) are ignored, so a full tree can be passed.
    `layout`: a key of `VISION_LAYOUTS` (see `hf_vision_param_shapes`).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or wrongly shaped leaf.
    """
    flat = flatten_params(params)
    rules = _vision_rules(config)
    known = {r.ours for r in rules}
    problems = [
        f"unexpected {path} {tuple(np.shape(v))}"
        for path, v in flat.items()
        if path.startswith("vision_encoder/") and path not in known
    ]
    state_dict = {}
    for rule in rules:
        if rule.ours not in flat:
            problems.append(f"missing {rule.ours} (expected {rule.our_shape})")
            continue
        leaf = np.asarray(flat[rule.ours])
        if leaf.shape != rule.our_shape:
            problems.append(f"{rule.ours}: shape {leaf.shape}, expected {rule.our_shape}")
            continue
        state_dict[_in_layout(rule.hf[0], layout)] = np.ascontiguousarray(rule.to_hf(leaf))
    if problems:
        raise CheckpointMismatchError(f"Vision parameters do not match {config.name}", problems)
    return state_dict


# `SiglipVisionConfig` class defaults of transformers 5.23, for fields a config.json omits.
_HF_SIGLIP_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    vision_use_head=True, num_channels=3,
)  # fmt: skip


def vision_config_from_hf(config_json: Mapping[str, Any]) -> VisionConfig | None:
    """Our `VisionConfig` from a `Gemma3ForConditionalGeneration` config.json (None if text-only).

    Raises:
      ValueError: a SigLIP variant our encoder does not implement.
    """
    if "vision_config" not in config_json or config_json.get("vision_config") is None:
        return None
    cfg = {**_HF_SIGLIP_DEFAULTS, **config_json["vision_config"]}
    problems = []
    if cfg["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        problems.append(f"hidden_act {cfg['hidden_act']!r}")
    if cfg["layer_norm_eps"] != 1e-6:
        problems.append(f"layer_norm_eps={cfg['layer_norm_eps']}")
    if cfg["vision_use_head"]:
        problems.append("vision_use_head=True (Gemma 3 has no attention-pooling head)")
    if cfg["num_channels"] != 3:
        problems.append(f"num_channels={cfg['num_channels']}")
    if problems:
        raise ValueError(f"Unsupported Gemma 3 vision config: {', '.join(problems)}")
    return VisionConfig(
        image_size=int(cfg["image_size"]),
        patch_size=int(cfg["patch_size"]),
        width=int(cfg["hidden_size"]),
        depth=int(cfg["num_hidden_layers"]),
        mlp_dim=int(cfg["intermediate_size"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_mm_tokens_per_image=int(config_json.get("mm_tokens_per_image", 256)),
    )
