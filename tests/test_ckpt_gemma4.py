"""Gemma 4 weight loading end to end, on checkpoints written by `scripts/make_checkpoints.py`.

* orbax FLAT (dense MLP in `/w` dict form) / NESTED / KAULDRON / bf16 / `transformer` root with
  `_query_norm` spellings, and the MoE preset in NESTED / FLAT / STACKED: every layout loads
  into exactly `abstract_params` + the encoder trees, with the values written;
* `text_only` drops the image and audio encoders and their projections;
* Hugging Face safetensors (Gemma4ForConditionalGeneration and Gemma4ForCausalLM) of the
  golden weights reproduce the transformers logits saved in tests/golden (no torch needed);
* Kaggle through the real `kagglehub.model_download`, offline from a kagglehub cache;
* the demo engine's model (vocab 4096, image + audio) written as a HF directory loads through
  `load_engine` with the same weights and gives the same greedy answer to an image + audio chat;
* mismatching checkpoints name every problem.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shutil
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import LOGITS_ATOL

from gemma_app.ckpt import (
    CheckpointMismatchError,
    errors,
    hf_config4,
    hf_map4,
    layouts,
    load_engine,
    load_params,
    registry,
    validate,
)
from gemma_app.ckpt import hf as hf_io
from gemma_app.ckpt.hf_map import flatten_params
from gemma_app.engine import demo_engine
from gemma_app.nn import presets, transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
ORBAX = [
    "tiny-gemma4/FLAT", "tiny-gemma4/NESTED", "tiny-gemma4/KAULDRON", "tiny-gemma4/FLAT-bf16",
    "tiny-gemma4/NESTED-root", "tiny-gemma4-moe/NESTED", "tiny-gemma4-moe/FLAT",
    "tiny-gemma4-moe/STACKED",
]  # fmt: skip
GEMMA4_PAGE = "https://www.kaggle.com/models/google/gemma-4"


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_checkpoints", ROOT / "scripts/make_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass needs the module registered
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The Gemma 4 fixture checkpoints, written once per module."""
    return SCRIPT.make_gemma4(tmp_path_factory.mktemp("gemma4"))


def expected_leaves(config, dtype, *, text_only: bool) -> dict:
    """Our path -> (shape, dtype) of every leaf a load must give."""
    return {p: (tuple(t.shape), np.dtype(t.dtype)) for p, t in
            validate.targets(config, dtype, text_only=text_only).items()}  # fmt: skip


def assert_loaded(params, written: dict, config, dtype, *, text_only: bool) -> None:
    """`params` has exactly the model's tree (+ encoders unless text_only) and the written
    values: text cast to `dtype`, encoders float32."""
    flat = flatten_params(params)
    wanted = expected_leaves(config, dtype, text_only=text_only)
    assert {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat.items()} == wanted
    for path, (_, leaf_dtype) in wanted.items():
        value = np.asarray(written[path]).astype(leaf_dtype)
        np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=path)


# --- orbax layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ORBAX)
def test_orbax_layouts_load_the_whole_tree_exactly(fx, name, dtype):
    preset = name.split("/")[0]
    config = presets.get_preset(preset)
    written = fx.params[preset]
    if name.endswith("bf16"):  # what was stored
        written = {p: np.asarray(v, ml_dtypes.bfloat16) for p, v in written.items()}
    params = load_params(fx.orbax[name], config, dtype=dtype, text_only=False)
    assert_loaded(params, written, config, DTYPES[dtype], text_only=False)
    assert "vision_encoder" in params and ("audio_encoder" in params) == (config.audio is not None)


def test_text_only_drops_the_encoders(fx):
    config = presets.tiny_gemma4()
    params = load_params(fx.orbax["tiny-gemma4/FLAT"], config, dtype="float32")
    assert {"vision_encoder", "audio_encoder"}.isdisjoint(params)
    assert {"mm_input_projection", "audio_input_projection"}.isdisjoint(params["embedder"])
    text = validate.text_config(config)
    assert text.vision is None and text.audio is None
    tree = flatten_params(transformer.abstract_params(text))
    assert {p: v.shape for p, v in flatten_params(params).items()} == {
        p: v.shape for p, v in tree.items()
    }
    assert_loaded(params, fx.params["tiny-gemma4"], config, np.float32, text_only=True)


def test_on_disk_keys_are_the_official_gemma4_ones(fx):
    from gemma_app.ckpt import orbax_io

    keys = {"/".join(k) for k in orbax_io.read_leaves(fx.orbax["tiny-gemma4/FLAT"])}
    assert "transformer/layer_0/mlp/gating_einsum/w" in keys  # dense MLP in dict form
    assert "transformer/layer_3/attn/query_norm/scale" in keys
    assert "vision_encoder/transformer/stacked_layers/block/attn/q_einsum/w" in keys
    assert "audio_encoder/conformer/stacked_layers_0/lconv/linear_start/kernel" in keys
    moe = {"/".join(k) for k in orbax_io.read_leaves(fx.orbax["tiny-gemma4-moe/FLAT"])}
    assert {
        "transformer/layer_0/mlp/gating_einsum/w",
        "transformer/layer_0/mlp2/gating_einsum/w",
    } <= moe
    root = {"/".join(k) for k in orbax_io.read_leaves(fx.orbax["tiny-gemma4/NESTED-root"])}
    assert "transformer/layer_0/attn/_query_norm/scale" in root


def test_dense_mlp_is_unwrapped_by_shape_and_moe_kept():
    leaves = {
        ("transformer/layer_0/mlp/gating_einsum", "w"): ((2, 6, 4), np.float32),
        ("transformer/layer_0/mlp/linear", "w"): ((6, 4), np.float32),
        ("transformer/layer_1/mlp/gating_einsum", "w"): ((8, 2, 3, 4), np.float32),
        ("transformer/layer_1/mlp/linear", "w"): ((8, 3, 4), np.float32),
        ("transformer/layer_1/mlp2/gating_einsum", "w"): ((2, 6, 4), np.float32),
        ("vision_encoder/transformer/stacked_layers/block/mlp/linear", "w"): (
            (2, 6, 4),
            np.float32,
        ),
    }
    layout, sources, problems = layouts.canonical_sources(leaves)
    assert (layout, problems) == (layouts.FLAT, [])
    assert set(sources) == {
        "layer_0/mlp/gating_einsum", "layer_0/mlp/linear", "layer_1/mlp/gating_einsum/w",
        "layer_1/mlp/linear/w", "layer_1/mlp2/gating_einsum",
        "vision_encoder/transformer/stacked_layers/block/mlp/linear/w",
    }  # fmt: skip
    assert layouts.spelling_key("layer_0/attn/_query_norm/scale") == "layer_0/attn/query_norm/scale"


def test_a_checkpoint_of_the_other_preset_lists_every_mismatch(fx):
    with pytest.raises(CheckpointMismatchError) as caught:
        load_params(fx.orbax["tiny-gemma4/FLAT"], presets.tiny_gemma4_moe(), dtype="float32")
    problems = caught.value.problems
    lines = "\n".join(problems)
    assert "missing layer_0/mlp2/gating_einsum (expected (2, 96, 64))" in lines
    assert "missing layer_5/attn/k_einsum/w (expected (1, 64, 32))" in lines
    assert "unexpected layer_6/skip_scale (1,)" in lines
    assert "unexpected embedder/per_layer_embeddings (256, 8, 8)" in lines
    assert "layer_3/attn/q_einsum/w: checkpoint has (4, 64, 32), model expects (4, 64, 16)" in lines
    assert caught.value.looks_like == "tiny-gemma4"
    # Every missing MoE leaf of all six layers is listed, not just the first.
    assert sum("mlp/router_logits/w" in p for p in problems) == 6


def test_wrong_encoder_shapes_say_how_to_skip_them(fx, tmp_path):
    config = presets.tiny_gemma4()
    wide = dataclasses.replace(config, audio=dataclasses.replace(config.audio, output_dim=40))
    with pytest.raises(CheckpointMismatchError, match="encoders only.*text_only=True") as caught:
        load_params(fx.orbax["tiny-gemma4/FLAT"], wide, dtype="float32", text_only=False)
    assert any("audio_encoder/output_projection/kernel" in p for p in caught.value.problems)
    assert all(layouts.is_audio_path(p.split()[1].rstrip(":")) or "audio" in p
               for p in caught.value.problems)  # fmt: skip


# --- Hugging Face safetensors ------------------------------------------------------------


def golden(preset: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / f"{preset}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_hf_checkpoint_reproduces_transformers_logits(fx, preset):
    """HF files of the golden weights -> our loader -> our model == transformers' logits."""
    config = hf_io.read_config(fx.hf[preset])
    params = load_params(fx.hf[preset], config, dtype="float32")
    data = golden(preset)
    logits = transformer.forward(config, params, jnp.asarray(data["tokens"]))
    diff = float(np.abs(np.asarray(logits) - data["logits"]).max())
    print(f"{preset}: max |ours - transformers| = {diff:.2e}")
    assert diff <= LOGITS_ATOL


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_hf_config_json_gives_the_preset(fx, preset):
    config = hf_io.read_config(fx.hf[preset])
    want = presets.get_preset(preset)
    if preset == "tiny-gemma4-moe":  # a text-only Gemma4ForCausalLM
        want = validate.text_config(want)
    else:  # the soft-token budget is the processor's, not in config.json
        config = dataclasses.replace(
            config, vision=dataclasses.replace(config.vision, max_soft_tokens=36)
        )
    assert config == dataclasses.replace(want, name="hf-gemma4")


def test_hf_dir_loads_encoders_and_text_only_skips_them(fx):
    config = presets.tiny_gemma4()
    params = load_params(fx.hf["tiny-gemma4"], config, dtype="float32", text_only=False)
    written = dict(fx.params["tiny-gemma4"])
    for rule in hf_map4.text_rules(config):  # HF has no K/V in KV-shared layers: zeros
        if not rule.hf:
            written[rule.ours] = np.zeros(rule.our_shape, np.float32)
    assert_loaded(params, written, config, np.float32, text_only=False)
    text = load_params(fx.hf["tiny-gemma4"], config, dtype="bfloat16")
    assert_loaded(text, written, config, ml_dtypes.bfloat16, text_only=True)


def test_hf_mismatch_lists_every_problem(fx):
    config = presets.tiny_gemma4()
    index = hf_io.tensor_index(fx.hf["tiny-gemma4"])
    shapes = {name: shape for name, (_, shape) in index.items()}
    del shapes["model.language_model.layers.2.mlp.up_proj.weight"]
    shapes["model.language_model.layers.0.self_attn.q_proj.weight"] = (60, 64)
    shapes["model.language_model.layers.0.extra.weight"] = (3,)
    prefix, problems = hf_map4.check(shapes, config, vision=True, audio=True)
    assert prefix == "model.language_model."
    assert problems == [
        "model.language_model.layers.0.self_attn.q_proj.weight: shape (60, 64), expected (64, 64)",
        "missing model.language_model.layers.2.mlp.up_proj.weight (expected (96, 64))",
        "unexpected model.language_model.layers.0.extra.weight (3,)",
    ]
    # Text-only: the towers are skipped, not unexpected.
    _, problems = hf_map4.check(dict(shapes), validate.text_config(config), vision=False,
                                audio=False)  # fmt: skip
    assert len(problems) == 3


def test_hf_clip_bounds_of_one_einsum_must_agree():
    config = presets.tiny_gemma4()
    rule = next(
        r for r in hf_map4.vision_rules(config) if r.ours.endswith("kv_einsum/clip_input_min")
    )
    values = [np.float32(-1.0)] * len(rule.hf)
    assert hf_map4.convert_rule(rule, values).shape == (2,)
    values[1] = np.float32(-2.0)  # layer 0's v_proj differs from its k_proj
    with pytest.raises(CheckpointMismatchError, match="v_proj.input_min"):
        hf_map4.convert_rule(rule, values)


def test_hf_config_errors_are_collected():
    bad = {**SCRIPT.TINY_GEMMA4_MOE_CONFIG, "hidden_activation": "relu", "attention_bias": True,
           "use_bidirectional_attention": "all"}  # fmt: skip
    with pytest.raises(ValueError, match="hidden_activation 'relu'.*attention_bias.*'all'"):
        hf_config4.config_from_hf(bad)


# --- Kaggle ------------------------------------------------------------------------------


@pytest.fixture
def gemma4_variant(fx, monkeypatch, tmp_path):
    """`gemma4-e2b-it` served from the fixture cache, holding "tiny-gemma4" weights sized for
    the project's Gemma 4 tokenizer (4096 pieces)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # any request would be refused
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(fx.kaggle_cache))
    monkeypatch.setitem(presets.TINY_PRESETS, "tiny-gemma4-4096", lambda: presets.tiny_gemma4(4096))
    real = registry.VARIANTS["gemma4-e2b-it"]
    variant = dataclasses.replace(real, preset="tiny-gemma4-4096")
    monkeypatch.setitem(registry.VARIANTS, variant.name, variant)
    return variant


def test_registry_gemma4_entries():
    v = registry.VARIANTS["gemma4-26b-a4b-it"]
    assert (v.handle, v.preset, v.checkpoint_dir, v.verified) == (
        "google/gemma-4/flax/gemma-4-26b-a4b-it", "gemma4-26b-a4b", "", False,
    )  # fmt: skip
    assert v.supported and v.model_page == GEMMA4_PAGE
    for size in ("e2b", "e4b", "31b", "26b-a4b"):
        for tuned in ("", "-it"):
            assert registry.VARIANTS[f"gemma4-{size}{tuned}"].supported


def test_kaggle_variant_loads_offline_with_both_encoders(fx, gemma4_variant):
    engine = load_engine("gemma4-e2b-it@1", dtype="float32")
    assert engine.name == "gemma4-e2b-it" and engine.config.family == 4
    assert engine.supports_images and engine.supports_audio
    assert engine.tokenizer.vocab_size == 4096
    config = presets.tiny_gemma4(4096)
    assert_loaded(engine.params, fx.params["kaggle-gemma4"], config, np.float32, text_only=False)
    tokens = jnp.asarray([engine.tokenizer.encode("hello world", add_bos=True)])
    logits = transformer.forward(engine.config, engine.params, tokens)
    assert logits.shape == (1, tokens.shape[1], 4096) and bool(jnp.isfinite(logits).all())

    text = load_engine("gemma4-e2b-it@1", dtype="float32", text_only=True)
    assert not text.supports_images and not text.supports_audio
    assert {"vision_encoder", "audio_encoder"}.isdisjoint(text.params)


# --- the demo model as a Hugging Face directory, end to end -------------------------------


@pytest.fixture(scope="module")
def demo_hf(tmp_path_factory):
    """(demo engine, its weights as a HF Gemma4ForConditionalGeneration dir with the project's
    Gemma 4 tokenizer)."""
    demo = demo_engine(family=4, dtype=jnp.float32)
    model_dir = tmp_path_factory.mktemp("hf-demo-gemma4") / "demo-gemma4"
    return demo, SCRIPT.write_hf_gemma4(model_dir, demo.config, demo.params)


def demo_media():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 200, 3), dtype=np.uint8)
    t = np.arange(16_000, dtype=np.float32) / 16_000  # 1 s at 16 kHz
    clip = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return image, clip.astype(np.float32)


def greedy_answer(engine) -> tuple[str, list[int]]:
    image, clip = demo_media()
    chat = engine.new_chat(cache_length=256, max_out_length=12)
    answer = chat.chat("Describe both.", images=[image], audio=[clip])
    return answer, list(chat.turns[-1].answer_tokens)


def test_hf_dir_of_the_demo_model_loads_and_chats_like_it(demo_hf):
    demo, model_dir = demo_hf
    engine = load_engine(str(model_dir), dtype="float32")
    assert engine.config.family == 4 and engine.supports_images and engine.supports_audio
    assert engine.tokenizer.vocab_size == 4096 and engine.name == "demo-gemma4"
    # config.json has no soft-token budget (the processor's): it is the reader's default.
    budget = engine.config.vision.max_soft_tokens
    assert (budget, demo.config.vision.max_soft_tokens) == (42, 36)
    assert engine.config == dataclasses.replace(
        demo.config, name="hf-gemma4",
        vision=dataclasses.replace(demo.config.vision, max_soft_tokens=budget),
    )  # fmt: skip

    loaded, original = flatten_params(engine.params), flatten_params(demo.params)
    assert loaded.keys() == original.keys()
    shared = {r.ours for r in hf_map4.text_rules(demo.config) if not r.hf}
    assert shared == {f"layer_{i}/attn/{leaf}" for i in (5, 6, 7)
                      for leaf in ("kv_einsum/w", "key_norm/scale")}  # fmt: skip
    for path, value in original.items():
        got = np.asarray(loaded[path])
        assert got.dtype == np.float32, path
        want = np.zeros(value.shape, np.float32) if path in shared else np.asarray(value)
        np.testing.assert_array_equal(got, want, err_msg=path)  # HF has no K/V there: zeros

    # Same weights (the unread K/V aside), same soft-token budget: the same greedy answer.
    reference = dataclasses.replace(demo, config=engine.config)
    answer, tokens = greedy_answer(engine)
    assert (answer, tokens) == greedy_answer(reference)
    assert len(tokens) > 0


def test_hf_dir_of_the_demo_model_text_only_refuses_media(demo_hf):
    _, model_dir = demo_hf
    engine = load_engine(str(model_dir), dtype="float32", text_only=True)
    assert not engine.supports_images and not engine.supports_audio
    assert engine.config.vision is None and engine.config.audio is None
    assert {"vision_encoder", "audio_encoder"}.isdisjoint(engine.params)
    assert {"mm_input_projection", "audio_input_projection"}.isdisjoint(engine.params["embedder"])
    image, clip = demo_media()
    chat = engine.new_chat(cache_length=128, max_out_length=4)
    with pytest.raises(ValueError, match="does not accept images"):
        chat.chat("What is this?", images=[image])
    with pytest.raises(ValueError, match="does not accept audio"):
        chat.chat("What is this?", audio=[clip])
    assert chat.turns == []  # refused before any work


@pytest.mark.parametrize(
    ("file", "content", "budget"),
    [
        ("processor_config.json", {"image_processor": {"max_soft_tokens": 36}}, 36),
        ("preprocessor_config.json", {"max_soft_tokens": 40, "patch_size": 16}, 40),
        ("processor_config.json", {"image_seq_length": 280}, None),
    ],
)
def test_hf_processor_config_sets_the_image_soft_token_budget(fx, tmp_path, file, content, budget):
    """HF keeps max_soft_tokens in the processor's config; with it the preset comes back exact."""
    shutil.copy(fx.hf["tiny-gemma4"] / "config.json", tmp_path / "config.json")
    (tmp_path / file).write_text(json.dumps(content))
    config = hf_io.read_config(tmp_path)
    default = hf_io.read_config(fx.hf["tiny-gemma4"]).vision.max_soft_tokens
    assert config.vision.max_soft_tokens == (default if budget is None else budget)
    if budget == 36:  # the preset's own budget: the whole config equals the preset
        assert config == dataclasses.replace(presets.tiny_gemma4(), name="hf-gemma4")


def test_hf_processor_config_with_a_bad_budget_is_a_clear_error(fx, tmp_path):
    shutil.copy(fx.hf["tiny-gemma4"] / "config.json", tmp_path / "config.json")
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 0}}')
    with pytest.raises(errors.CorruptCheckpointError, match="max_soft_tokens must be a positive"):
        hf_io.read_config(tmp_path)
    # A budget whose widest image would not fit the position table is refused by name.
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 70}}')
    with pytest.raises(errors.UnsupportedModelError, match="position table"):
        hf_io.read_config(tmp_path)
