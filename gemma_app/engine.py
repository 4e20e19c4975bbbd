"""`Engine`: one loaded model (config, params, tokenizer) that hands out a `ChatSampler` per chat.

The app holds exactly one engine; every browser session gets its own `ChatSampler` (and KV
cache) from `Engine.new_chat`, all sharing the same parameter arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp

from gemma_app.nn import presets, vision
from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import Transformer, init_params
from gemma_app.text.chat import ChatSampler
from gemma_app.text.tokenizer import Tokenizer

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
DEMO_TOKENIZER = ASSETS / "tokenizer.model"
DEMO_SEED = 0


_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


def default_compute_dtype() -> jnp.dtype:
    """fp32 on CPU (XLA:CPU runs bf16 matmuls several times slower); bf16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    """How weights are stored and activations computed, and why (shown in the model panel)."""

    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype
    note: str = ""


def resolve_dtype(requested: str | None = None) -> DtypeChoice:
    """Maps a user's dtype request ("auto", "float32", "bfloat16") to storage + compute dtypes.

    Measured on a 2-core AVX-512 CPU with XLA:CPU (bench/RESULTS.md): bf16 weights run Gemma 3
    270M decode ~20x slower than fp32, whether computed in bf16 or upcast per step. So "auto"
    is fp32 on CPU and bf16 on accelerators, and an explicit bf16 request on CPU is honoured
    (it halves memory) with a loud note instead of a silent slowdown.
    """
    key = (requested or "auto").lower()
    if key != "auto" and key not in _DTYPES:
        raise ValueError(f"Unknown dtype {requested!r}: use auto, float32 or bfloat16")
    on_cpu = jax.default_backend() == "cpu"
    if key == "auto":
        dtype = default_compute_dtype()
        return DtypeChoice(dtype, dtype, "fp32: fastest on CPU" if on_cpu else "")
    dtype = _DTYPES[key]
    note = ""
    if on_cpu and dtype == jnp.bfloat16:
        note = (
            "bfloat16 on CPU halves memory but decodes many times slower than float32 "
            "(XLA:CPU bf16 matmuls); use --dtype float32 if the weights fit in RAM"
        )
        logging.getLogger(__name__).warning(note)
    return DtypeChoice(dtype, dtype, note)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A loaded model.

    Attributes:
      name: what the UI shows, e.g. "gemma3-1b-it" or "demo (random weights)".
      config: the decoder architecture.
      params: the parameter tree (official nested layout).
      tokenizer: the matching tokenizer.
      dtype: compute dtype (activations and KV cache).
      is_demo: True for the built-in random-weight model: its answers are gibberish.
      supports_images / supports_audio: what the message box may accept.
    """

    name: str
    config: TransformerConfig
    params: dict
    tokenizer: Tokenizer
    dtype: jnp.dtype = jnp.float32
    is_demo: bool = False
    supports_images: bool = False
    supports_audio: bool = False

    @functools.cached_property
    def model(self) -> Transformer:
        return Transformer(self.config, dtype=self.dtype)

    @property
    def param_dtype(self) -> jnp.dtype:
        return jax.tree.leaves(self.params)[0].dtype

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def new_chat(self, **kwargs) -> ChatSampler:
        """A fresh multi-turn `ChatSampler` over the shared params; kwargs go to its __init__."""
        kwargs.setdefault("multi_turn", True)
        return ChatSampler(model=self.model, params=self.params, tokenizer=self.tokenizer, **kwargs)


def demo_engine(*, seed: int = DEMO_SEED, dtype: jnp.dtype | None = None) -> Engine:
    """The built-in demo: tiny Gemma 3 architecture with a toy image encoder, random weights
    from `seed`, and the project's tokenizer. It reads text and images (answers are gibberish).
    """
    tokenizer = Tokenizer(DEMO_TOKENIZER, version=3)
    config = presets.tiny_demo_vision(num_embed=tokenizer.vocab_size)
    params = dict(init_params(config, seed=seed, dtype=jnp.float32))
    params["vision_encoder"] = vision.init_params(config.vision, seed=seed + 1)
    mm = vision.init_mm_embedder(config.vision, config.embed_dim, seed=seed + 2)
    params["embedder"] = {**params["embedder"], **mm}
    return Engine(
        name="demo-tiny-gemma3 (random weights)",
        config=config,
        params=params,
        tokenizer=tokenizer,
        dtype=dtype or default_compute_dtype(),
        is_demo=True,
        supports_images=True,
    )
