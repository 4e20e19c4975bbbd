"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

from gemma_app.text.tokenizer import Tokenizer  # imports JAX, but starts no backend

# The suite compiles hundreds of small XLA programs, and most of its time is XLA:CPU's compiler
# (LLVM optimising each tiny kernel). At LLVM's lowest level tests/test_model.py took 55 s
# instead of 82 on the 2-core AMD EPYC; tests that run long decodes get a little slower. The
# HLO under test is the same, and the CPU kernels (gemma_app/kernels) are built by gcc as
# always. Set before JAX starts a backend; a user's XLA_FLAGS that name a level win.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# Ours vs the reference's logits, fp32 on CPU. The tiny models' logits reach 18-33, and the
# summation order of XLA:CPU's fp32 code differs between CPUs: every golden was within 1e-4 on
# the AMD EPYC where they were first checked; tiny-gemma4 gave 1.01e-4 on an Intel Xeon
# (~6e-6 of its largest logit).
LOGITS_ATOL = 2e-4


def rerun_atol(stored) -> float:
    """Tolerance for a golden recomputed by its own script (the same reference, fp32): torch's
    fp32 kernels sum in a CPU-dependent order. 1e-5 (1e-6 for soft tokens) held on the AMD
    EPYC that made the goldens; an Intel Xeon differs by up to 2.8e-5 of the largest value
    (4.5e-4 on two-image logits of max 16), the size of HF's own fp32 error there (2.1e-4
    from fp64 on the one-image logits). So: 5e-5 of the largest value, at least 1e-6; a wrong
    weight or input moves them by whole units."""
    import numpy as np

    return max(1e-6, 5e-5 * float(np.abs(np.asarray(stored)).max()))


@pytest.fixture(scope="session", autouse=True)
def unwritten_cache_slots_hold_nan():
    """Every new KV cache in the tests is NaN, not the allocator's leftovers.

    The engine never zeroes a cache (`kernels.attention.cache_array`): no reader may give an
    unwritten slot anything but a zero weight by a select. NaN is the worst leftover, so every
    cached test (cached == uncached, multi-turn == one shot, images, the app) checks that, and
    test_attention_kernel.py runs the real allocation (`REAL_CACHE_ARRAY`).
    """
    import jax.numpy as jnp

    from gemma_app.kernels import attention

    def nan_cache(shape, dtype):
        return jnp.full(shape, jnp.nan, dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "cache_array", nan_cache)
        yield


@pytest.fixture(scope="session", autouse=True)
def kaggle_test_endpoint():
    """kagglesdk's TEST environment (`KAGGLE_API_ENVIRONMENT=TEST`, what the Kaggle tests set)
    talks to a loopback port of this process's own, not the fixed localhost:7777.

    Test processes that run side by side (pytest-xdist) then never reach each other's fake
    Kaggle server, and a test that starts none is refused. `fake_kaggle` serves this port.
    """
    from kagglesdk import kaggle_env

    port = _free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(
            kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.TEST, f"http://localhost:{port}"
        )
        yield port


ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_MODEL = ASSETS / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The project's demo SentencePiece tokenizer (`assets/tokenizer.model`), Gemma 3 layout."""
    return Tokenizer(TOKENIZER_MODEL, version=3)


@pytest.fixture(scope="session")
def demo_engine():
    """The Gemma 3 demo engine (tiny Gemma 3 architecture, toy SigLIP, random weights, our
    Gemma 3 tokenizer): text and images, no audio, no thinking. `--model demo-gemma3`."""
    from gemma_app.engine import demo_engine

    return demo_engine(family=3)


@pytest.fixture(scope="session")
def gemma4_demo():
    """The default demo engine (`python app.py`): tiny Gemma 4 architecture with toy image and
    audio encoders, random weights, our Gemma 4 tokenizer."""
    from gemma_app.engine import demo_engine

    return demo_engine(family=4)


# -- the Gradio app (app.py) on loopback, for tests/test_ui*.py, test_load.py, test_browser.py --

APP_TEST_SETTINGS = {
    # One cache length for every launched test app: jit caches are shared across them.
    "cache_length": 1024,
    "max_out_length": 1000,
    "max_new_tokens": 32,
    "concurrency_limit": 4,
    "queue_size": 32,
    "warmup": False,
    "host": "127.0.0.1",
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch_app(demo_engine, tmp_path_factory):
    """Factory: `launch_app(engine=..., **settings) -> (App, url)`, served on 127.0.0.1 only.

    Uses the shared demo engine unless `engine` is given (None with `model=...` loads that
    model). Gradio is kept offline (no analytics) and its heartbeat is short, so a closed client
    triggers `unload` within about a second. Every app is closed at the end of the session.
    """
    import os

    env = {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_HEARTBEAT_INTERVAL": "0.5",
        "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    import app as app_module

    launched = []

    def launch(*, engine=demo_engine, **overrides):
        settings = app_module.Settings(**{**APP_TEST_SETTINGS, "port": _free_port(), **overrides})
        served = app_module.create_app(settings, engine=engine)
        served.launch(prevent_thread_lock=True, quiet=True)
        launched.append(served)
        return served, f"http://127.0.0.1:{settings.port}/"

    yield launch
    for served in launched:
        served.demo.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class ChatDriver:
    """One simulated browser tab: a `gradio_client.Client` with its own session and history.

    `add` and `respond` call the same two events the page's textbox triggers. Each returns what
    the server sent plus the toasts (`gr.Warning`/`gr.Info`) it raised, as (level, text).
    """

    SAMPLING = {
        "system_prompt": "",
        "thinking": False,
        "greedy": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
        "min_p": 0.0,
        "max_new_tokens": 32,
        "seed": -1,
    }
    TIMEOUT_S = 120

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False)
        self.history: list = []

    @property
    def session_hash(self) -> str:
        return self.client.session_hash

    def call(self, *args, api_name: str):
        """Runs an endpoint to completion: (every streamed output, toasts)."""
        job = self.client.submit(*args, api_name=api_name)
        job.result(timeout=self.TIMEOUT_S)
        return list(job.outputs()), self.toasts(job)

    @staticmethod
    def toasts(job) -> list[tuple[str, str]]:
        found = []
        updates = job.communicator.updates
        while not updates.empty():
            update = updates.get_nowait()
            log = getattr(update, "log", None)
            if log:
                found.append((log[1], log[0]))
        return found

    def add(self, text: str, files=()):
        """The textbox's submit: validates and appends the message (or refuses it)."""
        from gradio_client import handle_file

        message = {"text": text, "files": [handle_file(str(f)) for f in files]}
        outputs, toasts = self.call(message, self.history, api_name="/add_message")
        history, _textbox = outputs[-1]
        if isinstance(history, list):
            self.history = history
        return toasts

    def sampling_args(self, **overrides) -> list:
        return list({**self.SAMPLING, **overrides}.values())

    def submit_respond(self, **sampling):
        return self.client.submit(
            self.history, *self.sampling_args(**sampling), api_name="/respond"
        )

    def respond(self, **sampling):
        """Streams the reply; returns (streamed outputs, toasts) and keeps the final history."""
        job = self.submit_respond(**sampling)
        job.result(timeout=self.TIMEOUT_S)
        outputs = list(job.outputs())
        if outputs and isinstance(outputs[-1][0], list):
            self.history = outputs[-1][0]
        return outputs, self.toasts(job)

    def send(self, text: str, files=(), **sampling) -> str:
        """add + respond; returns the final answer text."""
        self.add(text, files)
        self.respond(**sampling)
        return last_answer(self.history)

    @property
    def answer(self) -> str | None:
        return last_answer(self.history)

    @staticmethod
    def answer_of(history: list) -> str | None:
        return last_answer(history)

    def close(self) -> None:
        self.client.close()


def last_answer(history: list) -> str | None:
    """Text of the last assistant message of a Chatbot value (None if there is none)."""
    from gemma_app import ui

    for message in reversed(history or []):
        if message["role"] == "assistant":
            return ui.message_text(message)
    return None


@pytest.fixture
def open_chat():
    """Factory: `open_chat(url) -> ChatDriver`; every driver is closed after the test."""
    drivers = []

    def open_(url: str) -> ChatDriver:
        driver = ChatDriver(url)
        drivers.append(driver)
        return driver

    yield open_
    for driver in drivers:
        driver.close()
