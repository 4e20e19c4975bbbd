"""The benchmark protocol, shared by every worker (standard library only: each engine runs in
its own virtual environment, and each of them imports this file).

Protocol (the one of the issue's reference figures, /work/shared/anchors):
  * batch 1, greedy, random weights, Gemma 3 architectures (vocab 262144, tied embedding);
  * a chat-templated prompt of exactly `prompt_tokens` ids, BOS included;
  * `new_tokens` generated tokens; end tokens are forbidden (or absent), so every run yields
    exactly `new_tokens` tokens;
  * wall-clock timings on host-synchronised results; medians of `reps` after a warm-up.

A worker writes one JSON object (a flat dict of metrics) to `--out`, rewritten after every
phase, so a worker killed by the harness's timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import resource
import statistics
import sys
import time

# Gemma 3 special ids (the real tokenizer's, and the fake one built for `gemma` 3.3.0).
PAD, EOS, BOS, START_OF_TURN, END_OF_TURN = 0, 1, 2, 105, 106
GEMMA3_VOCAB = 262_144

# Shape-relevant fields of the published Gemma 3 text configs (same as gemma_app.nn.presets).
ARCH = {
    "270m": dict(layers=18, d=640, f=2048, heads=4, kv_heads=1, head_dim=256, window=512),
    "1b": dict(layers=26, d=1152, f=6912, heads=4, kv_heads=1, head_dim=256, window=512),
    "4b": dict(layers=34, d=2560, f=10240, heads=8, kv_heads=4, head_dim=256, window=1024),
}
GLOBAL_EVERY = 6  # Gemma 3: five sliding-window layers, then one global layer

# dtype name -> (storage dtype, compute dtype)
DTYPES = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "bf16-fp32": ("bf16", "fp32")}
NBYTES = {"fp32": 4, "bf16": 2}


def num_params(model: str) -> int:
    """Parameters of the text decoder (tied embedding counted once)."""
    a = ARCH[model]
    d, f, h = a["d"], a["f"], a["head_dim"]
    per_layer = (
        a["heads"] * d * h * 2  # q and attention output
        + 2 * a["kv_heads"] * d * h  # k, v
        + 3 * d * f  # gate, up, down
        + 4 * d  # pre/post attention and ffw norms
        + 2 * h  # q and k norms
    )
    return GEMMA3_VOCAB * d + a["layers"] * per_layer + d


def kv_bytes_per_token(model: str, dtype: str, attended: int, cache_policy: str) -> int:
    """KV-cache bytes a decode step reads when `attended` positions are filled.

    cache_policy: "used" (exactly the filled positions), "chunk256" (filled positions rounded
    up to 256-slot chunks: our engine), or an int-like string = the whole cache of that many
    slots on every layer (a dense masked attention over the full cache).
    """
    a = ARCH[model]
    per_pos = 2 * a["kv_heads"] * a["head_dim"] * NBYTES[DTYPES[dtype][1]]
    total = 0
    for i in range(a["layers"]):
        is_global = (i + 1) % GLOBAL_EVERY == 0
        if cache_policy == "used":
            n = attended if is_global else min(attended, a["window"])
        elif cache_policy == "chunk256":
            n = -(-attended // 256) * 256
            if not is_global:
                n = min(n, -(-a["window"] // 256) * 256 + 256)
        else:
            n = int(cache_policy)
        total += n * per_pos
    return total


def prompt_ids(n_tokens: int, seed: int = 0) -> list[int]:
    """A chat-templated prompt of exactly `n_tokens` ids, the same for every id-level engine.

    BOS <start_of_turn> "user\\n" {filler} <end_of_turn> "\\n" <start_of_turn> "model\\n",
    where the role words, newlines and filler are ids drawn from [256, 8000) with a fixed
    seed (ordinary text pieces of the real Gemma 3 vocabulary; the model has random weights,
    so only the length and the special ids matter).
    """
    rng = random.Random(seed)
    filler = [rng.randrange(256, 8000) for _ in range(n_tokens)]
    user_nl, nl, model_nl = [2364, 107], [107], [4368, 107]  # stand-ins for "user\n" etc.
    head = [BOS, START_OF_TURN, *user_nl]
    tail = [END_OF_TURN, *nl, START_OF_TURN, *model_nl]
    k = n_tokens - len(head) - len(tail)
    if k < 1:
        raise ValueError(f"prompt of {n_tokens} tokens is shorter than the template")
    ids = head + filler[:k] + tail
    assert len(ids) == n_tokens
    return ids


def exact_length_text(count, overhead: int, n_tokens: int, seed_text: str, encode, decode):
    """User text whose templated prompt is exactly `n_tokens` ids under some tokenizer.

    count(text) -> length of the templated prompt; overhead: its length for empty text.
    """
    filler = encode(seed_text * (n_tokens // 4 + 50))
    k = max(1, n_tokens - overhead)
    for _ in range(60):
        text = decode(filler[:k])
        n = count(text)
        if n == n_tokens:
            return text
        k = max(1, k + n_tokens - n)
    raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")


SEED_TEXTS = (
    "Explain how a transformer language model decodes text token by token. ",
    "Now summarise the previous answer in three short bullet points please. ",
    "Finally, list two ways to make that decoding loop faster on a small CPU. ",
)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def worker_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", choices=sorted(ARCH), default="270m")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--long-prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--turn-tokens",
        type=int,
        default=8,
        help="new tokens on chat turns 2 and 3 (only "
        "their compilations are counted; turn 1 uses --new-tokens)",
    )
    ap.add_argument("--cache-length", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out", default=None, help="JSON file the metrics are (re)written to")
    ap.add_argument(
        "--paired",
        type=int,
        default=0,
        help="last phase (engines that have it): this many streaming reps, each between two "
        "in-process read-bandwidth probes (bench/membw.py ReadProbe), for the bound at the "
        "machine's speed of that moment",
    )
    ap.add_argument(
        "--serve-ttft",
        action="store_true",
        help="duel mode (bench/run.py --duel): set up, warm up the 100-token TTFT, then measure "
        "one TTFT per `ttft` line on stdin (see serve_ttft)",
    )
    return ap.parse_args()


DUEL_PREFIX = "DUEL "  # protocol lines on a duel worker's stdout; anything else is log


def serve_ttft(measure, warmups: int = 3) -> None:
    """Duel protocol: after `warmups` calls of `measure` (seconds of one TTFT), print
    `DUEL ready`, then `DUEL {"ttft_s": x}` for each `ttft` line read from stdin, until EOF.

    bench/run.py keeps two engines' workers alive and alternates their measurements, so both
    see the same moment of a machine whose speed drifts by ±30% within minutes."""
    for _ in range(warmups):
        measure()
    print(DUEL_PREFIX + "ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "ttft":
            print(DUEL_PREFIX + json.dumps({"ttft_s": measure()}), flush=True)


class Recorder:
    """A flat dict of metrics, flushed to `path` (atomically) on every `set`/`flush`."""

    def __init__(self, path: str | None, **fixed):
        self.path = path
        self.t0 = time.perf_counter()
        self.data = {"python": sys.version.split()[0], "pid": os.getpid(), **fixed}
        self.flush()

    def set(self, **kw):
        self.data.update(kw)
        self.flush()

    def phase(self, name: str):
        self.data["phase"] = name
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        print(
            f"[{self.data.get('engine')} {self.data.get('model')} {self.data.get('dtype')}] "
            f"{self.data['elapsed_s']:8.1f}s {name}",
            file=sys.stderr,
            flush=True,
        )
        self.flush()

    def flush(self):
        self.data["peak_rss_mib"] = round(peak_rss_mib(), 1)
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)

    def done(self):
        self.data["phase"] = "done"
        self.data["total_s"] = round(time.perf_counter() - self.t0, 2)
        self.flush()
        print(json.dumps(self.data, default=str))


class StreamTimer:
    """Timestamps of streamed tokens: ttft = first - start, tok/s from the inter-token gaps."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self):
        self.stamps.append(time.perf_counter())

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.start

    @property
    def tok_s(self) -> float | None:
        n = len(self.stamps)
        return (n - 1) / (self.stamps[-1] - self.stamps[0]) if n > 1 else None

    @property
    def total(self) -> float:
        return self.stamps[-1] - self.start


def machine_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def jax_compile_listener():
    """Accumulates JAX compile events (tracing, lowering, XLA backend) into a dict.

    Returns `totals`: {"trace_s", "lower_s", "backend_s", "backend_n"} updated in place; the
    same listener is used for our engine and for `gemma` 3.3.0, so their figures compare.
    """
    import jax.monitoring

    totals = {"trace_s": 0.0, "lower_s": 0.0, "backend_s": 0.0, "backend_n": 0}
    keys = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "backend_s",
    }

    def on_event(name, seconds, **kwargs):
        key = keys.get(name)
        if key:
            totals[key] += seconds
            if key == "backend_s":
                totals["backend_n"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    return totals


_COMPILE_MSG = re.compile(
    r"Finished (tracing|jaxpr to MLIR module conversion|XLA compilation of) (\S+)"
    r"(?: for jit)? in ([0-9.eE+-]+) sec"
)


class CompileLog(logging.Handler):
    """With `jax_log_compiles`, records (stage, function, seconds) of every compile event."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.events: list[tuple[str, str, float]] = []

    def emit(self, record):
        m = _COMPILE_MSG.search(record.getMessage())
        if m:
            name = re.sub(r"^jit\((.*)\)$", r"\1", m.group(2))
            self.events.append((m.group(1).split()[0], name, float(m.group(3))))

    @classmethod
    def install(cls) -> CompileLog:
        import jax

        handler = cls()
        logging.getLogger("jax").addHandler(handler)
        jax.config.update("jax_log_compiles", True)
        return handler


class CompileWindow:
    """Compile counts/seconds of the listener's totals inside a `with` block; with a
    `CompileLog`, also `breakdown`: seconds (tracing + lowering + XLA) per jitted function."""

    def __init__(self, totals, log: CompileLog | None = None):
        self.totals = totals
        self.log = log

    def __enter__(self):
        self.start = dict(self.totals)
        self.first_event = len(self.log.events) if self.log else 0
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        d = {k: self.totals[k] - self.start[k] for k in self.totals}
        self.count = d["backend_n"]
        self.backend_s = d["backend_s"]
        self.compile_s = d["trace_s"] + d["lower_s"] + d["backend_s"]
        per_fn: dict[str, float] = {}
        for _, name, seconds in self.log.events[self.first_event :] if self.log else ():
            per_fn[name] = per_fn.get(name, 0.0) + seconds
        self.breakdown = {
            k: round(v, 3) for k, v in sorted(per_fn.items(), key=lambda kv: -kv[1]) if v >= 0.01
        }
