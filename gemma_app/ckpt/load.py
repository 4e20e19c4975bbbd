"""Public entry points: `load_engine(model)` for the app and `load_params(path, config)`.

`model` may be a registry variant (`gemma3-4b-it`, pinned `gemma3-4b-it@1`), a Kaggle handle
(`google/gemma-3/flax/gemma3-4b-it/1`), a local directory (an orbax checkpoint, a Kaggle-style
download holding one next to `tokenizer.model`, or a Hugging Face model directory) or a
Hugging Face repo id (`google/gemma-3-1b-it`, or explicitly `hf:google/gemma-3-1b-it`).

Files are checked (checkpoint metadata, tokenizer) before any weight is read, so wrong
inputs fail in seconds with a message that says what to do (`errors.WeightsError`).

Usage:
    engine = load_engine("gemma3-1b-it@1", progress=lambda msg, f: print(f"{f:4.0%} {msg}"))
    params = load_params("/ckpts/gemma3-1b-it", presets.gemma3_1b(), dtype="float32")
"""

from __future__ import annotations

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
from gemma_app.engine import Engine, default_compute_dtype
from gemma_app.nn import presets
from gemma_app.nn.config import TransformerConfig
from gemma_app.text.tokenizer import Tokenizer

DTYPES = {
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
}
DEFAULT_DTYPE = "bfloat16"  # storage dtype of the weights: half the memory of float32
TOKENIZER_FILE = "tokenizer.model"
_HF_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_dtype(dtype: Any) -> np.dtype:
    """ "bfloat16"/"bf16"/"float32"/"fp32" or a dtype -> numpy dtype (bf16 via ml_dtypes)."""
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
      dtype: storage dtype of the result ("bfloat16" or "float32"); cast leaf by leaf.
      text_only: skip vision/audio encoder weights (the only mode supported so far).
      progress: optional `(message, fraction)` callback.

    Returns:
      The official nested tree, e.g. `params["layer_0"]["attn"]["q_einsum"]["w"]`.

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
    validate.check_restored(flat, config, dtype)
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
    return orbax_io.restore(ckpt, plan, dtype, progress, label=config.name)


# --- engines ----------------------------------------------------------------------------


def load_engine(
    model: str,
    *,
    tokenizer: str | pathlib.Path | None = None,
    dtype: str | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> Engine:
    """Builds an `Engine` from real weights (see the module docstring for `model`).

    Args:
      model: variant name, Kaggle handle, local directory or Hugging Face repo id.
      tokenizer: a `tokenizer.model` to use instead of the one next to the weights.
      dtype: storage dtype of the weights, "bfloat16" (default) or "float32". Compute runs
        in `default_compute_dtype()` (fp32 on CPU, bf16 on accelerators), or fp32 when
        float32 weights are asked for.
      progress: `(message, fraction)` callback for download + load (tqdm in a terminal).

    Raises:
      WeightsError: a subclass with a message that says what to do.
    """
    param_dtype = parse_dtype(dtype or DEFAULT_DTYPE)
    tok = pathlib.Path(tokenizer).expanduser() if tokenizer else None
    with Progress(progress) as report:
        local = pathlib.Path(model).expanduser()
        if local.exists():
            return _local_engine(local, tok, param_dtype, report)
        if model.startswith("hf:"):
            return _hub_engine(model.removeprefix("hf:"), tok, param_dtype, report)
        if (ref := registry.resolve_kaggle(model)) is not None:
            return _kaggle_engine(ref, tok, param_dtype, report)
        if _HF_REPO.match(model):
            return _hub_engine(model, tok, param_dtype, report)
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
    ref: registry.KaggleRef, tokenizer: pathlib.Path | None, dtype: np.dtype, report: Progress
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
    config = validate.text_config(presets.get_preset(variant.preset)) if variant else None
    expected = param_bytes(config, jnp.bfloat16) if config else None
    root = kaggle.download(ref, report.span(0.0, 0.5), expected_bytes=expected)
    ckpt = orbax_io.find_checkpoint_dir(root, variant.checkpoint_dir if variant else "")
    name = variant.name if variant else ref.handle.rsplit("/", 1)[-1]
    tokenizer = tokenizer or root / (variant.tokenizer_file if variant else TOKENIZER_FILE)
    return _orbax_engine(ckpt, config, tokenizer, name, dtype, report.span(0.5, 1.0))


def _local_engine(
    path: pathlib.Path, tokenizer: pathlib.Path | None, dtype: np.dtype, report: Progress
) -> Engine:
    if hf.is_hf_dir(path):
        return _hf_engine(path, path.name, tokenizer, dtype, report)
    if not path.is_dir():
        raise MissingFilesError(
            f"{path} is a file: pass the checkpoint directory (orbax, or config.json + safetensors)."
        )
    ckpt = orbax_io.find_checkpoint_dir(path)
    tokenizer = tokenizer or _find_tokenizer(path, ckpt)
    return _orbax_engine(ckpt, None, tokenizer, path.name, dtype, report.span(0.0, 1.0))


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
    repo_id: str, tokenizer: pathlib.Path | None, dtype: np.dtype, report: Progress
) -> Engine:
    model_dir = hf.snapshot(repo_id, report.span(0.0, 0.5))
    return _hf_engine(model_dir, repo_id, tokenizer, dtype, report, start=0.5)


def _hf_engine(
    model_dir: pathlib.Path,
    name: str,
    tokenizer: pathlib.Path | None,
    dtype: np.dtype,
    report: Progress,
    *,
    start: float = 0.0,
) -> Engine:
    config = validate.text_config(hf.read_config(model_dir))
    tok = _load_tokenizer(tokenizer or model_dir / TOKENIZER_FILE, config)
    progress = report.span(start, 1.0)
    params = hf.load_params(model_dir, config, dtype=dtype, progress=progress, label=name)
    validate.check_restored(flatten_params(params), config, dtype)
    return _engine(name, config, params, tok, dtype)


def _orbax_engine(
    ckpt: pathlib.Path,
    config: TransformerConfig | None,
    tokenizer: pathlib.Path,
    name: str,
    dtype: np.dtype,
    progress: ProgressFn,
) -> Engine:
    """Config (given, or inferred from the shapes) and tokenizer are checked before any read."""
    layout, sources = _read_sources(ckpt)
    if config is None:
        config = validate.infer_config(validate.text_shapes(sources))
        if config is None:
            shapes = validate.describe(validate.text_shapes(sources))
            raise UnsupportedModelError(
                f"{ckpt}: these weights ({shapes}) match no Gemma preset this engine knows "
                f"({', '.join(presets.PRESETS)})."
            )
    tok = _load_tokenizer(tokenizer, config)
    flat = _restore_orbax(ckpt, config, dtype, progress, sources=(layout, sources))
    validate.check_restored(flat, config, dtype)
    return _engine(name, config, unflatten_params(flat), tok, dtype)


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
    compute = jnp.float32 if dtype == np.dtype(jnp.float32) else default_compute_dtype()
    return Engine(name=name, config=config, params=params, tokenizer=tokenizer, dtype=compute)
