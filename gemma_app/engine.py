"""`Engine`: one loaded model (config, params, tokenizer) that hands out a `ChatSampler` per chat.

The app holds exactly one engine; every browser session gets its own `ChatSampler` (and KV
cache) from `Engine.new_chat`, all sharing the same parameter arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp

from gemma_app.nn import presets
from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import Transformer, init_params
from gemma_app.text.chat import ChatSampler
from gemma_app.text.tokenizer import Tokenizer

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
DEMO_TOKENIZER = ASSETS / "tokenizer.model"
DEMO_SEED = 0


def default_compute_dtype() -> jnp.dtype:
    """fp32 on CPU (XLA:CPU runs bf16 matmuls several times slower); bf16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


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
    """The built-in demo: tiny Gemma 3 architecture, random weights from `seed`, our tokenizer."""
    tokenizer = Tokenizer(DEMO_TOKENIZER, version=3)
    config = presets.tiny_demo(num_embed=tokenizer.vocab_size)
    dtype = dtype or default_compute_dtype()
    return Engine(
        name="demo-tiny-gemma3 (random weights)",
        config=config,
        params=init_params(config, seed=seed, dtype=jnp.float32),
        tokenizer=tokenizer,
        dtype=dtype,
        is_demo=True,
    )
