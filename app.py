"""Entry point: `python app.py [flags]` serves the Gemma chat UI (the demo model by default).

Every flag has an environment variable (`GEMMA_APP_<FLAG>`, e.g. `GEMMA_APP_MODEL`), so a
Hugging Face Space can be configured from its settings page; flags win over variables. This
file only resolves settings, loads the engine and launches `gemma_app.ui.build_demo`. A model
that fails to load leaves the app up with a banner that says why (docs/app.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping, Sequence

# Before gradio is imported: no usage analytics leave the machine unless asked for.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from gemma_app import media, ui  # noqa: E402
from gemma_app.sessions import SamplingSettings, SessionRegistry, kv_cache_bytes  # noqa: E402

logger = logging.getLogger("gemma_app.app")

ENV_PREFIX = "GEMMA_APP_"
DTYPES = ("auto", "bfloat16", "float32")
# The built-in random-weight models: `--model demo` is the Gemma 4 one (text, images, audio).
DEMOS = {"demo": 4, "demo-gemma4": 4, "demo-gemma3": 3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything `python app.py` can be told; see `parse_settings` for flags and env vars."""

    model: str = "demo"
    tokenizer: str | None = None
    dtype: str = "auto"
    text_only: bool = False
    cache_length: int = 4096
    max_new_tokens: int = 512
    max_out_length: int = 2048
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    concurrency_limit: int = 4
    queue_size: int = 64
    max_sessions: int = 64
    session_ttl: float = 3600.0
    kv_budget: int | None = 8 * 2**30
    max_file_size: int = 20 * 2**20
    warmup: bool = True
    compilation_cache: str | None = "~/.cache/gemma_app/xla"

    def chat_options(self) -> ui.ChatOptions:
        limits = dataclasses.replace(media.DEFAULT_LIMITS, max_file_bytes=self.max_file_size)
        return ui.ChatOptions(
            cache_length=self.cache_length, max_out_length=self.max_out_length,
            max_new_tokens=self.max_new_tokens, concurrency_limit=self.concurrency_limit,
            queue_size=self.queue_size, media_limits=limits,
        )  # fmt: skip


# -- parsing ----------------------------------------------------------------------------------


def parse_size(text: str) -> int | None:
    """'8GiB', '512MiB', '20MB', '1g', '1048576' -> bytes (binary units); '0'/'none' -> None."""
    if text.strip().lower() in ("", "0", "none", "unlimited"):
        return None
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 8GiB, 512MiB, 20MB)")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true or false)")


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


# (flag, type, default as typed on the command line, help). Booleans are --x / --no-x.
_FLAGS = [
    ("--model", str, "demo", "'demo' (tiny Gemma 4, random weights), 'demo-gemma3', a variant "
     "(gemma3-1b-it), a checkpoint dir or an HF repo"),
    ("--tokenizer", str, None, "tokenizer.model path, if not found next to the checkpoint"),
    ("--dtype", str, "auto", "weights dtype: auto (bfloat16, float32 math on CPU), bfloat16 "
     "or float32 (twice the memory; bf16 checkpoints gain nothing)"),
    ("--text-only", bool, "false", "skip the image encoder of vision models (saves ~1.7 GB)"),
    ("--cache-length", int, "4096", "context length: KV-cache slots per chat"),
    ("--max-new-tokens", int, "512", "default of the max-new-tokens slider"),
    ("--max-out-length", int, "2048", "top of the max-new-tokens slider"),
    ("--host", str, "127.0.0.1", "address to listen on (0.0.0.0: every interface; "
     "also GRADIO_SERVER_NAME)"),
    ("--port", int, "7860", "port to listen on (also GRADIO_SERVER_PORT)"),
    ("--share", bool, "false", "also serve through a public gradio.live link"),
    ("--concurrency-limit", int, "4", "replies generated at once"),
    ("--queue-size", int, "64", "requests that may wait; more get 'queue full'"),
    ("--max-sessions", int, "64", "chats kept in memory at once"),
    ("--session-ttl", float, "3600", "seconds an idle chat is kept"),
    ("--kv-budget", parse_size, "8GiB", "KV-cache memory for all chats (0 = no limit)"),
    ("--max-file-size", parse_size, "20MiB", "largest upload"),
    ("--warmup", bool, "true", "compile the model before serving"),
    ("--compilation-cache", str, "~/.cache/gemma_app/xla", "directory of the persistent XLA "
     "compilation cache, so a restart skips compiling ('off' disables; on Spaces use /data/...)"),
]  # fmt: skip
# Variables that hosts such as Hugging Face Spaces set, read when ours are absent.
_FALLBACK_ENV = {"--host": "GRADIO_SERVER_NAME", "--port": "GRADIO_SERVER_PORT"}


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Gemma chat: a Gradio app on our own JAX/Flax Gemma engine.",
        epilog=f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG>, "
        f"e.g. {ENV_PREFIX}MODEL=gemma3-1b-it; flags win.",
    )
    for flag, type_, default, help_ in _FLAGS:
        env = _env_name(flag)
        value = environ.get(env, environ.get(_FALLBACK_ENV.get(flag, ""), default))
        text = f"{help_} [env {env}; default {default}]"
        if type_ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text,
                                default=_env_bool(parser, env, value))  # fmt: skip
        else:
            # argparse converts string defaults with `type`: bad env values fail like flags.
            choices = DTYPES if flag == "--dtype" else None
            parser.add_argument(flag, type=type_, default=value, help=text, choices=choices)
    return parser


def _env_bool(parser: argparse.ArgumentParser, env: str, value: str | bool) -> bool:
    try:
        return parse_bool(value) if isinstance(value, str) else value
    except argparse.ArgumentTypeError as e:
        parser.error(f"{env}: {e}")


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags, then `GEMMA_APP_*` environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    parser = _parser(environ)
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    if problem := _check(settings):
        parser.error(problem)
    return settings


def _check(s: Settings) -> str | None:
    """A message for the first inconsistent setting, or None."""
    checks = [
        (s.cache_length >= 64, f"--cache-length must be >= 64, got {s.cache_length}"),
        (s.max_out_length >= 1, f"--max-out-length must be >= 1, got {s.max_out_length}"),
        (s.max_out_length < s.cache_length,
         f"--max-out-length ({s.max_out_length}) must be below --cache-length ({s.cache_length})"),
        (1 <= s.max_new_tokens <= s.max_out_length,
         f"--max-new-tokens must be in [1, --max-out-length={s.max_out_length}], got {s.max_new_tokens}"),
        (s.concurrency_limit >= 1, f"--concurrency-limit must be >= 1, got {s.concurrency_limit}"),
        (s.queue_size >= 1, f"--queue-size must be >= 1, got {s.queue_size}"),
        (s.max_sessions >= 1, f"--max-sessions must be >= 1, got {s.max_sessions}"),
        (s.session_ttl > 0, f"--session-ttl must be > 0, got {s.session_ttl}"),
        (0 <= s.port <= 65535, f"--port must be in [0, 65535], got {s.port}"),
        (s.max_file_size is not None, "--max-file-size cannot be unlimited"),
    ]  # fmt: skip
    return next((message for ok, message in checks if not ok), None)


# -- the app ----------------------------------------------------------------------------------


@dataclasses.dataclass
class App:
    """The launched pieces: tests reach the registry and engine through this."""

    settings: Settings
    demo: gr.Blocks
    engine: object | None
    registry: SessionRegistry
    notice: str | None

    def launch_kwargs(self) -> dict:
        return {
            "server_name": self.settings.host,
            "server_port": self.settings.port,
            "share": self.settings.share,
            "max_file_size": self.settings.max_file_size,
            "run_history": False,  # no browser-side copy of every chat
            **ui.launch_style(),
        }

    def launch(self, **overrides):
        return self.demo.launch(**{**self.launch_kwargs(), **overrides})


def load_model(settings: Settings):
    """The engine for `settings.model`; raises with a user-facing message on failure."""
    dtype = _jnp_dtype(settings.dtype)
    if settings.model in DEMOS:
        from gemma_app.engine import demo_engine

        return demo_engine(family=DEMOS[settings.model], dtype=dtype)
    # Imported here: the checkpoint stack is heavy and the demo does not need it.
    from gemma_app.ckpt import load_engine

    return load_engine(
        settings.model, tokenizer=settings.tokenizer, dtype=settings.dtype,
        text_only=settings.text_only, progress=_log_progress,
    )  # fmt: skip


def _jnp_dtype(name: str | None):
    if name in (None, "auto"):
        return None
    import jax.numpy as jnp

    return getattr(jnp, name)


def _log_progress(message: str, fraction: float) -> None:
    logger.info("Loading model: %s (%.0f%%)", message, 100 * fraction)


def create_app(settings: Settings, *, engine=None) -> App:
    """Loads the model (or records why it failed) and builds the UI.

    Args:
      settings: the resolved settings.
      engine: an already loaded engine to serve instead (tests share one demo engine).
    """
    notice = None
    if engine is None:
        try:
            engine = load_model(settings)
        except Exception as e:  # any failure: keep serving, explain it in the banner
            _log_load_failure(settings.model, e)
            notice = f"Could not load model `{settings.model}`: {e}"
    registry = _registry(engine, settings)
    if engine is not None and settings.warmup:
        _warm_up(registry, engine)
    options = settings.chat_options()
    demo = ui.build_demo(engine, options=options, registry=registry, notice=notice)
    return App(settings=settings, demo=demo, engine=engine, registry=registry, notice=notice)


def _log_load_failure(model: str, error: Exception) -> None:
    """The loader's own errors already say what to do; anything else gets its traceback."""
    try:
        from gemma_app.ckpt import WeightsError
    except Exception:  # the checkpoint stack itself failed to import: that is the error
        WeightsError = ()  # noqa: N806
    if isinstance(error, WeightsError):
        logger.error("Could not load model %r: %s", model, error)
    else:
        logger.exception("Could not load model %r", model)


def _registry(engine, settings: Settings) -> SessionRegistry:
    def factory():
        return engine.new_chat(
            cache_length=settings.cache_length, max_out_length=settings.max_out_length
        )

    per_session = (
        kv_cache_bytes(engine.config, settings.cache_length, engine.dtype) if engine else 0
    )
    try:
        return SessionRegistry(
            factory, max_sessions=settings.max_sessions, ttl_s=settings.session_ttl,
            kv_budget_bytes=settings.kv_budget, kv_bytes_per_session=per_session,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


# Clip lengths that fill the audio encoder's frame buckets up to ~10 s (128, 256, 512 and
# 1024 mel frames of 10 ms): microphone questions fall in these; longer clips compile once.
WARM_UP_AUDIO_SECONDS = (1.2, 2.5, 5.0, 10.0)


def _warm_up(registry: SessionRegistry, engine) -> None:
    """Compiles prefill and decode (greedy and the default sampling) and the encoders of the
    model's image and audio paths before the first user, who would otherwise wait for them."""
    start = time.perf_counter()
    sampler = registry.factory()
    for sampling in (SamplingSettings(greedy=True).method(), SamplingSettings().method()):
        sampler.chat("Hello!", sampling=sampling, rng=0, max_new_tokens=2, multi_turn=False)
    for media_kwargs in _warm_up_media(engine):
        sampler.chat("Hello!", max_new_tokens=1, multi_turn=False, **media_kwargs)
    logger.info("Warm-up done in %.1f s", time.perf_counter() - start)


def _warm_up_media(engine) -> list[dict]:
    import numpy as np

    rate = media.DEFAULT_LIMITS.audio_sample_rate
    calls = [{"images": [np.full((48, 64, 3), 128, np.uint8)]}] if engine.supports_images else []
    if engine.supports_audio:
        # A quiet hum, not silence: nothing in the encoder may special-case all zeros.
        calls += [
            {"audio": [0.01 * np.sin(np.arange(int(s * rate), dtype=np.float32) * 0.1)]}
            for s in WARM_UP_AUDIO_SECONDS
        ]
    return calls


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = parse_settings(argv)
    logger.info("Settings: %s", settings)
    enable_compilation_cache(settings.compilation_cache)
    create_app(settings).launch()


def enable_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache in `path` ('off'/'none'/'' = leave it off).

    XLA compiles every program of the model (init, prefill buckets, decode, encoders) on the
    first start; with the cache a restart loads them from disk instead. Called by `main` only,
    so tests and library users keep JAX's defaults.
    """
    if not path or path.strip().lower() in ("off", "none", "false", "0"):
        return
    import jax

    directory = pathlib.Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.warning("Compilation cache disabled: cannot create %s (%s)", directory, e)
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program that took noticeable time, including the small ones of tiny models.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("Persistent XLA compilation cache: %s", directory)


if __name__ == "__main__":
    main(sys.argv[1:])
