"""app.py: settings from flags and environment variables, the load-failure banner, the CLI."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import app as app_module
from app import Settings, parse_settings, parse_size

ROOT = Path(__file__).resolve().parent.parent


def test_no_flags_and_no_env_mean_the_demo_model_on_localhost():
    assert parse_settings([], environ={}) == Settings()
    assert Settings().model == "demo" and Settings().host == "127.0.0.1"


def test_env_vars_set_defaults_and_flags_win():
    env = {
        "GEMMA_APP_MODEL": "gemma3-1b-it",
        "GEMMA_APP_CACHE_LENGTH": "3072",
        "GEMMA_APP_KV_BUDGET": "512MiB",
        "GEMMA_APP_SHARE": "true",
        "GEMMA_APP_WARMUP": "0",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": "7861",
    }
    settings = parse_settings(["--cache-length", "8192", "--port", "9000"], environ=env)
    assert settings.model == "gemma3-1b-it"
    assert settings.cache_length == 8192 and settings.port == 9000
    assert settings.kv_budget == 512 * 2**20
    assert settings.share is True and settings.warmup is False
    assert settings.host == "0.0.0.0"
    assert parse_settings([], environ={**env, "GEMMA_APP_HOST": "10.0.0.1"}).host == "10.0.0.1"
    flags = parse_settings(["--no-share", "--warmup"], environ=env)
    assert flags.share is False and flags.warmup is True


def test_every_flag_is_documented_with_its_env_var():
    doc = (ROOT / "docs" / "app.md").read_text()
    for action in app_module._parser({})._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in doc
                if not flag.startswith("--no-"):
                    assert f"`{app_module._env_name(flag)}`" in doc


@pytest.mark.parametrize(
    "argv, env, message",
    [
        ([], {"GEMMA_APP_CACHE_LENGTH": "lots"}, "invalid int value: 'lots'"),
        (["--kv-budget", "huge"], {}, "not a size"),
        (["--max-new-tokens", "5000"], {}, "--max-new-tokens must be in"),
        (["--max-out-length", "4096"], {}, "must be below --cache-length"),
        (["--dtype", "int8"], {}, "invalid choice"),
        ([], {"GEMMA_APP_SHARE": "maybe"}, "GEMMA_APP_SHARE: not a boolean"),
    ],
)
def test_bad_settings_stop_with_a_clear_message(capsys, argv, env, message):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ=env)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("20mb", 20 * 2**20), ("1g", 2**30),
     ("1048576", 2**20), ("1.5k", 1536), ("0", None), ("none", None)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_a_model_that_fails_to_load_leaves_the_app_up_with_a_banner(launch_app, open_chat):
    app, url = launch_app(engine=None, model="no-such-model")
    assert app.engine is None
    assert app.notice.startswith("Could not load model `no-such-model`: Unknown model")
    page_config = httpx.get(f"{url}config", timeout=30).json()
    banners = [c for c in page_config["components"] if c["props"].get("elem_id") == "banner"]
    assert "Could not load model `no-such-model`" in banners[0]["props"]["value"]
    assert "Traceback" not in banners[0]["props"]["value"]
    chat = open_chat(url)
    toasts = chat.add("Hello?")
    assert toasts[0][0] == "warning" and toasts[0][1].startswith("No model is loaded")


def test_warm_up_compiles_the_image_path_and_the_usual_audio_buckets(gemma4_demo, demo_engine):
    from gemma_app import audio_input
    from gemma_app.nn import audio

    calls = app_module._warm_up_media(gemma4_demo)
    assert [list(c) for c in calls] == [["images"]] + [["audio"]] * 4
    frames = [audio_input.num_mel_frames(c["audio"][0].size) for c in calls[1:]]
    assert [audio.frame_bucket(f) for f in frames] == [128, 256, 512, 1024]  # up to ~10 s
    assert [list(c) for c in app_module._warm_up_media(demo_engine)] == [["images"]]


def _serve(args: list[str], env: dict, timeout_s: float):
    """Runs `python app.py ARGS` until it prints its URL; returns (process, url, output)."""
    process = subprocess.Popen(
        [sys.executable, "app.py", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if match := re.search(r"Running on local URL:\s+(\S+)", line):
            return process, match.group(1).rstrip("/") + "/", "".join(lines)
    process.kill()
    raise AssertionError("app.py did not print its URL:\n" + "".join(lines))


def _env(port: int) -> dict:
    return {
        **os.environ,
        "GEMMA_APP_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
    }


def test_compilation_cache_flag_turns_on_jax_persistent_cache(tmp_path, monkeypatch):
    import jax

    assert parse_settings([]).compilation_cache == "~/.cache/gemma_app/xla"
    assert parse_settings([], {"GEMMA_APP_COMPILATION_CACHE": "off"}).compilation_cache == "off"
    before = jax.config.jax_compilation_cache_dir
    try:
        app_module.enable_compilation_cache("off")
        assert jax.config.jax_compilation_cache_dir == before
        app_module.enable_compilation_cache(str(tmp_path / "xla"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert (tmp_path / "xla").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_the_cli_serves_at_the_printed_url_even_when_loading_fails():
    from conftest import _free_port

    port = _free_port()
    process, url, output = _serve(["--model", "no-such-model"], _env(port), timeout_s=120)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        assert "Could not load model 'no-such-model'" in output
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "Gemma chat" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_python_app_py_answers_on_the_demo_model(open_chat):
    """The README's command: no flags, demo model, a real answer at the printed URL."""
    from conftest import _free_port

    port = _free_port()
    process, url, _ = _serve([], _env(port), timeout_s=300)
    try:
        chat = open_chat(url)
        assert chat.send("Hello!", max_new_tokens=8)
    finally:
        process.terminate()
        process.wait(timeout=30)
