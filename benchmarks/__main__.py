"""Benchmark runner: `python -m benchmarks layer [--backends ...] [--quick]`.

The Keras backend is fixed per process, so each backend runs in its own
subprocess (`KERAS_BACKEND=<backend> python -m benchmarks.layer_overhead
--out <file>`); this process then combines the per-backend JSON files into
a markdown report.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from benchmarks import common

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
RESULTS_DIR = os.path.join(BENCHMARKS_DIR, "results")
BACKENDS = ("jax", "tensorflow", "torch")


def run_layer(args, command):
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        print(f"Unknown backend(s) {unknown}; choose from {BACKENDS}.")
        return 2
    date = datetime.date.today().isoformat()
    suffix = "-quick" if args.quick else ""
    results, failed = [], []
    load = common.load_average()
    if load and load[0] > 0.5:
        print(
            f"Warning: load average {load[0]:.2f} before starting; other "
            "work on this machine will distort the timings.",
            flush=True,
        )
    for backend in backends:
        out = os.path.join(args.out_dir, f"{date}-layer-{backend}{suffix}.json")
        child = [sys.executable, "-m", "benchmarks.layer_overhead"]
        child += ["--out", out]
        if args.quick:
            child.append("--quick")
        env = dict(os.environ)
        env["KERAS_BACKEND"] = backend
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
        )
        print(f"== layer overhead: backend {backend} ==", flush=True)
        start = time.perf_counter()
        status = subprocess.run(child, env=env, cwd=REPO_ROOT).returncode
        elapsed = time.perf_counter() - start
        if status != 0:
            print(f"== backend {backend} FAILED (exit {status}) ==")
            failed.append(backend)
            continue
        print(f"== backend {backend} done in {elapsed:.0f} s ==", flush=True)
        with open(out) as f:
            results.append(json.load(f))
    if results:
        # Imported only now: it imports Keras, which children must not wait
        # on (and this process's backend does not matter for rendering).
        from benchmarks import layer_overhead

        report = os.path.join(args.out_dir, f"layer_overhead{suffix}.md")
        common.write_text(
            report, layer_overhead.render_markdown(results, command)
        )
        print(f"Wrote {report}")
    if failed:
        print(f"Failed backends: {', '.join(failed)}")
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="keras_lora benchmarks."
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    layer = sub.add_parser(
        "layer",
        help="W4: per-layer forward / train-step overhead of LoRA.",
        description="W4 layer-overhead benchmark, one subprocess per "
        "backend. Writes <out-dir>/<date>-layer-<backend>.json and "
        "<out-dir>/layer_overhead.md (with -quick suffixes under --quick).",
    )
    layer.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"Comma-separated backends (default: {','.join(BACKENDS)}).",
    )
    layer.add_argument(
        "--quick", action="store_true", help="Few repetitions (smoke test)."
    )
    layer.add_argument(
        "--out-dir",
        default=RESULTS_DIR,
        help="Where to write results (default: benchmarks/results).",
    )
    args = parser.parse_args(argv)
    command = " ".join(["python", "-m", "benchmarks", *argv])
    if args.benchmark == "layer":
        return run_layer(args, command)
    parser.error(f"unknown benchmark {args.benchmark!r}")


if __name__ == "__main__":
    sys.exit(main())
