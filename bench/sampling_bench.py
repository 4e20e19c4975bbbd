"""Micro-benchmark of the sampling methods on one [1, 262144] logits row under jit.

Not a test. Run from the repository root:

    python bench/sampling_bench.py [--vocab 262144] [--iters 200]

Logits are gemma-like (a few peaked tokens over a long tail). Top-p is timed twice: on the
peaked row (top-MAX_TOP_K fast path) and on a flat row (the exact bisection fallback).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gemma_app.text import sampling  # noqa: E402


def _time_ms(step: Callable, logits: jax.Array, iters: int) -> float:
    """Median wall time of `step(logits, rng)`, in milliseconds, excluding compilation."""
    rng = jax.random.key(0)
    step(logits, rng).block_until_ready()
    times = []
    for i in range(iters):
        key = jax.random.fold_in(rng, i)
        start = time.perf_counter()
        step(logits, key).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def _zipf_logits(rng: jax.Array, vocab: int, exponent: float) -> jax.Array:
    """[1, vocab] logits with p(rank r) ~ r^-exponent, ranks shuffled over the ids."""
    ranks = jax.random.permutation(rng, vocab) + 1
    return (-exponent * jnp.log(ranks.astype(jnp.float32)))[None]


def _nucleus_size(logits: jax.Array, p: float) -> int:
    """Number of tokens top-p keeps (reference computation with a float64 sort)."""
    probs = np.sort(np.asarray(jax.nn.softmax(logits[0]), np.float64))[::-1]
    return int(np.sum(np.cumsum(probs) < p)) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()

    peaked = _zipf_logits(jax.random.key(1), args.vocab, exponent=1.5)
    flat = 0.01 * jax.random.normal(jax.random.key(2), (1, args.vocab), jnp.float32)
    for name, logits in (("peaked", peaked), ("flat", flat)):
        print(f"{name} row: top-p 0.95 nucleus = {_nucleus_size(logits, 0.95)} tokens")
    cases = [
        ("Greedy()", sampling.Greedy(), peaked),
        ("RandomSampling(T=1)", sampling.RandomSampling(), peaked),
        ("TopkSampling(k=64)", sampling.TopkSampling(k=64), peaked),
        ("TopPSampling(p=0.95), fast path", sampling.TopPSampling(p=0.95), peaked),
        ("TopPSampling(p=0.95), flat: fallback", sampling.TopPSampling(p=0.95), flat),
        ("MinPSampling(p=0.05)", sampling.MinPSampling(p=0.05), peaked),
        ("TopkTopPSampling(k=64, p=0.95)", sampling.TopkTopPSampling(k=64, p=0.95), peaked),
    ]
    # The method is a jit argument, exactly as in the decode step.
    run_method = jax.jit(lambda method, x, r: method(x, r))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, logits [1, {args.vocab}]")
    for name, method, logits in cases:
        step = functools.partial(run_method, method)
        print(f"  {name:40s} {_time_ms(step, logits, args.iters):7.3f} ms")
    baseline = jax.jit(lambda x, r: jax.random.categorical(r, x))
    name = "jax.random.categorical (reference)"
    print(f"  {name:40s} {_time_ms(baseline, peaked, args.iters):7.3f} ms")


if __name__ == "__main__":
    main()
