"""Checks a checkpoint against the model before reading any data, and names what it is.

`match_sources` compares every leaf (shape from the checkpoint's metadata, dtype on disk)
with `abstract_params(config)` and raises one `CheckpointMismatchError` listing every
problem. When the shapes fit another preset ("a gemma3-4b checkpoint loaded as gemma3-1b"),
the error says so; `infer_config` uses the same comparison to pick the architecture of a
local checkpoint that comes without a name.

Encoder loading (`text_only=False`) adds the encoders `config` has: the image encoder
(Gemma 3 SigLIP: `vision.abstract_params` + the two `embedder/mm_*` leaves of
`vision.mm_embedder_shapes`; Gemma 4: `vision4.abstract_params` + `vision4.mm_embedder_shapes`)
and the Gemma 4 audio encoder (`audio.abstract_params` + `audio.audio_embedder_shapes`), all
float32 whatever the text dtype (the encoders run in float32, and the reference casts the
projections to float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_app.ckpt import hf_map, layouts
from gemma_app.ckpt.errors import CheckpointMismatchError, UnsupportedModelError
from gemma_app.nn import presets, vision
from gemma_app.nn.config import Gemma4VisionConfig, TransformerConfig, VisionConfig
from gemma_app.nn.transformer import abstract_params

Shapes = Mapping[str, tuple[int, ...]]
VISION_DTYPE = np.dtype(np.float32)  # storage dtype of every vision leaf, whatever the text's
POOL = 4  # Gemma 3 average-pools the patch grid 4x4 (64x64 patches -> 256 soft tokens)
_SIGLIP = "vision_encoder/siglip_encoder/"
_BLOCK = re.compile(r"^vision_encoder/siglip_encoder/Transformer/encoderblock_(\d+)/")


def text_shapes(sources: Mapping[str, layouts.Source]) -> dict[str, tuple[int, ...]]:
    """Our path -> shape of every text-decoder leaf (encoder weights left out)."""
    return {p: s.shape for p, s in sources.items() if not layouts.is_encoder_path(p)}


def text_config(config: TransformerConfig) -> TransformerConfig:
    """`config` without its encoders (`vision=None`, `audio=None`): what text-only loading
    fills."""
    if config.vision is None and config.audio is None:
        return config
    return dataclasses.replace(config, vision=None, audio=None)


def loads_vision(config: TransformerConfig, text_only: bool) -> bool:
    """True when a load fills the image encoder: asked for, and `config` has one."""
    return not text_only and getattr(config, "vision", None) is not None


def loads_audio(config: TransformerConfig, text_only: bool) -> bool:
    """True when a load fills the Gemma 4 audio encoder: asked for, and `config` has one."""
    return not text_only and getattr(config, "audio", None) is not None


def audio_paths(paths: Iterable[str]) -> list[str]:
    """The audio-encoder leaves (`layouts.is_audio_path`) among `paths`, sorted."""
    return sorted(p for p in paths if layouts.is_audio_path(p))


def vision_paths(paths: Iterable[str]) -> list[str]:
    """The image-encoder leaves (`layouts.is_vision_path`) among `paths`, sorted."""
    return sorted(p for p in paths if layouts.is_vision_path(p))


def infer_vision_config(shapes: Shapes) -> VisionConfig | None:
    """The `VisionConfig` whose `vision_encoder` tree has these shapes, or None.

    Width, patch size, heads, MLP width and depth are read off the leaves; the soft-token count
    is not stored anywhere, so it follows Gemma 3's 4x4 pooling of the patch grid (64x64
    patches -> 256 tokens; the tiny presets' 8x8 -> 4). A tree without these leaves, or whose
    grid is not square or does not pool 4x4, gives None. Only block 0 is read: the other
    leaves are checked afterwards, against this config, by `match_sources`.
    """
    try:
        patch, patch_w, channels, width = shapes[_SIGLIP + "embedding/kernel"]
        _, patches, _ = shapes[_SIGLIP + "pos_embedding"]
        block = _SIGLIP + "Transformer/encoderblock_0/"
        _, mlp_dim = shapes[block + "MlpBlock_0/Dense_0/kernel"]
        _, heads, _ = shapes[block + "MultiHeadDotProductAttention_0/query/kernel"]
    except (KeyError, ValueError):
        return None
    depth = len({m[1] for path in shapes if (m := _BLOCK.match(path))})
    side = math.isqrt(patches)
    if side * side != patches or side % POOL or patch != patch_w or channels != 3:
        return None
    try:
        return VisionConfig(
            image_size=side * patch, patch_size=patch, width=width, depth=depth,
            mlp_dim=mlp_dim, num_heads=heads, num_mm_tokens_per_image=(side // POOL) ** 2,
        )  # fmt: skip
    except ValueError:
        return None


def _candidates(vocab: int | None) -> list[tuple[str, TransformerConfig]]:
    """(key, config) of every preset, with the checkpoint's vocabulary size where it differs."""
    candidates = []
    for key in [*presets.PRESETS, *presets.TINY_PRESETS]:
        config = text_config(presets.get_preset(key))
        if vocab is not None and vocab != config.num_embed:
            config = dataclasses.replace(config, num_embed=vocab)
        candidates.append((key, config))
    return candidates


def _spelled(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    return {layouts.spelling_key(p): tuple(s) for p, s in shapes.items()}


def infer_preset(shapes: Shapes) -> tuple[str, TransformerConfig] | None:
    """(preset key, config) whose parameter shapes equal `shapes` (vocab may differ), or None.

    Norm spellings (`_query_norm` / `query_norm`) do not matter (`layouts.spelling_key`).
    """
    embedding = shapes.get("embedder/input_embedding")
    vocab = embedding[0] if embedding else None
    wanted = _spelled(shapes)
    for key, config in _candidates(vocab):
        if _spelled(hf_map.param_shapes(config)) == wanted:
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


def _encoder_targets(
    root: str, tree: Mapping, embedder: Mapping[str, tuple[int, ...]]
) -> dict[str, jax.ShapeDtypeStruct]:
    """An encoder's tree under `root/` plus its embedder leaves, as float32 targets."""
    if set(tree) == {root}:  # a module whose own tree starts at its root name
        tree = tree[root]
    flat = {f"{root}/{path}": leaf for path, leaf in hf_map.flatten_params(tree).items()}
    flat = {p: jax.ShapeDtypeStruct(leaf.shape, VISION_DTYPE) for p, leaf in flat.items()}
    for path, shape in embedder.items():
        flat[path] = jax.ShapeDtypeStruct(tuple(shape), VISION_DTYPE)
    return flat


@functools.lru_cache(maxsize=8)
def _vision_targets(config: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Every vision leaf of `config` (encoder tree + embedder `mm_*`) as float32 targets."""
    vc, d = config.vision, config.embed_dim
    if isinstance(vc, Gemma4VisionConfig):
        from gemma_app.nn import vision4  # the Gemma 4 ViT (its own module)

        tree, embedder = vision4.abstract_params(vc), vision4.mm_embedder_shapes(vc, d)
    else:
        tree, embedder = vision.abstract_params(vc, VISION_DTYPE), vision.mm_embedder_shapes(vc, d)
    return _encoder_targets(layouts.VISION_ROOT, tree, embedder)


@functools.lru_cache(maxsize=8)
def _audio_targets(config: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Every audio leaf of `config` (conformer + `embedder/audio_input_projection`), float32."""
    from gemma_app.nn import audio  # the Gemma 4 conformer

    ac = config.audio
    embedder = audio.audio_embedder_shapes(ac, config.embed_dim)
    return _encoder_targets(layouts.AUDIO_ROOT, audio.abstract_params(ac), embedder)


def targets(
    config: TransformerConfig, dtype, *, text_only: bool = True
) -> dict[str, jax.ShapeDtypeStruct]:
    """Our path -> target shape and dtype of every leaf a load fills.

    The text decoder in `dtype`; with `text_only=False` also the encoders `config` has (image:
    `loads_vision`, audio: `loads_audio`) and their embedder projections, in float32.
    """
    flat = dict(_targets(config, np.dtype(dtype)))
    if loads_vision(config, text_only):
        flat.update(_vision_targets(config))
    if loads_audio(config, text_only):
        flat.update(_audio_targets(config))
    return flat


def vision_bytes(config: TransformerConfig, dtype=VISION_DTYPE) -> int:
    """Bytes of the image encoder + projection of `config` stored as `dtype` (0 without one)."""
    if getattr(config, "vision", None) is None:
        return 0
    count = sum(int(np.prod(t.shape)) for t in _vision_targets(config).values())
    return count * np.dtype(dtype).itemsize


def audio_bytes(config: TransformerConfig, dtype=VISION_DTYPE) -> int:
    """Bytes of the audio encoder + projection of `config` stored as `dtype` (0 without one)."""
    if getattr(config, "audio", None) is None:
        return 0
    count = sum(int(np.prod(t.shape)) for t in _audio_targets(config).values())
    return count * np.dtype(dtype).itemsize


def encoder_bytes(config: TransformerConfig, dtype=VISION_DTYPE) -> int:
    """Bytes of every encoder + projection of `config` stored as `dtype`."""
    return vision_bytes(config, dtype) + audio_bytes(config, dtype)


def _integer_leaves(
    sources: Mapping[str, layouts.Source], load_vision: bool, load_audio: bool
) -> list[str]:
    return [
        f"{path} ({source.dtype})"
        for path, source in sources.items()
        if not layouts.is_skipped(path, load_vision=load_vision, load_audio=load_audio)
        and not jnp.issubdtype(source.dtype, jnp.floating)
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
      text_only: skip encoder weights (`layouts.is_skipped`). With text_only=False the
        encoders of `config` (`vision`, `audio`) are loaded too and checked leaf by leaf.
      what: how the message names the checkpoint.

    Returns:
      (our path, Source) for every leaf of `targets(config, dtype, text_only=text_only)`.

    Raises:
      UnsupportedModelError: quantized (integer) weights.
      CheckpointMismatchError: missing, unexpected or wrongly shaped leaves, all listed
        (text and image encoder together).
    """
    load_vision, load_audio = loads_vision(config, text_only), loads_audio(config, text_only)
    if integers := _integer_leaves(sources, load_vision, load_audio):
        raise UnsupportedModelError(
            f"{what} stores integer weights ({', '.join(integers[:3])}): quantized "
            "checkpoints (e.g. the '-int4' Kaggle variants) are not supported; use the bf16 one."
        )
    wanted = targets(config, dtype, text_only=text_only)
    spelled = {layouts.spelling_key(p): p for p in sources}  # `_query_norm` == `query_norm`
    used = set()
    problems: dict[str, str] = {}  # our path -> problem
    plan = []
    for path, target in wanted.items():
        found = spelled.get(layouts.spelling_key(path))
        used.add(found)
        source, shape = sources.get(found), tuple(target.shape)
        if source is None:
            problems[path] = f"missing {path} (expected {shape})"
        elif source.shape != shape:
            problems[path] = f"{path}: checkpoint has {source.shape}, model expects {shape}"
        else:
            plan.append((path, source))
    skip = functools.partial(layouts.is_skipped, load_vision=load_vision, load_audio=load_audio)
    for path, source in sources.items():
        if path not in used and not skip(path):
            problems[path] = f"unexpected {path} {source.shape}"
    if problems:
        raise mismatch(f"{what} does not match {config.name}", problems, text_shapes(sources))
    return plan


def mismatch(what: str, problems: Mapping[str, str], shapes: Shapes) -> CheckpointMismatchError:
    """The error for `problems` (our path -> line), all listed.

    When only encoder leaves are wrong the message says how to skip them; otherwise it
    names the preset the text weights look like (`shapes`), if any.
    """
    if all(layouts.is_vision_path(path) for path in problems):
        what += " (image encoder only: load text-only, text_only=True or --text-only, to skip it)"
        return CheckpointMismatchError(what, list(problems.values()))
    if all(layouts.is_encoder_path(path) for path in problems):
        what += " (encoders only: load text-only, text_only=True or --text-only, to skip them)"
        return CheckpointMismatchError(what, list(problems.values()))
    return CheckpointMismatchError(what, list(problems.values()), looks_like=looks_like(shapes))


def check_restored(
    arrays: Mapping[str, jax.Array], config: TransformerConfig, dtype, *, text_only: bool = True
) -> None:
    """Every restored leaf has exactly the shape and dtype of `targets(config, dtype, ...)`."""
    targets_ = targets(config, dtype, text_only=text_only)
    problems = [f"missing {p} after restore" for p in targets_ if p not in arrays]
    problems += [
        f"{path}: restored {arrays[path].shape} {arrays[path].dtype}, expected "
        f"{target.shape} {target.dtype}"
        for path, target in targets_.items()
        if path in arrays
        and (arrays[path].shape != target.shape or arrays[path].dtype != target.dtype)
    ]
    problems += [f"unexpected {p} after restore" for p in arrays if p not in targets_]
    if problems:
        raise CheckpointMismatchError(f"Restored weights do not match {config.name}", problems)
