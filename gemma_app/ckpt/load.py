"""Public entry points: `load_engine(model)` for the app and `load_params(path, config)`.

`model` may be a registry variant (`gemma3-4b-it`, pinned `gemma3-4b-it@1`), a Kaggle handle
(`google/gemma-3/flax/gemma3-4b-it/1`), a local directory (an orbax checkpoint, a Kaggle-style
download holding one next to `tokenizer.model`, or a Hugging Face model directory) or a
Hugging Face repo id (`google/gemma-3-1b-it`, or explicitly `hf:google/gemma-3-1b-it`).

Files are checked (checkpoint metadata, tokenizer) before any weight is read, so wrong
inputs fail in seconds with a message that says what to do (`errors.WeightsError`).

Images: `load_engine` also loads the SigLIP image encoder of the models that have one
(Gemma 3 4B/12B/27B, `Gemma3ForConditionalGeneration` directories) and sets
`Engine.supports_images`; `text_only=True` skips it (about 0.4 B parameters, ~1.7 GB as the
float32 it runs in). The encoder and the embedder's `mm_*` projection + norm are stored in
float32 whatever `dtype` the text weights get. `load_params` stays text-only unless asked.

Usage:
    engine = load_engine("gemma3-4b-it@1", progress=lambda msg, f: print(f"{f:4.0%} {msg}"))
    engine = load_engine("gemma3-4b-it@1", text_only=True)       # no image input, less memory
    params = load_params("/ckpts/gemma3-1b-it", presets.gemma3_1b(), dtype="float32")
    params = load_params("/ckpts/gemma3-4b-it", presets.gemma3_4b(), text_only=False)
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma_app.ckpt import hf, kaggle, layouts, orbax_io, registry, validate
from gemma_app.ckpt.errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    MissingFilesError,
    ModelNotFoundError,
    UnsupportedModelError,
    brief,
)
from gemma_app.ckpt.hf_map import flatten_params, param_shapes, unflatten_params
from gemma_app.ckpt.progress import Progress, ProgressFn
from gemma_app.engine import Engine, compute_dtype_for, resolve_dtype, scan_by_default
from gemma_app.nn import presets
from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import stack_layers
from gemma_app.text.tokenizer import Tokenizer

DTYPES = {
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
}
# Storage dtype when none is asked for: engine.resolve_dtype("auto") picks bfloat16 (float32
# on a CPU without the project's kernels, where XLA:CPU decodes bf16 weights ~20x slower).
DEFAULT_DTYPE = "auto"
logger = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.model"
_HF_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_dtype(dtype: Any) -> np.dtype:
    """ "auto"/"bfloat16"/"bf16"/"float32"/"fp32" or a dtype -> numpy dtype (bf16: ml_dtypes)."""
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = resolve_dtype("auto").param_dtype
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"Unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float32)):
        raise ValueError(f"Unsupported dtype {dtype}; use bfloat16 or float32")
    return dtype


def param_bytes(config: TransformerConfig, dtype: Any) -> int:
    """Bytes of the text-decoder parameters of `config` stored as `dtype`."""
    count = sum(int(np.prod(shape)) for shape in param_shapes(config).values())
    return count * np.dtype(dtype).itemsize


def vision_bytes(config: TransformerConfig, dtype: Any = np.float32) -> int:
    """Bytes of the image encoder + projection of `config` as `dtype` (0 if it has none).

    Gemma 3 4B/12B/27B: 0.42 B parameters, 1.7 GB in float32 (the dtype they are loaded in).
    """
    return validate.vision_bytes(config, dtype)


# --- parameters -------------------------------------------------------------------------


def load_params(
    path: str | pathlib.Path,
    config: TransformerConfig,
    *,
    dtype: Any = DEFAULT_DTYPE,
    text_only: bool = True,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """Loads a local checkpoint into our nested parameter tree of device arrays.

    Args:
      path: an orbax checkpoint directory in any layout (FLAT, NESTED, STACKED, KAULDRON),
        a directory holding exactly one (a Kaggle download), or a Hugging Face model
        directory (config.json + safetensors).
      config: the architecture; every leaf is checked against `abstract_params(config)`.
      dtype: storage dtype of the text weights ("bfloat16" or "float32"); cast leaf by leaf.
      text_only: skip the vision/audio encoder weights (the default). False loads the image
        encoder of `config.vision` (Gemma 3 4B+): `vision_encoder/...` and
        `embedder/mm_input_projection/w`, `embedder/mm_soft_embedding_norm/scale`, all float32
        and all checked against `vision.abstract_params` + `vision.mm_embedder_shapes`; a
        checkpoint without them is then a mismatch. No effect when `config.vision` is None.
      progress: optional `(message, fraction)` callback.

    Returns:
      The official nested tree, e.g. `params["layer_0"]["attn"]["q_einsum"]["w"]`, plus
      `params["vision_encoder"]` when the image encoder was loaded.

    Raises:
      WeightsError: CheckpointMismatchError (every mismatch listed), MissingFilesError,
        CorruptCheckpointError or UnsupportedModelError.
    """
    dtype = parse_dtype(dtype)
    path = pathlib.Path(path)
    config = validate.text_config(config) if text_only else config
    with Progress(progress) as report:
        if hf.is_hf_dir(path):
            flat = flatten_params(
                hf.load_params(
                    path,
                    config,
                    dtype=dtype,
                    progress=report,
                    label=config.name,
                    text_only=text_only,
                )
            )
        else:
            ckpt = orbax_io.find_checkpoint_dir(path)
            flat = _restore_orbax(ckpt, config, dtype, report, text_only=text_only)
    validate.check_restored(flat, config, dtype, text_only=text_only)
    return unflatten_params(flat)


def _read_sources(ckpt: pathlib.Path) -> tuple[str, dict[str, layouts.Source]]:
    layout, sources, problems = layouts.canonical_sources(orbax_io.read_leaves(ckpt))
    if problems:
        raise CheckpointMismatchError(f"{layout} checkpoint {ckpt}", problems)
    return layout, sources


def _restore_orbax(
    ckpt: pathlib.Path,
    config: TransformerConfig,
    dtype: np.dtype,
    progress: ProgressFn,
    *,
    text_only: bool = True,
    sources: tuple[str, dict[str, layouts.Source]] | None = None,
) -> dict[str, Any]:
    layout, found = sources or _read_sources(ckpt)
    what = f"{layout} checkpoint {ckpt}"
    plan = validate.match_sources(found, config, dtype, text_only=text_only, what=what)
    encoder_dtypes = {p: validate.VISION_DTYPE for p, _ in plan if _is_encoder_leaf(p)}
    return orbax_io.restore(ckpt, plan, dtype, progress, label=config.name, dtypes=encoder_dtypes)


def _is_encoder_leaf(path: str) -> bool:
    """Image / audio encoder leaves and their projections: restored in float32."""
    return layouts.is_vision_path(path) or layouts.is_audio_path(path)


def _with_or_without_vision(
    config: TransformerConfig,
    has_vision: bool,
    text_only: bool,
    what: str,
    *,
    has_audio: bool = False,
) -> TransformerConfig:
    """What `load_engine` fills: `config` with its encoders, unless text_only or the
    checkpoint holds no weights of an encoder (that one is dropped, with a warning)."""
    if text_only:
        return validate.text_config(config)
    for field, present, kind in (("vision", has_vision, "image"), ("audio", has_audio, "audio")):
        if getattr(config, field) is not None and not present:
            logger.warning(
                "%s holds no %s-encoder weights: loading %s without %s input.",
                what, kind, config.name, kind,
            )  # fmt: skip
            config = dataclasses.replace(config, **{field: None})
    return config


# --- engines ----------------------------------------------------------------------------


def load_engine(
    model: str,
    *,
    tokenizer: str | pathlib.Path | None = None,
    dtype: str | None = None,
    text_only: bool = False,
    progress: Callable[[str, float], None] | None = None,
) -> Engine:
    """Builds an `Engine` from real weights (see the module docstring for `model`).

    Args:
      model: variant name, Kaggle handle, local directory or Hugging Face repo id.
      tokenizer: a `tokenizer.model` to use instead of the one next to the weights.
      dtype: storage dtype of the text weights, "auto" (default: bfloat16; float32 on a CPU
        without the project's kernels), "bfloat16" or "float32" (see `engine.resolve_dtype`).
        The math is float32 on CPU and the storage dtype elsewhere. The image encoder is
        always float32.
      text_only: skip the image encoder. By default it is loaded when the model has one
        (Gemma 3 4B/12B/27B; a local checkpoint's is recognised from its shapes) and the
        checkpoint holds it; `Engine.supports_images` says whether it was.
      progress: `(message, fraction)` callback for download + load (tqdm in a terminal).

    Raises:
      WeightsError: a subclass with a message that says what to do.
    """
    param_dtype = parse_dtype(dtype or DEFAULT_DTYPE)
    tok = pathlib.Path(tokenizer).expanduser() if tokenizer else None
    with Progress(progress) as report:
        local = pathlib.Path(model).expanduser()
        if local.exists():
            return _local_engine(local, tok, param_dtype, report, text_only)
        if model.startswith("hf:"):
            return _hub_engine(model.removeprefix("hf:"), tok, param_dtype, report, text_only)
        if (ref := registry.resolve_kaggle(model)) is not None:
            return _kaggle_engine(ref, tok, param_dtype, report, text_only)
        if _HF_REPO.match(model):
            return _hub_engine(model, tok, param_dtype, report, text_only)
        raise _unknown_model(model)


def _unknown_model(model: str) -> ModelNotFoundError:
    close = registry.suggest(model)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    known = ", ".join(v.name for v in registry.VARIANTS.values() if v.supported)
    return ModelNotFoundError(
        f"Unknown model {model!r}: not an existing path, a known variant or a Kaggle / Hugging "
        f"Face handle.{hint} Known variants: {known}. A local directory may hold an orbax "
        "checkpoint with tokenizer.model, or a Hugging Face model (config.json + safetensors)."
    )


def _kaggle_engine(
    ref: registry.KaggleRef,
    tokenizer: pathlib.Path | None,
    dtype: np.dtype,
    report: Progress,
    text_only: bool,
) -> Engine:
    variant = ref.variant
    if variant is not None and not variant.supported:
        supported = ", ".join(
            v.name for v in registry.VARIANTS.values() if v.supported and v.instruction_tuned
        )
        raise UnsupportedModelError(
            f"{variant.name} (Gemma {variant.family}) is not supported by this engine yet; "
            f"nothing was downloaded. Supported chat models: {supported}."
        )
    config = presets.get_preset(variant.preset) if variant else None
    # The download holds the image encoder whether it is loaded or not (~2 bytes/parameter).
    expected = (
        param_bytes(config, jnp.bfloat16) + validate.encoder_bytes(config, jnp.bfloat16)
        if config
        else None
    )
    root = kaggle.download(ref, report.span(0.0, 0.5), expected_bytes=expected)
    ckpt = orbax_io.find_checkpoint_dir(root, variant.checkpoint_dir if variant else "")
    name = variant.name if variant else ref.handle.rsplit("/", 1)[-1]
    tokenizer = tokenizer or root / (variant.tokenizer_file if variant else TOKENIZER_FILE)
    return _orbax_engine(ckpt, config, tokenizer, name, dtype, report.span(0.5, 1.0), text_only)


def _local_engine(
    path: pathlib.Path,
    tokenizer: pathlib.Path | None,
    dtype: np.dtype,
    report: Progress,
    text_only: bool,
) -> Engine:
    if hf.is_hf_dir(path):
        return _hf_engine(path, path.name, tokenizer, dtype, report, text_only)
    if not path.is_dir():
        raise MissingFilesError(
            f"{path} is a file: pass the checkpoint directory (orbax, or config.json + safetensors)."
        )
    ckpt = orbax_io.find_checkpoint_dir(path)
    tokenizer = tokenizer or _find_tokenizer(path, ckpt)
    return _orbax_engine(ckpt, None, tokenizer, path.name, dtype, report.span(0.0, 1.0), text_only)


def _find_tokenizer(path: pathlib.Path, ckpt: pathlib.Path) -> pathlib.Path:
    places = list(dict.fromkeys([path, ckpt, ckpt.parent]))
    for place in places:
        if (place / TOKENIZER_FILE).is_file():
            return place / TOKENIZER_FILE
    looked = ", ".join(str(p) for p in places)
    raise MissingFilesError(
        f"No {TOKENIZER_FILE} next to the checkpoint (looked in {looked}). Copy the "
        "tokenizer.model of this Gemma release there, or pass tokenizer=PATH (--tokenizer)."
    )


def _hub_engine(
    repo_id: str,
    tokenizer: pathlib.Path | None,
    dtype: np.dtype,
    report: Progress,
    text_only: bool,
) -> Engine:
    model_dir = hf.snapshot(repo_id, report.span(0.0, 0.5))
    return _hf_engine(model_dir, repo_id, tokenizer, dtype, report, text_only, start=0.5)


def _hf_engine(
    model_dir: pathlib.Path,
    name: str,
    tokenizer: pathlib.Path | None,
    dtype: np.dtype,
    report: Progress,
    text_only: bool,
    *,
    start: float = 0.0,
) -> Engine:
    config = hf.read_config(model_dir)
    tok = _load_tokenizer(tokenizer or model_dir / TOKENIZER_FILE, config)
    index = hf.tensor_index(model_dir)
    config = _with_or_without_vision(
        config, hf.has_vision(index), text_only, str(model_dir), has_audio=hf.has_audio(index)
    )
    progress = report.span(start, 1.0)
    params = hf.load_params(
        model_dir, config, dtype=dtype, progress=progress, label=name, text_only=False, index=index
    )
    validate.check_restored(flatten_params(params), config, dtype, text_only=False)
    return _engine(name, config, params, tok, dtype)


def _orbax_engine(
    ckpt: pathlib.Path,
    config: TransformerConfig | None,
    tokenizer: pathlib.Path,
    name: str,
    dtype: np.dtype,
    progress: ProgressFn,
    text_only: bool,
) -> Engine:
    """Config (given, or inferred from the shapes) and tokenizer are checked before any read."""
    layout, sources = _read_sources(ckpt)
    has_vision = bool(validate.vision_paths(sources))
    has_audio = bool(validate.audio_paths(sources))
    if config is None:
        wanted = (has_vision or has_audio) and not text_only
        config = _infer_config(ckpt, sources, with_vision=wanted)
    tok = _load_tokenizer(tokenizer, config)
    config = _with_or_without_vision(config, has_vision, text_only, str(ckpt), has_audio=has_audio)
    flat = _restore_orbax(ckpt, config, dtype, progress, text_only=False, sources=(layout, sources))
    validate.check_restored(flat, config, dtype, text_only=False)
    return _engine(name, config, unflatten_params(flat), tok, dtype)


def _infer_config(
    ckpt: pathlib.Path, sources: dict[str, layouts.Source], *, with_vision: bool
) -> TransformerConfig:
    """The architecture of an unnamed local checkpoint, from its shapes.

    The text decoder must match a preset (its vocabulary may differ). The encoders, when
    wanted, are the preset's own (Gemma 3 4B+, Gemma 4, so that wrong shapes are listed
    against them), or else the image encoder is the `VisionConfig` its shapes describe.
    """
    text = validate.text_shapes(sources)
    found = validate.infer_preset(text)
    if found is None:
        raise UnsupportedModelError(
            f"{ckpt}: these weights ({validate.describe(text)}) match no Gemma preset this "
            f"engine knows ({', '.join(presets.PRESETS)})."
        )
    key, config = found
    if not with_vision:
        return config
    full = presets.get_preset(key)
    vc = full.vision
    if vc is None and validate.vision_paths(sources):
        vision_shapes = {p: s.shape for p, s in sources.items() if layouts.is_vision_path(p)}
        vc = validate.infer_vision_config(vision_shapes)
        if vc is None:
            names = validate.vision_paths(sources)
            raise UnsupportedModelError(
                f"{ckpt}: its {len(names)} image-encoder weights ({names[0]}, ...) do not form a "
                "Gemma 3 SigLIP encoder. Load it text-only (text_only=True, --text-only)."
            )
    return dataclasses.replace(config, vision=vc, audio=full.audio)


def _load_tokenizer(path: pathlib.Path, config: TransformerConfig) -> Tokenizer:
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFilesError(
            f"Tokenizer {path} not found. Pass the tokenizer.model of this Gemma release with "
            "tokenizer=PATH (--tokenizer)."
        )
    try:
        tokenizer = Tokenizer(path, version=config.family)
    except ValueError as error:  # a SentencePiece model, but not of this Gemma family
        raise CheckpointMismatchError(
            f"Tokenizer {path} does not fit {config.name}", [str(error)]
        ) from error
    except (RuntimeError, OSError) as error:
        raise CorruptCheckpointError(
            f"{path} is not a SentencePiece model ({brief(error)})."
        ) from error
    if tokenizer.vocab_size > config.num_embed:
        raise CheckpointMismatchError(
            f"Tokenizer {path} does not fit {config.name}",
            [
                f"it has {tokenizer.vocab_size} pieces but the embedding has {config.num_embed} "
                "rows: is it the tokenizer of another model?"
            ],
        )
    return tokenizer


def _engine(
    name: str, config: TransformerConfig, params: dict, tokenizer: Tokenizer, dtype: np.dtype
) -> Engine:
    compute = compute_dtype_for(dtype)  # fp32 math on CPU, the storage dtype elsewhere
    images = config.vision is not None and "vision_encoder" in params
    audio = config.audio is not None and "audio_encoder" in params
    return Engine(
        name=name,
        config=config,
        # The restored leaves are ours: stacking frees each layer's arrays as it goes.
        params=stack_layers(config, params, consume=True) if scan_by_default() else params,
        tokenizer=tokenizer,
        dtype=compute,
        supports_images=images,
        supports_audio=audio,
    )
