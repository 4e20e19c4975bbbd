"""Regenerates `tests/golden/<preset>.npz`: Hugging Face `transformers` logits of the tiny presets.

Run in the reference venv (torch + transformers, see requirements-reference.txt):

    bench/.envs/ref/bin/python scripts/make_golden.py

For each tiny preset (vocab 256) this builds the matching `Gemma*ForCausalLM` in float32 with
eager attention, fills it with random weights from a fixed seed (norm scales included, so the
`(1 + scale)` form is exercised), runs one full forward over two fixed 20-token rows (longer
than the 4-token windows, so local layers differ from global ones) and saves:

    preset                   the preset name, e.g. "tiny-gemma3"
    tokens                   int32 [2, 20]
    logits                   float32 [2, 20, 256], HF's output (after any final softcap)
    params/<path>            our tree, flattened with '/' (`params/layer_0/attn/q_einsum/w`)
    hf_hidden/embed          float32 [2, 20, D], embeddings after the sqrt(D) scale
    hf_hidden/layer_<i>      output of decoder layer i (residual stream)
    hf_hidden/final_norm     input to the tied unembedding
    meta/<package>           versions of torch and transformers

Weights are rounded to float16-representable values (stored as float32, so exact), which
lets `savez_compressed` keep each file well under 1 MB.

How HF's conventions map to ours (the weights themselves: see `gemma_app/ckpt/hf_map.py`):
  * Embedding: HF multiplies by `sqrt(hidden_size)` cast to the weight dtype, as we do.
  * RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)` in float32, same as ours; weights copy 1:1.
  * Gemma 1: `post_attention_layernorm` is our `pre_ffw_norm`; queries scale by head_dim**-0.5
    (no `query_pre_attn_scalar` field). Gemma 2/3: `query_pre_attn_scalar**-0.5`.
  * RoPE: `rotate_half` on the two halves of head_dim (not interleaved), like ours. Gemma 3
    keeps one RoPE per layer type: `rope_parameters = {"sliding_attention": ..., "full_attention":
    ...}`; "linear" scaling divides the inverse frequencies by `factor`, i.e. our positions / 8.
  * Sliding window W: key j is visible from query i iff `i - W < j <= i` (W keys including
    itself), our `sliding_window_size`. HF picks local/global per layer from `layer_types`.
  * Softcaps: Gemma 2 applies `attn_logit_softcapping` after the query scale and before the
    mask, and `final_logit_softcapping` on the logits. Gemma 3 classes ignore the attention cap.
  * GeGLU: `down(gelu_tanh(gate(x)) * up(x))` = our `gating_einsum[0]` / `[1]`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from gemma_app.ckpt.hf_map import (
    flatten_params,
    hf_param_shapes,
    hf_to_params,
    params_to_hf,
    unflatten_params,
)
from gemma_app.nn.config import AttentionType, TransformerConfig
from gemma_app.nn.presets import TINY_PRESETS

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
PRESETS = ("tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2", "tiny-gemma3")
SEED = 20240521
BATCH, LENGTH = 2, 20
_LAYER_TYPES = {
    AttentionType.LOCAL_SLIDING: "sliding_attention",
    AttentionType.GLOBAL: "full_attention",
}


def hf_config(config: TransformerConfig, **overrides) -> transformers.PretrainedConfig:
    """The `transformers` config of the same architecture as `config` (fp32, eager attention)."""
    common = dict(
        vocab_size=config.num_embed,
        hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
        dtype=torch.float32,
    )
    if config.family == 1:
        assert config.query_pre_attn_scalar == config.head_dim, "HF Gemma 1 scales by head_dim"
        assert config.global_scale_factor == config.local_scale_factor == 1.0
        cfg = dict(
            common,
            hidden_act="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": config.global_base_frequency},
        )
        return transformers.GemmaConfig(**{**cfg, **overrides})
    gemma2_and_3 = dict(
        common,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=[_LAYER_TYPES[t] for t in config.attention_types],
        sliding_window=config.sliding_window_size,
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        attn_logit_softcapping=config.attn_logits_soft_cap,
        final_logit_softcapping=config.final_logit_softcap,
    )
    if config.family == 2:
        assert config.global_base_frequency == config.local_base_frequency
        rope = {"rope_type": "default", "rope_theta": config.global_base_frequency}
        return transformers.Gemma2Config(**{**gemma2_and_3, "rope_parameters": rope, **overrides})
    assert config.attn_logits_soft_cap is None, "HF Gemma 3 ignores attn_logit_softcapping"
    rope = {
        "sliding_attention": _rope(config.local_base_frequency, config.local_scale_factor),
        "full_attention": _rope(config.global_base_frequency, config.global_scale_factor),
    }
    return transformers.Gemma3TextConfig(**{**gemma2_and_3, "rope_parameters": rope, **overrides})


def _rope(theta: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": float(theta)}
    return {"rope_type": "linear", "factor": float(factor), "rope_theta": float(theta)}


def build_hf_model(config: TransformerConfig, params: dict, **overrides) -> torch.nn.Module:
    """`Gemma*ForCausalLM` for `config` holding our `params` (converted with `params_to_hf`)."""
    hf_cfg = hf_config(config, **overrides)
    cls = {
        1: transformers.GemmaForCausalLM,
        2: transformers.Gemma2ForCausalLM,
        3: transformers.Gemma3ForCausalLM,
    }[config.family]
    model = cls(hf_cfg).eval()
    state_dict = {k: torch.from_numpy(v) for k, v in params_to_hf(params, config).items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config._attn_implementation == "eager"
    return model


@torch.no_grad()
def hf_forward(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits [B, T, V] and the residual stream after the embedding, each layer and final norm."""
    hidden: dict[str, np.ndarray] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            hidden[name] = out.detach().numpy().copy()

        return hook

    inner = model.model
    handles = [inner.embed_tokens.register_forward_hook(keep("embed"))]
    handles += [
        layer.register_forward_hook(keep(f"layer_{i}")) for i, layer in enumerate(inner.layers)
    ]
    handles.append(inner.norm.register_forward_hook(keep("final_norm")))
    try:
        logits = model(torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits.numpy().astype(np.float32), hidden


def random_params(config: TransformerConfig, rng: np.random.Generator) -> dict:
    """Random weights in our tree, float16-exact float32, scaled so every feature matters.

    Drawn as an HF state dict (so the draw order is HF's key order) and mapped with
    `hf_to_params`. q/k get 2x the usual 1/sqrt(fan_in) scale so Gemma 2's attention softcap
    bends the logits measurably; embeddings have std 0.5 so the final softcap does too.
    """
    d = config.embed_dim
    state_dict = {}
    for name, shape in hf_param_shapes(config).items():
        if "norm" in name:  # the learned `w` of (1 + w): around 0, clearly non-zero
            std = 0.3
        elif "embed_tokens" in name:
            std = 0.5
        elif "q_proj" in name or "k_proj" in name:
            std = 2.0 / np.sqrt(d)
        else:  # [out, in] linears
            std = 1.0 / np.sqrt(shape[1])
        values = rng.standard_normal(shape) * std
        state_dict[name] = values.astype(np.float16).astype(np.float32)
    return hf_to_params(state_dict, config)


def _sensitivity(config: TransformerConfig, params: dict, tokens: np.ndarray, logits: np.ndarray):
    """Max |change| of the logits when one feature is switched off: proof that it is exercised."""
    ablations = {}
    if AttentionType.LOCAL_SLIDING in config.attention_types:
        ablations["no sliding window"] = dict(sliding_window=4 * LENGTH)
    if config.attn_logits_soft_cap:
        ablations["no attention softcap"] = dict(attn_logit_softcapping=None)
    if config.final_logit_softcap:
        ablations["no final softcap"] = dict(final_logit_softcapping=None)
    if config.global_scale_factor != 1.0:
        rope = hf_config(config).rope_parameters
        rope = {**rope, "full_attention": _rope(config.global_base_frequency, 1.0)}
        ablations["no global rope scaling"] = dict(rope_parameters=rope)
    result = {}
    for what, overrides in ablations.items():
        other, _ = hf_forward(build_hf_model(config, params, **overrides), tokens)
        result[what] = float(np.abs(other - logits).max())
    flat = flatten_params(params)
    zero_norms = {p: np.zeros_like(v) if p.endswith("scale") else v for p, v in flat.items()}
    other, _ = hf_forward(build_hf_model(config, unflatten_params(zero_norms)), tokens)
    result["zero norm scales"] = float(np.abs(other - logits).max())
    return result


def make_golden(preset: str, out_dir: Path = GOLDEN_DIR) -> Path:
    config = TINY_PRESETS[preset]()
    rng = np.random.default_rng([SEED, PRESETS.index(preset)])
    params = random_params(config, rng)
    tokens = rng.integers(0, config.num_embed, size=(BATCH, LENGTH), dtype=np.int32)
    logits, hidden = hf_forward(build_hf_model(config, params), tokens)

    sensitivity = _sensitivity(config, params, tokens, logits)
    print(f"{preset}: |logits| max {np.abs(logits).max():.2f}; change when switched off:")
    for what, delta in sensitivity.items():
        print(f"    {what:24s} {delta:.3g}")
        assert delta > 1e-2, f"{preset}: golden does not exercise '{what}'"

    arrays = {
        "preset": np.array(preset),
        "tokens": tokens,
        "logits": logits,
        **{f"params/{p}": v for p, v in flatten_params(params).items()},
        **{f"hf_hidden/{k}": v for k, v in hidden.items()},
        **{
            f"meta/{pkg}": np.array(importlib.metadata.version(pkg))
            for pkg in ("torch", "transformers")
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{preset}.npz"
    np.savez_compressed(path, **arrays)
    print(f"    wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help=f"some of {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR)
    args = parser.parse_args()
    if unknown := set(args.presets) - set(PRESETS):
        parser.error(f"unknown presets {sorted(unknown)}")
    torch.set_num_threads(1)  # reproducible reductions
    for preset in args.presets or PRESETS:
        make_golden(preset, args.out)


if __name__ == "__main__":
    main()
