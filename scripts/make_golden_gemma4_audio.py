"""Regenerates `tests/golden/tiny-gemma4-audio.npz`: HF Gemma 4 audio path on random weights.

Run in the reference venv (torch + transformers, see requirements-reference.txt):

    bench/.envs/ref/bin/python scripts/make_golden_gemma4_audio.py

Builds transformers' `Gemma4AudioModel` and the audio `Gemma4MultimodalEmbedder`
(`embed_audio`) for `presets.tiny_gemma4_audio()` (2 conformer layers of width 32, 2 heads,
real 128-bin features, subsampling (128, 4), output 48) and a text width D = 64, in float32,
with float16-exact random weights: kernels fan-in scaled, norm scales `1 + 0.25 N(0, 1)`,
`per_dim_scale ~ N(0, 0.5)`, and clip bounds set inside the activation range that a first,
unclipped pass measures, so every clipped linear really clips. Two clips, a 1 s chirp
(200 Hz -> 6 kHz) and 0.62 s of another chirp, both with noise, go through HF's feature
extractor as one batch (the short clip is padded), the tower and the projection. Saved:

    preset                   "tiny-gemma4-audio"
    waveforms                float32 [2, 16000] the clips at 16 kHz, zero-padded
    lengths                  int32 [2] samples per clip (16000, 9875)
    features                 float32 [2, T=99, 128] `Gemma4AudioFeatureExtractor` output
    features_mask            bool [2, 99]
    tower                    float32 [2, 25, 48] `Gemma4AudioModel(...).last_hidden_state`
                             (HF leaves padded frames unmasked: compare valid frames only)
    tower_mask               bool [2, 25]
    projected                float32 [2, 25, 64] `embed_audio(tower)`
    attention_mask_5d        bool [2, 1, 3, 12, 24] HF's blocked mask (True = attend)
    count/lengths, count/tokens   int32: `Gemma4Processor._compute_audio_num_tokens`
    count/mask_tokens        int32: the subsampled-mask count `replace_audio_token` inserts
                             (from the extractor's mask on silence of that length)
    params/<path>            our tree: `audio_encoder/...` and
                             `embedder/audio_input_projection/w`, float16 (exact)
    meta/<package>           versions of torch and transformers

HF -> our parameter names (HF module `model.audio_tower.` = `Gemma4AudioModel`, `L` = layer;
`.T` = transpose of a torch Linear weight [out, in]; clip buffers only with clipped linears):

    subsample_conv_projection.layer{j}.conv.weight [C',C,3,3]
                         -> audio_encoder/feature/subsampling_{j}/kernel  permute(2,3,1,0)
    subsample_conv_projection.layer{j}.norm.weight  -> audio_encoder/feature/norm_{j}/scale
    subsample_conv_projection.input_proj_linear.weight [W, F'*C]
                         -> audio_encoder/feature/input_proj/kernel  .T.reshape(F', C, W)
    layers.L.feed_forward1.* -> conformer/stacked_layers_L/fflayer_start/*  (feed_forward2
                                 -> fflayer_end):  pre_layer_norm.weight -> pre_layer_norm/
                                 scale, post_layer_norm.weight -> post_layer_norm/scale,
                                 ffw_layer_{1,2}.linear.weight -> ffn_layer{1,2}/kernel .T
    layers.L.norm_pre_attn.weight / norm_post_attn.weight -> trans_atten/pre_norm|post_norm/scale
    layers.L.self_attn.{q,k,v}_proj.linear.weight -> trans_atten/self_atten/{query,key,value}/
                                 kernel .T
    layers.L.self_attn.per_dim_scale -> trans_atten/self_atten/per_dim_scale
    layers.L.self_attn.relative_k_proj.weight [N*H, W]
                         -> trans_atten/self_atten/relative_position_embedding/pos_proj/kernel
                            .T.reshape(W, N, H)
    layers.L.self_attn.post.linear.weight [W, N*H] -> trans_atten/post/kernel .T.reshape(N,H,W)
    layers.L.lconv1d.pre_layer_norm.weight -> lconv/ln/scale
    layers.L.lconv1d.linear_start|linear_end.linear.weight -> lconv/linear_start|linear_end/
                                 kernel .T
    layers.L.lconv1d.depthwise_conv1d.weight [W, 1, K] -> lconv/depthwise_conv1d/kernel
                                 permute(2, 1, 0)
    layers.L.lconv1d.conv_norm.weight -> lconv/conv_norm/scale
    layers.L.norm_out.weight -> final_ln/scale
    <linear>.{input_min,input_max,output_min,output_max} (every `.linear` above: q/k/v_proj,
        post, ffw_layer_1/2, linear_start/end) -> <kernel's module>/clip_{input,output}_{min,max}
    output_proj.weight [O, W] / .bias -> audio_encoder/output_projection/kernel .T / bias
    model.embed_audio.embedding_projection.weight [D, O] -> embedder/audio_input_projection/w .T
    (`embed_audio.embedding_pre_projection_norm` has no weights.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import types
from pathlib import Path

import numpy as np
import torch
from transformers.models.gemma4 import modeling_gemma4, processing_gemma4
from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script

from gemma_app.nn import presets  # noqa: E402
from gemma_app.nn.config import AudioConfig  # noqa: E402

PRESET = "tiny-gemma4-audio"
EMBED_DIM = 64
LENGTHS = (16_000, 9_875)
COUNT_LENGTHS = (
    0, 100, 160, 161, 320, 321, 481, 1_600, 9_875, 16_000, 16_001, 48_000, 479_999, 480_000,
    600_000,
)  # fmt: skip
SEED = 0


def hf_audio_config(cfg: AudioConfig) -> Gemma4AudioConfig:
    assert cfg.ffn_dim == 4 * cfg.width and cfg.subsampling_channels[0] == cfg.num_mel_bins
    return Gemma4AudioConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        subsampling_conv_channels=list(cfg.subsampling_channels),
        conv_kernel_size=cfg.conv_kernel,
        attention_chunk_size=cfg.chunk_size,
        attention_context_left=cfg.context_left,
        attention_context_right=cfg.context_right,
        attention_logit_cap=cfg.logit_cap,
        output_proj_dims=cfg.output_dim,
        use_clipped_linears=cfg.use_clipped_linears,
    )


def clips(rng: np.random.Generator) -> list[np.ndarray]:
    """Deterministic chirps plus noise, float32 at 16 kHz."""
    out = []
    for n, (f0, f1) in zip(LENGTHS, ((200.0, 6000.0), (3000.0, 300.0)), strict=True):
        t = np.arange(n) / 16_000
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
        wave = 0.5 * np.sin(phase) + 0.05 * rng.standard_normal(n)
        out.append(wave.astype(np.float32))
    return out


def f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def randomize(model: torch.nn.Module, embedder: torch.nn.Module, rng: np.random.Generator):
    """Float16-exact random weights; clip bounds stay +-inf until `set_clip_bounds`."""
    for name, p in [*model.named_parameters(), *embedder.named_parameters()]:
        if name.endswith("per_dim_scale"):
            value = 0.5 * rng.standard_normal(p.shape)
        elif p.ndim == 1 and not name.endswith("bias"):  # norm scales
            value = 1.0 + 0.25 * rng.standard_normal(p.shape)
        elif name.endswith("bias"):
            value = 0.1 * rng.standard_normal(p.shape)
        else:
            fan_in = int(np.prod(p.shape[1:]))
            value = rng.standard_normal(p.shape) / np.sqrt(fan_in)
        with torch.no_grad():
            p.copy_(torch.from_numpy(f16(value)))


def set_clip_bounds(model, features, mask, rng):
    """Puts every ClippableLinear's bounds inside the range its activations reach."""
    seen: dict[str, list[float]] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0]
            seen[name] = [float(x.min()), float(x.max()), float(output.min()), float(output.max())]

        return record

    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, modeling_gemma4.Gemma4ClippableLinear)
    }
    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        model(features, mask)
    for h in handles:
        h.remove()
    for name, module in linears.items():
        in_lo, in_hi, out_lo, out_hi = seen[name]
        frac = rng.uniform(0.6, 0.9, size=4)
        with torch.no_grad():
            module.input_min.fill_(float(f16(in_lo * frac[0])))
            module.input_max.fill_(float(f16(in_hi * frac[1])))
            module.output_min.fill_(float(f16(out_lo * frac[2])))
            module.output_max.fill_(float(f16(out_hi * frac[3])))


def hf_to_params(state: dict[str, np.ndarray], cfg: AudioConfig) -> dict[str, np.ndarray]:
    """HF `Gemma4AudioModel` state dict -> our flat `audio_encoder/...` paths (see above)."""
    n, h, w = cfg.num_heads, cfg.head_dim, cfg.width
    out = {}
    sub = "subsample_conv_projection"
    for j in range(2):
        out[f"feature/subsampling_{j}/kernel"] = state[f"{sub}.layer{j}.conv.weight"].transpose(
            2, 3, 1, 0
        )
        out[f"feature/norm_{j}/scale"] = state[f"{sub}.layer{j}.norm.weight"]
    c = cfg.subsampling_channels[1]
    out["feature/input_proj/kernel"] = state[f"{sub}.input_proj_linear.weight"].T.reshape(-1, c, w)

    def linear(ours: str, theirs: str, shape=None):
        kernel = state[f"{theirs}.linear.weight"].T
        out[f"{ours}/kernel"] = kernel if shape is None else kernel.reshape(shape)
        if cfg.use_clipped_linears:
            for side in ("input", "output"):
                for end in ("min", "max"):
                    out[f"{ours}/clip_{side}_{end}"] = state[f"{theirs}.{side}_{end}"].reshape(())

    for i in range(cfg.depth):
        hf, us = f"layers.{i}", f"conformer/stacked_layers_{i}"
        for half, name in (("feed_forward1", "fflayer_start"), ("feed_forward2", "fflayer_end")):
            for norm in ("pre_layer_norm", "post_layer_norm"):
                out[f"{us}/{name}/{norm}/scale"] = state[f"{hf}.{half}.{norm}.weight"]
            linear(f"{us}/{name}/ffn_layer1", f"{hf}.{half}.ffw_layer_1")
            linear(f"{us}/{name}/ffn_layer2", f"{hf}.{half}.ffw_layer_2")
        att = f"{us}/trans_atten"
        out[f"{att}/pre_norm/scale"] = state[f"{hf}.norm_pre_attn.weight"]
        out[f"{att}/post_norm/scale"] = state[f"{hf}.norm_post_attn.weight"]
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            linear(f"{att}/self_atten/{name}", f"{hf}.self_attn.{proj}")
        out[f"{att}/self_atten/per_dim_scale"] = state[f"{hf}.self_attn.per_dim_scale"]
        out[f"{att}/self_atten/relative_position_embedding/pos_proj/kernel"] = state[
            f"{hf}.self_attn.relative_k_proj.weight"
        ].T.reshape(w, n, h)
        linear(f"{att}/post", f"{hf}.self_attn.post", (n, h, w))
        lc = f"{hf}.lconv1d"
        out[f"{us}/lconv/ln/scale"] = state[f"{lc}.pre_layer_norm.weight"]
        linear(f"{us}/lconv/linear_start", f"{lc}.linear_start")
        out[f"{us}/lconv/depthwise_conv1d/kernel"] = state[
            f"{lc}.depthwise_conv1d.weight"
        ].transpose(2, 1, 0)
        out[f"{us}/lconv/conv_norm/scale"] = state[f"{lc}.conv_norm.weight"]
        linear(f"{us}/lconv/linear_end", f"{lc}.linear_end")
        out[f"{us}/final_ln/scale"] = state[f"{hf}.norm_out.weight"]
    out["output_projection/kernel"] = state["output_proj.weight"].T
    out["output_projection/bias"] = state["output_proj.bias"]
    return {f"audio_encoder/{k}": v for k, v in out.items()}


def hf_token_counts(extractor) -> tuple[np.ndarray, np.ndarray]:
    """HF's two token counts per length: the processor formula and the mask it inserts for."""
    fake = types.SimpleNamespace(feature_extractor=extractor, audio_seq_length=750)
    formula = [
        processing_gemma4.Gemma4Processor._compute_audio_num_tokens(fake, np.zeros(n), 16_000)
        for n in COUNT_LENGTHS
    ]
    from_mask = []
    for n in COUNT_LENGTHS:
        if n < 321 - 160:  # the extractor itself has no frame to return
            from_mask.append(0)
            continue
        m = extractor([np.zeros(n, np.float32)], return_tensors="np")["input_features_mask"][0]
        for _ in range(2):  # `replace_audio_token`: two stride-2 convs on the mask
            m = m[::2][: (len(m) + 2 - 3) // 2 + 1]
        from_mask.append(int(m.sum()))
    return np.asarray(formula, np.int32), np.asarray(from_mask, np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / f"{PRESET}.npz")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    cfg = presets.tiny_gemma4_audio()
    hf_cfg = hf_audio_config(cfg)
    model = modeling_gemma4.Gemma4AudioModel(hf_cfg).eval().float()
    embedder = modeling_gemma4.Gemma4MultimodalEmbedder(
        hf_cfg, types.SimpleNamespace(hidden_size=EMBED_DIM)
    ).eval()
    randomize(model, embedder, rng)

    waves = clips(rng)
    extractor = Gemma4AudioFeatureExtractor()
    batch = extractor(waves, return_tensors="np")
    features = torch.from_numpy(batch["input_features"])
    mask = torch.from_numpy(batch["input_features_mask"])
    set_clip_bounds(model, features, mask, rng)

    captured = {}

    def grab_mask(module, args, kwargs):
        captured.setdefault("mask", kwargs["attention_mask"])

    handle = model.layers[0].self_attn.register_forward_pre_hook(grab_mask, with_kwargs=True)
    with torch.no_grad():
        tower = model(features, mask)
        projected = embedder(tower.last_hidden_state)
    handle.remove()
    attend = (captured["mask"] == 0).numpy()  # HF's additive mask: 0 = attend

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = hf_to_params(state, cfg)
    params["embedder/audio_input_projection/w"] = (
        embedder.embedding_projection.weight.detach().numpy().T
    )
    for path, value in params.items():
        assert np.array_equal(f16(value), value), f"{path} is not float16-exact"

    padded = np.zeros((len(waves), max(LENGTHS)), np.float32)
    for i, wave in enumerate(waves):
        padded[i, : wave.size] = wave
    formula, from_mask = hf_token_counts(extractor)
    out = {
        "preset": np.asarray(PRESET),
        "waveforms": padded,
        "lengths": np.asarray(LENGTHS, np.int32),
        "features": batch["input_features"].astype(np.float32),
        "features_mask": batch["input_features_mask"].astype(bool),
        "tower": tower.last_hidden_state.numpy().astype(np.float32),
        "tower_mask": tower.attention_mask.numpy().astype(bool),
        "projected": projected.numpy().astype(np.float32),
        "attention_mask_5d": attend,
        "count/lengths": np.asarray(COUNT_LENGTHS, np.int32),
        "count/tokens": formula,
        "count/mask_tokens": from_mask,
        **{f"params/{k}": v.astype(np.float16) for k, v in params.items()},
        **{
            f"meta/{p}": np.asarray(importlib.metadata.version(p))
            for p in ("torch", "transformers")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    valid = out["tower_mask"]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    print(f"  features {out['features'].shape}, valid frames {out['features_mask'].sum(1)}")
    print(f"  tower {out['tower'].shape}, valid tokens {valid.sum(1)}")
    print(f"  token counts {dict(zip(COUNT_LENGTHS, formula.tolist(), strict=True))}")
    print(f"  mask counts agree with the formula: {bool((formula == from_mask).all())}")


if __name__ == "__main__":
    main()
