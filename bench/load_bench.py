"""Load benchmark: wall time and peak RSS of restoring a ~1B-parameter orbax checkpoint.

Not a test. Run from the repository root (needs ~2 GB of disk and ~6 GB of RAM):

    python bench/load_bench.py [--preset gemma3-1b] [--layout FLAT] [--dtype bfloat16]

1. Writes random weights of the preset (bf16 on disk, the given orbax layout) into a
   temporary directory, in a subprocess.
2. Loads them with `gemma_app.ckpt.load_params` in another FRESH subprocess, so its
   `ru_maxrss` (peak resident set size) covers the load only: Python, JAX and orbax
   included, nothing left over from writing. (Linux carries `ru_maxrss` over fork + exec,
   so this parent process stays small: it imports neither numpy nor JAX.)
3. Prints wall time, peak RSS and their ratio to the loaded parameter bytes (target: peak
   RSS <= 1.3x parameter bytes), then deletes the checkpoint (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TARGET_RATIO = 1.3


def write_checkpoint(path: pathlib.Path, preset: str, layout: str) -> int:
    """Random bf16 weights of `preset` (std 0.02) as an orbax checkpoint; returns #params."""
    import ml_dtypes
    import numpy as np

    from gemma_app.ckpt import layouts, orbax_io
    from gemma_app.ckpt.hf_map import param_shapes
    from gemma_app.nn.presets import get_preset

    config = get_preset(preset)
    rng = np.random.default_rng(0)
    flat = {
        name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        for name, shape in param_shapes(config).items()
    }
    pattern_len = layouts.pattern_length(config.attention_types)
    orbax_io.save(path, flat, layout, pattern_len=pattern_len)
    return sum(int(v.size) for v in flat.values())


def load_in_this_process(path: str, preset: str, dtype: str) -> dict:
    """Runs in the fresh subprocess: import, load, report (JSON on stdout's last line)."""
    start = time.perf_counter()
    import jax

    from gemma_app.ckpt import load_params
    from gemma_app.nn.presets import get_preset

    jax.devices()  # start the backend before measuring the baseline
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    imported = time.perf_counter()
    params = load_params(path, get_preset(preset), dtype=dtype)
    jax.block_until_ready(params)
    loaded = time.perf_counter()
    leaves = jax.tree.leaves(params)
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "param_bytes": sum(x.nbytes for x in leaves),
        "num_params": sum(x.size for x in leaves),
        "dtype": str(leaves[0].dtype),
        "backend": jax.default_backend(),
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(result: dict, layout: str) -> None:
    gb = result["param_bytes"] / 2**30
    peak = result["peak_rss_mb"] / 1024
    ratio = peak / gb
    above = (result["peak_rss_mb"] - result["baseline_rss_mb"]) / 1024
    print(f"preset params     : {result['num_params']:,} ({result['dtype']}, {layout})")
    print(f"parameter bytes   : {gb:.3f} GiB")
    print(f"load wall time    : {result['load_s']:.2f} s (imports {result['import_s']:.2f} s)")
    print(
        f"peak RSS          : {peak:.3f} GiB = {ratio:.3f}x parameter bytes (target <= {TARGET_RATIO}x)"
    )
    print(f"  of which baseline (python + jax + orbax): {result['baseline_rss_mb'] / 1024:.3f} GiB")
    print(f"  above baseline  : {above:.3f} GiB = {above / gb:.3f}x parameter bytes")
    print("PASS" if ratio <= TARGET_RATIO else "FAIL: peak RSS above target")


def _run(arguments: list[str]):
    """Runs this script in a fresh interpreter; returns the JSON of its last stdout line."""
    command = [sys.executable, __file__, *arguments]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma3-1b")
    parser.add_argument("--layout", default="FLAT", choices=["FLAT", "NESTED", "STACKED"])
    parser.add_argument("--dtype", default="bfloat16", help="target dtype of the load")
    parser.add_argument("--dir", help="where to write (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the checkpoint")
    parser.add_argument("--load-only", help=argparse.SUPPRESS)  # subprocess modes
    parser.add_argument("--write-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:
        print(json.dumps(load_in_this_process(args.load_only, args.preset, args.dtype)))
        return
    if args.write_only:
        print(json.dumps(write_checkpoint(pathlib.Path(args.write_only), args.preset, args.layout)))
        return

    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="load_bench_"))
    ckpt = root / f"{args.preset}-{args.layout.lower()}"
    try:
        start = time.perf_counter()
        common = ["--preset", args.preset, "--layout", args.layout, "--dtype", args.dtype]
        if ckpt.exists():  # kept from an earlier --keep run
            print(f"reusing {ckpt}")
        else:
            count = _run([*common, "--write-only", str(ckpt)])
            took = time.perf_counter() - start
            print(f"wrote {count:,} params in {took:.1f} s")
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        print(f"checkpoint        : {ckpt} ({size / 2**30:.3f} GiB on disk)")
        report(_run([*common, "--load-only", str(ckpt)]), args.layout)
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            if not args.dir:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
