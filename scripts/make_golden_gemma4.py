"""Regenerates `tests/golden/tiny-gemma4*.npz`: Hugging Face logits of the tiny Gemma 4 presets.

Run in the reference venv (torch + transformers with `models.gemma4`):

    bench/.envs/ref/bin/python scripts/make_golden_gemma4.py

For `tiny-gemma4` (E2B-style) and `tiny-gemma4-moe` (26B-A4B-style) this builds
`Gemma4ForCausalLM` in float32 with eager attention, fills it with random weights from a fixed
seed (norm scales, `layer_scalar`, router and per-expert scales included, so none of them is an
identity), and saves:

    preset                  the preset name
    tokens                  int32 [2, 20]: two fixed rows, longer than the 4-token window
    logits                  float32 [2, 20, 256]: HF's text-only output (after the softcap 30)
    mm/tokens, mm/segments  int32 [2, 20]: rows with an image block (segment 1) and, on the
                            E-style preset, an audio block (segment -1)
    mm/embeddings           float32 [2, 20, D]: soft tokens (zeros on text positions)
    mm/logits               float32 [2, 20, 256]: HF's output for them (see `hf_mm_forward`)
    params/<path>           our tree, flattened with '/', stored as float16 (exact)
    hf_hidden/layer_<i>     HF's residual stream after layer i (text rows), for debugging
    meta/<package>          torch / transformers versions

Weights are float16-representable, so they are stored as float16 (files stay under 1 MB).

HF weight names (under `model.`) -> our tree (`gemma4_params_to_hf` below; move it into
`gemma_app/ckpt/hf_map.py` when loading Gemma 4 safetensors):

    embed_tokens.weight (V, D)                      embedder/input_embedding
    embed_tokens_per_layer.weight (V, L*P)          embedder/per_layer_embeddings (V, L, P)
    per_layer_model_projection.weight (L*P, D)      embedder/per_layer_model_projection/w (D, L, P)
    per_layer_projection_norm.weight (P,)           embedder/per_layer_projection_norm/scale
    norm.weight                                     final_norm/scale
    layers.i.input_layernorm                        layer_i/pre_attention_norm/scale
    layers.i.post_attention_layernorm               layer_i/post_attention_norm/scale
    layers.i.pre_feedforward_layernorm              pre_ffw_norm (dense) | pre_ffw2_norm (MoE)
    layers.i.post_feedforward_layernorm             post_ffw_norm
    layers.i.post_feedforward_layernorm_1           post_ffw2_norm (MoE: after the dense MLP)
    layers.i.pre_feedforward_layernorm_2            pre_ffw_norm (MoE: before the experts)
    layers.i.post_feedforward_layernorm_2           post_ffw1_norm (MoE: after the experts)
    layers.i.self_attn.q_proj (N*H, D)              attn/q_einsum/w (N, D, H)
    layers.i.self_attn.{k,v}_proj (K*H, D)          attn/kv_einsum/w (2, K, D, H)
    layers.i.self_attn.k_proj (k_eq_v global)       attn/k_einsum/w (K, D, H); no v_proj
    layers.i.self_attn.o_proj (D, N*H)              attn/attn_vec_einsum/w (N, H, D)
    layers.i.self_attn.q_norm / k_norm (H,)         attn/query_norm/scale / attn/key_norm/scale
    layers.i.mlp.{gate,up}_proj (F, D)              mlp/gating_einsum (2, F, D) | mlp2/... (MoE)
    layers.i.mlp.down_proj (D, F)                   mlp/linear (F, D) | mlp2/linear (MoE)
    layers.i.router.proj (E, D)                     mlp/router_logits/w (D, E)
    layers.i.router.scale (D,)                      mlp/router_scale
    layers.i.router.per_expert_scale (E,)           mlp/per_expert_scale
    layers.i.experts.gate_up_proj (E, 2*Fe, D)      mlp/gating_einsum/w (E, 2, Fe, D)
    layers.i.experts.down_proj (E, D, Fe)           mlp/linear/w (E, Fe, D)
    layers.i.per_layer_input_gate (P, D)            per_layer_input_gate/w (D, P)
    layers.i.per_layer_projection (D, P)            per_layer_projection/w (P, D)
    layers.i.post_per_layer_input_norm              post_per_layer_input_norm/scale
    layers.i.layer_scalar (1,)                      skip_scale (1,)

KV-shared layers have no `k_proj`/`v_proj`/`k_norm` in HF (they are dropped on load); ours keep
`kv_einsum`/`key_norm` as the official checkpoints do, unused. The MoE naming swap (library
`mlp` = experts, `mlp2` = dense) is the one of HF's `convert_gemma4_weights.py`.

HF conventions matched (read from `transformers/models/gemma4/modeling_gemma4.py`):
  * RMSNorm `x * (mean(x^2) + eps)**-0.5 * w` in float32, `w` initialised to ones.
  * Attention scaling 1.0; v_norm without weight; k_eq_v global layers feed the raw `k_proj`
    output to both k_norm+RoPE (keys) and v_norm (values).
  * "proportional" RoPE on full-attention layers: the first `int(0.25 * H // 2)` frequencies
    are `theta**(-2i/H)` with H the global head width, the rest 0 (identity): our
    `apply_rope(rope_proportion=0.25)`.
  * Sliding window W: query i sees keys i-W < j <= i. With `use_bidirectional_attention=
    "vision"` HF's `create_masks_for_vision_model` ORs "same image block" into the sliding
    mask only (the window still cuts the past side); full-attention layers stay causal.
  * PLE: `Gemma4Model` looks up pad id 0 at every soft-token position (image, audio) in
    `embed_tokens_per_layer`, and projects the merged embeddings (soft tokens included).
  * KV sharing: `kv_sharing_modes` -> the last earlier non-shared layer of the same type.
  * MoE router: `softmax(proj(norm(x) * scale * D**-0.5))`, exact `topk`, renormalised, times
    `per_expert_scale`; the router reads the residual, the experts `pre_feedforward_layernorm_2`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.gemma4 import modeling_gemma4 as hf4

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from gemma_app.ckpt.hf_map import flatten_params, unflatten_params
from gemma_app.nn.config import AttentionType, TransformerConfig
from gemma_app.nn.presets import TINY_PRESETS

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
PRESETS = ("tiny-gemma4", "tiny-gemma4-moe")
SEED = 20260404
BATCH, LENGTH = 2, 20
_LAYER_TYPES = {
    AttentionType.LOCAL_SLIDING: "sliding_attention",
    AttentionType.GLOBAL: "full_attention",
}


def hf_config(config: TransformerConfig, **overrides) -> transformers.Gemma4TextConfig:
    """The `Gemma4TextConfig` of the same architecture as `config` (fp32, eager attention)."""
    assert config.family == 4 and config.query_pre_attn_scalar == 1.0
    moe = config.moe
    cfg = dict(
        vocab_size=config.num_embed,
        hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        global_head_dim=config.layer_head_dim(AttentionType.GLOBAL),
        num_global_key_value_heads=config.num_global_kv_heads,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        layer_types=[_LAYER_TYPES[t] for t in config.attention_types],
        sliding_window=config.sliding_window_size,
        final_logit_softcapping=config.final_logit_softcap,
        rope_parameters={
            "sliding_attention": {
                "rope_type": "default", "rope_theta": float(config.local_base_frequency)
            },
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": config.global_rope_proportion,
                "rope_theta": float(config.global_base_frequency),
            },
        },
        use_bidirectional_attention="vision" if config.bidirectional_vision else None,
        vocab_size_per_layer_input=config.num_embed,
        hidden_size_per_layer_input=config.per_layer_input_dim,
        attention_k_eq_v=config.k_eq_v,
        num_kv_shared_layers=config.num_kv_shared_layers,
        use_double_wide_mlp=config.shared_layer_hidden_dim is not None,
        enable_moe_block=moe is not None,
        num_experts=None if moe is None else moe.num_experts,
        top_k_experts=None if moe is None else moe.top_k,
        moe_intermediate_size=None if moe is None else moe.expert_hidden_dim,
        attn_implementation="eager",
        dtype=torch.float32,
    )  # fmt: skip
    if config.shared_layer_hidden_dim is not None:
        assert config.shared_layer_hidden_dim == 2 * config.hidden_dim, "HF: double-wide only"
    return transformers.Gemma4TextConfig(**{**cfg, **overrides})


def _heads_in(w: np.ndarray) -> np.ndarray:
    """(heads, D, H) -> HF (heads*H, D), row n*H + h."""
    n, d, h = w.shape
    return w.transpose(0, 2, 1).reshape(n * h, d)


def gemma4_params_to_hf(params: dict, config: TransformerConfig) -> dict[str, np.ndarray]:
    """Our Gemma 4 tree -> `Gemma4ForCausalLM` state dict (names under `model.`)."""
    flat = flatten_params(params)
    v, d, n_l, p = config.num_embed, config.embed_dim, config.num_layers, config.per_layer_input_dim
    sd = {
        "embed_tokens.weight": flat["embedder/input_embedding"],
        "norm.weight": flat["final_norm/scale"],
    }
    if p:
        sd["embed_tokens_per_layer.weight"] = flat["embedder/per_layer_embeddings"].reshape(
            v, n_l * p
        )
        w = flat["embedder/per_layer_model_projection/w"]
        sd["per_layer_model_projection.weight"] = w.reshape(d, n_l * p).T
        sd["per_layer_projection_norm.weight"] = flat["embedder/per_layer_projection_norm/scale"]
    for i in range(n_l):
        sd.update({f"layers.{i}.{k}": x for k, x in _layer_to_hf(flat, config, i).items()})
    return {f"model.{k}": np.ascontiguousarray(x) for k, x in sd.items()}


def _layer_to_hf(flat: dict, config: TransformerConfig, i: int) -> dict[str, np.ndarray]:
    pre = f"layer_{i}/"

    def get(path):
        return flat[pre + path]

    shared = config.kv_source(i) != i
    out = {
        "input_layernorm.weight": get("pre_attention_norm/scale"),
        "post_attention_layernorm.weight": get("post_attention_norm/scale"),
        "post_feedforward_layernorm.weight": get("post_ffw_norm/scale"),
        "layer_scalar": get("skip_scale"),
        "self_attn.q_proj.weight": _heads_in(get("attn/q_einsum/w")),
        "self_attn.q_norm.weight": get("attn/query_norm/scale"),
        "self_attn.o_proj.weight": get("attn/attn_vec_einsum/w").reshape(-1, config.embed_dim).T,
    }
    if not shared:
        out["self_attn.k_norm.weight"] = get("attn/key_norm/scale")
        if pre + "attn/k_einsum/w" in flat:
            out["self_attn.k_proj.weight"] = _heads_in(get("attn/k_einsum/w"))
        else:
            k, v = get("attn/kv_einsum/w")
            out["self_attn.k_proj.weight"] = _heads_in(k)
            out["self_attn.v_proj.weight"] = _heads_in(v)
    dense = "mlp2" if config.moe is not None else "mlp"
    gate, up = get(f"{dense}/gating_einsum")
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = gate, up
    out["mlp.down_proj.weight"] = get(f"{dense}/linear").T
    if config.moe is None:
        out["pre_feedforward_layernorm.weight"] = get("pre_ffw_norm/scale")
    else:
        e, _, fe, d = get("mlp/gating_einsum/w").shape
        out.update({
            "pre_feedforward_layernorm.weight": get("pre_ffw2_norm/scale"),
            "post_feedforward_layernorm_1.weight": get("post_ffw2_norm/scale"),
            "pre_feedforward_layernorm_2.weight": get("pre_ffw_norm/scale"),
            "post_feedforward_layernorm_2.weight": get("post_ffw1_norm/scale"),
            "router.proj.weight": get("mlp/router_logits/w").T,
            "router.scale": get("mlp/router_scale"),
            "router.per_expert_scale": get("mlp/per_expert_scale"),
            "experts.gate_up_proj": get("mlp/gating_einsum/w").reshape(e, 2 * fe, d),
            "experts.down_proj": get("mlp/linear/w").transpose(0, 2, 1),
        })  # fmt: skip
    if config.per_layer_input_dim:
        out["per_layer_input_gate.weight"] = get("per_layer_input_gate/w").T
        out["per_layer_projection.weight"] = get("per_layer_projection/w").T
        out["post_per_layer_input_norm.weight"] = get("post_per_layer_input_norm/scale")
    return out


def random_params(config: TransformerConfig, rng: np.random.Generator) -> dict:
    """Random weights in our tree, float16-exact float32; every scale is far from identity."""
    import jax  # only for the tree's shapes

    from gemma_app.nn.transformer import abstract_params

    flat = {}
    for path, leaf in sorted(flatten_params(jax.device_get(abstract_params(config))).items()):
        shape = leaf.shape
        if path.endswith(("query_norm/scale", "key_norm/scale")):
            # Without query scaling, unit q/k give logits ~ H: too peaked to compare float32
            # runs. H**-0.25 on each side makes them ~ sqrt(H), as trained models have.
            values = (1.0 + 0.3 * rng.standard_normal(shape)) * shape[0] ** -0.25
        elif path.endswith(("/scale", "skip_scale", "expert_scale", "router_scale")):
            values = 1.0 + 0.3 * rng.standard_normal(shape)  # `normed * scale` form
        elif path == "embedder/input_embedding":
            values = 0.5 * rng.standard_normal(shape)
        elif path == "embedder/per_layer_embeddings":
            values = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif path.endswith("router_logits/w"):
            values = 3.0 * rng.standard_normal(shape) / np.sqrt(shape[0])  # decisive routing
        else:
            values = rng.standard_normal(shape) / np.sqrt(_fan_in(path, shape))
        flat[path] = values.astype(np.float16).astype(np.float32)
    return unflatten_params(flat)


def _fan_in(path: str, shape: tuple[int, ...]) -> int:
    if path.endswith("attn_vec_einsum/w"):
        return shape[0] * shape[1]
    if path.endswith("per_layer_model_projection/w"):
        return shape[0]
    if "gating_einsum" in path:
        return shape[-1]
    return shape[-2]


def build_hf_model(config: TransformerConfig, params: dict, **overrides):
    model = transformers.Gemma4ForCausalLM(hf_config(config, **overrides)).eval()
    sd = {k: torch.from_numpy(v) for k, v in gemma4_params_to_hf(params, config).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config._attn_implementation == "eager"
    return model


@torch.no_grad()
def hf_forward(model, tokens: np.ndarray) -> tuple[np.ndarray, dict]:
    """Text-only logits [B, T, V] and the residual stream after every layer."""
    hidden = {}

    def keep(name):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            hidden[name] = out.detach().numpy().copy()

        return hook

    handles = [
        layer.register_forward_hook(keep(f"layer_{i}"))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        logits = model(torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits.numpy().astype(np.float32), hidden


@torch.no_grad()
def hf_mm_forward(model, tokens, segments, embeddings) -> np.ndarray:
    """`Gemma4Model.forward`'s text path with soft tokens, replayed on the text model.

    As there: pad id 0 at soft positions for both embeddings, soft tokens scattered in, PLE
    from the pad ids and the merged embeddings, and the masks of `create_masks_for_vision_model`
    (image blocks = `mm_token_type_ids` 1) with `use_bidirectional_attention="vision"`.
    """
    cfg, lm = model.config, model.model
    ids = torch.from_numpy(tokens.astype(np.int64))
    seg = torch.from_numpy(segments.astype(np.int64))
    soft = seg != 0
    llm_ids = torch.where(soft, cfg.pad_token_id, ids)
    x = lm.embed_tokens(llm_ids)
    per_layer = lm.get_per_layer_inputs(llm_ids, x) if cfg.hidden_size_per_layer_input else None
    x = torch.where(soft[..., None], torch.from_numpy(embeddings), x)
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    mask_kwargs = dict(
        config=cfg, inputs_embeds=x, attention_mask=None, past_key_values=None,
        position_ids=positions,
    )  # fmt: skip
    if cfg.use_bidirectional_attention == "vision":
        type_ids = torch.where(seg > 0, 1, torch.where(seg < 0, 3, 0))
        blocks = hf4.get_block_sequence_ids_for_mask(type_ids, device=x.device)
        masks = hf4.create_masks_for_vision_model(block_sequence_ids=blocks, **mask_kwargs)
    else:
        masks = hf4.create_masks_for_generate(**mask_kwargs)
    out = lm(
        inputs_embeds=x, per_layer_inputs=per_layer, attention_mask=masks,
        position_ids=positions, use_cache=False,
    )  # fmt: skip
    logits = model.lm_head(out.last_hidden_state)
    c = cfg.final_logit_softcapping
    return (torch.tanh(logits / c) * c).numpy().astype(np.float32)


def mm_inputs(config: TransformerConfig, rng: np.random.Generator):
    """Two rows with an image block (and an audio block when the preset has audio)."""
    tokens = rng.integers(3, config.num_embed, size=(BATCH, LENGTH)).astype(np.int32)
    segments = np.zeros((BATCH, LENGTH), np.int32)
    segments[0, 3:9] = 1  # a 6-token image: wider than the 4-token window
    segments[1, 10:16] = 1
    if config.audio is not None:
        segments[0, 12:16] = -1
        segments[1, 2:6] = -1
    embeddings = rng.standard_normal((BATCH, LENGTH, config.embed_dim)).astype(np.float16)
    embeddings = np.where(segments[..., None] != 0, embeddings.astype(np.float32), 0.0)
    tokens = np.where(segments != 0, 7, tokens).astype(np.int32)  # placeholder ids
    return tokens, segments, embeddings.astype(np.float32)


def make_golden(preset: str, out_dir: Path = GOLDEN_DIR) -> Path:
    config = TINY_PRESETS[preset]()
    rng = np.random.default_rng([SEED, PRESETS.index(preset)])
    params = random_params(config, rng)
    tokens = rng.integers(0, config.num_embed, size=(BATCH, LENGTH), dtype=np.int32)
    model = build_hf_model(config, params)
    logits, hidden = hf_forward(model, tokens)
    mm_tokens, mm_segments, mm_embeddings = mm_inputs(config, rng)
    mm_logits = hf_mm_forward(model, mm_tokens, mm_segments, mm_embeddings)
    _print_sensitivity(config, params, tokens, logits, mm_tokens, mm_segments, mm_embeddings)
    arrays = {
        "preset": np.array(preset),
        "tokens": tokens,
        "logits": logits,
        "mm/tokens": mm_tokens,
        "mm/segments": mm_segments,
        "mm/embeddings": mm_embeddings,
        "mm/logits": mm_logits,
        # float16 is exact for these values and halves the file; tests cast back to float32.
        **{f"params/{p}": v.astype(np.float16) for p, v in flatten_params(params).items()},
        **{f"hf_hidden/{k}": v for k, v in hidden.items()},
        **{f"meta/{pkg}": np.array(importlib.metadata.version(pkg)) for pkg in ("torch", "transformers")},
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{preset}.npz"
    np.savez_compressed(path, **arrays)
    print(f"    wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def _print_sensitivity(config, params, tokens, logits, mm_tokens, mm_segments, mm_embeddings):
    """Max |change| of HF's logits when a feature is switched off: proof it is exercised."""
    ablations = {"no sliding window": dict(sliding_window=4 * LENGTH)}
    rope = hf_config(config).rope_parameters
    full = {**rope["full_attention"], "partial_rotary_factor": 1.0}
    ablations["full rope on global"] = dict(rope_parameters={**rope, "full_attention": full})
    ablations["no final softcap"] = dict(final_logit_softcapping=None)
    print(f"{config.name}: |logits| max {np.abs(logits).max():.2f}; change when switched off:")
    for what, overrides in ablations.items():
        other, _ = hf_forward(build_hf_model(config, params, **overrides), tokens)
        delta = float(np.abs(other - logits).max())
        print(f"    {what:24s} {delta:.3g}")
        assert delta > 1e-2, f"{config.name}: golden does not exercise '{what}'"
    if config.bidirectional_vision:
        causal = build_hf_model(config, params, use_bidirectional_attention=None)
        mm = hf_mm_forward(build_hf_model(config, params), mm_tokens, mm_segments, mm_embeddings)
        other = hf_mm_forward(causal, mm_tokens, mm_segments, mm_embeddings)
        delta = float(np.abs(other - mm).max())
        print(f"    {'no bidirectional vision':24s} {delta:.3g}")
        assert delta > 1e-2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help=f"some of {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible reductions
    for preset in args.presets or PRESETS:
        make_golden(preset, args.out)


if __name__ == "__main__":
    main()
