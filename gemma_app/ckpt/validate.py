"""Checks a checkpoint against the model before reading any data, and names what it is.

`match_sources` compares every leaf (shape from the checkpoint's metadata, dtype on disk)
with `abstract_params(config)` and raises one `CheckpointMismatchError` listing every
problem. When the shapes fit another preset ("a gemma3-4b checkpoint loaded as gemma3-1b"),
the error says so; `infer_config` uses the same comparison to pick the architecture of a
local checkpoint that comes without a name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.ckpt import hf_map, layouts
from gemma_app.ckpt.errors import CheckpointMismatchError, UnsupportedModelError
from gemma_app.nn import presets
from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import abstract_params

Shapes = Mapping[str, tuple[int, ...]]


def text_shapes(sources: Mapping[str, layouts.Source]) -> dict[str, tuple[int, ...]]:
    """Our path -> shape of every text-decoder leaf (encoder weights left out)."""
    return {p: s.shape for p, s in sources.items() if not layouts.is_encoder_path(p)}


def text_config(config: TransformerConfig) -> TransformerConfig:
    """`config` without its image encoder (`vision=None`): what text-only loading fills."""
    if getattr(config, "vision", None) is None:
        return config
    return dataclasses.replace(config, vision=None)


def _candidates(vocab: int | None) -> list[tuple[str, TransformerConfig]]:
    """(key, config) of every preset, with the checkpoint's vocabulary size where it differs."""
    candidates = []
    for key in [*presets.PRESETS, *presets.TINY_PRESETS]:
        config = text_config(presets.get_preset(key))
        if vocab is not None and vocab != config.num_embed:
            config = dataclasses.replace(config, num_embed=vocab)
        candidates.append((key, config))
    return candidates


def infer_preset(shapes: Shapes) -> tuple[str, TransformerConfig] | None:
    """(preset key, config) whose parameter shapes equal `shapes` (vocab may differ), or None."""
    embedding = shapes.get("embedder/input_embedding")
    vocab = embedding[0] if embedding else None
    for key, config in _candidates(vocab):
        if hf_map.param_shapes(config) == dict(shapes):
            return key, config
    return None


def infer_config(shapes: Shapes) -> TransformerConfig | None:
    """The config of the preset whose shapes equal `shapes` (see `infer_preset`), or None."""
    found = infer_preset(shapes)
    return found[1] if found else None


def describe(shapes: Shapes) -> str:
    """A one-line summary of a checkpoint's architecture, from its shapes."""
    layers = len({p.split("/")[0] for p in shapes if p.startswith("layer_")})
    parts = [f"{layers} layers"]
    if embedding := shapes.get("embedder/input_embedding"):
        parts.append(f"embedding {embedding[0]} x {embedding[1]}")
    if q := shapes.get("layer_0/attn/q_einsum/w"):
        kv = shapes.get("layer_0/attn/kv_einsum/w")
        parts.append(f"{q[0]} heads of {q[2]}, {kv[1] if kv else q[0]} KV heads")
    if linear := shapes.get("layer_0/mlp/linear"):
        parts.append(f"MLP {linear[0]}")
    return ", ".join(parts)


def looks_like(shapes: Shapes) -> str:
    """What `shapes` look like: a preset key, maybe with its vocabulary size, or a summary."""
    found = infer_preset(shapes)
    if found is None:
        return f"an unknown model ({describe(shapes)})"
    key, config = found
    if presets.get_preset(key).num_embed != config.num_embed:
        return f"{key} with {config.num_embed} embedding rows"
    return key


@functools.lru_cache(maxsize=8)
def _targets(config: TransformerConfig, dtype: np.dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `abstract_params(config, dtype)`; cached because tracing the model takes ~0.3 s."""
    return hf_map.flatten_params(abstract_params(config, dtype))


def _integer_leaves(sources: Mapping[str, layouts.Source]) -> list[str]:
    return [
        f"{path} ({source.dtype})"
        for path, source in sources.items()
        if not layouts.is_encoder_path(path) and not jnp.issubdtype(source.dtype, jnp.floating)
    ]


def match_sources(
    sources: Mapping[str, layouts.Source],
    config: TransformerConfig,
    dtype,
    *,
    text_only: bool = True,
    what: str = "Checkpoint",
) -> list[tuple[str, layouts.Source]]:
    """Pairs every leaf of the model with its checkpoint source, or raises listing all problems.

    Args:
      sources: our path -> Source, from `layouts.canonical_sources`.
      config: the architecture to load into.
      dtype: the target dtype (on-disk floating dtypes are cast to it).
      text_only: skip encoder weights (`layouts.is_encoder_path`).
      what: how the message names the checkpoint.

    Returns:
      (our path, Source) for every leaf of `abstract_params(config)`.

    Raises:
      UnsupportedModelError: quantized (integer) weights, or encoder weights with
        text_only=False (vision loading is not implemented yet).
      CheckpointMismatchError: missing, unexpected or wrongly shaped leaves, all listed.
    """
    encoders = sorted(p for p in sources if layouts.is_encoder_path(p))
    if encoders and not text_only:
        raise UnsupportedModelError(
            f"{what} holds {len(encoders)} vision/audio encoder weights ({encoders[0]}, ...); "
            "loading them is not supported yet: load with text_only=True."
        )
    if integers := _integer_leaves(sources):
        raise UnsupportedModelError(
            f"{what} stores integer weights ({', '.join(integers[:3])}): quantized "
            "checkpoints (e.g. the '-int4' Kaggle variants) are not supported; use the bf16 one."
        )
    targets = _targets(config, np.dtype(dtype))
    problems, plan = [], []
    for path, target in targets.items():
        source, shape = sources.get(path), tuple(target.shape)
        if source is None:
            problems.append(f"missing {path} (expected {shape})")
        elif source.shape != shape:
            problems.append(f"{path}: checkpoint has {source.shape}, model expects {shape}")
        else:
            plan.append((path, source))
    problems += [
        f"unexpected {p} {s.shape}"
        for p, s in sources.items()
        if p not in targets and not layouts.is_encoder_path(p)
    ]
    if problems:
        raise CheckpointMismatchError(
            f"{what} does not match {config.name}",
            problems,
            looks_like=looks_like(text_shapes(sources)),
        )
    return plan


def check_restored(arrays: Mapping[str, jax.Array], config: TransformerConfig, dtype) -> None:
    """Every restored leaf has exactly the shape and dtype of `abstract_params(config, dtype)`."""
    targets = _targets(config, np.dtype(dtype))
    problems = [f"missing {p} after restore" for p in targets if p not in arrays]
    problems += [
        f"{path}: restored {arrays[path].shape} {arrays[path].dtype}, expected "
        f"{target.shape} {target.dtype}"
        for path, target in targets.items()
        if path in arrays
        and (arrays[path].shape != target.shape or arrays[path].dtype != target.dtype)
    ]
    if problems:
        raise CheckpointMismatchError(f"Restored weights do not match {config.name}", problems)
