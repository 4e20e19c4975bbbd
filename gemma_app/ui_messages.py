"""Pure helpers of the chat UI: chat messages, turns, thoughts, throttling, stats, panel text.

A Gradio 6 `Chatbot` value is a list of messages `{"role", "content": [blocks], "metadata"}`
whose content blocks are `{"type": "text", "text"}` or `{"type": "file", "file": {"path"}}`.
These functions turn such a value into the conversation the sampler sees and back:

* consecutive user messages form one user turn (text joined by newlines, files in order);
* the assistant messages after it are its answer, except a *thought* (an assistant message
  with `metadata.title`, shown as a collapsible box): Gemma 4 drops earlier turns' thoughts
  from the prompt, so a thought marks the turn as answered but adds no text to it;
* Gemma tags in texts are defused for display (`shown`) and restored on the way back
  (`unshown`), so a round trip through the page is exact.

No gradio, jax or array code here: everything is testable on plain dicts.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from gemma_app.sessions import ReplyStats, kv_cache_bytes

__all__ = [
    "ChatTurn",
    "Message",
    "Throttle",
    "UserTurn",
    "apply_edit",
    "banner_text",
    "contains_control_text",
    "format_stats",
    "history_pairs",
    "history_turns",
    "is_thought",
    "message_files",
    "message_text",
    "model_card",
    "reads_text",
    "retry_history",
    "settle_thoughts",
    "shown",
    "split_pending",
    "text_message",
    "thought_message",
    "undo_history",
    "unshown",
    "user_message",
    "with_answer",
    "with_reply",
    "without_pending",
]

# Text that spells a Gemma control token. The engine encodes it as plain text; the UI only
# tells the user so, because such a message may not mean what they expect.
_CONTROL_TEXT = re.compile(
    r"<(?:start_of_turn|end_of_turn|bos|eos|pad|start_of_image|end_of_image"
    r"|image_soft_token|unused\d+)>"
    r"|<\|(?:turn|channel|think\||image\|?|audio\|?|tool(?:_call|_response)?)>"
    r"|<(?:turn|channel|image|audio|tool|tool_call|tool_response)\|>"
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

THINKING_TITLE = "💭 Thinking…"
THOUGHT_TITLE = "💭 Thoughts"


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


def is_thought(message: Message) -> bool:
    """A model's thoughts (or any titled box): shown collapsed, never part of the answer."""
    metadata = message.get("metadata") or {}
    return message.get("role") == "assistant" and bool(metadata.get("title"))


def thought_message(text: str, *, done: bool, seconds: float | None = None) -> Message:
    """The collapsible box a Gemma 4 model's thoughts stream into.

    Gradio 6 keeps a titled message open while its status is "pending" and folds it once it
    is "done" (unless the user opened it), so the thoughts are visible while they are written
    and collapsed above the answer afterwards.
    """
    metadata: dict[str, Any] = {
        "title": THOUGHT_TITLE if done else THINKING_TITLE,
        "status": "done" if done else "pending",
    }
    if seconds is not None:
        metadata["duration"] = round(seconds, 1)
    return {**text_message("assistant", text), "metadata": metadata}


def history_turns(history: Sequence[Message]) -> list[ChatTurn]:
    """Groups a Chatbot value into turns: consecutive user messages, then assistant messages.

    Thoughts are left out of the answer (Gemma 4 drops earlier turns' thoughts from the
    prompt), but a turn with only thoughts (stopped while thinking) counts as answered ("").
    """
    turns: list[ChatTurn] = []
    texts: list[str] = []
    files: list[str] = []
    answer: list[str] | None = None

    def close() -> None:
        if texts or files or answer is not None:
            user = UserTurn("\n".join(texts), tuple(files))
            turns.append(ChatTurn(user, None if answer is None else "\n".join(answer)))

    for message in history or []:
        role = message.get("role")
        if role not in ("user", "assistant"):  # system messages are not conversation
            continue
        if is_thought(message):  # the reply has begun; its thoughts are not its answer
            answer = answer if answer is not None else []
        elif role == "user":
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


def with_reply(
    history: Sequence[Message],
    answer: str,
    thought: str = "",
    *,
    thinking: bool = False,
    thought_seconds: float | None = None,
) -> list[Message]:
    """The history with a reply that may have thoughts: [thought box], answer.

    Args:
      history: the history ending with the user turn being answered.
      answer: the answer so far.
      thought: the thoughts so far ("" for none: no box).
      thinking: the thoughts are still being written (the box stays open, no answer yet).
      thought_seconds: how long the model thought, shown in the box's title.
    """
    if not thought:
        return with_answer(history, answer)
    box = thought_message(thought, done=not thinking, seconds=thought_seconds)
    # No empty answer bubble under the thoughts: the box alone marks the turn as answered.
    return [*history, box] + ([text_message("assistant", answer)] if answer else [])


def settle_thoughts(history: Sequence[Message]) -> list[Message] | None:
    """The history with every still-open thought box folded, or None if none is open.

    A reply stopped while thinking never sends its last update, so its box would stay open
    with a spinner; the UI settles it after the reply ends.
    """
    history = list(history or [])
    open_ = [
        i
        for i, m in enumerate(history)
        if is_thought(m) and m["metadata"].get("status") == "pending"
    ]
    if not open_:
        return None
    for i in open_:
        metadata = {**history[i]["metadata"], "title": THOUGHT_TITLE, "status": "done"}
        history[i] = {**history[i], "metadata": metadata}
    return history


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


# ---------------------------------------------------------------------------------------------
# Panel text: the banner and the model card.
# ---------------------------------------------------------------------------------------------


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


def _kernels_text() -> str:
    from gemma_app.kernels import build  # here: building them is a first-use cost

    if build.load():
        return "on (gemma_app/kernels: bf16 and fp32 weights at memory speed)"
    why = (
        "GEMMA_APP_KERNELS=0"
        if not build.enabled()
        else "no C++ compiler or a failed build: see the log"
    )
    return f"off ({why}): XLA's dots, much slower with bf16 weights"


def model_card(engine, options, registry=None) -> str:
    """The model panel: family, size, dtypes, device, context, capabilities, session budget.

    Args:
      engine: the loaded `Engine`, or None.
      options: the UI's `ChatOptions` (cache_length, max_out_length).
      registry: the `SessionRegistry`, for how many chats are kept.
    """
    if engine is None:
        return "No model is loaded."
    config = engine.config
    kv = kv_cache_bytes(config, options.cache_length, engine.dtype)
    random = engine.is_demo and "random weights" not in engine.name
    device = _device(engine.params)
    rows = [
        ("Model", f"`{engine.name}`" + (" (random weights)" if random else "")),
        ("Family", f"Gemma {config.family}"),
        ("Size", f"{_size(engine.num_params)} parameters"),
        ("Layers / heads", f"{config.num_layers} / {config.num_heads} (KV {config.num_kv_heads})"),
        ("Weights dtype", str(engine.param_dtype)),
        ("Compute dtype", getattr(engine.dtype, "__name__", str(engine.dtype))),
        ("Device", device),
        *([("CPU kernels", _kernels_text())] if device == "cpu" else []),
        ("Context length", f"{options.cache_length:,} tokens"),
        ("Max answer", f"{options.max_out_length:,} tokens"),
        ("Reads", reads_text(engine)),
        ("Thinking mode", "yes (the Thinking switch)" if engine.supports_thinking else "no"),
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
        shows = ["uploads"] + (["the microphone"] if engine.supports_audio else [])
        shows += ["streaming"] + (["thinking"] if engine.supports_thinking else [])
        return (
            f"⚠️ **Demo model: random weights.** This is a tiny untrained Gemma "
            f"{engine.config.family}-architecture model that reads {reads_text(engine)}, so its "
            f"answers are gibberish. It shows the app working end to end ({', '.join(shows)}); "
            "start the app with a real model (`--model gemma3-1b-it`, see the README) for real "
            "answers."
        )
    return ""


def reads_text(engine) -> str:
    """'text', 'text and images', 'text, images and audio'."""
    kinds = ["text"] + (["images"] if engine.supports_images else [])
    kinds += ["audio"] if engine.supports_audio else []
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
