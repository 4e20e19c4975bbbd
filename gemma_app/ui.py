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
  Microphone recordings are ordinary audio attachments: Gradio 6 re-encodes what the browser
  captured as a 16-bit WAV at 44.1 kHz (channels kept), and `media.load_audio` makes it the
  16 kHz mono float32 clip audio-capable models (Gemma 4 E2B/E4B, the demo) receive.
  Images of any aspect ratio go to the engine as decoded; Gemma 4 resizes them itself.
* Thinking (Gemma 4): a checkbox asks the model to think first; the thought channel streams
  into a titled message that Gradio shows open while pending and folded once done, above the
  answer. Thoughts never enter the conversation the next turns see (`ui_messages`).
* Streaming yields on a time budget (`ChatOptions.refresh_s`), not once per token: every
  yield re-sends and re-renders the answer's markdown, which is what makes long answers slow.
* Stop: the textbox's stop button cancels the reply (Gradio closes the generator) and sets the
  session's stop flag, which ends the decode loop at the next token even between refreshes.

This module never touches jax; message normalisation, stats and panel text are pure
functions in `gemma_app.ui_messages` (re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import gradio as gr

from gemma_app import media
from gemma_app.sessions import (
    THOUGHT,
    CacheFullError,
    SamplingSettings,
    SessionBusyError,
    SessionLimitError,
    SessionRegistry,
)

# The pure helpers, re-exported: `ui.history_turns` etc. are part of this module's API.
from gemma_app.ui_messages import (  # noqa: F401
    ChatTurn,
    Message,
    Throttle,
    UserTurn,
    apply_edit,
    banner_text,
    contains_control_text,
    format_stats,
    history_pairs,
    history_turns,
    is_thought,
    message_files,
    message_text,
    model_card,
    reads_text,
    retry_history,
    settle_thoughts,
    shown,
    split_pending,
    text_message,
    thought_message,
    undo_history,
    unshown,
    user_message,
    with_answer,
    with_reply,
    without_pending,
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
        """The answered turns for the sampler; with their images and audio when the model
        reads them, as `(user, answer, images, audio)`.

        The sampler compares them (content hashes) with its own turns, so a media turn is
        reused from the cache, not re-encoded, as long as the page still shows it.
        """
        if not (self.engine.supports_images or self.engine.supports_audio):
            return history_pairs(done)
        past = []
        for turn in (t for t in done if t.answer is not None):
            decoded = self.decode_attachments(turn.user.files)
            past.append((turn.user.text, turn.answer, decoded["images"], decoded["audio"]))
        return past

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
                    "<start_of_turn> or <|turn>). It is sent as plain text, not as a control token."
                )
            )
        return [*(history or []), user_message(text, files)], _locked_textbox(clear=True)

    def respond(
        self,
        history: list[Message],
        system_prompt: str,
        thinking: bool,
        greedy: bool,
        temperature: float,
        top_k: float,
        top_p: float,
        min_p: float,
        max_new_tokens: float,
        seed: float | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        """Streams the answer to the trailing user message: (chatbot, textbox, stats).

        With `thinking` (Gemma 4 models only) the thoughts stream into a collapsible box above
        the answer; they are never part of the answer the next turns see.
        """
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
            past = self._past_turns(done)
            session = self.registry.get(request.session_hash)
        except (ValueError, SessionLimitError) as e:  # MediaError is a ValueError
            yield self._refuse(history, pending, str(e))
            return
        reply = session.reply_parts(
            past, pending.text, system_prompt=system_prompt, sampling=sampling,
            rng=settings.rng(), max_new_tokens=_as_int(max_new_tokens), media=attachments,
            thinking=bool(thinking) and self.engine.supports_thinking,
        )  # fmt: skip
        yield from self._stream(history, pending, reply, session)

    def _stream(self, history, pending: UserTurn, reply, session) -> Iterator[tuple]:
        answer = thought = ""
        thought_s, start = None, time.monotonic()
        throttle = Throttle(self.options.refresh_s)

        def shown_reply() -> list[Message]:
            thinking = bool(thought) and not answer and thought_s is None
            return with_reply(
                history, answer, thought, thinking=thinking, thought_seconds=thought_s
            )

        try:
            for channel, delta in reply:
                if channel == THOUGHT:
                    thought += delta
                else:
                    if thought and thought_s is None:  # the answer begins: fold the thoughts
                        thought_s = time.monotonic() - start
                    answer += delta
                if throttle.ready():
                    yield shown_reply(), gr.skip(), format_stats(session.last_stats)
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
        if thought and thought_s is None:  # cut (or stopped) while thinking
            thought_s = time.monotonic() - start
        stats = session.last_stats
        if stats and not stats.complete and stats.context_used >= stats.context_length - 1:
            gr.Warning("The context is full, so the answer was cut. Start a new chat to go on.")
        yield shown_reply(), gr.skip(), format_stats(stats)

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
            try:  # with the turns' media, so the kept image/audio turns keep their cache
                past = self._past_turns(history_turns(history))
            except ValueError:  # an upload that expired: the next reply says so
                past = history_pairs(history_turns(history))
            session.sync(past, system_prompt=system_prompt)
        if removed is None:
            return history, gr.skip()
        return history, {"text": removed.text, "files": list(removed.files)}

    def clear(self, request: gr.Request):
        """New chat: frees the session's sampler (and its KV cache)."""
        self.registry.drop(request.session_hash)
        return [], ""

    def after_reply(self, history: list[Message], request: gr.Request):
        """Unlocks the textbox and shows the final statistics, also after a cancelled reply.

        A cancelled reply cannot send its last update (the page stops listening), so the
        statistics line would keep its live "Writing…" text, and thoughts stopped mid-way their
        open "Thinking…" box; this event runs after it either way and settles both.
        """
        settled = settle_thoughts(history)
        chat = gr.skip() if settled is None else settled
        session = self.registry.peek(request.session_hash)
        if session is None or not session.wait_idle(timeout_s=5.0):
            return chat, _unlocked_textbox(), gr.skip()
        return chat, _unlocked_textbox(), format_stats(session.last_stats)

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
                thinking = gr.Checkbox(
                    False, label="Thinking", elem_id="thinking",
                    info="Think before answering; the thoughts appear folded above the answer.",
                    visible=bool(engine and engine.supports_thinking),  # Gemma 4 only
                )  # fmt: skip
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
        _wire(demo, app, chatbot, textbox, stats, [system, thinking, *sampling], new_chat)
    demo.queue(max_size=options.queue_size)
    return demo


def _chat_column(engine, options: ChatOptions):
    reads = reads_text(engine) if engine else "text"
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


def _wire(demo, app: _ChatApp, chatbot, textbox, stats, settings, new_chat) -> None:
    """Events. `settings` are the reply's inputs after the chat: system prompt, thinking,
    then the sampling controls (the order of `_ChatApp.respond`'s parameters)."""
    cheap = {"concurrency_limit": None, "show_progress": "hidden"}
    # Every reply runs in one shared lane: retry and edit must not double the GPU load.
    lane = {
        "concurrency_id": "generate",
        "concurrency_limit": app.options.concurrency_limit,
        "show_progress": "minimal",
        "show_progress_on": [chatbot],  # queue position on the chat, not over the stats line
    }
    reply_inputs = [chatbot, *settings]
    system = settings[0]
    reply_outputs = [chatbot, textbox, stats]

    def reply_chain(event, api_name: str | None):
        visibility = "public" if api_name else "private"
        reply = event.then(
            app.respond, reply_inputs, reply_outputs, api_name=api_name,
            api_visibility=visibility, **lane,
        )  # fmt: skip
        # Runs after a cancelled reply too, so stop always gives the textbox back.
        reply.then(
            app.after_reply, [chatbot], [chatbot, textbox, stats], queue=False,
            api_visibility="private",
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
