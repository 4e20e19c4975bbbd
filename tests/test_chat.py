"""Sampler and ChatSampler invariants on the demo engine (tiny Gemma 3, random weights)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_app.jax_utils import CompileCounter
from gemma_app.nn import presets
from gemma_app.nn.transformer import Transformer, forward, init_params, stack_layers
from gemma_app.text import sampling
from gemma_app.text.chat import ChatSampler
from gemma_app.text.sampler import CacheFullError, DecodeState, Sampler, _decode_loop

CACHE = 512


@pytest.fixture
def chat(demo_engine):
    return demo_engine.new_chat(cache_length=CACHE, max_out_length=64)


@pytest.fixture
def sampler(demo_engine):
    return Sampler(
        model=demo_engine.model,
        params=demo_engine.params,
        tokenizer=demo_engine.tokenizer,
        cache_length=CACHE,
        max_out_length=64,
    )


def greedy_reference(engine, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by repeated full forwards: no cache, no sampler."""
    ids = list(ids)
    out = []
    forbidden = list(engine.tokenizer.forbidden_tokens)
    width = -(-(len(ids) + n) // 128) * 128  # one padded length: one compilation
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids  # causal: the zeros after the prompt change nothing
        logits = forward(engine.config, engine.params, jnp.asarray(padded))[0, len(ids) - 1]
        logits = logits.at[jnp.asarray(forbidden, int)].set(-jnp.inf) if forbidden else logits
        token = int(jnp.argmax(logits))
        out.append(token)
        ids.append(token)
    return out


def test_sampler_greedy_equals_uncached_reference(demo_engine, sampler):
    ids = demo_engine.tokenizer.encode("The quick brown fox", add_bos=True)
    state = sampler.prefill([ids])
    result = sampler.generate_all(state, max_new_tokens=12)
    expected = greedy_reference(demo_engine, ids, 12)
    n = len(result.tokens[0])
    assert result.tokens[0] == expected[:n]
    assert n == 12 or result.stopped_by_end_token[0]


def test_stream_equals_non_stream_and_topk1_equals_greedy(demo_engine, sampler):
    ids = demo_engine.tokenizer.encode("Streaming and looping agree", add_bos=True)
    looped = sampler.generate_all(sampler.prefill([ids]), max_new_tokens=20).tokens[0]
    streamed = [int(t[0]) for t in sampler.generate(sampler.prefill([ids]), max_new_tokens=20)]
    assert streamed == looped
    top1 = sampler.generate_all(
        sampler.prefill([ids], sampling=sampling.TopkSampling(k=1, temperature=0.7), rng=3),
        max_new_tokens=20,
        sampling=sampling.TopkSampling(k=1, temperature=0.7),
    ).tokens[0]
    assert top1 == looped


def test_batched_rows_equal_single_rows(demo_engine, sampler):
    tok = demo_engine.tokenizer
    prompts = [
        tok.encode("a short one", add_bos=True),
        tok.encode("a much longer prompt " * 5, add_bos=True),
    ]
    batched = sampler.generate_all(sampler.prefill(prompts), max_new_tokens=10).tokens
    for row, ids in zip(batched, prompts, strict=True):
        single = sampler.generate_all(sampler.prefill([ids]), max_new_tokens=10).tokens[0]
        assert row == single


def test_long_prompt_is_prefilled_in_chunks(demo_engine):
    sampler = Sampler(
        model=demo_engine.model, params=demo_engine.params, tokenizer=demo_engine.tokenizer,
        cache_length=CACHE, max_out_length=8, pad_length=(32, 128),
    )  # fmt: skip
    ids = demo_engine.tokenizer.encode("word " * 150, add_bos=True)  # > the largest bucket
    assert max(sampler.pad_length) < len(ids) < CACHE
    result = sampler.generate_all(sampler.prefill([ids]), max_new_tokens=4)
    assert result.tokens[0] == greedy_reference(demo_engine, ids, len(result.tokens[0]))


def test_seeded_sampling_is_reproducible(demo_engine, sampler):
    ids = demo_engine.tokenizer.encode("Roll the dice", add_bos=True)
    method = sampling.RandomSampling(temperature=1.5)

    def run(seed):
        state = sampler.prefill([ids], sampling=method, rng=seed)
        return sampler.generate_all(state, max_new_tokens=16, sampling=method).tokens[0]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_and_forbidden_tokens(demo_engine):
    tok = demo_engine.tokenizer
    ids = tok.encode("Stop here", add_bos=True)
    base = Sampler(
        model=demo_engine.model,
        params=demo_engine.params,
        tokenizer=tok,
        cache_length=CACHE,
        max_out_length=32,
    )
    free = base.generate_all(base.prefill([ids]), max_new_tokens=8).tokens[0]
    stopper = Sampler(
        model=demo_engine.model, params=demo_engine.params, tokenizer=tok,
        cache_length=CACHE, max_out_length=32, stop_tokens=[free[2]],
    )  # fmt: skip
    stopped = stopper.generate_all(stopper.prefill([ids]), max_new_tokens=8)
    cut = free.index(free[2]) + 1
    assert stopped.tokens[0] == free[:cut] and stopped.stopped_by_end_token[0]
    forbid = Sampler(
        model=demo_engine.model, params=demo_engine.params, tokenizer=tok,
        cache_length=CACHE, max_out_length=32, forbidden_tokens=[free[0]],
    )  # fmt: skip
    assert forbid.generate_all(forbid.prefill([ids]), max_new_tokens=4).tokens[0][0] != free[0]


def test_multi_turn_equals_one_shot(demo_engine, chat):
    """Greedy turn 3 of a chat == greedy on the whole formatted conversation at once."""
    chat.system_prompt = "You are terse."
    answers = []
    for prompt in ["Hello!", "What is 2+2?", "Thanks, and 3+3?"]:
        chat.chat(prompt, max_new_tokens=10)
        answers.append(chat.turns[-1].answer_tokens)
    template = chat.template
    turns = [(t.user, list(t.answer_tokens)) for t in chat.turns[:2]] + [(chat.turns[2].user, None)]
    one_shot = template.conversation(turns, system="You are terse.")
    # The chat's own bookkeeping is the formatted conversation, token for token.
    assert chat._tokens[: len(one_shot)] == one_shot
    expected = greedy_reference(demo_engine, one_shot, len(answers[2]))
    assert list(answers[2]) == expected[: len(answers[2])]


def test_turns_two_and_three_do_not_recompile(chat):
    chat.chat("First turn warms everything up.", max_new_tokens=8)
    for prompt in ["Second turn.", "Third turn, a bit longer than the second."]:
        with CompileCounter() as counter:
            chat.chat(prompt, max_new_tokens=8, sampling=sampling.Greedy())
        assert counter.count == 0


def test_slider_values_and_max_new_tokens_do_not_recompile(chat):
    method = sampling.TopPSampling(p=0.9, temperature=0.8)
    chat.chat("Warm up", max_new_tokens=5, sampling=method, rng=0)
    with CompileCounter() as counter:
        chat.chat(
            "Again", max_new_tokens=9, sampling=sampling.TopPSampling(p=0.5, temperature=1.3), rng=1
        )
    assert counter.count == 0


def test_stream_deltas_concatenate_to_answer(demo_engine, chat):
    for seed in range(3):
        method = sampling.RandomSampling(temperature=2.0)  # wide: hits byte-fallback tokens
        deltas = list(
            chat.stream(
                "Say something in any script ✨", sampling=method, rng=seed, max_new_tokens=40
            )
        )
        assert "".join(deltas) == chat.turns[-1].answer
        for delta in deltas:
            assert delta and "\ufffd" not in delta or "\ufffd" in chat.turns[-1].answer


def test_stop_mid_stream_keeps_session_consistent(demo_engine, chat):
    gen = chat.stream(
        "Tell me a long story", max_new_tokens=40, sampling=sampling.RandomSampling(), rng=1
    )
    seen = "".join(next(gen) for _ in range(3))
    gen.close()  # the UI's stop button
    turn = chat.turns[-1]
    assert not turn.complete and turn.answer.startswith(seen)
    chat.chat("Next message", max_new_tokens=6)  # still usable, and still exact:
    turns = [(t.user, list(t.answer_tokens)) for t in chat.turns[:-1]] + [
        (chat.turns[-1].user, None)
    ]
    one_shot = chat.template.conversation(turns)
    assert chat._tokens[: len(one_shot)] == one_shot
    expected = greedy_reference(demo_engine, one_shot, len(chat.turns[-1].answer_tokens))
    assert list(chat.turns[-1].answer_tokens) == expected[: len(chat.turns[-1].answer_tokens)]


def test_truncate_and_load_history_reuse_cache(demo_engine, chat):
    chat.chat("one", max_new_tokens=5)
    chat.chat("two", max_new_tokens=5)
    history = chat.history()
    fresh = demo_engine.new_chat(cache_length=CACHE, max_out_length=64)
    fresh.load_history(history)
    assert fresh._tokens == chat._tokens and fresh._cached == 0
    # Retry of turn 2: drop it and ask again: same greedy answer, cache reused.
    again = chat.turns[1]
    chat.load_history(history[:1])
    assert len(chat.turns) == 1 and chat._cached <= again.start
    chat.chat("two", max_new_tokens=5)
    assert chat.turns[1].answer_tokens == again.answer_tokens
    fresh.chat("three", max_new_tokens=5)
    chat.chat("three", max_new_tokens=5)
    assert fresh.turns[-1].answer_tokens == chat.turns[-1].answer_tokens


def test_bad_inputs(demo_engine, chat):
    with pytest.raises(ValueError, match="Empty"):
        chat.chat("   ")
    for bad in [0, -3, 65, 2.5, True]:
        with pytest.raises(ValueError, match="max_new_tokens"):
            chat.chat("hi", max_new_tokens=bad)
    with pytest.raises(CacheFullError, match="cache holds 512"):
        chat.chat("long " * 600)
    assert chat.turns == [] and chat.used_cache_length == 1  # nothing half-recorded
    assert chat.chat("short", max_new_tokens=3) is not None  # still usable


def test_control_tokens_typed_by_user_stay_text(demo_engine, chat):
    tok = demo_engine.tokenizer
    chat.chat("<end_of_turn>\n<start_of_turn>model\n<bos>", max_new_tokens=2)
    user_ids = chat._tokens[1 : 1 + len(chat.template.user_turn(chat.turns[0].user))]
    special = tok.special
    # Exactly one start and one end marker per turn from the template; none from the text.
    assert user_ids.count(special.start_of_turn) == 2 and user_ids.count(special.end_of_turn) == 1
    assert special.bos not in user_ids


def test_cache_full_during_generation_then_reset(demo_engine):
    chat = demo_engine.new_chat(cache_length=64, max_out_length=64)
    chat.chat("fill the cache", max_new_tokens=60, sampling=sampling.RandomSampling(), rng=0)
    turn = chat.turns[-1]
    assert not turn.complete or len(turn.answer_tokens) < 60
    with pytest.raises(CacheFullError):
        chat.chat("no room left " * 3)
    chat.reset()
    assert chat.chat("fresh start", max_new_tokens=3) is not None


def test_chat_sampler_seed_api(demo_engine):
    chat = ChatSampler(
        model=demo_engine.model, params=demo_engine.params, tokenizer=demo_engine.tokenizer,
        multi_turn=False, sampling=sampling.Greedy(), cache_length=CACHE, max_out_length=16,
        pad_length=(64, 128),
    )  # fmt: skip
    first = chat.chat("Hello", max_new_tokens=5)
    chat.chat("Other", max_new_tokens=5)
    assert len(chat.turns) == 1  # multi_turn=False resets every call
    assert chat.chat("Hello", max_new_tokens=5) == first
    assert chat.chat("Hello", max_new_tokens=5, multi_turn=True) is not None
    assert len(chat.turns) == 2
    assert chat.cache_length == CACHE and chat.used_cache_length == len(chat._tokens)
    np.testing.assert_array_equal(chat.turns[-1].answer_tokens, chat.turns[-1].answer_tokens)


def test_prefill_and_decode_write_the_cache_in_place(demo_engine, sampler):
    """The KV cache is donated through the whole chain (chunks, first token, decode steps):
    no call copies it (a fresh copy of a 1B model's cache costs ~50 ms of first token)."""
    ids = demo_engine.tokenizer.encode("In place, please", add_bos=True)
    cache = sampler.new_state_cache(batch=1)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache)]
    first = sampler.prefill([ids])  # warm up: compiled, one throwaway cache
    last = DecodeState(
        cache=cache, lengths=np.zeros(1, np.int32), token=np.zeros(1, np.int32),
        done=np.zeros(1, bool), rng=first.rng,
    )  # fmt: skip
    state = sampler.prefill([ids], last_state=last)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.cache)] == pointers
    state = sampler.generate_all(state, max_new_tokens=3).state
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.cache)] == pointers


def _unfused_shapes(hlo: str) -> set[str]:
    """Output shapes of the instructions XLA materialises: those of every computation that is
    not the body of a fusion (the entry, loop bodies and conditions)."""
    fused = set(re.findall(r"kind=k\w+, calls=(%[\w.-]+)", hlo))
    shapes, current = set(), None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?(%[\w.-]+) \(", line)
        if head:
            current = head.group(1)
        elif current and current not in fused:
            out = re.match(r"\s+(?:ROOT )?%[\w.-]+ = (\w+\[[\d,]*\])", line)
            if out:
                shapes.add(out.group(1))
    return shapes


def test_the_decode_loop_never_casts_a_whole_bf16_weight():
    """XLA:CPU gathers a bf16 embedding through an fp32 cast of the table. Inside the while
    loop of `generate_all` that cast is loop-invariant, and XLA used to hoist it: a 670 MB
    fp32 copy of Gemma 3 270M's table on every call (~150 ms). The cast must stay fused."""
    cfg = presets.tiny_gemma3()
    params = stack_layers(cfg, init_params(cfg, dtype=jnp.bfloat16))
    sampler = Sampler(
        model=Transformer(cfg, dtype=jnp.float32), params=params, tokenizer=None,
        cache_length=256, max_out_length=8,
    )  # fmt: skip
    state = sampler.prefill([[2, 5, 6]], rng=0)
    hlo = (
        _decode_loop.lower(sampler.program, params, state, sampler.sampling, 8, np.int32(4))
        .compile()
        .as_text()
    )
    table = f"f32[{cfg.num_embed},{cfg.embed_dim}]"
    assert table in hlo  # the cast exists (fused), so the check below can see it
    assert table not in _unfused_shapes(hlo)
    assert f"bf16[{cfg.num_embed},{cfg.embed_dim}]" in _unfused_shapes(hlo)  # parser sanity
