"""The Gradio 6 Blocks UI: `build_demo(engine) -> gr.Blocks`, a thin factory over pure helpers.

Design (see docs/app.md):

* The browser owns the conversation: the `Chatbot` value is passed to every event, and the
  session's sampler is made equal to it before each reply (`gemma_app.sessions`). Retry, undo,
  edit and stop only rewrite that value; nothing else needs to be kept in step.
* Sending is two events: `add_message` (cheap, unlimited lane) validates the message and its
  attachments and appends it, then `respond` (the shared generation lane, `concurrency_id`)
  answers the trailing user message. A refused message is not appended and stays in the
  textbox, so `respond` finds nothing to answer.
* Attachments the loaded model cannot read are refused as a whole message (text included):
  a question about a picture answered without the picture would mislead. The warning says so.
* Streaming yields on a time budget (`ChatOptions.refresh_s`), not once per token: every
  yield re-sends and re-renders the answer's markdown, which is what makes long answers slow.
* Stop: the textbox's stop button cancels the reply (Gradio closes the generator) and sets the
  session's stop flag, which ends the decode loop at the next token even between refreshes.

This module never touches arrays or jax; message normalisation is made of pure functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from gemma_app import media
from gemma_app.sessions import (
    CacheFullError,
    ReplyStats,
    SamplingSettings,
    SessionBusyError,
    SessionLimitError,
    SessionRegistry,
    kv_cache_bytes,
)

__all__ = [
    "LATEX_DELIMITERS",
    "ChatOptions",
    "ChatTurn",
    "Throttle",
    "UserTurn",
    "apply_edit",
    "build_demo",
    "format_stats",
    "history_pairs",
    "history_turns",
    "launch_style",
    "split_pending",
]

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES_DIR = ASSETS / "examples"

# Gradio renders only `$$` by default; bare `$` is left out on purpose (prices, shell vars).
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]

# Text that spells a Gemma control token. The engine encodes it as plain text; the UI only
# tells the user so, because such a message may not mean what they expect.
_CONTROL_TEXT = re.compile(
    r"<(?:start_of_turn|end_of_turn|bos|eos|pad|start_of_image|end_of_image"
    r"|image_soft_token|unused\d+)>|<\|turn>|<turn\|>"
)

# What follows "<" in a Gemma tag (`<start_of_turn>`, `<escape>`, `<unused7>`, `<|turn>`, ...).
# The Chatbot renders markdown with HTML, where such text is an unknown tag and vanishes, so a
# user's typed `<start_of_turn>` or a model's `<escape>` would silently disappear. Showing it as
# `<` + ZERO WIDTH SPACE + rest stops the tag parse (the text looks the same, also inside code
# blocks); `unshown` removes exactly those marks when the page sends the history back. (A
# copied message keeps the invisible mark.)
_TAG_REST = (
    r"(?:(?:pad|eos|bos|unk|mask|escape)>|unused\d+>|(?:start|end)_[a-z_]+>"
    r"|[a-z_]+_soft_token>|\|[^<>\s]*>|[^<>\s|]*\|>)"
)
# Marks already in the text are kept by adding one more, so the two are exact inverses.
_SHOW_TAG = re.compile("<(?=\u200b*" + _TAG_REST + ")")
_UNSHOW_TAG = re.compile("<\u200b(?=\u200b*" + _TAG_REST + ")")

Message = dict[str, Any]  # a Gradio 6 chat message: {"role", "content": [blocks], ...}


# ---------------------------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatOptions:
    """Limits and defaults of the chat UI (app.py fills them from flags and env vars).

    Attributes:
      cache_length: KV-cache slots per session (the context length).
      max_out_length: most tokens one answer may have (the max-new-tokens slider's top).
      max_new_tokens: the slider's default.
      concurrency_limit: replies generated at once, across all sessions (one shared lane).
      queue_size: events waiting beyond that; more are refused with "queue full".
      refresh_s: time budget between streamed UI updates.
      max_attachments: files per message.
      media_limits: per-file limits (pixels, seconds, bytes).
    """

    cache_length: int = 4096
    max_out_length: int = 2048
    max_new_tokens: int = 512
    concurrency_limit: int = 4
    queue_size: int = 64
    refresh_s: float = 0.05
    max_attachments: int = 4
    media_limits: media.MediaLimits = media.DEFAULT_LIMITS


# ---------------------------------------------------------------------------------------------
# Pure message helpers (Gradio 6 messages: content is a list of {"type": ...} blocks).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserTurn:
    """What the user sent in one turn: text and attachment paths."""

    text: str
    files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    """One exchange as shown in the browser; `answer` is None while it awaits a reply."""

    user: UserTurn
    answer: str | None


def shown(text: str) -> str:
    """The text as put in the Chatbot: Gemma tags defused so the page displays them."""
    return _SHOW_TAG.sub("<\u200b", text)


def unshown(text: str) -> str:
    """Inverse of `shown`: the text as typed by the user or written by the model."""
    return _UNSHOW_TAG.sub("<", text)


def text_message(role: str, text: str) -> Message:
    # A text block, not a bare string: Gradio runs bare strings through inspect.cleandoc,
    # which would change the text (indentation, blank lines) the sampler compares against.
    return {"role": role, "content": [{"type": "text", "text": shown(text)}]}


def user_message(text: str, files: Sequence[str] = ()) -> Message:
    """A user message with its text (if any) and attachments, as one chat message."""
    content: list[dict] = [{"type": "text", "text": shown(text)}] if text else []
    content += [{"type": "file", "file": {"path": str(path)}} for path in files]
    return {"role": "user", "content": content}


def _blocks(message: Message) -> list:
    content = message.get("content")
    if content is None:
        return []
    return content if isinstance(content, list) else [content]


def message_text(message: Message) -> str:
    """The text of a message as typed or generated (text blocks joined by newlines)."""
    texts = []
    for block in _blocks(message):
        if isinstance(block, str):
            texts.append(block)
        elif isinstance(block, dict) and block.get("type", "text") == "text" and "text" in block:
            texts.append(block["text"])
    return unshown("\n".join(texts))


def message_files(message: Message) -> list[str]:
    """The attachment paths of a message."""
    paths = []
    for block in _blocks(message):
        if not isinstance(block, dict):
            continue
        file = block.get("file") if block.get("type") == "file" else block
        if isinstance(file, dict) and file.get("path"):
            paths.append(file["path"])
    return paths


def _is_visible_turn_part(message: Message) -> bool:
    # System messages and "thought" bubbles (metadata with a title) are not conversation.
    metadata = message.get("metadata") or {}
    return message.get("role") in ("user", "assistant") and not metadata.get("title")


def history_turns(history: Sequence[Message]) -> list[ChatTurn]:
    """Groups a Chatbot value into turns: consecutive user messages, then assistant messages."""
    turns: list[ChatTurn] = []
    texts: list[str] = []
    files: list[str] = []
    answer: list[str] | None = None

    def close() -> None:
        if texts or files or answer is not None:
            user = UserTurn("\n".join(texts), tuple(files))
            turns.append(ChatTurn(user, None if answer is None else "\n".join(answer)))

    for message in history or []:
        if not _is_visible_turn_part(message):
            continue
        if message["role"] == "user":
            if answer is not None:  # a user message after an answer starts the next turn
                close()
                texts, files, answer = [], [], None
            if text := message_text(message):
                texts.append(text)
            files += message_files(message)
        else:
            answer = (answer or []) + [message_text(message)]
    close()
    return turns


def history_pairs(turns: Sequence[ChatTurn]) -> list[tuple[str, str]]:
    """(user text, answer) for the sampler; only answered turns."""
    return [(t.user.text, t.answer) for t in turns if t.answer is not None]


def split_pending(history: Sequence[Message]) -> tuple[list[ChatTurn], UserTurn | None]:
    """(answered turns, the trailing user turn awaiting an answer or None)."""
    turns = history_turns(history)
    if turns and turns[-1].answer is None:
        return turns[:-1], turns[-1].user
    return turns, None


def _last_user_index(history: Sequence[Message]) -> int | None:
    """Index of the first message of the last user turn, or None."""
    i = len(history) - 1
    while i >= 0 and history[i].get("role") != "user":
        i -= 1
    if i < 0:
        return None
    while i > 0 and history[i - 1].get("role") == "user":
        i -= 1
    return i


def retry_history(history: Sequence[Message]) -> list[Message]:
    """The history without the last answer, so the last user turn is answered again."""
    history = list(history or [])
    while history and history[-1].get("role") != "user":
        history.pop()
    return history


def undo_history(history: Sequence[Message]) -> tuple[list[Message], UserTurn | None]:
    """(history without the last user turn and its answer, that user turn) for undo."""
    history = list(history or [])
    start = _last_user_index(history)
    if start is None:
        return history, None
    removed = history_turns(history[start:])
    return history[:start], (removed[0].user if removed else None)


def apply_edit(history: Sequence[Message], index: int | Sequence[int], text: str) -> list[Message]:
    """The history after the user edited message `index` to `text`: later messages are dropped.

    `index` is a message index, or [message, content block] as Gradio sends for multi-part
    messages. Attachments of the edited message are kept.
    """
    history = list(history or [])
    i = index[0] if isinstance(index, list | tuple) else index
    if not 0 <= i < len(history):
        return history
    message = dict(history[i])
    kept = [b for b in _blocks(message) if not (isinstance(b, dict) and b.get("type") == "text")]
    kept = [b for b in kept if not isinstance(b, str)]
    message["content"] = ([{"type": "text", "text": shown(unshown(text))}] if text else []) + kept
    return history[:i] + [message]


def with_answer(history: Sequence[Message], answer: str) -> list[Message]:
    """The history with `answer` as the reply to its trailing user turn."""
    return [*history, text_message("assistant", answer)]


def without_pending(history: Sequence[Message]) -> list[Message]:
    """The history without its trailing unanswered user messages (a refused message)."""
    history = list(history or [])
    while history and history[-1].get("role") == "user":
        history.pop()
    return history


def contains_control_text(text: str) -> bool:
    return bool(_CONTROL_TEXT.search(text or ""))


# ---------------------------------------------------------------------------------------------
# Streaming and statistics.
# ---------------------------------------------------------------------------------------------


class Throttle:
    """True at most once per `interval_s` (and always on the first call)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._next = -float("inf")

    def ready(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


def format_stats(stats: ReplyStats | None) -> str:
    """One status line: tokens, time to first token, tokens/s, context used."""
    if stats is None:
        return ""
    parts = [f"**{stats.answer_tokens} tokens**"]
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    if stats.tokens_per_s is not None:
        parts.append(f"{stats.tokens_per_s:.1f} tokens/s")
    if stats.finished and stats.context_length:
        share = 100 * stats.context_used / stats.context_length
        parts.append(
            f"context {stats.context_used:,} / {stats.context_length:,} tokens ({share:.0f}%)"
        )
    if stats.stopped:
        parts.append("stopped")
    elif stats.finished and not stats.complete:
        parts.append("cut off (max new tokens or full context)")
    return ("Writing… " if not stats.finished else "") + " · ".join(parts)


def _size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def _device(params) -> str:
    """The device of the first parameter array, read off the array itself (no jax import)."""
    leaf = params
    while isinstance(leaf, dict) and leaf:
        leaf = next(iter(leaf.values()))
    try:
        device = next(iter(leaf.devices()))
        kind = getattr(device, "device_kind", "")
        return device.platform if kind.lower() == device.platform else f"{device.platform} ({kind})"
    except (AttributeError, StopIteration, TypeError):
        return "unknown"


def model_card(engine, options: ChatOptions, registry: SessionRegistry | None = None) -> str:
    """The model panel: family, size, dtypes, device, context, capabilities, session budget."""
    if engine is None:
        return "No model is loaded."
    config = engine.config
    kv = kv_cache_bytes(config, options.cache_length, engine.dtype)
    reads = ["text"] + (["images"] if engine.supports_images else [])
    reads += ["audio"] if engine.supports_audio else []
    random = engine.is_demo and "random weights" not in engine.name
    rows = [
        ("Model", f"`{engine.name}`" + (" (random weights)" if random else "")),
        ("Family", f"Gemma {config.family}"),
        ("Size", f"{_size(engine.num_params)} parameters"),
        ("Layers / heads", f"{config.num_layers} / {config.num_heads} (KV {config.num_kv_heads})"),
        ("Weights dtype", str(engine.param_dtype)),
        ("Compute dtype", getattr(engine.dtype, "__name__", str(engine.dtype))),
        ("Device", _device(engine.params)),
        ("Context length", f"{options.cache_length:,} tokens"),
        ("Max answer", f"{options.max_out_length:,} tokens"),
        ("Reads", ", ".join(reads)),
        ("KV cache / chat", f"{kv / 2**20:,.1f} MiB"),
    ]
    if registry is not None:
        rows.append(("Chats kept", f"up to {registry.capacity} (idle ones expire)"))
    # A list, not a table: the panel is a narrow side column.
    return "\n".join(f"- **{key}:** {value}" for key, value in rows)


def banner_text(engine, notice: str | None) -> str:
    """The warning banner: a load failure, or the demo model's random weights."""
    if notice:
        return f"❌ **{notice}** The app is running without a model: messages cannot be answered."
    if engine is not None and engine.is_demo:
        return (
            "⚠️ **Demo model: random weights.** This is a tiny untrained Gemma 3-architecture "
            "model, so its answers are gibberish. It shows the app working end to end; start "
            "the app with `--model gemma3-1b-it` (see the README) for real answers."
        )
    return ""


def launch_style() -> dict:
    """Theme and CSS, which Gradio 6 takes in `launch()` rather than `gr.Blocks()`."""
    css = """
    #banner { background: #fff4ce; border: 1px solid #e5c07b; border-radius: 8px; padding: 4px 12px; }
    #banner.error { background: #fde2e2; border-color: #e08080; }
    #answer-stats { font-size: 0.85em; opacity: 0.85; min-height: 1.5em; }
    """
    return {"theme": gr.themes.Soft(), "css": css}


# ---------------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------------


class _ChatApp:
    """Event handlers bound to one engine and one session registry."""

    def __init__(self, engine, registry: SessionRegistry, options: ChatOptions, notice: str | None):
        self.engine = engine
        self.registry = registry
        self.options = options
        self.notice = notice

    # -- validation ---------------------------------------------------------------------------

    def check_message(self, text: str, files: Sequence[str]) -> str | None:
        """Why a message cannot be sent, or None. Nothing of a refused message is sent."""
        if self.engine is None:
            return f"No model is loaded ({self.notice}). Nothing was sent."
        if not text.strip() and not files:
            return "Empty message: type something first."
        if len(files) > self.options.max_attachments:
            return (
                f"Too many attachments ({len(files)}); the limit is {self.options.max_attachments}."
            )
        kinds = []
        for path in files:
            try:
                kinds.append(media.media_kind(path))
                media.load_media(path, self.options.media_limits)
            except media.MediaError as e:
                return f"{e} Nothing was sent."
        return self._check_capabilities(kinds)

    def _check_capabilities(self, kinds: Sequence[str]) -> str | None:
        name = self.engine.name
        if "image" in kinds and not self.engine.supports_images:
            return (
                f"Images are not supported by this model ({name} reads text only), so nothing "
                "was sent. Remove the image, or start the app with a vision model "
                "(Gemma 3 4B or larger)."
            )
        if "audio" in kinds and not self.engine.supports_audio:
            return (
                f"Audio is not supported by this model ({name} cannot listen), so nothing was "
                "sent. Remove the recording, or start the app with an audio model."
            )
        return None

    def _past_turns(self, done: Sequence[ChatTurn]) -> list[tuple]:
        """The answered turns for the sampler; with their images when the model reads them.

        The sampler compares them (content hashes) with its own turns, so an image turn is
        reused from the cache, not re-encoded, as long as the page still shows it.
        """
        if not self.engine.supports_images:
            return history_pairs(done)
        return [
            (t.user.text, t.answer, self.decode_attachments(t.user.files)["images"])
            for t in done
            if t.answer is not None
        ]

    def decode_attachments(self, files: Sequence[str]) -> dict[str, list]:
        """A message's attachments as arrays by kind, for the sampler (see `Session.reply`)."""
        decoded: dict[str, list] = {"images": [], "audio": []}
        for path in files:
            kind = "images" if media.media_kind(path) == "image" else "audio"
            decoded[kind].append(media.load_media(path, self.options.media_limits))
        return decoded

    # -- events -------------------------------------------------------------------------------

    def _new_request(self, request: gr.Request) -> None:
        """A new message, retry or edit: a stop pressed for an earlier reply no longer applies."""
        session = self.registry.peek(request.session_hash)
        if session is not None:
            session.clear_stop()

    def add_message(self, message: dict | None, history: list[Message], request: gr.Request):
        """Validates the textbox value; appends it to the chat and locks the textbox."""
        self._new_request(request)
        message = message or {}
        text = message.get("text") or ""
        files = list(message.get("files") or [])
        if problem := self.check_message(text, files):
            gr.Warning(problem)
            return gr.skip(), gr.skip()
        if contains_control_text(text):
            gr.Info(  # toasts render HTML too: `shown` keeps the tag visible
                shown(
                    "Your message contains text that looks like a Gemma control token (such as "
                    "<start_of_turn>). It is sent as plain text, not as a control token."
                )
            )
        return [*(history or []), user_message(text, files)], _locked_textbox(clear=True)

    def respond(
        self,
        history: list[Message],
        system_prompt: str,
        greedy: bool,
        temperature: float,
        top_k: float,
        top_p: float,
        min_p: float,
        max_new_tokens: float,
        seed: float | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        """Streams the answer to the trailing user message: (chatbot, textbox, stats)."""
        history = list(history or [])
        done, pending = split_pending(history)
        if pending is None or self.engine is None:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        settings = SamplingSettings(
            greedy=bool(greedy), temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, seed=None if seed is None else int(seed),
        )  # fmt: skip
        try:
            sampling = settings.method()
            attachments = self.decode_attachments(pending.files)
            session = self.registry.get(request.session_hash)
        except (ValueError, SessionLimitError) as e:  # MediaError is a ValueError
            yield self._refuse(history, pending, str(e))
            return
        reply = session.reply(
            self._past_turns(done), pending.text, system_prompt=system_prompt, sampling=sampling,
            rng=settings.rng(), max_new_tokens=_as_int(max_new_tokens), media=attachments,
        )  # fmt: skip
        yield from self._stream(history, pending, reply, session)

    def _stream(self, history, pending: UserTurn, reply, session) -> Iterator[tuple]:
        answer = ""
        throttle = Throttle(self.options.refresh_s)
        try:
            for delta in reply:
                answer += delta
                if throttle.ready():
                    yield with_answer(history, answer), gr.skip(), format_stats(session.last_stats)
        except (ValueError, SessionBusyError) as e:  # CacheFullError is a ValueError
            yield self._refuse(history, pending, _explain(e))
            return
        except Exception as e:  # e.g. device out of memory: explain, never a stack trace
            logger.exception("Reply failed")
            # A fresh sampler, rebuilt from the page's history next time, cannot be half-updated.
            self.registry.drop(session.key)
            yield self._refuse(history, pending, f"The reply failed ({type(e).__name__}: {e}).")
            return
        finally:
            reply.close()  # on stop/disconnect: ends the decode loop, keeps the partial answer
        stats = session.last_stats
        if stats and not stats.complete and stats.context_used >= stats.context_length - 1:
            gr.Warning("The context is full, so the answer was cut. Start a new chat to go on.")
        yield with_answer(history, answer), gr.skip(), format_stats(stats)

    @staticmethod
    def _refuse(history, pending: UserTurn, message: str) -> tuple:
        """Takes the unanswered message back out of the chat and puts it in the textbox."""
        gr.Warning(message)
        restored = gr.update(value={"text": pending.text, "files": list(pending.files)})
        return without_pending(history), restored, gr.skip()

    def prepare_retry(self, history: list[Message], request: gr.Request):
        self._new_request(request)
        history = retry_history(history)
        if split_pending(history)[1] is None:
            return gr.skip(), gr.skip()
        return history, _locked_textbox()

    def prepare_edit(self, history: list[Message], edit: gr.EditData, request: gr.Request):
        self._new_request(request)
        history = apply_edit(history, edit.index, edit.value or "")
        if split_pending(history)[1] is None:
            return gr.skip(), gr.skip()
        return history, _locked_textbox()

    def undo(self, history: list[Message], system_prompt: str, request: gr.Request):
        """Removes the last exchange, puts its message back in the textbox, syncs the sampler."""
        history, removed = undo_history(history)
        session = self.registry.peek(request.session_hash)
        if session is not None:
            session.sync(history_pairs(history_turns(history)), system_prompt=system_prompt)
        if removed is None:
            return history, gr.skip()
        return history, {"text": removed.text, "files": list(removed.files)}

    def clear(self, request: gr.Request):
        """New chat: frees the session's sampler (and its KV cache)."""
        self.registry.drop(request.session_hash)
        return [], ""

    def after_reply(self, request: gr.Request):
        """Unlocks the textbox and shows the final statistics, also after a cancelled reply.

        A cancelled reply cannot send its last update (the page stops listening), so the
        statistics line would keep its live "Writing…" text; this event runs after it either way.
        """
        session = self.registry.peek(request.session_hash)
        if session is None or not session.wait_idle(timeout_s=5.0):
            return _unlocked_textbox(), gr.skip()
        return _unlocked_textbox(), format_stats(session.last_stats)

    def stop(self, request: gr.Request) -> None:
        if self.engine is None:
            return
        # get, not peek: a stop pressed before the chat's first reply created its session
        # must still apply if that reply starts anyway.
        with contextlib.suppress(SessionLimitError):  # then no reply of it can be running
            self.registry.get(request.session_hash).request_stop()

    def unload(self, request: gr.Request) -> None:
        """The browser went away: stop its reply and free its session."""
        self.registry.drop(request.session_hash)


def _locked_textbox(*, clear: bool = False):
    # While a reply streams the textbox shows stop instead of submit and takes no input.
    update = {"interactive": False, "submit_btn": False, "stop_btn": True}
    return gr.update(value=None, **update) if clear else gr.update(**update)


def _unlocked_textbox():
    return gr.update(interactive=True, submit_btn=True, stop_btn=False)


def _as_int(value) -> int | None:
    return None if value is None else int(value)


def _explain(error: Exception) -> str:
    text = str(error)
    if isinstance(error, CacheFullError):
        return f"Context full: {text} (Undo earlier turns or press the trash icon for a new chat.)"
    return text


# ---------------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------------


_TEXT_EXAMPLES = [
    "Write a haiku about the sea.",
    "Explain the quadratic formula \\(ax^2+bx+c=0\\) with LaTeX.",
    "Write a Python function that reverses a string.",
]
# (label, file pattern in assets/examples, prompt, Engine flag that says the model reads it)
_MEDIA_EXAMPLES = [
    ("Images", "*.png", "What is in this picture?", "supports_images"),
    ("Spoken questions", "*.wav", "Answer the spoken question.", "supports_audio"),
]


def example_sets(engine) -> list[tuple[str, list[dict], bool]]:
    """(label, textbox values, usable by this model) for the examples under the chat."""
    sets = [("Try", [{"text": t, "files": []} for t in _TEXT_EXAMPLES], True)]
    for label, pattern, prompt, flag in _MEDIA_EXAMPLES:
        paths = sorted(EXAMPLES_DIR.glob(pattern))
        usable = engine is not None and getattr(engine, flag)
        if paths:
            sets.append((label, [{"text": prompt, "files": [str(p)]} for p in paths], usable))
    return sets


def _sampling_controls(options: ChatOptions) -> list[gr.components.Component]:
    defaults = SamplingSettings()
    greedy = gr.Checkbox(defaults.greedy, label="Greedy (always the most likely token)")
    temperature = gr.Slider(0.0, 2.0, defaults.temperature, step=0.05, label="Temperature")
    top_k = gr.Slider(0, 1024, defaults.top_k, step=1, label="Top-k", info="0 = off")
    top_p = gr.Slider(0.0, 1.0, defaults.top_p, step=0.01, label="Top-p", info="1 = off")
    min_p = gr.Slider(
        0.0, 0.99, defaults.min_p, step=0.01, label="Min-p",
        info="0 = off; needs top-k 0 and top-p 1",
    )  # fmt: skip
    max_new = gr.Slider(
        1, options.max_out_length, min(options.max_new_tokens, options.max_out_length), step=1,
        label="Max new tokens",
    )  # fmt: skip
    seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random each time")
    greedy.change(
        lambda g: [gr.update(interactive=not g)] * 4, [greedy], [temperature, top_k, top_p, min_p],
        queue=False, api_visibility="private",
    )  # fmt: skip
    return [greedy, temperature, top_k, top_p, min_p, max_new, seed]


def build_demo(
    engine,
    *,
    options: ChatOptions | None = None,
    registry: SessionRegistry | None = None,
    notice: str | None = None,
) -> gr.Blocks:
    """The chat UI for `engine` (None when it failed to load; `notice` then says why).

    Args:
      engine: a `gemma_app.engine.Engine`, or None.
      options: limits and defaults.
      registry: where sessions live; built from `options` when None.
      notice: a load-failure message shown in the banner.
    """
    options = options or ChatOptions()
    if registry is None:
        registry = SessionRegistry(
            lambda: engine.new_chat(
                cache_length=options.cache_length, max_out_length=options.max_out_length
            )
        )
    app = _ChatApp(engine, registry, options, notice)

    with gr.Blocks(title="Gemma chat", fill_height=True) as demo:
        banner = banner_text(engine, notice)
        gr.Markdown(
            banner, elem_id="banner", visible=bool(banner), elem_classes=["error"] if notice else []
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=360):
                chatbot, textbox, stats = _chat_column(engine, options)
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("System prompt", open=False):
                    system = gr.Textbox(
                        show_label=False, lines=3,
                        placeholder="e.g. You are a concise assistant. (Applies from the first turn.)",
                    )  # fmt: skip
                with gr.Accordion("Sampling", open=True):
                    sampling = _sampling_controls(options)
                new_chat = gr.Button("New chat", variant="secondary")
                with gr.Accordion("Model", open=False):
                    gr.Markdown(model_card(engine, options, registry if engine else None))
        _wire(demo, app, chatbot, textbox, stats, system, sampling, new_chat)
    demo.queue(max_size=options.queue_size)
    return demo


def _chat_column(engine, options: ChatOptions):
    reads = "text" + (", images" if engine and engine.supports_images else "")
    reads += ", audio" if engine and engine.supports_audio else ""
    chatbot = gr.Chatbot(
        label="Chat", scale=1, min_height=420, editable="user", buttons=["copy", "copy_all"],
        latex_delimiters=LATEX_DELIMITERS, placeholder="Ask anything. Enter sends.",
        allow_tags=False,  # no custom HTML elements; Gemma tags are defused by `shown`
        feedback_options=None,
    )  # fmt: skip
    textbox = gr.MultimodalTextbox(
        show_label=False, sources=["upload", "microphone"], file_types=["image", "audio"],
        file_count="multiple", placeholder=f"Message the model (it reads {reads})…",
        submit_btn=True, stop_btn=False, autofocus=True,
    )  # fmt: skip
    stats = gr.Markdown("", elem_id="answer-stats")
    sets = example_sets(engine)
    for label, examples, _ in (s for s in sets if s[2]):
        gr.Examples(examples=[[e] for e in examples], inputs=[textbox], label=label)
    unusable = [s for s in sets if not s[2]]
    if unusable:
        # Shown, not hidden: they demonstrate what another model would read. Sending one to
        # this model gets the "not supported" warning, which is the honest answer.
        title = " and ".join(label.lower() for label, _, _ in unusable)
        with gr.Accordion(f"Examples with {title} (this model cannot read them)", open=False):
            for label, examples, _ in unusable:
                gr.Examples(examples=[[e] for e in examples], inputs=[textbox], label=label)
    return chatbot, textbox, stats


def _wire(demo, app: _ChatApp, chatbot, textbox, stats, system, sampling, new_chat) -> None:
    cheap = {"concurrency_limit": None, "show_progress": "hidden"}
    # Every reply runs in one shared lane: retry and edit must not double the GPU load.
    lane = {
        "concurrency_id": "generate",
        "concurrency_limit": app.options.concurrency_limit,
        "show_progress": "minimal",
        "show_progress_on": [chatbot],  # queue position on the chat, not over the stats line
    }
    reply_inputs = [chatbot, system, *sampling]
    reply_outputs = [chatbot, textbox, stats]

    def reply_chain(event, api_name: str | None):
        visibility = "public" if api_name else "private"
        reply = event.then(
            app.respond, reply_inputs, reply_outputs, api_name=api_name,
            api_visibility=visibility, **lane,
        )  # fmt: skip
        # Runs after a cancelled reply too, so stop always gives the textbox back.
        reply.then(
            app.after_reply, None, [textbox, stats], queue=False, api_visibility="private",
            show_progress="hidden",  # a progress overlay here would cover the stop button
        )  # fmt: skip
        return reply

    sent = textbox.submit(
        app.add_message, [textbox, chatbot], [chatbot, textbox], api_name="add_message", **cheap
    )
    retried = chatbot.retry(
        app.prepare_retry, [chatbot], [chatbot, textbox], api_name="retry", **cheap
    )
    # Private: EditData (which message, the new text) only comes from the page.
    edited = chatbot.edit(
        app.prepare_edit, [chatbot], [chatbot, textbox], api_visibility="private", **cheap
    )
    replies = [
        reply_chain(sent, "respond"),
        reply_chain(retried, None),
        reply_chain(edited, None),
    ]
    textbox.stop(app.stop, None, None, cancels=replies, api_name="stop", queue=False)
    chatbot.undo(app.undo, [chatbot, system], [chatbot, textbox], api_name="undo", **cheap)
    chatbot.clear(app.clear, None, [chatbot, stats], api_name="clear", **cheap)
    new_chat.click(app.clear, None, [chatbot, stats], api_visibility="private", **cheap)
    demo.unload(app.unload)
