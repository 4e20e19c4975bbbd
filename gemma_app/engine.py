"""`Engine`: one loaded model (config, params, tokenizer) that hands out a `ChatSampler` per chat.

The app holds exactly one engine; every browser session gets its own `ChatSampler` (and KV
cache) from `Engine.new_chat`, all sharing the same parameter arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import typing

import jax
import jax.numpy as jnp

from gemma_app import kernels
from gemma_app.jax_utils import huge_pages_for, release_freed_host_memory
from gemma_app.nn import audio, presets, vision, vision4
from gemma_app.nn.config import TransformerConfig
from gemma_app.nn.transformer import Transformer, init_params, stack_layers
from gemma_app.text.chat import ChatSampler
from gemma_app.text.tokenizer import Tokenizer

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
DEMO_TOKENIZERS = {3: ASSETS / "tokenizer.model", 4: ASSETS / "tokenizer_gemma4.model"}
DEMO_SEED = 0


_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


def compute_dtype_for(param_dtype) -> jnp.dtype:
    """fp32 activations on CPU whatever the storage (gemma_app/kernels reads bf16 weights at
    memory speed and multiplies them by bf16-rounded x with fp32 sums; XLA:CPU's bf16 matmuls
    are several times slower); the storage dtype elsewhere."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(param_dtype)


def default_compute_dtype() -> jnp.dtype:
    """The compute dtype of released (bf16) weights here: fp32 on CPU, bf16 on accelerators."""
    return compute_dtype_for(jnp.bfloat16)


class DtypeChoice(typing.NamedTuple):
    """How weights are stored and activations computed."""

    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype


def resolve_dtype(requested: str | None = None) -> DtypeChoice:
    """Maps a user's dtype request ("auto", "float32", "bfloat16") to storage + compute dtypes.

    The math is fp32 on CPU and the storage dtype elsewhere (`compute_dtype_for`). "auto"
    stores bf16, as checkpoints are released: on CPU the kernels (gemma_app/kernels, built on
    first use) read it at memory speed, so decode moves half the bytes of fp32 (Gemma 3 1B:
    12.1 vs 7.1 tok/s on a Xeon, bench/RESULTS.md). Without the kernels XLA:CPU decodes bf16 weights
    ~20x slower, so "auto" is fp32 there and an explicit bf16 request gets a loud warning.
    """
    key = (requested or "auto").lower()
    if key != "auto" and key not in _DTYPES:
        raise ValueError(f"Unknown dtype {requested!r}: use auto, float32 or bfloat16")
    fast_bf16 = jax.default_backend() != "cpu" or kernels.build.load()
    if key == "auto":
        store = jnp.bfloat16 if fast_bf16 else jnp.float32
    else:
        store = _DTYPES[key]
        if store == jnp.bfloat16 and not fast_bf16:
            logging.getLogger(__name__).warning(
                "bfloat16 weights on a CPU without the project's kernels (no C++ compiler?) "
                "decode many times slower than float32; use --dtype float32 if they fit in RAM"
            )
    return DtypeChoice(store, compute_dtype_for(store))


def scan_by_default() -> bool:
    """Scan the layers where the kernels run (CPU): they read each layer of the stack in place.

    XLA's dots would slice every layer's weights out of the stack into a copy per call, so
    without the kernels (no compiler, `GEMMA_APP_KERNELS=0`) and on accelerators, where no
    measurement says otherwise yet, the layers stay unrolled.
    """
    return jax.default_backend() == "cpu" and kernels.build.load()


@dataclasses.dataclass(frozen=True)
class Engine:
    """A loaded model.

    Attributes:
      name: what the UI shows, e.g. "gemma3-1b-it" or "demo (random weights)".
      config: the decoder architecture.
      params: the parameter tree: the official nested layout; with `scan_layers`, the decoder
        layers of Gemma 1-3 stacked (`nn.transformer.stack_layers`, done here if the caller
        has not).
      tokenizer: the matching tokenizer.
      dtype: compute dtype (activations and KV cache).
      is_demo: True for the built-in random-weight model: its answers are gibberish.
      supports_images / supports_audio: what the message box may accept. Left unset (None),
        each follows what was loaded: the config has the encoder and the params hold it.
      scan_layers: run the decoder layers in a scan over stacked weights: one layer body is
        compiled instead of one per layer (Gemma 3 1B: 26; its first chat call compiles in
        2.1-2.6 s, 7.6-8.1 s unrolled), at the same decode speed (bench/README.md). None:
        `scan_by_default()`.
    """

    name: str
    config: TransformerConfig
    params: dict
    tokenizer: Tokenizer
    dtype: jnp.dtype = jnp.float32
    is_demo: bool = False
    supports_images: bool | None = None
    supports_audio: bool | None = None
    scan_layers: bool | None = None

    def __post_init__(self):
        if self.scan_layers is None:
            object.__setattr__(self, "scan_layers", scan_by_default())
        if self.scan_layers:
            object.__setattr__(self, "params", stack_layers(self.config, self.params))
            release_freed_host_memory()  # the per-layer arrays the stacks replaced
        if jax.default_backend() == "cpu":
            huge_pages_for(self.params)  # decode streams them: fewer TLB misses
        if self.supports_images is None:
            loaded = self.config.vision is not None and "vision_encoder" in self.params
            object.__setattr__(self, "supports_images", loaded)
        if self.supports_audio is None:
            loaded = getattr(self.config, "audio", None) is not None
            object.__setattr__(self, "supports_audio", loaded and "audio_encoder" in self.params)

    @property
    def supports_thinking(self) -> bool:
        """Gemma 4 models think before answering when asked to (`<|think|>`, spec §5)."""
        return self.config.family == 4

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


DEMO_FAMILIES = (4, 3)


def demo_engine(
    *, family: int = 4, seed: int = DEMO_SEED, dtype: jnp.dtype | None = None
) -> Engine:
    """The built-in demo: a tiny model with random weights from `seed` (answers are gibberish).

    Args:
      family: 4 (default): Gemma 4 architecture with toy image and audio encoders and the
        project's Gemma 4 tokenizer, so uploads, the microphone and thinking all work; 3: the
        Gemma 3 architecture with a toy SigLIP image encoder and the Gemma 3 tokenizer.
      seed: weights seed (encoders use seed + 1, + 2, ...).
      dtype: compute dtype; None: `default_compute_dtype()`.
    """
    builders = {3: _demo_gemma3, 4: _demo_gemma4}
    if family not in builders:
        raise ValueError(f"The demo model is Gemma 4 or Gemma 3, not Gemma {family}")
    name, config, params, tokenizer = builders[family](seed)
    return Engine(
        name=f"{name} (random weights)",
        config=config,
        params=params,
        tokenizer=tokenizer,
        dtype=dtype or default_compute_dtype(),
        is_demo=True,
    )


def _demo_gemma3(seed: int):
    tokenizer = Tokenizer(DEMO_TOKENIZERS[3], version=3)
    config = presets.tiny_demo_vision(num_embed=tokenizer.vocab_size)
    params = init_params(config, seed=seed)
    params = stack_layers(config, params, consume=True) if scan_by_default() else dict(params)
    params["vision_encoder"] = vision.init_params(config.vision, seed=seed + 1)
    mm = vision.init_mm_embedder(config.vision, config.embed_dim, seed=seed + 2)
    params["embedder"] = {**params["embedder"], **mm}
    return "demo-tiny-gemma3", config, params, tokenizer


def _demo_gemma4(seed: int):
    tokenizer = Tokenizer(DEMO_TOKENIZERS[4], version=4)
    # The test preset (toy ViT and conformer included) with a 128-token local window instead
    # of 4, so the demo's local layers see a chat-sized context like a real model's.
    config = dataclasses.replace(
        presets.tiny_gemma4(num_embed=tokenizer.vocab_size), name="demo-tiny-gemma4",
        sliding_window_size=128,
    )  # fmt: skip
    params = dict(init_params(config, seed=seed, dtype=jnp.float32))
    params["vision_encoder"] = vision4.init_params(config.vision, seed=seed + 1)
    params["audio_encoder"] = audio.init_params(config.audio, seed=seed + 2)
    projections = {
        **vision4.init_mm_embedder(config.vision, config.embed_dim, seed=seed + 3),
        **audio.init_audio_embedder(config.audio, config.embed_dim, seed=seed + 4),
    }
    params["embedder"] = {**params["embedder"], **projections}
    return "demo-tiny-gemma4", config, params, tokenizer
