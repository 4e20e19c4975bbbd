"""Memory bandwidth of this machine, for the decode bound (bytes read per token / bandwidth).

    python bench/membw.py [--gib 1] [--reps 5] [--device cpu|gpu] [--out membw.json]

CPU (NumPy, arrays far larger than the last-level cache; each test warmed once, medians):
  gemv      W @ x, W float32 of --gib GiB, BLAS threads: read-only, the batch-1 decode pattern
  dot       np.dot over two float32 halves, one chunk per thread (threads release the GIL)
  copy      np.copyto, one chunk per thread: STREAM convention, read + write bytes counted
and, when JAX is importable, what XLA itself reaches (our engine's compiler):
  xla_gemv_f32 / xla_gemv_bf16   jitted W @ x with W float32 / bfloat16 (read-only)
  xla_sum_f32                    jitted sum of the float32 array (read-only)
GPU (JAX on the default accelerator): the xla_* tests on --gib GiB, plus xla_copy_f32.

`read_gbs` (the bound's bandwidth) is the best median of the read-only tests.

`ReadProbe` keeps the CPU read tests ready to rerun, for a benchmark worker to probe the
bandwidth in its own process right before and after a measurement (worker_ours.py --paired).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import numpy as np


def timed(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def in_threads(work, nthreads):
    def run():
        threads = [threading.Thread(target=work, args=(i, nthreads)) for i in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return run


def part(i, t, length):
    return slice(length * i // t, length * (i + 1) // t)


def numpy_tests(a: np.ndarray, b: np.ndarray, threads: int) -> dict:
    """name -> (fn, bytes moved, read-only) of the NumPy tests on two float32 arrays."""
    n = a.size
    rows = 8192
    w = a[: n - n % rows].reshape(rows, -1)
    x = np.ones(w.shape[1], np.float32)
    sink = [0.0] * threads

    def dot_chunk(i, t):
        s = part(i, t, n)
        sink[i] = float(np.dot(a[s], b[s]))

    def copy_chunk(i, t):
        s = part(i, t, n)
        np.copyto(b[s], a[s])

    return {
        "gemv": (lambda: w @ x, w.nbytes, True),
        "dot": (in_threads(dot_chunk, threads), 2 * a.nbytes, True),
        "copy": (in_threads(copy_chunk, threads), 2 * a.nbytes, False),
    }


def xla_fns(a: np.ndarray | None, gib: float = 1.0, bf16: bool = True) -> dict:
    """name -> (fn, bytes moved, read-only) of the jitted tests; {} without JAX. `a`: the host
    array to copy in (CPU), or None to allocate `gib` GiB on the accelerator."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    if a is None:
        n = int(gib * 2**30 / 4)
        a32 = jnp.ones((n,), jnp.float32)
    else:
        n = a.size
        a32 = jnp.asarray(a)
    rows = 8192
    w32 = a32[: n - n % rows].reshape(rows, -1)
    x32 = jnp.ones((w32.shape[1],), jnp.float32)
    gemv = jax.jit(lambda w, x: w @ x)
    total = jax.jit(jnp.sum)
    tests = {"xla_gemv_f32": (lambda: gemv(w32, x32).block_until_ready(), w32.nbytes, True)}
    if bf16:
        w16, x16 = w32.astype(jnp.bfloat16), x32.astype(jnp.bfloat16)
        tests["xla_gemv_bf16"] = (lambda: gemv(w16, x16).block_until_ready(), w16.nbytes, True)
    tests["xla_sum_f32"] = (lambda: total(a32).block_until_ready(), a32.nbytes, True)
    if jax.default_backend() != "cpu":  # on CPU a fresh output buffer measures page faults
        copy = jax.jit(lambda v: v + 1)  # reads and writes the array (not donated)
        tests["xla_copy_f32"] = (lambda: copy(a32).block_until_ready(), 2 * a32.nbytes, False)
    return tests


def measure(tests: dict, reps: int) -> dict:
    results = {}
    for name, (fn, nbytes, read_only) in tests.items():
        gbs = [nbytes / t / 1e9 for t in timed(fn, reps)]
        results[name] = {"gbs": statistics.median(gbs), "raw": gbs, "read_only": read_only}
    return results


def cpu_tests(gib: float, reps: int, threads: int) -> dict:
    n = int(gib * 2**30 / 4)  # float32 elements
    a = np.full(n, 1.0, np.float32)
    b = np.full(n, 2.0, np.float32)
    return {**measure(numpy_tests(a, b, threads), reps), **xla_tests(a, reps)}


def xla_tests(a: np.ndarray | None, reps: int, gib: float = 1.0) -> dict:
    tests = xla_fns(a, gib)
    if not tests:
        return {}
    import jax

    return {**measure(tests, reps), "_xla_backend": jax.default_backend()}


class ReadProbe:
    """The CPU read tests of this file, kept to be rerun: a benchmark worker probes the
    bandwidth right before and after a measurement (bench/worker_ours.py --paired). `gbs()` is
    the best median of the read-only tests, the bound's convention (`read_gbs`); XLA's bf16
    GEMV (~1 GB/s here) is left out. Holds 3 x `gib` GiB (two NumPy arrays, XLA's copy)."""

    def __init__(self, gib: float = 1.0, threads: int | None = None):
        n = int(gib * 2**30 / 4)
        a, b = np.full(n, 1.0, np.float32), np.full(n, 2.0, np.float32)
        tests = {**numpy_tests(a, b, threads or os.cpu_count()), **xla_fns(a, bf16=False)}
        self.tests = {k: v for k, v in tests.items() if v[2]}

    def gbs(self, reps: int = 3) -> tuple[float, str]:
        """(best median GB/s of `reps` reads after a warm one, the test that gave it)."""
        results = measure(self.tests, reps)
        best = max(results, key=lambda k: results[k]["gbs"])
        return results[best]["gbs"], best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="array size in GiB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        tests = cpu_tests(args.gib, args.reps, args.threads)
    else:
        tests = xla_tests(None, args.reps, args.gib)
    backend = tests.pop("_xla_backend", None)
    read = {k: v["gbs"] for k, v in tests.items() if v["read_only"]}
    best = max(read, key=read.get)
    out = {
        "device": args.device, "xla_backend": backend, "gib": args.gib, "reps": args.reps,
        "threads": args.threads, "tests": tests, "read_gbs": read[best], "read_test": best,
        "loadavg": os.getloadavg(),
    }  # fmt: skip
    for name, v in tests.items():
        kind = "read" if v["read_only"] else "read+write"
        print(f"{name:14s} {v['gbs']:7.1f} GB/s ({kind})")
    print(f"bound bandwidth: {read[best]:.1f} GB/s ({best})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
