"""Orbax checkpoint layouts (spec §2.2) <-> paths of our nested tree, as pure key maps.

Our tree uses '/'-joined paths such as `layer_0/attn/q_einsum/w` and the bare MLP leaves
`layer_0/mlp/gating_einsum`. Checkpoints spell the same leaves four ways:

* FLAT (the official Gemma 1/2/3 releases): top-level keys are module paths under
  `transformer/`, leaves sit in small dicts: `{"transformer/layer_0/attn/q_einsum": {"w": x}}`,
  MLP weights too (`{"transformer/layer_0/mlp/gating_einsum": {"w": x}}`); the Gemma 3
  vision tower lives under `SigLiPFromPatches_0/...`.
* NESTED: the `model.init()` tree itself, optionally under a `transformer` root.
* STACKED: layers stacked by position in the attention pattern:
  `transformer/stacked_layers/attention_type_{j}/<module>` holds a leading axis `s`, and
  layer `s * pattern_len + j` is slice `s` (pattern_len = 1 + the largest j).
* KAULDRON: a training checkpoint, `{"params": ..., "opt_state", "step", "collections"}`,
  usually in a `default/` sub-directory; only `params` is read.

Joining every key path with '/' makes FLAT and NESTED the same string, so one canonical
mapping covers all layouts; a `Source` keeps the original key tuple for orbax. No I/O here.

Gemma 4 (spec §2.2) adds, all handled by the same canonical mapping:

* dense MLP weights stored in dict form (`layer_i/mlp/gating_einsum/w`, also `mlp2/` of the
  MoE layers) while the model has bare leaves; the MoE expert weights of 26B-A4B are *meant*
  to be `mlp/gating_einsum/w` `(E, 2, I, D)` and `mlp/linear/w` `(E, I, D)`. The `/w` is
  therefore unwrapped by shape (dense: 3-D gate, 2-D linear), never by name alone, so MoE
  checkpoints load in every layout, FLAT included (where the reference loader's `mlp/`
  rule would mangle them);
* `query_norm` / `key_norm` (Gemma 3n/4) vs `_query_norm` / `_key_norm` (Gemma 3): both
  spellings are accepted for either model (`spelling_key` compares them as equal);
* encoders at their own roots: `vision_encoder/entry/...`, `vision_encoder/transformer/
  stacked_layers/block/...` (already stacked by layer in our tree, left as stored; not the
  STACKED layout), `vision_encoder/standardize/...`, `audio_encoder/...`; an optional
  `transformer/` root in front of anything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gemma_app.ckpt.hf_map import unflatten_params
from gemma_app.nn.config import AttentionType

FLAT, NESTED, STACKED, KAULDRON = "FLAT", "NESTED", "STACKED", "KAULDRON"
KAULDRON_KEYS = frozenset({"collections", "opt_state", "params", "step"})

# Text-only loading skips these (spec §2.2); vision loading keeps the image encoder
# (`VISION_ROOT` and `VISION_EMBEDDER_KEYS`), audio loading the audio encoder (`AUDIO_ROOT`,
# `AUDIO_EMBEDDER_KEYS`), and both still skip the rest. `is_skipped` is the one rule every
# loader applies.
ENCODER_ROOTS = ("vision_encoder", "audio_encoder")
VISION_ROOT = "vision_encoder"
AUDIO_ROOT = "audio_encoder"
# The embedder leaves of the image path (spec §2.1: Gemma 3 both, Gemma 4 the projection
# only); restored in float32.
VISION_EMBEDDER_KEYS = frozenset({"mm_input_projection", "mm_soft_embedding_norm"})
# The embedder leaf of the Gemma 4 audio path (its norm has no parameters); float32.
AUDIO_EMBEDDER_KEYS = frozenset({"audio_input_projection"})
EMBEDDER_ENCODER_KEYS = frozenset(
    {
        "mm_input_projection",
        "mm_soft_embedding_norm",
        "mm_pre_projection_norm",
        "mm_input_embedding_extra",
        "audio_input_projection",
        "audio_soft_embedding_norm",
        "audio_input_embedding",
        "audio_input_embedding_extra",
    }
)

_SIGLIP_ROOT = "SigLiPFromPatches_0/"
_OUR_SIGLIP = "vision_encoder/siglip_encoder"
_STACKED = re.compile(r"^stacked_layers/attention_type_(\d+)/(.+)$")
# Dense MLP leaves in dict form; group 2 says which, for the rank check of `_unwrap_mlp`.
_MLP_WRAPPED = re.compile(r"^(layer_\d+/mlp2?/(gating_einsum|linear))/w$")
_DENSE_RANK = {"gating_einsum": 3, "linear": 2}  # (2, F, D) / (F, D); MoE experts add E
_BARE_MLP = re.compile(r"^layer_\d+/mlp2?/(?:gating_einsum|linear)$")
_NORM_SPELLING = re.compile(r"(^|/)_(query_norm|key_norm)(/|$)")


def is_encoder_path(path: str) -> bool:
    """True for vision/audio encoder weights (canonical path), which text-only loading skips."""
    root, _, rest = path.partition("/")
    return root in ENCODER_ROOTS or (
        root == "embedder" and rest.split("/")[0] in EMBEDDER_ENCODER_KEYS
    )


def is_vision_path(path: str) -> bool:
    """True for the image encoder and its embedder projection leaves (canonical path)."""
    root, _, rest = path.partition("/")
    return root == VISION_ROOT or (
        root == "embedder" and rest.split("/")[0] in VISION_EMBEDDER_KEYS
    )


def is_audio_path(path: str) -> bool:
    """True for the Gemma 4 audio encoder and its embedder projection (canonical path)."""
    root, _, rest = path.partition("/")
    return root == AUDIO_ROOT or (root == "embedder" and rest.split("/")[0] in AUDIO_EMBEDDER_KEYS)


def is_skipped(path: str, *, load_vision: bool = False, load_audio: bool = False) -> bool:
    """The skip rule of every loader: encoder weights, except those of a loaded encoder.

    Text-only loading skips every `is_encoder_path`; vision loading keeps `is_vision_path`
    leaves, audio loading `is_audio_path` leaves, and both still skip the embedder extras
    some checkpoints carry (`mm_pre_projection_norm`, `mm_input_embedding_extra`, ...).
    """
    keep = (load_vision and is_vision_path(path)) or (load_audio and is_audio_path(path))
    return is_encoder_path(path) and not keep


def spelling_key(path: str) -> str:
    """`path` with `_query_norm` / `_key_norm` spelled `query_norm` / `key_norm`.

    Gemma 3 trees use the underscore, Gemma 3n/4 trees do not, and third-party converters
    normalise either way; two paths with the same key are the same leaf.
    """
    return _NORM_SPELLING.sub(r"\1\2\3", path)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one leaf of our tree lives in a checkpoint.

    Attributes:
      key: key path in the checkpoint's tree, e.g. `("transformer/layer_0/mlp/linear", "w")`.
      shape: shape of our leaf (for STACKED: without the stacking axis).
      dtype: dtype on disk.
      index: STACKED only: the slice of the stored array's leading axis.
    """

    key: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    index: int | None = None


def detect_layout(keys: Sequence[tuple[str, ...]]) -> str:
    """FLAT, NESTED, STACKED or KAULDRON, from the key paths of a checkpoint's tree.

    Only the text decoder's `stacked_layers/attention_type_{j}` makes a STACKED checkpoint;
    the Gemma 4 image encoder's `vision_encoder/transformer/stacked_layers/block` is stacked
    in every layout (and in our tree).
    """
    if {key[0] for key in keys} == KAULDRON_KEYS:
        return KAULDRON
    if any(_STACKED.match("/".join(key).removeprefix("transformer/")) for key in keys):
        return STACKED
    return FLAT if any("/" in key[0] for key in keys) else NESTED


def _unwrap_mlp(path: str, shape: tuple[int, ...]) -> str:
    """`layer_i/mlp/gating_einsum/w` -> `layer_i/mlp/gating_einsum` for a dense MLP only."""
    match = _MLP_WRAPPED.match(path)
    if match and len(shape) == _DENSE_RANK[match[2]]:
        return match[1]
    return path


def _canonical(joined: str, shape: tuple[int, ...]) -> str:
    path = joined.removeprefix("transformer/")
    if path.startswith(_SIGLIP_ROOT):
        path = "vision_encoder/" + path.removeprefix(_SIGLIP_ROOT)
    return _unwrap_mlp(path, shape)


def canonical_sources(
    leaves: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]],
) -> tuple[str, dict[str, Source], list[str]]:
    """Maps every leaf of a checkpoint onto a path of our tree.

    Args:
      leaves: checkpoint key path -> (shape, dtype on disk), e.g. from orbax metadata.

    Returns:
      (layout, our path -> Source, problems): problems name keys that two leaves map to.
    """
    layout = detect_layout(list(leaves))
    if layout == KAULDRON:
        leaves = {key: meta for key, meta in leaves.items() if key[0] == "params"}
    stacked = {}
    sources: dict[str, Source] = {}
    problems: list[str] = []

    def add(path: str, source: Source) -> None:
        if path in sources:
            problems.append(f"{path} is stored twice: as {sources[path].key} and {source.key}")
        sources[path] = source

    for key, (shape, dtype) in leaves.items():
        joined = "/".join(key[1:] if layout == KAULDRON else key)
        match = _STACKED.match(joined.removeprefix("transformer/"))
        if match:
            stacked[key] = (int(match[1]), match[2], tuple(shape), dtype)
        else:
            add(_canonical(joined, tuple(shape)), Source(key, tuple(shape), np.dtype(dtype)))
    pattern_len = 1 + max((j for j, *_ in stacked.values()), default=0)
    for key, (j, rest, shape, dtype) in stacked.items():
        for s in range(shape[0]):
            path = _canonical(f"layer_{s * pattern_len + j}/{rest}", shape[1:])
            add(path, Source(key, shape[1:], np.dtype(dtype), index=s))
    return layout, sources, problems


def pattern_length(attention_types: Sequence[AttentionType]) -> int:
    """Shortest period of the per-layer attention pattern (Gemma 1: 1, 2: 2, 3: 6)."""
    n = len(attention_types)
    return next(
        p
        for p in range(1, n + 1)
        if all(t == attention_types[i % p] for i, t in enumerate(attention_types))
    )


# --- writing (test fixtures, benchmarks) ----------------------------------------------------


def _module_and_leaf(path: str) -> tuple[str, str]:
    """`layer_0/attn/q_einsum/w` -> (`layer_0/attn/q_einsum`, `w`); bare MLP leaves get `w`."""
    if _BARE_MLP.match(path):
        return path, "w"
    module, leaf = path.rsplit("/", 1)
    return module, leaf


def _flat_key(module: str) -> str:
    """FLAT key of a module: the Gemma 3 SigLIP tower under its own root, the Gemma 4
    encoders under theirs (spec §2.2), the text decoder under `transformer/`."""
    if module.startswith(_OUR_SIGLIP):
        return _SIGLIP_ROOT + module.removeprefix("vision_encoder/")
    if module.split("/")[0] in ENCODER_ROOTS:
        return module
    return f"transformer/{module}"


def to_layout(flat: Mapping[str, Any], layout: str, *, pattern_len: int = 1) -> dict[str, Any]:
    """Our '/'-joined leaves -> the tree a checkpoint of `layout` stores (inverse of the above).

    Args:
      flat: our path -> array (may include `vision_encoder/...` and embedder `mm_*` leaves).
      layout: FLAT, NESTED, STACKED or KAULDRON.
      pattern_len: STACKED only: layers per attention pattern (`pattern_length`).
    """
    if layout == NESTED:
        return unflatten_params(flat)
    if layout == KAULDRON:
        step = np.zeros((), np.int64)
        return {
            "params": unflatten_params(flat),
            "step": step,
            "opt_state": {"count": step},
            "collections": {"unused": step},
        }
    tree: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], dict[int, Any]] = {}
    for path, value in flat.items():
        module, leaf = _module_and_leaf(path)
        layer = re.match(r"^layer_(\d+)/(.+)$", module)
        if layout == STACKED and layer:
            i = int(layer[1])
            j, s = i % pattern_len, i // pattern_len
            groups.setdefault((f"stacked_layers/attention_type_{j}/{layer[2]}", leaf), {})[s] = (
                value
            )
        else:
            tree.setdefault(_flat_key(module), {})[leaf] = value
    for (module, leaf), by_slice in groups.items():
        tree.setdefault(f"transformer/{module}", {})[leaf] = np.stack(
            [by_slice[s] for s in sorted(by_slice)]
        )
    return tree
