"""Model math: configs, presets, layers, attention, the decoder. No I/O in here."""

from gemma_app.nn.config import AttentionType, TransformerConfig
from gemma_app.nn.presets import PRESETS, TINY_PRESETS, get_preset
from gemma_app.nn.transformer import (
    Transformer,
    abstract_params,
    forward,
    init_cache,
    init_params,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "PRESETS",
    "TINY_PRESETS",
    "AttentionType",
    "Transformer",
    "TransformerConfig",
    "abstract_params",
    "forward",
    "get_preset",
    "init_cache",
    "init_params",
    "stack_layers",
    "unstack_layers",
]
