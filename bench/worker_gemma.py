"""One configuration of Google's `gemma` 3.3.0 library, in its own process. Run by bench/run.py.

Runs in bench/.envs/gemma (gemma==3.3.0, kauldron 1.4.2 without xmanager, jax 0.10.2):

    bench/.envs/gemma/bin/python bench/worker_gemma.py --model 270m --dtype fp32 --out /tmp/g.json

`gemma` 3.3.0 imports `kauldron.checkpoints.AbstractPartialLoader`, which kauldron >= 1.4 calls
`InitTransform`: a two-line shim below. Tokenizer: the Gemma-3-shaped 262144-piece model of
bench/fake_tokenizer.py (Gemma 3's special ids; no download). Random parameters N(0, 0.02)
in the model's parameter dtype. EOS and <end_of_turn> are forbidden, so every run generates
exactly --new-tokens tokens. Phases:
  1. chat   : multi-turn `ChatSampler.chat` (non-streaming while_loop); turn 1 is the first
              call of the process (`first_call_s`, `compile_s` = tracing + lowering + XLA, by
              the same JAX listener as our worker); turns 2 and 3 count XLA compilations.
  2. loop   : single-turn `ChatSampler.chat` steady state, and the library's prefill alone:
              loop_tok_s = N / (chat_s - prefill_s)  (the anchor figures' definition).
  3. stream : `Sampler.sample(stream=True)` (the path `ChatSampler(print_stream=True)` takes):
              TTFT = call to first yielded token; tok/s from the gaps between tokens.
  4. ttft   : streaming first token of the 1000-token prompt (the library pads it to 1024).
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import fake_tokenizer  # noqa: E402

args = common.worker_args(__doc__.splitlines()[0])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

totals = common.jax_compile_listener()
compile_log = common.CompileLog.install()

import kauldron.checkpoints as _kc  # noqa: E402

if not hasattr(_kc, "AbstractPartialLoader"):  # gemma 3.3.0 vs kauldron >= 1.4
    _kc.AbstractPartialLoader = _kc.InitTransform

import gemma  # noqa: E402
from gemma import gm  # noqa: E402
from gemma.gm.text import _prefill, _template  # noqa: E402

store, compute = common.DTYPES[args.dtype]
if store != compute:
    raise SystemExit(f"dtype {args.dtype}: not measured for gemma 3.3.0 (one dtype for both)")
JNP = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
N, REPS = args.new_tokens, args.reps
med = common.median
FORBID = [common.EOS, common.END_OF_TURN]

rec = common.Recorder(
    args.out, engine="gemma", model=args.model, dtype=args.dtype,
    gemma=getattr(gemma, "__version__", "3.3.0"), jax=jax.__version__,
    backend=jax.default_backend(), prompt_tokens=args.prompt_tokens,
    long_prompt_tokens=args.long_prompt_tokens, new_tokens=N, cache_length=args.cache_length,
    reps=REPS,
)  # fmt: skip

rec.phase("init")
tok = gm.text.Gemma3Tokenizer(path=str(fake_tokenizer.ensure()))
model = {"270m": gm.nn.Gemma3_270M, "1b": gm.nn.Gemma3_1B, "4b": gm.nn.Gemma3_4B}[args.model](
    dtype=JNP[compute]
)
t = time.perf_counter()
shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens=jnp.zeros((1, 8), jnp.int32)))[
    "params"
]
leaves, treedef = jax.tree.flatten(shapes)
keys = jax.random.split(jax.random.key(0), len(leaves))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)


params = jax.tree.unflatten(
    treedef, [_normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
)
jax.block_until_ready(params)
rec.set(
    init_s=round(time.perf_counter() - t, 2),
    n_params=int(sum(int(np.prod(x.shape)) for x in leaves)),
    param_bytes=int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)),
    param_dtypes=sorted({str(x.dtype) for x in leaves}),
    rss_after_init_mib=common.current_rss_mib(),
)


def templated_len(text: str, bos: bool = True) -> int:
    return len(tok.encode(_template.PROMPT.format(text), add_bos=bos))


def make_text(n_tokens: int, seed_text: str) -> str:
    return common.exact_length_text(
        templated_len, templated_len(""), n_tokens, seed_text, tok.encode, tok.decode
    )


texts = [make_text(args.prompt_tokens, s) for s in common.SEED_TEXTS]
long_text = make_text(args.long_prompt_tokens, common.SEED_TEXTS[0])


def new_chat(multi_turn: bool):
    return gm.text.ChatSampler(
        model=model, params=params, tokenizer=tok, multi_turn=multi_turn,
        forbidden_tokens=FORBID, cache_length=args.cache_length, max_out_length=max(128, N),
    )  # fmt: skip


def n_generated(chat) -> int:
    return int((np.asarray(chat.last_state.predicted_tokens) != 0).sum())


# ---- 1. multi-turn chat: first call and compilations on turns 2 and 3 ---------------------
rec.phase("chat")
chat = new_chat(multi_turn=True)
for i, text in enumerate(texts, start=1):
    with common.CompileWindow(totals, compile_log) as w:
        chat.chat(text, max_new_tokens=N if i == 1 else args.turn_tokens, rng=0)
    if i == 1:
        rec.set(
            first_call_s=round(w.wall, 3), compile_s=round(w.compile_s, 3),
            compile_backend_s=round(w.backend_s, 3), compiles_turn1=w.count,
            compile_breakdown=w.breakdown,
            chat_prompt_tokens=templated_len(text), chat_answer_tokens=n_generated(chat),
        )  # fmt: skip
    else:
        rec.set(**{f"compiles_turn{i}": w.count, f"turn{i}_s": round(w.wall, 3),
                   f"turn{i}_breakdown": w.breakdown})  # fmt: skip
rec.set(chat_cache_used=int(chat.last_state.used_cache_length))
del chat

# ---- 2. non-streaming: single-turn ChatSampler.chat, and prefill alone ---------------------
rec.phase("loop")
chat = new_chat(multi_turn=False)
sampler = chat.sampler


def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


with common.CompileWindow(totals, compile_log) as w:
    chat.chat(texts[0], max_new_tokens=2, rng=0)  # warm-up (max_new_tokens is traced data)
rec.set(loop_warmup_compiles=w.count)
loop_s = [timed(lambda i=i: chat.chat(texts[0], max_new_tokens=N, rng=i)) for i in range(REPS)]
assert n_generated(chat) == N, n_generated(chat)


def prefill_once():
    inputs = sampler._get_inputs(
        prompt=_template.PROMPT.format(texts[0]), images=None, add_bos=True,
        has_batch_dim=False, sharding=None,
    )  # fmt: skip
    return _prefill.prefill(
        model=model, params=params, input=inputs, last_state=None,
        cache_length=sampler.cache_length, pad_length=sampler.pad_length,
        rng=jax.random.key(0), sharding=None, max_out_length=sampler.max_out_length,
    )  # fmt: skip


prefill_once()
prefill_s = [timed(prefill_once) for _ in range(REPS)]
rec.set(
    prefill_100_s=med(prefill_s), loop_s=med(loop_s), loop_s_raw=[round(x, 4) for x in loop_s],
    loop_tok_s=med(N / (x - med(prefill_s)) for x in loop_s), loop_e2e_tok_s=N / med(loop_s),
)  # fmt: skip

# ---- 3. streaming: Sampler.sample(stream=True) ----------------------------------------------


def stream_once(text, n, seed):
    timer = common.StreamTimer()
    count = 0
    for _ in sampler.sample(_template.PROMPT.format(text), stream=True, max_new_tokens=n, rng=seed):
        timer.tick()
        count += 1
    assert count == n, count
    return timer


rec.phase("stream")
with common.CompileWindow(totals, compile_log) as w:
    stream_once(texts[0], 2, 0)
rec.set(stream_warmup_compile_s=round(w.compile_s, 3), stream_warmup_compiles=w.count)
timers = [stream_once(texts[0], N, i + 1) for i in range(REPS)]
rec.set(
    stream_tok_s=med(t.tok_s for t in timers),
    stream_tok_s_raw=[round(t.tok_s, 3) for t in timers],
    ttft_100_s=med(t.ttft for t in timers),
    ttft_100_raw=[round(t.ttft, 4) for t in timers],
)

# ---- 4. TTFT of the long prompt ----------------------------------------------------------------
rec.phase("ttft_long")
with common.CompileWindow(totals, compile_log) as w:
    stream_once(long_text, 1, 0)
rec.set(long_warmup_compile_s=round(w.compile_s, 3), long_warmup_compiles=w.count)
ttft_long = [stream_once(long_text, 1, i).ttft for i in range(REPS)]
rec.set(ttft_long_s=med(ttft_long), ttft_long_raw=[round(x, 4) for x in ttft_long])
rec.done()
