"""Checkpoint I/O: Kaggle (kagglehub + orbax), local orbax directories, Hugging Face safetensors.

Public API:
    load_engine(model, *, tokenizer=None, dtype=None, text_only=False, progress=None) -> Engine
        (loads the Gemma 3 image encoder when the model has one, unless text_only=True)
    load_params(path, config, *, dtype="bfloat16", text_only=True, progress=None) -> params
    VARIANTS / Variant / resolve_kaggle: the registry of released checkpoints
    WeightsError and its subclasses: user-facing errors (show `str(error)`)
"""

from gemma_app.ckpt.errors import (
    AccessDeniedError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    DownloadError,
    MissingFilesError,
    ModelNotFoundError,
    NoCredentialsError,
    UnsupportedModelError,
    WeightsError,
)
from gemma_app.ckpt.load import load_engine, load_params
from gemma_app.ckpt.registry import VARIANTS, KaggleRef, Variant, resolve_kaggle

__all__ = [
    "VARIANTS",
    "AccessDeniedError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "DownloadError",
    "KaggleRef",
    "MissingFilesError",
    "ModelNotFoundError",
    "NoCredentialsError",
    "UnsupportedModelError",
    "Variant",
    "WeightsError",
    "load_engine",
    "load_params",
    "resolve_kaggle",
]
