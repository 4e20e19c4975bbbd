"""Benchmark harness (issue 5): our engine vs HF transformers vs `gemma` 3.3.0, one run, one table.

Run by hand from the repository root (not part of the test suite):

    source .venv/bin/activate
    python bench/run.py                       # full CPU run: 270M and 1B, fp32 and bf16
    python bench/run.py --quick               # smoke test: 270M fp32, 8 tokens, 1 rep
    python bench/run.py --models 1b --engines ours,hf --dtypes fp32
    python bench/run.py --device gpu          # ours (+ HF on cuda if importable), 1B/4B bf16
    python bench/run.py --render bench/out/<run>/results.json   # re-render, no measuring

Every (engine, model, dtype) runs in its OWN subprocess (clean peak RSS and compile caches):
  ours   bench/worker_ours.py   with this interpreter (the project venv)
  hf     bench/worker_hf.py     with bench/.envs/ref/bin/python  (torch 2.13.0, transformers 5.23.0)
  gemma  bench/worker_gemma.py  with bench/.envs/gemma/bin/python (gemma 3.3.0)
A missing environment, an unsupported dtype, a crash or a timeout shows as "n/a" with the reason.
bench/membw.py measures the memory bandwidth (before and after the workers) for the bound:
bytes read per decode step (all weights in their storage dtype, the tied embedding included,
plus the KV cache each engine reads) / the best measured read bandwidth.

Outputs: a table on stdout; `bench/RESULTS.md` (or `bench/out/RESULTS-quick.md` with --quick);
raw per-worker JSON and logs under bench/out/<timestamp>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

ENGINES = ("ours", "hf", "gemma")
ENGINE_NAMES = {
    "ours": "ours (gemma_app)",
    "hf": "HF transformers generate",
    "gemma": "gemma 3.3.0",
}
WORKERS = {"ours": "worker_ours.py", "hf": "worker_hf.py", "gemma": "worker_gemma.py"}
SUPPORTED_DTYPES = {"ours": {"fp32", "bf16", "bf16-fp32"}, "hf": {"fp32", "bf16"},
                    "gemma": {"fp32", "bf16"}}  # fmt: skip
# How much KV cache one decode step reads (see common.kv_bytes_per_token).
KV_POLICY = {"ours": "chunk256", "hf": "used", "gemma": "cache"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--models", default=None, help="comma list of 270m,1b,4b")
    ap.add_argument("--engines", default=None, help="comma list of ours,hf,gemma")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,bf16-fp32")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--long-prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--cache-length", type=int, default=4096)
    ap.add_argument("--timeout", type=int, default=None, help="seconds per worker")
    ap.add_argument("--membw-gib", type=float, default=None)
    ap.add_argument("--skip-membw", action="store_true")
    ap.add_argument(
        "--membw-each",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="probe the bandwidth before every worker too (default: on for full CPU runs), for "
        "a bound at the machine's speed of that moment (this VM's drifts ±30%% within a run)",
    )
    ap.add_argument(
        "--duel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after each model and dtype's workers, TTFT(100) of ours and HF alternated rep by "
        "rep in two live workers (default: on for full CPU runs with both engines)",
    )
    ap.add_argument("--duel-reps", type=int, default=15, help="TTFT pairs per duel")
    ap.add_argument(
        "--duel-gap",
        type=float,
        default=1.0,
        help="seconds of quiet before each duel measurement (an idle engine's spinning "
        "threads, e.g. torch's OpenMP pool, otherwise take cores from the next one)",
    )
    ap.add_argument(
        "--paired",
        type=int,
        default=None,
        help="our workers end with this many streaming reps, each between two in-process "
        "bandwidth probes, for the %% of the bound at the same moment (default: 7 for full CPU "
        "runs, else 0)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: small and fast")
    ap.add_argument("--hf-threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument(
        "--ours-init",
        choices=["leaf", "flax"],
        default="leaf",
        help="random weights leaf by leaf (default) or gemma_app's init_params",
    )
    ap.add_argument("--python-ours", default=sys.executable)
    ap.add_argument("--python-hf", default=None, help="default bench/.envs/ref/bin/python")
    ap.add_argument("--python-gemma", default=str(HERE / ".envs" / "gemma" / "bin" / "python"))
    ap.add_argument("--out-dir", default=None, help="default bench/out/<timestamp>")
    ap.add_argument("--results", default=None, help="markdown file to write")
    ap.add_argument(
        "--render",
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="re-render saved results.json file(s) only (several are merged)",
    )
    ap.add_argument("--notes", default=None, help="with --render: markdown file to include")
    ap.add_argument(
        "--supplement",
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="with --render: runs shown as extra sections after the main one",
    )
    a = ap.parse_args(argv)
    gpu = a.device == "gpu"
    a.models = (a.models or ("1b,4b" if gpu else "270m" if a.quick else "270m,1b")).split(",")
    a.engines = (a.engines or ("ours,hf" if gpu else "ours,hf,gemma")).split(",")
    a.dtypes = (a.dtypes or ("bf16" if gpu else "fp32" if a.quick else "fp32,bf16")
                ).split(",")  # fmt: skip
    for name, values, allowed in (("models", a.models, common.ARCH), ("engines", a.engines,
                                  ENGINES), ("dtypes", a.dtypes, common.DTYPES)):  # fmt: skip
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; choose from {sorted(allowed)}")
    a.reps = a.reps or (1 if a.quick else 3)
    a.new_tokens = a.new_tokens or (8 if a.quick else 64)
    a.long_prompt_tokens = a.long_prompt_tokens or (300 if a.quick else 1000)
    a.timeout = a.timeout or (900 if a.quick else 2400)
    a.membw_gib = a.membw_gib or (0.25 if a.quick else (4.0 if gpu else 1.0))
    if a.membw_each is None:
        a.membw_each = not (a.quick or gpu or a.skip_membw)
    if a.paired is None:
        a.paired = 0 if (a.quick or gpu) else 7
    if a.duel is None:
        a.duel = not (a.quick or gpu) and {"ours", "hf"} <= set(a.engines)
    if a.python_hf is None:
        ref = HERE / ".envs" / "ref" / "bin" / "python"
        # On a GPU machine without our ref env, try the machine's own torch + transformers.
        a.python_hf = str(ref) if ref.exists() or not gpu else sys.executable
    if a.results is None:
        a.results = str(HERE / "out" / "RESULTS-quick.md" if a.quick else HERE / "RESULTS.md")
    return a


class LoadSampler:
    """Samples os.getloadavg() every `period` seconds in a background thread."""

    def __init__(self, period: float = 10.0):
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.is_set():
            self.samples.append((time.time(), *os.getloadavg()))
            self._stop.wait(period)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        one = [s[1] for s in self.samples]
        return {"n": len(one), "min_1m": min(one), "max_1m": max(one),
                "mean_1m": sum(one) / len(one)}  # fmt: skip


def run_subprocess(cmd, log_path: pathlib.Path, timeout: float, env=None) -> dict:
    """Runs `cmd` in a new session; returns rc, wall time, timeout flag and the child's peak RSS
    (from wait4's rusage, so also for a crashed or killed child)."""
    t0 = time.time()
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)  # fmt: skip
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not timed_out and time.time() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode, "wall_s": round(time.time() - t0, 1), "timed_out": timed_out,
        "child_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "load_before": load_before, "load_after": os.getloadavg(), "log": str(log_path),
    }  # fmt: skip


def tail(path, n=6) -> str:
    try:
        lines = [ln for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(ln.strip().replace("|", "/") for ln in lines[-n:])[-600:]


def run_membw(a, out_dir: pathlib.Path, tag: str) -> dict | None:
    out = out_dir / f"membw-{tag}.json"
    cmd = [a.python_ours, str(HERE / "membw.py"), "--gib", str(a.membw_gib), "--device",
           a.device, "--out", str(out)] + (["--reps", "2"] if a.quick else [])  # fmt: skip
    print(f"[membw {tag}] {shlex.join(cmd)}", flush=True)
    info = run_subprocess(cmd, out_dir / f"membw-{tag}.log", 900)
    if info["rc"] != 0 or not out.exists():
        print(f"[membw {tag}] failed: {tail(info['log'])}", flush=True)
        return None
    res = json.loads(out.read_text())
    res["command"] = shlex.join(
        [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd]
    )
    print(f"[membw {tag}] read bandwidth {res['read_gbs']:.1f} GB/s ({res['read_test']})")
    return res


def worker_python(a, engine) -> str:
    return {"ours": a.python_ours, "hf": a.python_hf, "gemma": a.python_gemma}[engine]


def run_worker(a, engine, model, dtype, out_dir: pathlib.Path) -> dict:
    row = {"engine": engine, "model": model, "dtype": dtype}
    if dtype not in SUPPORTED_DTYPES[engine]:
        return {**row, "status": "n/a (dtype not offered by this engine)"}
    python = worker_python(a, engine)
    if not pathlib.Path(python).exists():
        return {**row, "status": f"n/a (no env: {os.path.relpath(python, ROOT)})"}
    if engine == "gemma" and a.device == "gpu":
        return {**row, "status": "n/a (gemma 3.3.0 is measured on CPU only)"}
    stem = f"{engine}-{model}-{dtype}"
    out = out_dir / f"{stem}.json"
    paired = ["--paired", str(a.paired)] if engine == "ours" and a.paired else []
    cmd = worker_command(a, engine, model, dtype, "--out", str(out), *paired)
    env = worker_env(a)
    print(f"[{stem}] start (timeout {a.timeout}s), load {os.getloadavg()[0]:.2f}", flush=True)
    info = run_subprocess(cmd, out_dir / f"{stem}.log", a.timeout, env)
    data = json.loads(out.read_text()) if out.exists() else {}
    row.update(data)
    row["run"] = info
    row["command"] = shlex.join([os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                 for c in cmd])  # fmt: skip
    if data.get("phase") == "done" and info["rc"] == 0:
        row["status"] = "ok"
    elif info["timed_out"]:
        row["status"] = f"timeout after {a.timeout}s in phase {data.get('phase', '?')}"
    else:
        row["status"] = f"error rc={info['rc']} in phase {data.get('phase', '?')}: " + tail(
            info["log"], 3
        )
    print(f"[{stem}] {row['status']} in {info['wall_s']}s: stream {fmt(row.get('stream_tok_s'))}"
          f" tok/s, loop {fmt(row.get('loop_tok_s'))} tok/s", flush=True)  # fmt: skip
    return row


def worker_command(a, engine, model, dtype, *extra) -> list[str]:
    return [worker_python(a, engine), str(HERE / WORKERS[engine]), "--model", model, "--dtype", dtype,
            "--prompt-tokens", str(a.prompt_tokens), "--long-prompt-tokens",
            str(a.long_prompt_tokens), "--new-tokens", str(a.new_tokens), "--cache-length",
            str(a.cache_length), "--reps", str(a.reps), "--device", a.device, *extra]  # fmt: skip


def worker_env(a) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               BENCH_OURS_INIT=a.ours_init)  # fmt: skip
    if a.hf_threads:
        env["BENCH_HF_THREADS"] = str(a.hf_threads)
    return env


def duel_reply(proc) -> dict | str:
    """The next protocol line of a duel worker (common.serve_ttft); its log lines are skipped."""
    for line in proc.stdout:
        if line.startswith(common.DUEL_PREFIX):
            body = line[len(common.DUEL_PREFIX) :].strip()
            return body if body == "ready" else json.loads(body)
    raise RuntimeError(f"the {proc.args[1]} worker exited (rc {proc.wait()})")


def run_duel(a, model, dtype, out_dir: pathlib.Path) -> dict | None:
    """TTFT(100) of ours and HF, alternated rep by rep in two live workers (`--serve-ttft`).

    Each engine's own worker measures its TTFT minutes apart from the other's, and this
    machine's speed drifts by ±30% in that time. Here both are loaded at once, each idle while
    the other measures, and the order flips every pair (ours first, then HF first, ...)."""
    engines = ("ours", "hf")
    if any(dtype not in SUPPORTED_DTYPES[e] or not pathlib.Path(worker_python(a, e)).exists()
           for e in engines):  # fmt: skip
        return None
    stem = f"duel-{model}-{dtype}"
    t0, procs = time.time(), {}
    out = {"model": model, "dtype": dtype, "reps": a.duel_reps, "raw": {e: [] for e in engines}}
    watchdog = threading.Timer(a.timeout, lambda: [p.kill() for p in procs.values()])
    watchdog.start()
    print(f"[{stem}] {a.duel_reps} interleaved TTFT pairs", flush=True)
    with contextlib.ExitStack() as logs:
        try:
            for engine in engines:  # set up one at a time: each warms up alone
                cmd = worker_command(a, engine, model, dtype, "--serve-ttft")
                log = logs.enter_context(open(out_dir / f"{stem}-{engine}.log", "w"))
                log.write("$ " + shlex.join(cmd) + "\n")
                log.flush()
                procs[engine] = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                    env=worker_env(a), text=True,
                )  # fmt: skip
                if duel_reply(procs[engine]) != "ready":
                    raise RuntimeError(f"{engine}: no ready line")
            for i in range(a.duel_reps):
                for engine in engines if i % 2 == 0 else engines[::-1]:
                    time.sleep(a.duel_gap)
                    procs[engine].stdin.write("ttft\n")
                    procs[engine].stdin.flush()
                    out["raw"][engine].append(round(duel_reply(procs[engine])["ttft_s"], 4))
            out["status"] = "ok"
        except (RuntimeError, OSError, ValueError) as e:
            out["status"] = f"error: {e}"
        finally:
            watchdog.cancel()
            for p in procs.values():
                p.stdin.close()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    ours, hf = out["raw"]["ours"], out["raw"]["hf"]
    if out["status"] == "ok":
        out["ours_ttft_s"], out["hf_ttft_s"] = common.median(ours), common.median(hf)
        out["ours_faster"] = sum(o < h for o, h in zip(ours, hf, strict=True))
    out["wall_s"] = round(time.time() - t0, 1)
    print(f"[{stem}] {out['status']}: ours {fmt(out.get('ours_ttft_s'), 3)} s, HF "
          f"{fmt(out.get('hf_ttft_s'), 3)} s, ours faster in {out.get('ours_faster')} of "
          f"{len(ours)} pairs", flush=True)  # fmt: skip
    return out


# ---- derived figures and rendering --------------------------------------------------------


def fmt(x, digits=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def bound_for(row, cfg, bw_gbs):
    """(bytes per token, tok/s bound) for the bytes this row's engine reads per decode step."""
    if bw_gbs is None:
        return None, None
    model, dtype = row["model"], row["dtype"]
    param_bytes = (
        row.get("param_bytes") or common.num_params(model) * common.NBYTES[common.DTYPES[dtype][0]]
    )
    attended = cfg["prompt_tokens"] + cfg["new_tokens"] // 2  # mean filled length in decode
    policy = KV_POLICY[row["engine"]]
    policy = str(cfg["cache_length"]) if policy == "cache" else policy
    total = param_bytes + common.kv_bytes_per_token(model, dtype, attended, policy)
    return total, bw_gbs * 1e9 / total


def gemv_gbs(results) -> float | None:
    """Best matrix-vector read rate of the probes (NumPy BLAS `gemv`, XLA `xla_gemv_f32`).

    A batch-1 decode step is a chain of matrix-vector products; on CPUs where one GEMV cannot
    saturate memory (this 2-core box: ~36 GB/s vs ~54 GB/s for a threaded read), this is
    the rate a BLAS-quality kernel actually reaches, a second, tighter bound.
    """
    rates = [
        t["gbs"]
        for tag in ("start", "end")
        for name, t in (results.get(f"membw_{tag}") or {}).get("tests", {}).items()
        if name in ("gemv", "xla_gemv_f32")
    ]
    return max(rates) if rates else None


def adjacent_gbs(row) -> float | None:
    """The read bandwidth probed just before this row's worker (`--membw-each`), if any."""
    return (row.get("membw_before") or {}).get("read_gbs")


def paired_gbs(row) -> list[float]:
    """The bandwidth of each of the worker's `--paired` streaming reps: the mean of the two
    in-process probes around it."""
    return [(p["bw_before"] + p["bw_after"]) / 2 for p in row.get("paired") or ()]


def paired_pcts(row, cfg) -> list[float]:
    """% of the bound of each `--paired` streaming rep, at its `paired_gbs`."""
    return [
        100 * p["tok_s"] / bound_for(row, cfg, bw)[1]
        for p, bw in zip(row.get("paired") or (), paired_gbs(row), strict=True)
    ]


def paired_txt(row, cfg) -> str:
    pcts = paired_pcts(row, cfg)
    if not pcts:
        return "n/a"
    bws = paired_gbs(row)
    return (f"{statistics.median(pcts):.0f}% ({min(pcts):.0f}-{max(pcts):.0f}%; "
            f"{min(bws):.0f}-{max(bws):.0f} GB/s)")  # fmt: skip


def ok(row):
    return row.get("status") == "ok" or any(
        row.get(k) is not None for k in ("stream_tok_s", "loop_tok_s", "first_call_s")
    )


def rss(row):
    if row.get("paired"):  # the probe's arrays came after the benchmark's own peak
        return row.get("peak_rss_bench_mib")
    return row.get("run", {}).get("child_peak_rss_mib") or row.get("peak_rss_mib")


def row_load(row) -> str:
    run = row.get("run") or {}
    if not run.get("load_before"):
        return "n/a"
    return f"{run['load_before'][0]:.1f}→{run['load_after'][0]:.1f}"


def device_peak(row) -> str:
    peak = row.get("device_peak_mib")
    return f"; GPU peak {fmt(peak, 0)}" if peak else ""


def main_table(results) -> list[str]:
    cfg, bw = results["config"], results.get("bandwidth_gbs")
    head = ("| model | dtype | engine | stream tok/s | non-stream tok/s | "
            "TTFT 100 (s) | TTFT {L} (s) | first call (s) | compile (s) | recompiles t2/t3 | "
            "peak RSS (after init) MiB | bound tok/s | stream % of bound | "
            "stream % of bound at the bw probed just before | stream % of bound, paired "
            "in-process probes: median (range; bw) | stream % of GEMV bound | load | "
            "status |").format(
        L=cfg["long_prompt_tokens"])  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in results["rows"]:
        if not ok(row):
            lines.append(f"| {row['model']} | {row['dtype']} | {row['engine']} |" + " |" * (head.count("|") - 5)
                         + f" {row['status'].replace('|', '/')} |")  # fmt: skip
            continue
        _, bound = bound_for(row, cfg, bw)
        stream = row.get("stream_tok_s")
        pct = f"{100 * stream / bound:.0f}%" if stream and bound else "n/a"
        _, gemv_bound = bound_for(row, cfg, gemv_gbs(results))
        gemv_pct = f"{100 * stream / gemv_bound:.0f}%" if stream and gemv_bound else "n/a"
        near_bw = adjacent_gbs(row)
        _, near = bound_for(row, cfg, near_bw)
        near_pct = f"{100 * stream / near:.0f}% ({near_bw:.1f} GB/s)" if stream and near else "n/a"
        t2, t3 = row.get("compiles_turn2"), row.get("compiles_turn3")
        recompiles = "n/a" if t2 is None else f"{t2}/{fmt(t3)}"
        if row["engine"] == "hf":
            recompiles = "eager (0/0)"
        compile_s = row.get("compile_s")
        compile_txt = "eager" if row["engine"] == "hf" else fmt(compile_s)
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['engine']} | {fmt(stream)} | "
            f"{fmt(row.get('loop_tok_s'))} | {fmt(row.get('ttft_100_s'), 3)} | "
            f"{fmt(row.get('ttft_long_s'), 3)} | {fmt(row.get('first_call_s'), 1)} | "
            f"{compile_txt} | {recompiles} | {fmt(rss(row), 0)} "
            f"({fmt(row.get('rss_after_init_mib'), 0)}){device_peak(row)} | {fmt(bound, 1)} | "
            f"{pct} | {near_pct} | {paired_txt(row, cfg)} | {gemv_pct} | {row_load(row)} | "
            f"{row['status']} |"
        )
    return lines


def pick(results, engine, model, dtype=None):
    for row in results["rows"]:
        same = (row["engine"], row["model"]) == (engine, model) and dtype in (None, row["dtype"])
        if same and ok(row):
            yield row


def best(rows, key):
    rows = [r for r in rows if r.get(key)]
    return max(rows, key=lambda r: r[key]) if rows else None


def ratio(x, y):
    return x / y if x and y else None


def check(value, target, higher=True):
    if value is None:
        return "n/a"
    good = value >= target if higher else value <= target
    return "meets" if good else "MISSES"


def targets(results) -> list[str]:
    """The issue's target ratios, per model."""
    cfg, bw = results["config"], results.get("bandwidth_gbs")
    out = []
    for model in cfg["models"]:
        ours_best = best(pick(results, "ours", model), "stream_tok_s")
        if ours_best is None:
            continue
        s = ours_best["stream_tok_s"]
        out.append(f"\n**{model}** — our best streaming: {fmt(s)} tok/s "
                   f"({ours_best['dtype']})\n")  # fmt: skip
        out.append("| target | figure | ratio | verdict |")
        out.append("|---|---|---|---|")
        hf_rows = list(pick(results, "hf", model))
        hf_dec = [(max(r.get("loop_tok_s") or 0, r.get("stream_tok_s") or 0), r) for r in hf_rows]
        hf_dec = [x for x in hf_dec if x[0]]
        if hf_dec:
            v, r = max(hf_dec, key=lambda x: x[0])
            q = ratio(s, v)
            out.append(f"| stream ≥ 1.2× HF decode (best dtype each) | HF {fmt(v)} tok/s "
                       f"({r['dtype']}, best of its generate and streamer) | {fmt(q)}× | "
                       f"{check(q, 1.2)} |")  # fmt: skip
        else:
            out.append("| stream ≥ 1.2× HF decode | HF n/a | n/a | n/a |")
        g = best(pick(results, "gemma", model), "stream_tok_s")
        if g:
            q = ratio(s, g["stream_tok_s"])
            out.append(f"| stream ≥ 4× gemma 3.3.0 streaming (best dtype each) | gemma "
                       f"{fmt(g['stream_tok_s'])} tok/s ({g['dtype']}) | {fmt(q)}× | "
                       f"{check(q, 4)} |")  # fmt: skip
        else:
            out.append("| stream ≥ 4× gemma streaming | gemma n/a | n/a | n/a |")
        for row in pick(results, "ours", model):
            _, bound = bound_for(row, cfg, bw)
            q = ratio(row.get("stream_tok_s"), bound)
            _, near = bound_for(row, cfg, adjacent_gbs(row))
            qn = ratio(row.get("stream_tok_s"), near)
            aside = "" if qn is None else (
                f"; at the {fmt(adjacent_gbs(row), 1)} GB/s probed just before: bound "
                f"{fmt(near, 1)} tok/s, {fmt(100 * qn, 0)}%")  # fmt: skip
            out.append(f"| stream ≥ 80% of bandwidth bound ({row['dtype']}) | bound "
                       f"{fmt(bound, 1)} tok/s at the run's best {fmt(bw, 1)} GB/s{aside} | "
                       f"{fmt(100 * q if q else None, 0)}% | {check(q, 0.8)} (best bw) |")  # fmt: skip
            pcts = paired_pcts(row, cfg)
            if pcts:
                q = statistics.median(pcts) / 100
                out.append(f"| stream ≥ 80% of bandwidth bound, paired ({row['dtype']}) | "
                           f"{len(pcts)} streaming reps, each at the mean of in-process probes "
                           f"just before and after it: {paired_txt(row, cfg)} | median "
                           f"{fmt(100 * q, 0)}% | {check(q, 0.8)} (paired) |")  # fmt: skip
        for row in pick(results, "ours", model):
            h = next(pick(results, "hf", model, row["dtype"]), None)
            if h is None:  # bf16-fp32 has no HF twin: compare with HF's best TTFT
                h = min((r for r in hf_rows if r.get("ttft_100_s")),
                        key=lambda r: r["ttft_100_s"], default=None)  # fmt: skip
            q = ratio(row.get("ttft_100_s"), h and h.get("ttft_100_s"))
            out.append(f"| TTFT 100 ≤ HF's ({row['dtype']} vs HF {h['dtype'] if h else 'n/a'}) "
                       f"| ours {fmt(row.get('ttft_100_s'), 3)} s, HF "
                       f"{fmt(h.get('ttft_100_s') if h else None, 3)} s | {fmt(q)}× | "
                       f"{check(q, 1.0, higher=False)} |")  # fmt: skip
        for d in results.get("duels", ()):
            if d["model"] != model or d.get("ours_ttft_s") is None:
                continue
            q = ratio(d["ours_ttft_s"], d["hf_ttft_s"])
            out.append(f"| TTFT 100 ≤ HF's, interleaved duel ({d['dtype']}) | ours "
                       f"{fmt(d['ours_ttft_s'], 3)} s, HF {fmt(d['hf_ttft_s'], 3)} s (medians of "
                       f"{len(d['raw']['ours'])} alternated pairs; ours faster in "
                       f"{d['ours_faster']}) | {fmt(q)}× | {check(q, 1.0, higher=False)} |")  # fmt: skip
        for row in pick(results, "ours", model):
            t2, t3 = row.get("compiles_turn2"), row.get("compiles_turn3")
            zero = "meets" if (t2, t3) == (0, 0) else ("n/a" if t2 is None else "MISSES")
            out.append(f"| 0 recompilations on turns 2, 3 ({row['dtype']}) | {t2}, {t3} | — | "
                       f"{zero} |")  # fmt: skip
        for row in pick(results, "ours", model):
            g = next(pick(results, "gemma", model, row["dtype"]), None)
            q = ratio(row.get("compile_s"), g and g.get("compile_s"))
            out.append(f"| first-call compile ≤ 0.5× gemma's ({row['dtype']}) | ours "
                       f"{fmt(row.get('compile_s'))} s, gemma "
                       f"{fmt(g.get('compile_s') if g else None)} s (first call: ours "
                       f"{fmt(row.get('first_call_s'), 1)} s, gemma "
                       f"{fmt(g.get('first_call_s') if g else None, 1)} s) | {fmt(q)}× | "
                       f"{check(q, 0.5, higher=False)} |")  # fmt: skip
    return out


def render(results, supplements=None, notes=None) -> str:
    cfg = results["config"]
    m = results["machine"]
    load = results.get("load", {})
    versions = {}
    for r in results["rows"]:
        for k in ("jax", "torch", "transformers", "gemma"):
            if r.get(k):
                versions[k] = r[k]
    layouts = sorted({r["layout"] for r in results["rows"] if r.get("layout")})
    layout_txt = f" Our decoder layers: {', '.join(layouts)}." if layouts else ""
    lines = [
        "# Benchmark results (issue 5)",
        "",
        f"Run {results['started']} → {results['finished']} ({results['wall_min']:.0f} min) "
        f"on `{m.get('cpu', '?')}`, {m.get('cpu_count')} cores, {m.get('mem_total_gib')} GiB "
        f"RAM, {m.get('platform')}.",
        "",
        f"**Load average** (os.getloadavg(), 1 min, sampled every 10 s during the run): min "
        f"{fmt(load.get('min_1m'))}, mean {fmt(load.get('mean_1m'))}, max "
        f"{fmt(load.get('max_1m'))}; at start {fmt(results['load_start'][0])}, at end "
        f"{fmt(results['load_end'][0])}. "
        + (
            "The machine was shared with other jobs: absolute numbers are noisy. "
            if (load.get("mean_1m") or 0) > 0.5 * (m.get("cpu_count") or 1)
            else ""
        ),
        "",
        f"Protocol: random weights, batch 1, greedy, {cfg['prompt_tokens']}-token chat-templated "
        f"prompt, {cfg['new_tokens']} new tokens with end tokens forbidden (every run "
        f"generates exactly that many), TTFT also for a {cfg['long_prompt_tokens']}-token "
        f"prompt, cache length {cfg['cache_length']}, medians of {cfg['reps']} after a "
        f"warm-up; device `{cfg['device']}`; XLA_FLAGS=`{cfg.get('xla_flags') or ''}`."
        + layout_txt,
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        *([notes.rstrip(), ""] if notes else []),
        "## Command",
        "",
        "```",
        results["command"],
        *(
            [f"# this file rendered with: {results['render_command']}"]
            if results.get("render_command")
            else []
        ),
        "```",
        "",
        "## Memory bandwidth",
        "",
    ]
    for tag in ("start", "end"):
        bw = results.get(f"membw_{tag}")
        if bw:
            tests = ", ".join(f"{k} {v['gbs']:.1f}" for k, v in bw["tests"].items())
            lines.append(f"- {tag}: {tests} GB/s (load {fmt(bw['loadavg'][0])}); "
                         f"`{bw['command']}`")  # fmt: skip
    near = [(r, adjacent_gbs(r)) for r in results["rows"] if adjacent_gbs(r)]
    if near:
        probes = ", ".join(f"{r['engine']} {r['model']} {r['dtype']} {g:.1f}" for r, g in near)
        lines.append(f"- just before each worker (`--membw-each`), read GB/s: {probes}")
    bwv = results.get("bandwidth_gbs")
    lines += [
        "",
        f"Bound bandwidth: **{fmt(bwv, 1)} GB/s** (best read-only median of all probes); "
        f"GEMV bound bandwidth: **{fmt(gemv_gbs(results), 1)} GB/s** (best of NumPy's BLAS "
        "`gemv` and XLA's `xla_gemv_f32`: what a matrix-vector product, the batch-1 decode "
        "pattern, reaches here; the *stream % of GEMV bound* column uses it). "
        "Bound tok/s = that / bytes read per decode step: every weight once in its STORAGE "
        "dtype (the tied 262144-row embedding is read whole by the logits product) plus the KV "
        "cache the engine reads at the mean decode length (ours: used 256-slot chunks, local "
        "layers ≤ 768 slots; HF: used positions; gemma 3.3.0: the whole cache on every layer). "
        "For bf16-fp32 the bound counts bf16 bytes (what an ideal kernel reads); an engine "
        "that converts to fp32 each step moves more.",
        "",
        "## Results",
        "",
        *main_table(results),
        "",
        "Columns: *stream* = tokens/s from the gaps between streamed tokens (ours "
        "`Sampler.generate`, HF `generate(streamer=)`, gemma `Sampler.sample(stream=True)`). "
        "*non-stream* = decode tokens/s of one jitted loop / one `generate` call: ours "
        "(N-1)/(time of `generate_all` after a synced prefill), HF (N-1)/(generate(N) - "
        "generate(1)), gemma N/(ChatSampler.chat - prefill) as the anchor figures. *TTFT* = prefill to the first "
        "token on the host (HF: generate(max_new_tokens=1); gemma: first streamed token, which "
        "includes one decode step). *first call* = wall time of the process's first chat call "
        "(ours `Engine.new_chat().chat`, gemma `ChatSampler.chat`, both 64 tokens; HF the first "
        "`generate`); *compile* = JAX tracing + lowering + XLA compile seconds inside it (same "
        "listener for ours and gemma). *recompiles t2/t3* = XLA compilations during chat turns "
        "2 and 3 of a multi-turn chat. *peak RSS* = the worker process's ru_maxrss (random "
        "weights included; ours and gemma make them leaf by leaf), in brackets the RSS right "
        "after the weights exist. *load* = 1-minute load average when the worker started → "
        "ended. *dtype*: fp32; bf16 = bf16 weights, computed in bf16 by HF and gemma, and by ours "
        "as the engine serves a bf16 request (`engine.resolve_dtype`: fp32 activations on CPU; "
        "gemma_app/kernels multiply the bf16 weights by bf16-rounded activations and sum in "
        "fp32, as bf16 matmuls do on accelerators; `compute_dtype` in the JSON); bf16-fp32 "
        "(ours only, `--dtypes`): stored bf16, fp32 activations (on CPU the same as bf16).",
        "",
        "## Targets (ratios from this run)",
        *targets(results),
        "",
        *duel_section(results),
        "## Per-worker commands",
        "",
        "```",
        *[r["command"] for r in results["rows"] if r.get("command")],
        "```",
        "",
        f"Raw JSON and logs: `{results['out_dir']}` (git-ignored).",
        "",
    ]
    for extra in supplements or ():
        lines += supplement_section(extra)
    return "\n".join(lines)


def duel_section(results) -> list[str]:
    """The raw TTFT pairs of `--duel` (run_duel)."""
    duels = results.get("duels")
    if not duels:
        return []
    lines = [
        "## TTFT duels",
        "",
        "Ours and HF loaded side by side, TTFT(100) measured in alternation, the order flipped "
        "every pair, each measurement after "
        f"{results['config'].get('duel_gap', 1.0)} s of quiet (`run_duel`): both see the same "
        "minutes of a machine whose speed drifts, and each starts idle, as a chat message "
        "does (the workers' own TTFT reps run back to back). Seconds, in measurement order:",
        "",
    ]
    for d in duels:
        raw = d["raw"]
        lines.append(f"- {d['model']} {d['dtype']} ({d['status']}, {d['wall_s']} s): ours "
                     f"{raw['ours']}; HF {raw['hf']}")  # fmt: skip
    return lines + [""]


def supplement_section(results) -> list[str]:
    """Another run (e.g. a rerun in a quiet window) rendered after the main one."""
    load, cfg = results.get("load", {}), results["config"]
    bws = ", ".join(
        f"{tag} {results[f'membw_{tag}']['read_gbs']:.1f}"
        for tag in ("start", "end")
        if results.get(f"membw_{tag}")
    )
    return [
        f"## Supplementary run, {results['started']} ({results['wall_min']:.0f} min)",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Load average (1 min) during it: min {fmt(load.get('min_1m'))}, mean "
        f"{fmt(load.get('mean_1m'))}, max {fmt(load.get('max_1m'))}. Read bandwidth: {bws} "
        f"GB/s → bound bandwidth {fmt(results.get('bandwidth_gbs'), 1)} GB/s; best GEMV "
        f"{fmt(gemv_gbs(results), 1)} GB/s. Same protocol "
        f"({cfg['new_tokens']} tokens, medians of {cfg['reps']}).",
        "",
        *main_table(results),
        "",
        "Targets from this run:",
        *targets(results),
        "",
        *duel_section(results),
        f"Raw JSON and logs: `{results['out_dir']}`.",
        "",
    ]


def merge(runs: list[dict]) -> dict:
    """One results dict from several runs (e.g. one device call per model): rows concatenated,
    the best bandwidth, the load range over all of them."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    out["rows"] = [row for r in runs for row in r["rows"]]
    out["duels"] = [d for r in runs for d in r.get("duels", ())]
    out["command"] = "\n".join(r["command"] for r in runs)
    out["config"] = dict(runs[0]["config"])
    for key in ("models", "engines", "dtypes"):
        out["config"][key] = list(dict.fromkeys(v for r in runs for v in r["config"][key]))
    bws = [r.get("bandwidth_gbs") for r in runs if r.get("bandwidth_gbs")]
    out["bandwidth_gbs"] = max(bws) if bws else None
    loads = [r["load"] for r in runs if r.get("load")]
    if loads:
        out["load"] = {
            "n": sum(x["n"] for x in loads), "min_1m": min(x["min_1m"] for x in loads),
            "max_1m": max(x["max_1m"] for x in loads),
            "mean_1m": sum(x["mean_1m"] * x["n"] for x in loads) / sum(x["n"] for x in loads),
        }  # fmt: skip
    out["started"], out["finished"] = runs[0]["started"], runs[-1]["finished"]
    out["load_end"] = runs[-1]["load_end"]
    out["wall_min"] = sum(r["wall_min"] for r in runs)
    out["out_dir"] = ", ".join(r["out_dir"] for r in runs)
    for tag in ("membw_start", "membw_end"):
        out[tag] = next((r[tag] for r in runs if r.get(tag)), None)
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.render:
        results = merge([json.loads(pathlib.Path(p).read_text()) for p in a.render])
        argv_ = [os.path.relpath(sys.argv[0], ROOT), *(argv if argv is not None else sys.argv[1:])]
        results["render_command"] = "python " + shlex.join(argv_)
        print("\n".join(main_table(results)))
        print("\n".join(targets(results)))
        extra = [json.loads(pathlib.Path(p).read_text()) for p in a.supplement or ()]
        notes = pathlib.Path(a.notes).read_text() if a.notes else None
        pathlib.Path(a.results).write_text(render(results, extra, notes))
        print(f"wrote {a.results}")
        return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = pathlib.Path(a.out_dir or HERE / "out" / (stamp + ("-quick" if a.quick else "")))
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = LoadSampler()
    t0 = time.time()
    keys = ("device", "models", "engines", "dtypes", "reps", "prompt_tokens",
            "long_prompt_tokens", "new_tokens", "cache_length", "timeout", "quick",
            "hf_threads", "ours_init", "duel", "duel_reps", "duel_gap", "paired")  # fmt: skip
    config = {k: getattr(a, k) for k in keys}
    config["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    results = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": common.machine_info(),
        "load_start": os.getloadavg(),
        "out_dir": os.path.relpath(out_dir, ROOT),
        "config": config,
        "rows": [],
    }
    # The shared tokenizer for the chat phases (ours and gemma), built once up front.
    subprocess.run([a.python_ours, str(HERE / "fake_tokenizer.py")], cwd=ROOT, check=False)
    if not a.skip_membw:
        results["membw_start"] = run_membw(a, out_dir, "start")
    for model in a.models:
        for dtype in a.dtypes:
            for engine in a.engines:
                before = None
                if a.membw_each and dtype in SUPPORTED_DTYPES[engine]:
                    before = run_membw(a, out_dir, f"before-{engine}-{model}-{dtype}")
                row = run_worker(a, engine, model, dtype, out_dir)
                if before:
                    row["membw_before"] = {k: before[k] for k in ("read_gbs", "read_test")}
                results["rows"].append(row)
                (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
            duel = run_duel(a, model, dtype, out_dir) if a.duel else None
            if duel:
                results.setdefault("duels", []).append(duel)
                (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if not a.skip_membw:
        results["membw_end"] = run_membw(a, out_dir, "end")
    bws = [results[k]["read_gbs"] for k in ("membw_start", "membw_end") if results.get(k)]
    bws += [g for g in map(adjacent_gbs, results["rows"]) if g]
    results["bandwidth_gbs"] = max(bws) if bws else None
    results["load"] = sampler.stop()
    results["load_samples"] = sampler.samples
    results["load_end"] = os.getloadavg()
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["wall_min"] = (time.time() - t0) / 60
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = render(results)
    print()
    print("\n".join(main_table(results)))
    print("\n".join(targets(results)))
    pathlib.Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.results).write_text(text)
    print(f"\nwrote {a.results} and {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
