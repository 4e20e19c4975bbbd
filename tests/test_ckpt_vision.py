"""Image-encoder weights through the real loaders (Kaggle cache, local orbax, Hugging Face).

Fixtures come from `scripts/make_checkpoints.py` (`make_vision`): the demo text model plus the
tiny SigLIP encoder ("demo-vision", random weights, the project's 4096-piece tokenizer) in the
FLAT (`SigLiPFromPatches_0/...`), NESTED and STACKED orbax layouts, as a kagglehub cache entry
and as a HF `Gemma3ForConditionalGeneration` directory; and the vision golden
(`tests/golden/tiny-gemma3-vision.npz`) as a HF directory, whose transformers outputs are known.

* every loader gives exactly the arrays written: text in the requested dtype, the encoder and
  the embedder `mm_*` leaves in float32;
* the loaded engine answers a message with an image; text-only loading of the same checkpoint
  has no vision leaves and its engine refuses images;
* wrong vision shapes are all listed; the HF golden reproduces transformers' vision tower
  output and logits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_vision import _golden, golden_pixels

from gemma_app.ckpt import (
    CheckpointMismatchError,
    UnsupportedModelError,
    layouts,
    load_engine,
    load_params,
    orbax_io,
    registry,
    validate,
)
from gemma_app.ckpt import hf as hf_io
from gemma_app.ckpt.hf_map import (
    flatten_params,
    params_to_hf,
    unflatten_params,
    vision_param_shapes,
)
from gemma_app.ckpt.progress import format_bytes
from gemma_app.engine import resolve_dtype
from gemma_app.nn import presets, vision
from gemma_app.nn.transformer import Transformer, unstack_layers

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4  # ours vs transformers, float32
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
# What loading picks when no dtype is asked for: float32 on CPU, bfloat16 on accelerators.
AUTO_DTYPE = np.dtype(resolve_dtype("auto").param_dtype)
IMAGE = np.zeros((64, 64, 3), np.uint8)
PRESET = "demo-vision"


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_checkpoints_vision", ROOT / "scripts/make_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass needs the module registered
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
CONFIG = SCRIPT.vision_preset()  # tiny_demo() + tiny_vision()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return SCRIPT.make_vision(tmp_path_factory.mktemp("vision_checkpoints"))


def assert_loaded(params, written: dict[str, np.ndarray], dtype) -> None:
    """`params` holds exactly `written` (an engine's stacked layers unstacked): text leaves as
    `dtype`, vision leaves as float32."""
    flat = flatten_params(unstack_layers(params))
    assert flat.keys() == written.keys()
    for path, value in written.items():
        want = np.float32 if layouts.is_vision_path(path) else dtype
        got = flat[path]
        assert got.dtype == want and got.shape == value.shape, path
        np.testing.assert_array_equal(np.asarray(got), value.astype(want), err_msg=path)


def text_part(written: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {p: v for p, v in written.items() if not layouts.is_vision_path(p)}


def assert_answers_images(engine) -> None:
    assert engine.supports_images
    chat = engine.new_chat(cache_length=256)
    assert chat.supports_images
    answer = chat.chat("What is it?", images=[IMAGE], max_new_tokens=3)
    assert isinstance(answer, str) and len(chat.turns) == 1


def assert_encodes_images(engine) -> None:
    """The image path of a chat (encoder + projection) on the engine's own params, without
    compiling another decoder: the HF engine's config differs from the orbax one by its name."""
    assert engine.supports_images and engine.new_chat(cache_length=256).supports_images
    vc, embedder = engine.config.vision, engine.params["embedder"]
    pixels = vision.preprocess_image(IMAGE, vc.image_size)[None]
    soft = vision.encode_images(vc, engine.params["vision_encoder"], pixels)
    tokens = vision.project_soft_tokens(
        soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
    )
    assert tokens.shape == (1, vc.num_mm_tokens_per_image, engine.config.embed_dim)
    assert bool(jnp.isfinite(tokens).all())


def assert_refuses_images(engine) -> None:
    assert not engine.supports_images and "vision_encoder" not in engine.params
    assert not any(layouts.is_vision_path(p) for p in flatten_params(engine.params))
    chat = engine.new_chat(cache_length=256)
    with pytest.raises(ValueError, match="does not accept images"):
        chat.chat("What is it?", images=[IMAGE], max_new_tokens=3)


# --- orbax layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", SCRIPT.VISION_LAYOUTS)
def test_orbax_vision_layouts_load_exactly_what_was_written(fx, layout, dtype):
    path = fx.orbax[f"{PRESET}/{layout}"]
    seen = []
    params = load_params(
        path, CONFIG, dtype=dtype, text_only=False, progress=lambda m, f: seen.append(m)
    )
    assert_loaded(params, fx.params[PRESET], DTYPES[dtype])
    # The progress total counts the float32 encoder next to the text weights.
    text = sum(v.size for v in text_part(fx.params[PRESET]).values()) * np.dtype(dtype).itemsize
    total = text + validate.vision_bytes(CONFIG)
    assert seen[0] == f"Loading demo-tiny-gemma3 weights ({format_bytes(total)})"
    # Default (text-only): the same checkpoint without a single vision leaf.
    assert_loaded(
        load_params(path, CONFIG, dtype=dtype), text_part(fx.params[PRESET]), DTYPES[dtype]
    )


def test_flat_vision_keys_are_the_official_ones(fx):
    path = fx.orbax[f"{PRESET}/FLAT"]
    leaves = orbax_io.read_leaves(path)
    keys = {key[0] for key in leaves}
    assert "SigLiPFromPatches_0/siglip_encoder" in keys  # pos_embedding
    assert "SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock_1/LayerNorm_0" in keys
    assert "transformer/embedder" in keys and not any(k.startswith("vision_encoder") for k in keys)
    assert {str(dtype) for _, dtype in leaves.values()} == {"bfloat16"}  # as released
    layout, sources, problems = layouts.canonical_sources(leaves)
    assert (layout, problems) == (layouts.FLAT, [])
    assert set(validate.vision_paths(sources)) == set(vision_param_shapes(CONFIG))
    stacked = layouts.canonical_sources(orbax_io.read_leaves(fx.orbax[f"{PRESET}/STACKED"]))
    assert stacked[0] == layouts.STACKED and stacked[1].keys() == sources.keys()


def test_vision_config_is_inferred_from_shapes():
    shapes = vision_param_shapes(CONFIG)
    assert validate.infer_vision_config(shapes) == presets.tiny_vision()
    real = presets.gemma3_4b()
    assert validate.infer_vision_config(vision_param_shapes(real)) == presets.gemma3_vision()
    del shapes["vision_encoder/siglip_encoder/pos_embedding"]
    assert validate.infer_vision_config(shapes) is None


def test_local_orbax_engine_answers_images_and_text_only_does_not(fx):
    path = fx.orbax[f"{PRESET}/FLAT"]
    engine = load_engine(str(path))
    assert engine.config == CONFIG and engine.name == "FLAT"
    assert_loaded(engine.params, fx.params[PRESET], AUTO_DTYPE)
    assert engine.param_dtype == AUTO_DTYPE  # the text dtype: the first leaf is the embedding
    assert_answers_images(engine)

    text_only = load_engine(str(fx.orbax[f"{PRESET}/NESTED"]), text_only=True)
    assert text_only.config == presets.tiny_demo()
    assert_loaded(text_only.params, text_part(fx.params[PRESET]), AUTO_DTYPE)
    assert_refuses_images(text_only)


# --- Kaggle: the kagglehub cache, offline --------------------------------------------------


@pytest.fixture
def vision_variant(fx, monkeypatch, tmp_path):
    """A registry entry on Kaggle's gemma3-4b-it handle whose preset is "demo-vision"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # loopback: nothing leaves the host
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(fx.kaggle_cache))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(presets.TINY_PRESETS, PRESET, SCRIPT.vision_preset)
    variant = registry.Variant(
        name="demo-vision-it", family=3, handle=SCRIPT.KAGGLE_VISION_HANDLE, preset=PRESET,
        instruction_tuned=True, checkpoint_dir="gemma3-4b-it", multimodal=True,
    )  # fmt: skip
    monkeypatch.setitem(registry.VARIANTS, variant.name, variant)
    return variant


def test_kaggle_variant_loads_vision_by_default(fx, vision_variant):
    engine = load_engine("demo-vision-it@1")
    assert engine.config == CONFIG and engine.name == "demo-vision-it"
    assert_loaded(engine.params, fx.params[PRESET], AUTO_DTYPE)
    assert_answers_images(engine)
    text_only = load_engine("demo-vision-it@1", text_only=True, dtype="float32")
    assert text_only.config == presets.tiny_demo()
    assert_loaded(text_only.params, text_part(fx.params[PRESET]), np.float32)
    assert_refuses_images(text_only)


def test_vision_architecture_without_vision_weights_loads_text_only(fx, tmp_path, caplog):
    """A Gemma3ForConditionalGeneration config over text-only safetensors (e.g. an export of
    the decoder alone): the engine loads text-only with a warning; an explicit vision load
    lists what is missing."""
    path = tmp_path / "hf-text-export"
    text = unflatten_params(text_part(fx.params[PRESET]))
    state = params_to_hf(text, CONFIG, prefix="language_model.model.")
    hf_io.save(path, state, SCRIPT.DEMO_VISION_CONFIG)
    shutil.copy(ROOT / "assets" / "tokenizer.model", path / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger="gemma_app.ckpt.load"):
        engine = load_engine(str(path))
    assert "holds no image-encoder weights" in caplog.text
    assert engine.config == dataclasses.replace(presets.tiny_demo(), name="hf-gemma3")
    assert_refuses_images(engine)
    with pytest.raises(CheckpointMismatchError, match="none of vision_tower.vision_model"):
        load_params(path, hf_io.read_config(path), text_only=False)


# --- Hugging Face ----------------------------------------------------------------------------


def test_hf_vision_dir(fx):
    path = fx.hf[PRESET]
    config = hf_io.read_config(path)
    assert config == dataclasses.replace(CONFIG, name="hf-gemma3")
    params = load_params(path, config, dtype="bfloat16", text_only=False)
    assert_loaded(params, fx.params[PRESET], ml_dtypes.bfloat16)
    assert_loaded(load_params(path, config), text_part(fx.params[PRESET]), AUTO_DTYPE)

    engine = load_engine(str(path))
    assert engine.config == config
    assert_loaded(engine.params, fx.params[PRESET], AUTO_DTYPE)
    assert_encodes_images(engine)
    assert_refuses_images(load_engine(str(path), text_only=True))


def test_hf_golden_reproduces_the_transformers_vision_tower(fx):
    path = fx.hf["tiny-gemma3-vision"]
    config = hf_io.read_config(path)
    assert config == dataclasses.replace(presets.tiny_gemma3_vision(), name="hf-gemma3")
    params = load_params(path, config, dtype="float32", text_only=False)
    assert_loaded(params, fx.params["tiny-gemma3-vision"], np.float32)
    golden = _golden()

    soft = vision.encode_images(config.vision, params["vision_encoder"], golden_pixels())
    diff = float(np.abs(np.asarray(soft) - golden["vision/pooled"]).max())
    assert diff <= ATOL, f"vision tower: max |ours - HF| = {diff:.3g}"

    # The whole two-image prompt: soft tokens replace the embeddings of their slots.
    embedder = params["embedder"]
    projected = vision.project_soft_tokens(
        soft, embedder["mm_soft_embedding_norm"]["scale"], embedder["mm_input_projection"]["w"]
    )
    ids, is_soft = golden["input_ids"], golden["token_type_ids"] == 1
    starts = is_soft & ~np.pad(is_soft, ((0, 0), (1, 0)))[:, :-1]
    segments = np.where(is_soft, np.cumsum(starts, axis=1), 0).astype(np.int32)
    mm = np.zeros((*ids.shape, config.embed_dim), np.float32)
    mm[is_soft] = np.asarray(projected).reshape(-1, config.embed_dim)
    positions = np.arange(ids.shape[1])[None]
    apply = jax.jit(Transformer(config).apply)  # jitted: 1 s instead of 7 s eager
    logits, _ = apply({"params": params}, ids, positions, mm_embeddings=mm, segments=segments)
    diff = float(np.abs(np.asarray(logits) - golden["logits"]).max())
    assert diff <= ATOL, f"logits: max |ours - HF| = {diff:.3g}"


# --- mismatches ----------------------------------------------------------------------------

BLOCK = "vision_encoder/siglip_encoder/Transformer/encoderblock_1/"
BAD = {  # path -> replacement shape (None: left out)
    BLOCK + "MultiHeadDotProductAttention_0/query/kernel": (32, 4, 8),
    "embedder/mm_input_projection/w": (32, 64),
    "vision_encoder/siglip_encoder/Transformer/encoder_norm/bias": None,
}


def _bad_checkpoint(fx, tmp_path) -> pathlib.Path:
    flat = dict(fx.params[PRESET])
    for path, shape in BAD.items():
        if shape is None:
            del flat[path]
        else:
            flat[path] = np.zeros(shape, np.float32)
    orbax_io.save(tmp_path / "bad", flat, layouts.FLAT)
    return tmp_path / "bad"


def test_wrong_vision_shapes_are_all_listed(fx, tmp_path):
    path = _bad_checkpoint(fx, tmp_path)
    expected = [
        f"{BLOCK}MultiHeadDotProductAttention_0/query/kernel: checkpoint has (32, 4, 8), "
        "model expects (32, 2, 16)",
        "embedder/mm_input_projection/w: checkpoint has (32, 64), model expects (32, 128)",
        "missing vision_encoder/siglip_encoder/Transformer/encoder_norm/bias (expected (32,))",
    ]
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(path, CONFIG, text_only=False)
    assert sorted(info.value.problems) == sorted(expected)
    assert "image encoder only: load text-only" in str(info.value)
    # The engine infers the encoder from the shapes that are right, then lists the same three.
    tokenizer = ROOT / "assets" / "tokenizer.model"
    with pytest.raises(CheckpointMismatchError) as info:
        load_engine(str(path), tokenizer=tokenizer)
    assert sorted(info.value.problems) == sorted(expected)
    # Text-only loading never looks at them.
    assert_refuses_images(load_engine(str(path), tokenizer=tokenizer, text_only=True))


def test_vision_weights_of_no_known_encoder(fx, tmp_path):
    flat = dict(fx.params[PRESET])
    flat["vision_encoder/siglip_encoder/pos_embedding"] = np.zeros((1, 49, 32), np.float32)
    orbax_io.save(tmp_path / "odd", flat, layouts.NESTED)
    with pytest.raises(UnsupportedModelError, match="do not form a Gemma 3 SigLIP encoder"):
        load_engine(str(tmp_path / "odd"), tokenizer=ROOT / "assets" / "tokenizer.model")
