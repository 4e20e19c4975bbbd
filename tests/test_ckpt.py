"""Weight loading end to end, on checkpoints written by `scripts/make_checkpoints.py`.

* orbax FLAT / NESTED / STACKED / KAULDRON -> exactly the arrays written, bf16 and fp32;
* Kaggle through the real `kagglehub.model_download`: a pinned handle resolves offline from
  a kagglehub cache directory; downloads and HTTP errors go to a loopback fake of the Kaggle
  API (kagglesdk's `KAGGLE_API_ENVIRONMENT=TEST` endpoint, moved to a port of the test process's
  own by conftest's `kaggle_test_endpoint`) - nothing in
  kagglehub or orbax is mocked;
* Hugging Face safetensors of the golden weights reproduce the transformers logits;
* every user-facing error is triggered and its message checked.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import LOGITS_ATOL

from gemma_app.ckpt import (
    AccessDeniedError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    DownloadError,
    MissingFilesError,
    ModelNotFoundError,
    NoCredentialsError,
    UnsupportedModelError,
    hf_map,
    kaggle,
    layouts,
    load_engine,
    load_params,
    orbax_io,
    registry,
    validate,
)
from gemma_app.ckpt import hf as hf_io
from gemma_app.ckpt.hf_map import flatten_params
from gemma_app.ckpt.progress import Progress, format_bytes
from gemma_app.engine import resolve_dtype
from gemma_app.nn import presets, transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
LAYOUTS = (layouts.FLAT, layouts.NESTED, layouts.STACKED, layouts.KAULDRON)
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
# What loading picks when no dtype is asked for: float32 on CPU, bfloat16 on accelerators.
AUTO_DTYPE = np.dtype(resolve_dtype("auto").param_dtype)
HANDLE = "google/gemma-3/flax/gemma3-1b-it"
GEMMA3_PAGE = "https://www.kaggle.com/models/google/gemma-3"
# A registry entry for the fixture: Kaggle's gemma3-1b-it handle, holding "demo"-sized weights.
DEMO_VARIANT = registry.Variant(
    name="demo-it", family=3, handle=HANDLE, preset="demo", instruction_tuned=True,
    checkpoint_dir="gemma3-1b-it",
)  # fmt: skip


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_checkpoints", ROOT / "scripts/make_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass needs the module registered
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """Every fixture checkpoint, written once per session into a temporary directory."""
    return _script().make_all(tmp_path_factory.mktemp("checkpoints"))


def assert_params_equal(params, expected: dict[str, np.ndarray], dtype) -> None:
    """`params` (our tree; an engine's layers stacked) holds exactly `expected` (flat) cast to
    `dtype`."""
    flat = flatten_params(transformer.unstack_layers(params))
    assert flat.keys() == expected.keys()
    for path, value in expected.items():
        got = flat[path]
        assert got.dtype == dtype and got.shape == value.shape, path
        np.testing.assert_array_equal(np.asarray(got), value.astype(dtype), err_msg=path)


# --- orbax layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_orbax_layouts_load_exactly_what_was_written(fx, preset, layout, dtype):
    path = fx.orbax[f"{preset}/{layout}"]
    params = load_params(path, presets.get_preset(preset), dtype=dtype)
    assert_params_equal(params, fx.params[preset], DTYPES[dtype])


def test_layout_detection_and_stacked_mapping(fx):
    leaves = orbax_io.read_leaves(fx.orbax["tiny-gemma2/STACKED"])
    layout, sources, problems = layouts.canonical_sources(leaves)
    assert (layout, problems) == (layouts.STACKED, [])
    # tiny-gemma2: pattern (L, G), 4 layers -> layer 3 is slice 1 of attention_type_1.
    q3 = sources["layer_3/attn/q_einsum/w"]
    assert q3.key == ("transformer/stacked_layers/attention_type_1/attn/q_einsum", "w")
    assert (q3.index, q3.shape) == (1, (4, 64, 16))
    assert sources["layer_2/mlp/linear"].key[0].endswith("attention_type_0/mlp/linear")
    for layout in (layouts.FLAT, layouts.NESTED, layouts.KAULDRON):
        ckpt = orbax_io.find_checkpoint_dir(fx.orbax[f"tiny-gemma2/{layout}"])
        found, sources, _ = layouts.canonical_sources(orbax_io.read_leaves(ckpt))
        assert found == layout and set(sources) == set(fx.params["tiny-gemma2"])
    assert ckpt.name == "default"  # Kauldron keeps its params in a sub-directory
    assert layouts.pattern_length(presets.gemma3_1b().attention_types) == 6
    assert layouts.pattern_length(presets.gemma1_2b().attention_types) == 1


def test_float32_on_disk_is_cast_per_leaf(fx):
    config, written = presets.tiny_gemma3(), fx.params["tiny-gemma3-f32"]
    path = fx.orbax["tiny-gemma3/FLAT-f32"]
    assert_params_equal(load_params(path, config, dtype="bfloat16"), written, ml_dtypes.bfloat16)
    assert_params_equal(load_params(path, config, dtype="float32"), written, np.float32)


def test_text_only_skips_vision_weights(fx):
    path, config = fx.orbax["tiny-gemma3/FLAT-vision"], presets.tiny_gemma3()
    _, sources, _ = layouts.canonical_sources(orbax_io.read_leaves(path))
    skipped = sorted(p for p in sources if layouts.is_encoder_path(p))
    assert skipped == [
        "embedder/mm_input_projection/w",
        "embedder/mm_soft_embedding_norm/scale",
        "vision_encoder/siglip_encoder/Transformer/encoder_norm/scale",
        "vision_encoder/siglip_encoder/embedding/bias",
        "vision_encoder/siglip_encoder/embedding/kernel",
    ]
    params = load_params(path, config, dtype="bfloat16")
    assert_params_equal(params, fx.params["tiny-gemma3"], ml_dtypes.bfloat16)
    # A config without an image encoder has nothing to fill: text_only=False changes nothing.
    params = load_params(path, config, text_only=False)
    assert_params_equal(params, fx.params["tiny-gemma3"], AUTO_DTYPE)
    # Text-only loading fills (and the engine runs) the config without its image encoder.
    assert getattr(validate.text_config(presets.gemma3_4b()), "vision", None) is None


def test_partial_vision_weights_are_listed_when_loading_vision(fx):
    """The 5 fake SigLIP leaves against the whole tiny encoder: every vision problem at once."""
    path, config = fx.orbax["tiny-gemma3/FLAT-vision"], presets.tiny_gemma3_vision()
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(path, config, text_only=False)
    error, expected = info.value, len(hf_map.vision_param_shapes(config))
    wrong = [p for p in error.problems if "checkpoint has" in p]
    assert len(wrong) == 5 and len(error.problems) == expected  # 5 wrong, the rest missing
    assert (
        "vision_encoder/siglip_encoder/embedding/kernel: checkpoint has (2, 2, 3, 8), model "
        "expects (14, 14, 3, 32)" in str(error)
    )
    assert "image encoder only" in str(error) and error.looks_like is None
    # Hugging Face: the fake two-tensor tower of the text golden's directory.
    config = hf_io.read_config(fx.hf["tiny-gemma3"])
    assert config.vision == presets.tiny_vision()
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(fx.hf["tiny-gemma3"], config, text_only=False)
    assert len(info.value.problems) == len(hf_map.hf_vision_param_shapes(config))
    assert "vision_tower.vision_model.post_layernorm.weight: shape (8,), expected (32,)" in str(
        info.value
    )


# --- Kaggle: offline cache, real kagglehub --------------------------------------------------


@pytest.fixture
def kaggle_env(monkeypatch, tmp_path):
    """No credentials anywhere, a private HOME, and kagglesdk's API endpoint on loopback.

    With `KAGGLE_API_ENVIRONMENT=TEST` kagglesdk talks to a loopback port (conftest's
    `kaggle_test_endpoint`); a test that does not start `FakeKaggle` therefore proves it made
    no request (it would be refused).
    """
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    for name in (
        "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR",
        "KAGGLE_KERNEL_RUN_TYPE", "TBE_RUNTIME_ADDR", "HTTP_PROXY", "HTTPS_PROXY",
        "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(registry.VARIANTS, DEMO_VARIANT.name, DEMO_VARIANT)
    return home


def test_pinned_handle_resolves_offline_from_the_kagglehub_cache(fx, kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(fx.kaggle_cache))
    ref = registry.resolve_kaggle("gemma3-1b-it@1")
    path = kaggle.download(ref, lambda *_: None)
    assert path == fx.kaggle_cache / "models" / HANDLE / "1"
    params = load_params(path, presets.tiny_demo(), dtype="bfloat16")
    assert_params_equal(params, fx.params["demo"], ml_dtypes.bfloat16)


def test_load_engine_from_a_pinned_variant_offline(fx, kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(fx.kaggle_cache))
    seen = []
    engine = load_engine("demo-it@1", progress=lambda message, f: seen.append((message, f)))
    assert engine.name == "demo-it" and engine.config == presets.tiny_demo()
    assert engine.tokenizer.vocab_size == 4096 and not engine.is_demo
    assert_params_equal(engine.params, fx.params["demo"], AUTO_DTYPE)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("Loading demo-tiny-gemma3 weights") for m, _ in seen)
    tokens = jnp.asarray([engine.tokenizer.encode("hello world", add_bos=True)])
    logits = transformer.forward(engine.config, engine.params, tokens)
    assert logits.shape == (1, tokens.shape[1], 4096) and bool(jnp.isfinite(logits).all())


def test_registry_variant_of_another_size_lists_every_mismatch(fx, kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(fx.kaggle_cache))
    with pytest.raises(CheckpointMismatchError) as info:
        load_engine("gemma3-1b-it@1")
    error, config = info.value, presets.gemma3_1b()
    assert error.looks_like == "demo"
    assert len(error.problems) == 2 + 11 * config.num_layers  # every leaf of gemma3-1b
    message = str(error)
    assert "does not match gemma3-1b" in message and "This checkpoint looks like demo." in message
    assert (
        "embedder/input_embedding: checkpoint has (4096, 128), model expects (262144, 1152)"
        in message
    )
    assert "missing layer_25/mlp/linear (expected (6912, 1152))" in message


def test_local_download_dir_and_checkpoint_dir_infer_the_preset(fx):
    for path in (fx.kaggle_files, fx.kaggle_files / "gemma3-1b-it"):
        engine = load_engine(str(path), dtype="float32")
        assert engine.config == presets.tiny_demo() and engine.dtype == jnp.float32
        assert_params_equal(engine.params, fx.params["demo"], np.float32)


# --- Kaggle: downloads and HTTP errors through a loopback fake API --------------------------


class _FakeKaggleHandler(http.server.BaseHTTPRequestHandler):
    """The three model endpoints kagglehub 1.0.2 uses, at kagglesdk's TEST address."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        state: FakeKaggle = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        method = self.path.rsplit("/", 1)[-1]
        state.requests.append((method, body, self.headers.get("Authorization")))
        if state.status != 200 or (state.require_auth and not self.headers.get("Authorization")):
            status = state.status if state.status != 200 else 401
            return self._json(status, {"code": status, "message": state.message})
        if method == "GetModelInstance":
            return self._json(200, {"versionNumber": state.version})
        files = sorted(p for p in state.files.rglob("*") if p.is_file())
        if method == "ListModelInstanceVersionFiles":
            names = [
                {"name": str(p.relative_to(state.files)), "size": p.stat().st_size} for p in files
            ]
            return self._json(200, {"files": names, "nextPageToken": ""})
        data = (state.files / body["path"]).read_bytes()
        digest = hashlib.md5(data + (b"x" if state.bad_md5 else b"")).digest()
        time.sleep(state.delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-goog-hash", f"md5={base64.b64encode(digest).decode()}")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output clean
        pass


@dataclasses.dataclass
class FakeKaggle:
    files: pathlib.Path
    status: int = 200
    message: str = ""
    version: int = 1
    require_auth: bool = True
    bad_md5: bool = False
    delay: float = 0.0
    requests: list = dataclasses.field(default_factory=list)


@pytest.fixture
def fake_kaggle(fx, kaggle_env, kaggle_test_endpoint):
    """Serves `fx.kaggle_files` at kagglesdk's TEST endpoint for one test; loopback only."""
    address = ("127.0.0.1", kaggle_test_endpoint)
    server = http.server.ThreadingHTTPServer(address, _FakeKaggleHandler)
    server.daemon_threads = True
    server.state = FakeKaggle(files=fx.kaggle_files)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_through_kagglehub_then_offline(
    fx, fake_kaggle, kaggle_env, monkeypatch, tmp_path
):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
    monkeypatch.setattr(kaggle, "POLL_SECONDS", 0.02)
    fake_kaggle.delay = 0.15  # per file: lets the progress watcher see bytes arrive
    seen = []
    engine = load_engine("demo-it", progress=lambda message, f: seen.append((message, f)))
    assert_params_equal(engine.params, fx.params["demo"], AUTO_DTYPE)
    methods = [method for method, *_ in fake_kaggle.requests]
    assert methods[:2] == ["GetModelInstance", "ListModelInstanceVersionFiles"]
    assert methods.count("DownloadModelInstanceVersion") == sum(
        1 for p in fx.kaggle_files.rglob("*") if p.is_file()
    )
    assert all(auth == "Bearer test-token" for *_, auth in fake_kaggle.requests)
    cache = tmp_path / "kagglehub" / "models" / HANDLE
    assert (cache / "1.complete").is_file() and (cache / "1" / "tokenizer.model").is_file()
    downloads = [f for m, f in seen if m.startswith("Downloading")]
    assert downloads and all(0 < f < 0.5 for f in downloads)
    assert [f for _, f in seen] == sorted(f for _, f in seen) and seen[-1][1] == 1.0

    fake_kaggle.requests.clear()
    fake_kaggle.status = 500  # the pinned version must not need the server at all
    load_engine("demo-it@1")
    assert fake_kaggle.requests == []


def test_no_credentials(fake_kaggle, kaggle_env):
    with pytest.raises(NoCredentialsError) as info:
        load_engine("gemma3-1b-it@1")
    message = str(info.value)
    for needle in (
        "KAGGLE_API_TOKEN",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "https://www.kaggle.com/settings",
    ):
        assert needle in message
    assert str(kaggle_env / ".kaggle" / "kaggle.json") in message and GEMMA3_PAGE in message
    assert fake_kaggle.requests and all(auth is None for *_, auth in fake_kaggle.requests)


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("credentials", ["token", "env", "kaggle.json"])
def test_licence_not_accepted(fake_kaggle, kaggle_env, monkeypatch, status, credentials):
    if credentials == "token":
        monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
        source = "KAGGLE_API_TOKEN"
    elif credentials == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", "someone")
        monkeypatch.setenv("KAGGLE_KEY", "test-key")
        source = "KAGGLE_USERNAME and KAGGLE_KEY"
    else:
        (kaggle_env / ".kaggle").mkdir()
        (kaggle_env / ".kaggle" / "kaggle.json").write_text('{"username": "someone", "key": "k"}')
        source = str(kaggle_env / ".kaggle" / "kaggle.json")
    fake_kaggle.status, fake_kaggle.message = status, "User has not consented to terms of use"
    with pytest.raises(AccessDeniedError) as info:
        load_engine("gemma3-4b-it@1")
    message = str(info.value)
    assert f"HTTP {status}" in message and "google/gemma-3/flax/gemma3-4b-it/1" in message
    assert f"open {GEMMA3_PAGE} and accept the Gemma licence" in message and source in message
    assert all(auth for *_, auth in fake_kaggle.requests)


def test_unknown_handle_404(fake_kaggle, kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
    fake_kaggle.status = 404
    with pytest.raises(
        ModelNotFoundError, match="Kaggle has no model google/gemma-3/flax/gemma3-2b-it/3 "
    ):
        load_engine("google/gemma-3/flax/gemma3-2b-it/3")


def test_corrupted_download(fake_kaggle, kaggle_env, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
    fake_kaggle.bad_md5 = True
    with pytest.raises(CorruptCheckpointError, match="is corrupted .checksum mismatch.*run again"):
        load_engine("demo-it@1")
    assert not (tmp_path / "kagglehub" / "models" / HANDLE / "1.complete").exists()


def test_unpinned_and_offline_suggests_pinning(fx, kaggle_env, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(fx.kaggle_cache))  # no server: refused
    with pytest.raises(DownloadError) as info:
        load_engine("demo-it")
    message = str(info.value)
    assert "Could not reach Kaggle" in message and "demo-it@1" in message
    assert "Versions cached here: [1]" in message


def test_unsupported_variant_fails_before_any_download(fake_kaggle, kaggle_env, monkeypatch):
    # Every listed release has a preset now; a variant without one (e.g. a future family).
    future = registry.Variant(
        name="gemma9-2b-it", family=9, handle="google/gemma-9/flax/gemma-9-2b-it", preset=None,
        instruction_tuned=True, checkpoint_dir="",
    )  # fmt: skip
    monkeypatch.setitem(registry.VARIANTS, future.name, future)
    with pytest.raises(
        UnsupportedModelError,
        match="gemma9-2b-it .Gemma 9. is not supported.*nothing was downloaded",
    ):
        load_engine("gemma9-2b-it")
    assert fake_kaggle.requests == []


def test_unknown_name():
    with pytest.raises(
        ModelNotFoundError, match="Unknown model 'gemma3-4b-itt'.*Did you mean gemma3-4b-it"
    ):
        load_engine("gemma3-4b-itt")


# --- other family / size, missing and corrupt files -------------------------------------


def test_checkpoint_of_another_family_lists_all_mismatches(fx):
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(fx.orbax["tiny-gemma2/NESTED"], presets.tiny_gemma3())
    error = info.value
    assert error.looks_like == "tiny-gemma2"
    # tiny-gemma3: 6 layers x 11 leaves + 2; tiny-gemma2 has 4 layers, no q/k norms.
    missing = [p for p in error.problems if p.startswith("missing")]
    assert len(missing) == 2 * 11 + 4 * 2 and len(error.problems) == len(missing)
    assert "missing layer_0/attn/_query_norm/scale (expected (16,))" in str(error)


def test_tokenizer_of_another_model(fx):
    with pytest.raises(CheckpointMismatchError, match="4096 pieces but the embedding has 256 rows"):
        load_engine(str(fx.hf["tiny-gemma3"]), tokenizer=ROOT / "assets" / "tokenizer.model")


def test_quantized_weights_are_refused(tmp_path):
    flat = {"embedder/input_embedding": np.zeros((256, 64), np.int8)}
    orbax_io.save(tmp_path / "int8", flat, layouts.NESTED)
    with pytest.raises(UnsupportedModelError, match="integer weights.*int8.*not supported"):
        load_params(tmp_path / "int8", presets.tiny_gemma3())


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_files(fx, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(MissingFilesError, match="No orbax checkpoint in .*Found: notes.txt"):
        load_params(tmp_path / "empty", presets.tiny_gemma3())
    with pytest.raises(
        MissingFilesError, match="No tokenizer.model next to the checkpoint.*--tokenizer"
    ):
        load_engine(str(fx.orbax["tiny-gemma3/FLAT"]))
    no_tok = _copy(fx.kaggle_files, tmp_path / "download")
    (no_tok / "tokenizer.model").unlink()
    with pytest.raises(MissingFilesError, match="No tokenizer.model"):
        load_engine(str(no_tok))
    hf_dir = _copy(fx.hf["tiny-gemma3"], tmp_path / "hf")
    (hf_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingFilesError, match="lacks 1 of the 2 shards.*model-00002-of-00002"):
        load_params(hf_dir, presets.tiny_gemma3())


def test_damaged_data_files(fx, tmp_path):
    """Runs in a subprocess: when one read of a batch fails, orbax closes its event loop with
    the sibling reads still pending, and Python reports them ("Event loop is closed")
    whenever the garbage collector finds them, which would be during some later test."""
    damaged = _copy(fx.orbax["tiny-gemma3/FLAT"], tmp_path / "data")
    for f in (damaged / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(b"\x00garbage" * (f.stat().st_size // 8 + 1))
    code = (
        "import sys\n"
        "from gemma_app.ckpt import CorruptCheckpointError, load_params\n"
        "from gemma_app.nn.presets import tiny_gemma3\n"
        "try:\n    load_params(sys.argv[1], tiny_gemma3())\n"
        "except CorruptCheckpointError as error:\n    print('CORRUPT', error)\n"
    )
    command = [sys.executable, "-c", code, str(damaged)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stdout.startswith("CORRUPT Cannot read "), run.stdout + run.stderr[-2000:]
    assert "The checkpoint files are truncated or damaged" in run.stdout


def test_corrupt_files(fx, tmp_path):
    config = presets.tiny_gemma3()
    bad_meta = _copy(fx.orbax["tiny-gemma3/FLAT"], tmp_path / "meta")
    (bad_meta / "_METADATA").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="Cannot read the orbax metadata"):
        load_params(bad_meta, config)
    hf_dir = _copy(fx.hf["tiny-gemma2"], tmp_path / "hf")
    shard = hf_dir / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated or damaged"):
        load_params(hf_dir, presets.tiny_gemma2())
    bad_tok = _copy(fx.kaggle_files, tmp_path / "tok")
    (bad_tok / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CorruptCheckpointError, match="is not a SentencePiece model"):
        load_engine(str(bad_tok))


# --- Hugging Face safetensors --------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_hf_checkpoint_reproduces_transformers_logits(fx, preset):
    config = validate.text_config(hf_io.read_config(fx.hf[preset]))
    assert config == dataclasses.replace(presets.get_preset(preset), name=config.name)
    params = load_params(fx.hf[preset], config, dtype="float32")
    with np.load(GOLDEN_DIR / f"{preset}.npz") as golden:
        logits = np.asarray(transformer.forward(config, params, golden["tokens"]))
        diff = np.abs(logits - golden["logits"]).max()
    assert diff <= LOGITS_ATOL, f"{preset}: max |ours - HF| = {diff:.3g}"


def test_hf_dir_engine(fx):
    engine = load_engine(str(fx.hf["demo"]))
    assert engine.name == "demo" and engine.config.name == "hf-gemma3"
    assert engine.config == dataclasses.replace(presets.tiny_demo(), name="hf-gemma3")
    assert_params_equal(engine.params, fx.params["hf-demo"], AUTO_DTYPE)


# --- registry and progress -----------------------------------------------------------------


def test_registry():
    variants = registry.VARIANTS.values()
    assert len({v.handle for v in variants}) == len(variants)
    for v in variants:
        assert v.supported and v.preset in presets.PRESETS
    v = registry.VARIANTS["gemma3-4b-it"]
    assert (v.handle, v.checkpoint_dir, v.model_page) == (
        "google/gemma-3/flax/gemma3-4b-it",
        "gemma3-4b-it",
        GEMMA3_PAGE,
    )
    assert v.multimodal and not registry.VARIANTS["gemma3-1b-it"].multimodal
    assert registry.VARIANTS["gemma1-2b-it"].handle == "google/gemma/flax/2b-it"
    assert registry.VARIANTS["gemma4-e2b-it"].handle == "google/gemma-4/flax/gemma-4-e2b-it"
    assert not registry.VARIANTS["gemma3-270m-it"].verified
    for spec in ("gemma3-4b-it@2", "gemma3-4b-it/2", "kaggle:google/gemma-3/flax/gemma3-4b-it/2"):
        ref = registry.resolve_kaggle(spec)
        assert (ref.pinned_handle, ref.variant) == ("google/gemma-3/flax/gemma3-4b-it/2", v)
    assert registry.resolve_kaggle("google/gemma-3/flax/gemma3-4b-it").version is None
    assert registry.resolve_kaggle("google/gemma-3-4b-it") is None  # a Hugging Face repo id


def test_progress_spans_are_monotonic():
    seen = []
    with Progress(lambda message, f: seen.append((message, f)), terminal=False) as progress:
        first, second = progress.span(0.0, 0.5), progress.span(0.5, 1.0)
        first("a", 0.5)
        first("a", 0.25)  # a late report from a watcher thread never moves the bar back
        second("b", 1.0)
    assert seen == [("a", 0.25), ("a", 0.25), ("b", 1.0)]
    assert format_bytes(999) == "999 B" and format_bytes(1_234_567) == "1.2 MB"
    assert format_bytes(2.5e9) == "2.5 GB"


def test_encoder_skip_rule():
    assert layouts.is_encoder_path("vision_encoder/siglip_encoder/embedding/kernel")
    assert layouts.is_encoder_path("audio_encoder/conformer/x")
    assert layouts.is_encoder_path("embedder/mm_input_projection/w")
    assert not layouts.is_encoder_path("embedder/input_embedding")
    assert not layouts.is_encoder_path("layer_0/attn/q_einsum/w")


def test_device_arrays_and_dtype_names(fx):
    params = load_params(fx.orbax["tiny-gemma3/FLAT"], presets.tiny_gemma3(), dtype="bf16")
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in leaves)
    with pytest.raises(ValueError, match="Unsupported dtype 'int8'"):
        load_params(fx.orbax["tiny-gemma3/FLAT"], presets.tiny_gemma3(), dtype="int8")
