"""One configuration of OUR engine (gemma_app), in its own process. Run by bench/run.py.

    python bench/worker_ours.py --model 270m --dtype fp32 --out /tmp/ours.json

Phases (in this order, so the first one sees a fresh process):
  1. chat  : `Engine.new_chat()` multi-turn ChatSampler with the Gemma-3-shaped tokenizer of
             bench/fake_tokenizer.py (the one `gemma` 3.3.0 gets too), end tokens forbidden.
             Turn 1 (100-token templated prompt, 64 tokens) is the process's first call: its
             wall time is `first_call_s`, its JAX compile time `compile_s` (tracing +
             lowering + XLA, per function in `compile_breakdown`). Turns 2 and 3 (other
             100-token messages, --turn-tokens tokens) count XLA compilations (must be 0).
  2. stream: `Sampler.prefill` + `Sampler.generate` (the app's streaming path), token ids from
             `common.prompt_ids`, no tokenizer (so no end tokens): TTFT = prefill to the first
             token on the host; tok/s from the gaps between the 64 streamed tokens.
  3. loop  : `Sampler.generate_all` (one jitted while_loop) timed alone after a synced
             prefill: decode tok/s = (64 - 1) / its time (the prefill samples token 1).
  4. ttft  : prefill + first token for the 1000-token prompt (two 512-token chunks).
  5. paired (--paired R): R streaming reps as in phase 2, each between two in-process
             bandwidth probes (membw.ReadProbe: membw.py's CPU read tests on 1 GiB, best
             median, the bound's convention): bench/run.py turns each rep into a % of the
             bound at the mean of its two probes. The VM's bandwidth drifts ±30% within
             minutes, so a probe taken minutes away (before the worker, or the run's best) says
             less about this worker's rate. The probe's arrays come after the peak-RSS reading.
With --serve-ttft the worker only serves phase 2's TTFT to bench/run.py's duel (common.serve_ttft).
Warm-ups use 2 new tokens (max_new_tokens is data: the same compiled programs).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import fake_tokenizer  # noqa: E402

args = common.worker_args(__doc__.splitlines()[0])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

totals = common.jax_compile_listener()
compile_log = common.CompileLog.install()

from gemma_app.engine import Engine, resolve_dtype, scan_by_default  # noqa: E402
from gemma_app.jax_utils import CompileCounter, release_freed_host_memory  # noqa: E402
from gemma_app.nn import presets  # noqa: E402
from gemma_app.nn.transformer import (  # noqa: E402
    Transformer,
    abstract_params,
    init_params,
    stack_layers,
)
from gemma_app.text.sampler import Sampler  # noqa: E402
from gemma_app.text.template import ChatTemplate  # noqa: E402
from gemma_app.text.tokenizer import Tokenizer  # noqa: E402

JNP = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
store, compute = common.DTYPES[args.dtype]
if args.dtype == "bf16":  # what the engine serves for a bf16 request: fp32 activations on CPU
    compute = "fp32" if resolve_dtype("bfloat16").compute_dtype == jnp.float32 else "bf16"
N, REPS = args.new_tokens, args.reps
INIT = os.environ.get("BENCH_OURS_INIT", "leaf")  # "flax": gemma_app's init_params
# "stacked": the layers stacked (one scanned layer body), as the engine serves them where the
# kernels run; "unrolled": the official per-layer tree (one compiled body per layer), for A/B
# runs. Default: what the engine would do (`scan_by_default`).
LAYOUT = os.environ.get("BENCH_OURS_LAYOUT") or ("stacked" if scan_by_default() else "unrolled")
med = common.median

rec = common.Recorder(
    args.out,
    engine="ours",
    model=args.model,
    dtype=args.dtype,
    store_dtype=store,
    compute_dtype=compute,
    init=INIT,
    layout=LAYOUT,
    jax=jax.__version__,
    backend=jax.default_backend(),
    device_kind=jax.devices()[0].device_kind,
    prompt_tokens=args.prompt_tokens,
    long_prompt_tokens=args.long_prompt_tokens,
    new_tokens=N,
    cache_length=args.cache_length,
    reps=REPS,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    # A persistent compilation cache would turn first-call compiles into cache loads.
    jax_compilation_cache_dir=jax.config.jax_compilation_cache_dir,
)


def device_peak_mib():
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return round(stats.get("peak_bytes_in_use", 0) / 2**20, 1) or None
    except Exception:  # CPU client: no memory stats
        return None


def leafwise_random_params(cfg, dtype):
    """N(0, 0.02) parameters made one leaf at a time (as the gemma 3.3.0 worker does).

    `init_params` (one jitted flax init of the whole tree) leaves about 3.6x the parameter
    bytes resident on XLA:CPU, which would dominate the peak-RSS column; leaf by leaf the
    process holds the parameters plus one leaf's temporaries, like a checkpoint load.
    """
    shapes = abstract_params(cfg, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    normal = jax.jit(
        lambda k, shape, dt: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dt),
        static_argnums=(1, 2),
    )
    return jax.tree.unflatten(
        treedef, [normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def sync(x):
    return np.asarray(x)


# ---- setup ----------------------------------------------------------------------------
rec.phase("init")
cfg = {"270m": presets.gemma3_270m, "1b": presets.gemma3_1b, "4b": presets.gemma3_4b}[args.model]()
t = time.perf_counter()
if INIT == "flax":
    params = init_params(cfg, seed=0, dtype=JNP[store])
else:
    params = leafwise_random_params(cfg, JNP[store])
if LAYOUT == "stacked":  # as the engine serves them; the per-layer arrays are freed
    params = stack_layers(cfg, params, consume=True)
    release_freed_host_memory()  # as the engine does after stacking
jax.block_until_ready(params)
leaves = jax.tree.leaves(params)
rec.set(
    init_s=round(time.perf_counter() - t, 2),
    n_params=int(sum(x.size for x in leaves)),
    param_bytes=int(sum(x.size * x.dtype.itemsize for x in leaves)),
    param_dtypes=sorted({str(x.dtype) for x in leaves}),
    rss_after_init_mib=common.current_rss_mib(),
)
model = Transformer(cfg, dtype=JNP[compute])

if args.serve_ttft:  # duel mode (bench/run.py --duel): the streaming path's TTFT only
    duel = Sampler(
        model=model, params=params, tokenizer=None, cache_length=args.cache_length,
        max_out_length=max(128, N),
    )  # fmt: skip
    duel_ids = common.prompt_ids(args.prompt_tokens)

    def duel_ttft() -> float:
        # Two tokens, as phase 2 streams them (step 1 is dispatched before token 0 is read),
        # and run to the end, so no step is left running into the other engine's turn.
        timer = common.StreamTimer()
        for _ in duel.generate(duel.prefill([duel_ids], rng=0), max_new_tokens=2):
            timer.tick()
        return timer.ttft

    common.serve_ttft(duel_ttft)
    sys.exit(0)

# ---- 1. multi-turn chat: first call (compile) and compilations on turns 2 and 3 ----------
rec.phase("chat")
# A Gemma-3-shaped 262144-piece tokenizer, so every id the random model emits decodes.
tok = Tokenizer(fake_tokenizer.ensure(), version=3)
template = ChatTemplate(tok)
engine = Engine(
    name=cfg.name, config=cfg, params=params, tokenizer=tok, dtype=JNP[compute],
    scan_layers=LAYOUT == "stacked",
)  # fmt: skip
forbid = [tok.special.eos, tok.special.end_of_turn]
chat = engine.new_chat(
    cache_length=args.cache_length, max_out_length=max(128, N), forbidden_tokens=forbid
)
overhead = 1 + len(template.user_turn(""))
texts = [
    common.exact_length_text(
        lambda s: 1 + len(template.user_turn(s)),
        overhead,
        args.prompt_tokens,
        seed,
        tok.encode,
        tok.decode,
    )
    for seed in common.SEED_TEXTS
]
for i, text in enumerate(texts, start=1):
    with common.CompileWindow(totals, compile_log) as w, CompileCounter() as cc:
        answer = chat.chat(text, max_new_tokens=N if i == 1 else args.turn_tokens)
    if i == 1:
        rec.set(
            first_call_s=round(w.wall, 3), compile_s=round(w.compile_s, 3),
            compile_backend_s=round(w.backend_s, 3), compiles_turn1=cc.count,
            compile_breakdown=w.breakdown,
            chat_prompt_tokens=1 + len(template.user_turn(text)),
            chat_answer_tokens=len(chat.turns[-1].answer_tokens), chat_answer_chars=len(answer),
        )  # fmt: skip
    else:
        rec.set(**{f"compiles_turn{i}": cc.count, f"turn{i}_s": round(w.wall, 3),
                   f"turn{i}_breakdown": w.breakdown})  # fmt: skip
rec.set(chat_cache_used=chat.used_cache_length)
del chat

# ---- 2. streaming (Sampler.prefill + Sampler.generate) -----------------------------------
rec.phase("stream")
sampler = Sampler(
    model=model, params=params, tokenizer=None, cache_length=args.cache_length,
    max_out_length=max(128, N),
)  # fmt: skip
ids = common.prompt_ids(args.prompt_tokens)
long_ids = common.prompt_ids(args.long_prompt_tokens, seed=1)


def stream_once(prompt, n):
    timer = common.StreamTimer()
    state = sampler.prefill([prompt], rng=0)
    count = 0
    for _ in sampler.generate(state, max_new_tokens=n):
        timer.tick()
        count += 1
    assert count == n, count
    return timer


with common.CompileWindow(totals, compile_log) as w:
    stream_once(ids, 2)
rec.set(
    stream_warmup_compile_s=round(w.compile_s, 3), stream_warmup_compiles=w.count,
    stream_warmup_breakdown=w.breakdown,
)  # fmt: skip
timers = [stream_once(ids, N) for _ in range(REPS)]
rec.set(
    stream_tok_s=med(t.tok_s for t in timers),
    stream_tok_s_raw=[round(t.tok_s, 3) for t in timers],
    ttft_100_s=med(t.ttft for t in timers),
    ttft_100_raw=[round(t.ttft, 4) for t in timers],
    stream_total_s=med(t.total for t in timers),
)

# ---- 3. non-streaming (generate_all: one jitted while_loop) -------------------------------
rec.phase("loop")


def prefill_once(prompt):
    t = time.perf_counter()
    state = sampler.prefill([prompt], rng=0)
    sync(state.token)
    return time.perf_counter() - t, state


def loop_once(n):
    """(prefill + first token, generate_all alone, end to end) seconds."""
    t0 = time.perf_counter()
    state = sampler.prefill([ids], rng=0)
    sync(state.token)
    t1 = time.perf_counter()
    result = sampler.generate_all(state, max_new_tokens=n)  # returns host arrays
    t2 = time.perf_counter()
    assert len(result.tokens[0]) == n, len(result.tokens[0])
    return t1 - t0, t2 - t1, t2 - t0


with common.CompileWindow(totals, compile_log) as w:
    loop_once(2)
rec.set(
    loop_warmup_compile_s=round(w.compile_s, 3), loop_warmup_compiles=w.count,
    loop_warmup_breakdown=w.breakdown,
)  # fmt: skip
runs = [loop_once(N) for _ in range(REPS)]
rec.set(
    prefill_100_s=med(r[0] for r in runs),
    loop_s=med(r[2] for r in runs),
    loop_only_s_raw=[round(r[1], 4) for r in runs],
    loop_tok_s=med((N - 1) / r[1] for r in runs),  # N - 1 decode steps after the prefill's
    loop_e2e_tok_s=N / med(r[2] for r in runs),
)


# ---- 4. TTFT of the long prompt -------------------------------------------------------------
rec.phase("ttft_long")
with common.CompileWindow(totals, compile_log) as w:
    prefill_once(long_ids)
rec.set(long_warmup_compile_s=round(w.compile_s, 3), long_warmup_compiles=w.count)
ttft_long = [prefill_once(long_ids)[0] for _ in range(REPS)]
rec.set(ttft_long_s=med(ttft_long), ttft_long_raw=[round(x, 4) for x in ttft_long])

rec.set(device_peak_mib=device_peak_mib(), peak_rss_bench_mib=round(common.peak_rss_mib(), 1))

# ---- 5. streaming between in-process bandwidth probes --------------------------------------
if args.paired:
    rec.phase("paired")
    import membw  # noqa: E402  (NumPy, and JAX's CPU backend)

    probe = membw.ReadProbe(1.0)

    def quiet_gbs():
        time.sleep(0.25)  # XLA's pool threads spin a moment after work: not in the probe's way
        gbs, test = probe.gbs()
        return round(gbs, 2), test

    pairs = []
    for _ in range(args.paired):
        before, before_test = quiet_gbs()
        tok_s = round(stream_once(ids, N).tok_s, 3)
        after, after_test = quiet_gbs()
        pairs.append({"bw_before": before, "tok_s": tok_s, "bw_after": after,
                      "tests": [before_test, after_test]})  # fmt: skip
        rec.set(paired=pairs)
    del probe
rec.done()
