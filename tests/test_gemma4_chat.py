"""ChatSampler on a tiny Gemma 4 with image and audio encoders (random weights).

Multi-turn chats with images and audio must equal greedy decoding by uncached full forwards
over the same token sequence, with soft tokens computed independently of the chat.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_app import audio_input, vision_input
from gemma_app.engine import Engine
from gemma_app.jax_utils import CompileCounter
from gemma_app.nn import audio, presets, vision4
from gemma_app.nn.transformer import Transformer, init_params
from gemma_app.text.chat import ChatSampler
from gemma_app.text.sampler import CacheFullError, GenerationResult
from gemma_app.text.template import AUDIO_SOFT_TOKEN, SOFT_TOKEN
from gemma_app.text.tokenizer import Tokenizer

MODEL_GEMMA4 = Path(__file__).resolve().parent.parent / "assets" / "tokenizer_gemma4.model"
CACHE = 384


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL_GEMMA4, version=4)


def make_engine(config, tok: Tokenizer) -> Engine:
    params = dict(init_params(config, seed=0))
    embedder = dict(params["embedder"])
    params["vision_encoder"] = vision4.init_params(config.vision, seed=1)
    embedder |= vision4.init_mm_embedder(config.vision, config.embed_dim, seed=2)
    if config.audio is not None:
        params["audio_encoder"] = audio.init_params(config.audio, seed=3)
        embedder |= audio.init_audio_embedder(config.audio, config.embed_dim, seed=4)
    params["embedder"] = embedder
    return Engine(name=config.name, config=config, params=params, tokenizer=tok)


@pytest.fixture(scope="module")
def engine(tok) -> Engine:
    config = dataclasses.replace(
        presets.tiny_gemma4(num_embed=tok.vocab_size),
        vision=presets.tiny_gemma4_vision(),
        audio=presets.tiny_gemma4_audio(),
    )
    return make_engine(config, tok)


def media():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (60, 200, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (150, 100, 3), dtype=np.uint8)
    clip = (0.1 * rng.standard_normal(8000)).astype(np.float32)  # 0.5 s at 16 kHz
    return wide, tall, clip


def image_soft(engine, image) -> np.ndarray:
    """[n, D] soft tokens of one image, computed without the chat."""
    vc, params = engine.config.vision, engine.params
    pre = vision_input.preprocess(image, vc)
    soft, mask = vision4.encode_images(
        vc, params["vision_encoder"], pre.patches[None], pre.positions[None]
    )
    soft = np.asarray(soft[0])[np.asarray(mask[0])]
    assert soft.shape[0] == pre.num_soft_tokens
    w = params["embedder"]["mm_input_projection"]["w"]
    return np.asarray(vision4.project_soft_tokens(soft, w))


def audio_soft(engine, clip) -> np.ndarray:
    """[n, D] soft tokens of one clip, computed without the chat."""
    ac, params = engine.config.audio, engine.params
    features, valid = audio_input.log_mel_features(clip)
    soft, mask = audio.encode_audio(ac, params["audio_encoder"], features[None], valid[None])
    soft = np.asarray(soft[0])[np.asarray(mask[0])]
    assert soft.shape[0] == audio_input.num_audio_tokens(clip.size)
    return np.asarray(audio.project_audio(soft, params["embedder"]["audio_input_projection"]["w"]))


def segments_and_mm(ids, soft_blocks, dim):
    """Numbers the soft-token runs of `ids` (image k, audio -k) and fills their soft tokens."""
    segments, mm, counts, queue = [], np.zeros((len(ids), dim), np.float32), {}, list(soft_blocks)
    for i, token in enumerate(ids):
        segment = 0
        if token in (SOFT_TOKEN, AUDIO_SOFT_TOKEN):
            kind = 1 if token == SOFT_TOKEN else -1
            if ids[i - 1] != token:
                counts[kind] = counts.get(kind, 0) + 1
                block, offset = queue.pop(0), i
            segment = kind * counts[kind]
            mm[i] = block[i - offset]
        segments.append(segment)
    assert not queue
    return segments, mm


def greedy_full_forward(engine, ids, segments, mm, n):
    """Greedy continuation by repeated uncached forwards over the whole sequence."""
    model = Transformer(engine.config)
    width = -(-(len(ids) + n) // 128) * 128  # one padded length: one compilation
    apply = jax.jit(
        lambda t, p, m, s: model.apply(
            {"params": engine.params}, t, p, mm_embeddings=m, segments=s
        )[0]
    )
    ids, out = list(ids), []
    for _ in range(n):
        pad = width - len(ids)
        t = np.array([[max(i, 0) for i in ids] + [0] * pad])
        s = np.array([list(segments) + [0] * (width - len(segments))])
        m = np.pad(mm, ((0, width - len(mm)), (0, 0)))[None]
        logits = apply(t, np.arange(width)[None], m, s)[0, len(ids) - 1]
        token = int(jnp.argmax(logits))
        out.append(token)
        ids.append(token)
    return out


def test_image_then_audio_then_text_equals_one_shot(engine, tok):
    """Greedy turns with an image (turn 1), an audio clip (turn 2) and text (turn 3) equal
    greedy decoding of the same token sequence by full uncached forwards."""
    wide, _, clip = media()
    chat = engine.new_chat(cache_length=CACHE, max_out_length=8, system_prompt="Be brief.")
    chat.chat("What is this?", images=[wide], max_new_tokens=5)
    chat.chat("And this sound?", audio=[clip], max_new_tokens=5)
    chat.chat("Thanks.", max_new_tokens=5)
    answers = [list(t.answer_tokens) for t in chat.turns]

    # The one-shot sequence, from the template alone.
    template = chat.template
    n_image = vision_input.soft_token_count(*wide.shape[:2], engine.config.vision)
    n_audio = audio_input.num_audio_tokens(clip.size)
    prompts = [
        [tok.special.bos]
        + template.user_turn("What is this?", system="Be brief.", images=[n_image]),
        template.user_turn("And this sound?", audio=[n_audio]),
        template.user_turn("Thanks."),
    ]
    ids = []
    for k in range(3):
        ids += prompts[k]
        blocks = [image_soft(engine, wide), audio_soft(engine, clip)][: min(k + 1, 2)]
        segments, mm = segments_and_mm(ids, blocks, engine.config.embed_dim)
        assert chat._tokens[: len(ids)] == ids and chat._segments[: len(ids)] == segments
        expected = greedy_full_forward(engine, ids, segments, mm, len(answers[k]))
        assert answers[k] == expected, f"turn {k + 1}"
        ids += answers[k] + template.end_of_model_turn()
    assert sorted(set(chat._segments)) == [-1, 0, 1]


def test_images_of_two_aspect_ratios_have_their_own_counts(engine, tok):
    wide, tall, _ = media()
    vc = engine.config.vision
    counts = [vision_input.soft_token_count(*i.shape[:2], vc) for i in (wide, tall)]
    assert counts[0] != counts[1] and max(counts) <= vc.max_soft_tokens
    chat = engine.new_chat(cache_length=CACHE, max_out_length=4)
    chat.chat("Compare.", images=[wide, tall], max_new_tokens=1)
    runs = [chat._segments.count(block) for block in (1, 2)]
    assert runs == counts
    # Hugging Face's rendering, tokenized whole (plain SentencePiece: tags are pieces).
    text = "<|turn>user\n" + "".join(f"\n\n<|image>{'<|image|>' * n}<image|>\n\n" for n in counts)
    text += "Compare.<turn|>\n<|turn>model\n"
    placeholder = tok.special.image_placeholder
    ids = [placeholder if t == SOFT_TOKEN else t for t in chat._tokens[1:]]
    assert ids[: ids.index(tok.special.end_of_turn) + 5] == tok._sp.encode(text)
    # Another aspect ratio compiles nothing more: patches are padded to the budget.
    other = np.random.default_rng(1).integers(0, 256, (90, 90, 3), dtype=np.uint8)
    with CompileCounter() as counter:
        chat.chat("And this?", images=[other], max_new_tokens=1)
    assert counter.count == 0


def test_thinking_switch_and_thought_stripping(engine, tok, monkeypatch):
    """`<|think|>` opens the system turn; a sampled thought is dropped from the context of
    later turns, which stay exact."""
    s = tok.special
    chat = engine.new_chat(cache_length=CACHE, max_out_length=16, thinking=True)
    thought = [s.channel_start, *tok.encode("thought\nLet me see."), s.channel_end]
    script = thought + tok.encode("Four.") + [s.end_of_turn]
    real_generate = chat.sampler.generate

    def scripted(state, *, max_new_tokens, sampling=None, result=None):
        # Teacher-forces the script into the cache, as if the model had sampled it.
        state = chat.sampler.prefill([script[:-1]], last_state=state)
        try:
            for token in script:
                yield np.array([token])
        finally:
            result.append(GenerationResult([script], state, [True], [False]))

    monkeypatch.setattr(chat.sampler, "generate", scripted)
    parts = list(chat.stream_parts("What is 2+2?", max_new_tokens=16))
    monkeypatch.setattr(chat.sampler, "generate", real_generate)
    assert "".join(d for c, d in parts if c == "thought") == "Let me see."
    assert "".join(d for c, d in parts if c == "answer") == "Four."
    turn = chat.turns[0]
    assert (turn.thought, turn.answer, turn.complete) == ("Let me see.", "Four.", True)
    assert tok.decode(chat._tokens) == (
        "<|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\nFour.<turn|>\n"
    )
    answer_start = len(chat._tokens) - len(tok.encode("Four.")) - 2
    assert chat._cached <= answer_start  # the thought's cache slots are rewritten

    answer = chat.chat("And 3+3?", max_new_tokens=5)
    one_shot = chat.template.conversation(
        [("What is 2+2?", script[:-1]), ("And 3+3?", None)], thinking=True
    )
    assert chat._tokens[: len(one_shot)] == one_shot
    n = len(chat.turns[1].answer_tokens)
    segments, mm = [0] * len(one_shot), np.zeros((len(one_shot), engine.config.embed_dim))
    expected = greedy_full_forward(engine, one_shot, segments, mm, n)
    assert list(chat.turns[1].answer_tokens) == expected
    assert answer == chat.turns[1].answer

    # Switching thinking off rebuilds the context without the system turn.
    chat.chat("Bye.", max_new_tokens=2, thinking=False)
    assert not chat.thinking and len(chat.turns) == 3
    rebuilt = [s.bos] + chat.template.user_turn("What is 2+2?")
    assert chat._tokens[: len(rebuilt)] == rebuilt
    assert tok.decode(chat._tokens).startswith(
        "<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\nFour."
    )


def test_load_history_with_audio_and_images(engine, tok):
    wide, _, clip = media()
    chat = engine.new_chat(cache_length=CACHE, max_out_length=4)
    chat.chat("look", images=[wide], max_new_tokens=2)
    chat.chat("listen", audio=[clip], max_new_tokens=2)
    history = [
        (chat.turns[0].user, chat.turns[0].answer, [wide]),
        (chat.turns[1].user, chat.turns[1].answer, [], [clip]),
    ]
    fresh = engine.new_chat(cache_length=CACHE, max_out_length=4)
    fresh.load_history(history)
    template, eot = fresh.template, fresh.template.end_of_model_turn()
    n_image = vision_input.soft_token_count(*wide.shape[:2], engine.config.vision)
    expected = [tok.special.bos] + template.user_turn("look", images=[n_image])
    expected += tok.encode(history[0][1]) + eot
    expected += template.user_turn("listen", audio=[audio_input.num_audio_tokens(clip.size)])
    expected += tok.encode(history[1][1]) + eot
    assert fresh._tokens == expected and fresh._cached == 0
    assert sorted(set(fresh._segments)) == [-1, 0, 1]
    for block, soft in chat._soft.items():
        np.testing.assert_allclose(fresh._soft[block], soft, rtol=1e-6, atol=1e-6)
    cached = chat._cached
    chat.load_history(history)  # unchanged: the cache is kept
    assert chat._cached == cached and len(chat.turns) == 2
    chat.load_history([history[0], (history[1][0], history[1][1], [], [clip[:4000]])])
    assert chat._cached <= chat.turns[1].start  # another clip: turn 2 is re-encoded


def test_errors(engine, tok):
    _, _, clip = media()
    no_audio = make_engine(dataclasses.replace(engine.config, audio=None), tok)
    chat = no_audio.new_chat(cache_length=CACHE)
    with pytest.raises(ValueError, match="does not accept audio"):
        chat.chat("hear", audio=[clip])
    chat = engine.new_chat(cache_length=CACHE)
    with pytest.raises(ValueError, match="at most 30 s"):
        chat.chat("long", audio=[np.zeros(16_000 * 31, np.float32)])
    with pytest.raises(ValueError, match="too short"):
        chat.chat("short", audio=[np.zeros(100, np.float32)])
    with pytest.raises(ValueError, match="float mono"):
        chat.chat("int", audio=[np.zeros(16_000, np.int16)])
    small = engine.new_chat(cache_length=64)
    with pytest.raises(CacheFullError, match="cache holds 64"):
        small.chat("hear", audio=[np.zeros(16_000 * 5, np.float32)])  # 125 tokens
    assert small.turns == [] and small.used_cache_length == 1  # nothing half-recorded
    with pytest.raises(ValueError, match="thinking"):
        gemma3 = Tokenizer(MODEL_GEMMA4.with_name("tokenizer.model"), version=3)
        ChatSampler(model=engine.model, params=engine.params, tokenizer=gemma3, thinking=True)


def test_bidirectional_image_is_never_split_across_chunks(tok):
    """26B-style bidirectional image attention with chunks (8) shorter than an image."""
    config = presets.tiny_gemma4_moe(num_embed=tok.vocab_size)
    moe = make_engine(config, tok)
    wide, tall, _ = media()
    chat = moe.new_chat(cache_length=CACHE, max_out_length=8, pad_length=(8,))
    chat.chat("Hi", max_new_tokens=2)
    chat.chat("What is this?", images=[tall, wide], max_new_tokens=4)
    ids = chat._tokens[: chat.turns[1].start] + chat.template.user_turn(
        "What is this?", images=[chat._segments.count(1), chat._segments.count(2)]
    )
    segments, mm = segments_and_mm(
        ids, [image_soft(moe, tall), image_soft(moe, wide)], config.embed_dim
    )
    expected = greedy_full_forward(moe, ids, segments, mm, len(chat.turns[1].answer_tokens))
    assert list(chat.turns[1].answer_tokens) == expected
