"""Pure helpers of gemma_app.ui: message normalisation, throttling, status text, the layout."""

import dataclasses
from pathlib import Path

import gradio as gr

from gemma_app import ui, ui_messages
from gemma_app.sessions import ReplyStats


def user(text, *files):
    return ui.user_message(text, files)


def bot(text):
    return ui.text_message("assistant", text)


def test_user_message_keeps_text_exact_and_files_as_blocks():
    message = user("  indented\n\n", "/tmp/a.png")
    assert message == {
        "role": "user",
        "content": [
            {"type": "text", "text": "  indented\n\n"},
            {"type": "file", "file": {"path": "/tmp/a.png"}},
        ],
    }
    assert ui.message_text(message) == "  indented\n\n"
    assert ui.message_files(message) == ["/tmp/a.png"]
    assert user("", "/tmp/a.png")["content"] == [{"type": "file", "file": {"path": "/tmp/a.png"}}]


def test_message_helpers_accept_plain_string_content():
    assert ui.message_text({"role": "assistant", "content": "plain"}) == "plain"
    assert ui.message_files({"role": "user", "content": {"path": "/x.wav"}}) == ["/x.wav"]


def test_history_turns_groups_consecutive_messages_and_skips_thoughts():
    history = [
        {"role": "system", "content": [{"type": "text", "text": "ignored"}]},
        user("look"),
        user("", "/tmp/a.png"),
        bot("part one"),
        {"role": "assistant", "metadata": {"title": "Reasoning"}, "content": "hidden"},
        bot("part two"),
        user("next"),
    ]
    turns = ui.history_turns(history)
    assert turns == [
        ui.ChatTurn(ui.UserTurn("look", ("/tmp/a.png",)), "part one\npart two"),
        ui.ChatTurn(ui.UserTurn("next"), None),
    ]
    assert ui.history_pairs(turns) == [("look", "part one\npart two")]
    done, pending = ui.split_pending(history)
    assert done == turns[:1] and pending == ui.UserTurn("next")


def test_a_reply_with_thoughts_is_a_collapsible_box_and_then_the_answer():
    history = [user("q")]
    writing = ui.with_reply(history, "", "Let me think", thinking=True)
    assert writing[1]["metadata"] == {"title": ui_messages.THINKING_TITLE, "status": "pending"}
    assert len(writing) == 2  # no empty answer bubble while thinking
    done = ui.with_reply(history, "4", "2 + 2 = 4", thought_seconds=1.234)
    box, answer = done[1:]
    assert box["metadata"] == {
        "title": ui_messages.THOUGHT_TITLE, "status": "done", "duration": 1.2,
    }  # fmt: skip
    assert ui.is_thought(box) and not ui.is_thought(answer)
    assert ui.message_text(box) == "2 + 2 = 4" and answer == bot("4")
    # The sampler sees the answer only; thoughts never reach the next turns.
    assert ui.history_pairs(ui.history_turns([*done, user("next")])) == [("q", "4")]
    # Stopped while thinking: the box alone marks the turn as answered (with "").
    stopped = ui.with_reply(history, "", "hmm", thought_seconds=0.5)
    assert ui.split_pending(stopped) == ([ui.ChatTurn(ui.UserTurn("q"), "")], None)
    assert ui.retry_history(done) == history and ui.undo_history(done) == ([], ui.UserTurn("q"))
    assert ui.with_reply(history, "plain") == ui.with_answer(history, "plain")
    # A reply cancelled while thinking: its open box is folded afterwards.
    assert ui_messages.settle_thoughts(done) is None
    settled = ui_messages.settle_thoughts(writing)
    assert (
        settled[1]["metadata"]["status"] == "done" and ui.message_text(settled[1]) == "Let me think"
    )
    assert writing[1]["metadata"]["status"] == "pending"  # the input is not mutated


def test_split_pending_on_answered_and_empty_histories():
    assert ui.split_pending([]) == ([], None)
    done, pending = ui.split_pending([user("q"), bot("")])  # a reply stopped before any text
    assert pending is None and ui.history_pairs(done) == [("q", "")]


def test_retry_drops_the_last_answer_only():
    history = [user("a"), bot("1"), user("b"), bot("2")]
    assert ui.retry_history(history) == history[:3]
    assert ui.retry_history(history[:3]) == history[:3]


def test_undo_removes_the_last_user_turn_and_returns_it():
    history = [user("a"), bot("1"), user("b"), user("", "/f.png"), bot("2")]
    rest, removed = ui.undo_history(history)
    assert rest == history[:2]
    assert removed == ui.UserTurn("b", ("/f.png",))
    assert ui.undo_history([]) == ([], None)


def test_apply_edit_replaces_text_keeps_files_and_drops_later_messages():
    history = [user("a", "/f.png"), bot("1"), user("b"), bot("2")]
    edited = ui.apply_edit(history, 0, "A!")
    assert edited == [user("A!", "/f.png")]
    assert ui.apply_edit(history, [2, 0], "B!") == history[:2] + [user("B!")]
    assert ui.apply_edit(history, 9, "x") == history  # out of range: unchanged
    assert history[0] == user("a", "/f.png")  # the input is not mutated


def test_with_answer_and_without_pending():
    history = [user("a"), bot("1"), user("b")]
    assert ui.with_answer(history, "2")[-1] == bot("2")
    assert ui.without_pending(history) == history[:2]


def test_control_text_detection():
    assert ui.contains_control_text("x <start_of_turn>model")
    assert ui.contains_control_text("<|channel>thought") and ui.contains_control_text("<|think|>")
    assert ui.contains_control_text("<|audio|>") and ui.contains_control_text("a<turn|>")
    assert ui.contains_control_text("<end_of_turn>") and ui.contains_control_text("<unused12>")
    assert not ui.contains_control_text("a <b>bold</b> <start of turn>")


def test_gemma_tags_are_defused_for_display_and_read_back_exactly():
    text = "<start_of_turn>model <escape> <b>bold</b> <unused3> <|turn> a<b <\u200bescape>"
    message = ui.user_message(text)
    displayed = message["content"][0]["text"]
    assert "<start_of_turn>" not in displayed and "<escape>" not in displayed
    assert "<b>bold</b>" in displayed  # ordinary HTML is left to the markdown renderer
    assert ui.message_text(message) == text
    answer = ui.text_message("assistant", "<eos> and <end_of_turn>")
    assert ui.history_pairs(ui.history_turns([message, answer])) == [
        (text, "<eos> and <end_of_turn>")
    ]
    assert ui.message_text(ui.apply_edit([message], 0, "<pad>")[0]) == "<pad>"


def test_throttle_fires_first_then_once_per_interval():
    now = [0.0]
    throttle = ui.Throttle(0.05, clock=lambda: now[0])
    fired = []
    for t in (0.0, 0.01, 0.049, 0.05, 0.06, 0.2):
        now[0] = t
        fired.append(throttle.ready())
    assert fired == [True, False, False, True, False, True]


def test_format_stats_while_streaming_and_when_done():
    assert ui.format_stats(None) == ""
    live = ReplyStats(answer_tokens=3, ttft_s=0.1234, tokens_per_s=50.0, context_length=1024)
    assert ui.format_stats(live) == "Writing… **3 tokens** · first token 0.12 s · 50.0 tokens/s"
    done = ReplyStats(
        answer_tokens=40, ttft_s=0.2, tokens_per_s=80.0, context_used=256,
        context_length=1024, complete=True, finished=True,
    )  # fmt: skip
    assert ui.format_stats(done) == (
        "**40 tokens** · first token 0.20 s · 80.0 tokens/s · context 256 / 1,024 tokens (25%)"
    )
    cut = ReplyStats(answer_tokens=5, context_used=9, context_length=64, finished=True)
    assert ui.format_stats(cut).endswith("cut off (max new tokens or full context)")
    stopped = ReplyStats(answer_tokens=5, stopped=True, finished=True, context_length=64)
    assert ui.format_stats(stopped).endswith("stopped")


def test_banner_labels_the_demo_and_load_failures(demo_engine, gemma4_demo):
    assert "random weights" in ui.banner_text(demo_engine, None)
    banner = ui.banner_text(gemma4_demo, None)
    assert "Demo model: random weights" in banner and "Gemma 4-architecture" in banner
    assert "reads text, images and audio" in banner and "microphone" in banner
    failed = ui.banner_text(None, "Could not load model `x`: nope.")
    assert failed.startswith("❌ **Could not load model `x`: nope.**")
    assert ui.banner_text(None, None) == ""


def test_model_card_lists_what_the_panel_promises(demo_engine, gemma4_demo):
    card = ui.model_card(demo_engine, ui.ChatOptions(cache_length=1024))
    for needle in ("Gemma 3", "parameters", "float32", "cpu", "1,024 tokens", "**Reads:** text"):
        assert needle in card
    assert ui.model_card(None, ui.ChatOptions()) == "No model is loaded."
    card = ui.model_card(gemma4_demo, ui.ChatOptions(cache_length=1024))
    assert "Gemma 4" in card and "**Reads:** text, images and audio" in card
    assert "**Thinking mode:** yes" in card


def test_model_card_says_whether_the_cpu_kernels_run(demo_engine, monkeypatch):
    from gemma_app.kernels import build

    card = ui.model_card(demo_engine, ui.ChatOptions())
    expected = "**CPU kernels:** on" if build.load() else "**CPU kernels:** off"
    assert expected in card
    monkeypatch.setenv("GEMMA_APP_KERNELS", "0")
    monkeypatch.setattr(build, "load", lambda: False)
    card = ui.model_card(demo_engine, ui.ChatOptions())
    assert "**CPU kernels:** off (GEMMA_APP_KERNELS=0)" in card


def _component(demo, cls, **props):
    found = [
        c
        for c in demo.blocks.values()
        if isinstance(c, cls) and all(getattr(c, k, None) == v for k, v in props.items())
    ]
    assert len(found) == 1, f"expected one {cls.__name__} with {props}, found {len(found)}"
    return found[0]


def test_layout_has_the_promised_controls(demo_engine):
    demo = ui.build_demo(demo_engine, options=ui.ChatOptions(max_out_length=300))
    chatbot = _component(demo, gr.Chatbot)
    assert chatbot.latex_delimiters == ui.LATEX_DELIMITERS
    assert {"copy", "copy_all"} <= set(chatbot.buttons)
    assert chatbot.editable == "user"
    textbox = _component(demo, gr.MultimodalTextbox)
    assert textbox.sources == ["upload", "microphone"]
    for label in ("Temperature", "Top-k", "Top-p", "Min-p", "Max new tokens"):
        _component(demo, gr.Slider, label=label)
    assert _component(demo, gr.Slider, label="Max new tokens").maximum == 300
    _component(demo, gr.Checkbox, label="Greedy (always the most likely token)")
    _component(demo, gr.Number, label="Seed")
    banner = _component(demo, gr.Markdown, elem_id="banner")
    assert "random weights" in banner.value
    assert not _component(demo, gr.Checkbox, label="Thinking").visible  # Gemma 3: no thinking


def test_the_thinking_switch_is_shown_for_gemma4_models(gemma4_demo):
    demo = ui.build_demo(gemma4_demo)
    thinking = _component(demo, gr.Checkbox, label="Thinking")
    assert thinking.visible and thinking.value is False
    respond = next(fn for fn in demo.fns.values() if fn.name == "respond")
    assert [c._id for c in respond.inputs[1:3]] == [  # after the chat: system prompt, thinking
        _component(demo, gr.Textbox, lines=3)._id, thinking._id,
    ]  # fmt: skip


def test_generation_events_share_one_lane(demo_engine):
    demo = ui.build_demo(demo_engine, options=ui.ChatOptions(concurrency_limit=3))
    replies = [fn for fn in demo.fns.values() if fn.name == "respond"]
    assert len(replies) == 3  # submit, retry and edit
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in replies} == {("generate", 3)}
    assert demo._queue.max_size == ui.ChatOptions().queue_size


def test_examples_come_from_assets_and_are_marked_by_what_the_model_reads(demo_engine, gemma4_demo):
    sets = {label: (examples, usable) for label, examples, usable in ui.example_sets(demo_engine)}
    assert sets["Try"][1] and all(not e["files"] for e in sets["Try"][0])
    images, usable = sets["Images"]  # the demo reads images (a toy SigLIP), not audio
    assert usable and {Path(e["files"][0]).name for e in images} >= {
        "shapes.png",
        "chart.png",
        "timeline.png",
    }
    assert not sets["Spoken questions"][1]
    text_only = dataclasses.replace(demo_engine, supports_images=False)
    assert not dict((label, usable) for label, _, usable in ui.example_sets(text_only))["Images"]
    gemma4 = {label: usable for label, _, usable in ui.example_sets(gemma4_demo)}
    assert gemma4["Images"] and gemma4["Spoken questions"]  # the Gemma 4 demo listens too


def test_engine_capabilities_follow_the_loaded_encoders(demo_engine, gemma4_demo):
    assert demo_engine.supports_images and not demo_engine.supports_audio
    assert not demo_engine.supports_thinking
    assert gemma4_demo.supports_images and gemma4_demo.supports_audio
    assert gemma4_demo.supports_thinking and gemma4_demo.config.family == 4
    assert gemma4_demo.name == "demo-tiny-gemma4 (random weights)" and gemma4_demo.is_demo
    without = {k: v for k, v in gemma4_demo.params.items() if k != "audio_encoder"}
    assert not dataclasses.replace(gemma4_demo, params=without, supports_audio=None).supports_audio


def test_attachments_are_decoded_by_kind_for_the_sampler(demo_engine):
    chat = ui._ChatApp(demo_engine, registry=None, options=ui.ChatOptions(), notice=None)
    files = [str(ui.EXAMPLES_DIR / "shapes.png"), str(ui.EXAMPLES_DIR / "question_math.wav")]
    decoded = chat.decode_attachments(files)
    assert [a.shape for a in decoded["images"]] == [(384, 512, 3)]
    assert len(decoded["audio"]) == 1 and decoded["audio"][0].ndim == 1
    assert chat.decode_attachments([]) == {"images": [], "audio": []}
