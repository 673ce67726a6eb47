"""Benchmark runner: `python -m benchmarks [WORKLOAD ...] [options]`.

    python -m benchmarks                       # W1, W3, W4 on all backends
    python -m benchmarks training inference --backends jax --quick
    python -m benchmarks all --with-w2         # adds W2
    python -m benchmarks serving server        # the serving benchmarks

`all` (the default) is the LoRA comparison suite: training, inference and
layer. The serving benchmarks run only when named: they take longer than
the whole suite here (about 25 minutes on the 2-core CPU machine, most of
it PyTorch's eager token-by-token generation).

The Keras backend is fixed per process, so every workload runs under each
backend in its own subprocess (`KERAS_BACKEND=<backend> python -m
<module> --out <file> [--quick] ...`). A workload module exposes
`main(argv)` (with `--out FILE` and `--quick`) and
`render_markdown(results, command)`; this process collects the
per-backend JSON files of each workload and writes its markdown report.

Outputs, in `--out-dir` (default `benchmarks/results/`):
`<date>-<workload>-<backend>.json` (one file per child process: one
workload on one backend) and `<report>.md` per workload (`-quick` is
appended to both under `--quick`). One file per child rather than one
per backend, so that a workload can be re-run alone without rewriting
or mixing in the results of the others.
"""

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
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


@dataclasses.dataclass(frozen=True)
class Workload:
    """A registered benchmark: a module run once per backend."""

    module: str  # exposes main(argv) and render_markdown(results, command)
    help: str
    report: str  # markdown file name, without ".md"
    options: tuple = ()  # runner options it accepts, e.g. ("with_w2",)
    in_all: bool = True  # run by `all` (the default), or only when named
    backends: tuple = ("jax", "tensorflow", "torch")  # where it can run


# Registry, in run order (`all` takes those with `in_all`). The name goes
# into the JSON file names (`layer` keeps the names its recorded results
# already have).
WORKLOADS = {
    "training": Workload(
        "benchmarks.training",
        "W1 (and W2 with --with-w2): GPT-2 training step, full fine-tuning "
        "vs Keras built-in LoRA vs keras_lora vs PEFT.",
        "training",
        ("with_w2",),
    ),
    "inference": Workload(
        "benchmarks.inference",
        "W3: forward pass of the W1 model, merged/unmerged LoRA vs base.",
        "inference",
    ),
    "layer": Workload(
        "benchmarks.layer_overhead",
        "W4: per-layer forward / train-step overhead of LoRA.",
        "layer_overhead",
    ),
    "serving": Workload(
        "benchmarks.serving",
        "Multi-adapter serving (benchmarks/serving.py); only when named.",
        "serving",
        in_all=False,
    ),
    "server": Workload(
        "benchmarks.server_throughput",
        "HTTP server throughput (benchmarks/server_throughput.py); only "
        "when named.",
        "server_throughput",
        in_all=False,
    ),
    "quantized": Workload(
        "benchmarks.quantized",
        "QLoRA: LoRA training on a float32 / int8 / int4 GPT-2 base (W2 "
        "shape), keras_lora vs Keras's built-in LoRA on the same base: base "
        "bytes, peak training memory, step time (only when named).",
        "quantized",
        in_all=False,
    ),
    "sharded": Workload(
        "benchmarks.sharded",
        "Per-device memory of full fine-tuning vs LoRA under ModelParallel "
        "(GPT-2 base shape, 8 simulated devices; JAX only, only when named).",
        "sharded",
        in_all=False,
        backends=("jax",),
    ),
    "variants": Workload(
        "benchmarks.variants",
        "LoRA vs LoRA+ vs DoRA on the digits example: validation loss after "
        "the same steps, step time and memory relative to LoRA (only when "
        "named).",
        "variants",
        in_all=False,
    ),
}
ALL = [name for name, workload in WORKLOADS.items() if workload.in_all]
OPTION_FLAGS = {"with_w2": "--with-w2"}


def module_available(module):
    """True if `module` can be imported (without importing it here)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def child_command(workload, out, args):
    """The argv of the child process running `workload`."""
    argv = [sys.executable, "-m", workload.module, "--out", out]
    if args.quick:
        argv.append("--quick")
    for option in workload.options:
        if getattr(args, option, False):
            argv.append(OPTION_FLAGS[option])
    return argv


def child_env(backend):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    return env


def run_workload(name, args, backends, command, date):
    """Runs workload `name` under every backend, then writes its report.

    Returns `{backend: status}` with status "ok", "failed (exit N)" or
    "skipped (...)".
    """
    workload = WORKLOADS[name]
    if not module_available(workload.module):
        reason = f"skipped: module {workload.module} not found"
        print(
            f"== {name}: {workload.module} is not there (not written yet?); "
            "skipping this workload ==",
            flush=True,
        )
        return dict.fromkeys(backends, reason)
    suffix = "-quick" if args.quick else ""
    statuses, results = {}, []
    for backend in backends:
        if backend not in workload.backends:
            statuses[backend] = f"skipped ({name} runs on {workload.backends})"
            continue
        out = f"{date}-{name}-{backend}{suffix}.json"
        out = os.path.join(args.out_dir, out)
        print(f"== {name}: backend {backend} ==", flush=True)
        start = time.perf_counter()
        status = subprocess.run(
            child_command(workload, out, args),
            env=child_env(backend),
            cwd=REPO_ROOT,
        ).returncode
        elapsed = time.perf_counter() - start
        if status != 0:
            print(f"== {name}: backend {backend} FAILED (exit {status}) ==")
            statuses[backend] = f"failed (exit {status})"
            continue
        print(f"== {name}: backend {backend} done in {elapsed:.0f} s ==")
        statuses[backend] = "ok"
        with open(out) as f:
            result = json.load(f)
        # The runner's view: which command produced the file, how long the
        # child took (start-up, model building and compiling included).
        result["runner"] = {
            "command": command,
            "wall_seconds": round(elapsed, 1),
        }
        common.write_json(out, result)
        results.append(result)
    if results:
        # Imported only now: workload modules import Keras, which the
        # children must not wait on (and the backend of this process does
        # not matter for rendering).
        module = importlib.import_module(workload.module)
        report = os.path.join(args.out_dir, f"{workload.report}{suffix}.md")
        common.write_text(report, module.render_markdown(results, command))
        print(f"Wrote {report}", flush=True)
    return statuses


def parse_args(argv):
    names = ", ".join(WORKLOADS)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="keras_lora benchmarks, one subprocess per workload and "
        "backend.",
        epilog="Workloads: "
        + " ".join(f"{n}: {w.help}" for n, w in WORKLOADS.items()),
    )
    parser.add_argument(
        "workloads",
        nargs="*",
        default=["all"],
        metavar="WORKLOAD",
        help="all (default: " + ", ".join(ALL) + f") or any of: {names}.",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"Comma-separated backends (default: {','.join(BACKENDS)}).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="Few repetitions (smoke test)."
    )
    parser.add_argument(
        "--with-w2",
        action="store_true",
        help="training: also run W2 (GPT-2 base shape, LoRA on all linear "
        "layers; several minutes per backend).",
    )
    parser.add_argument(
        "--out-dir",
        default=RESULTS_DIR,
        help="Where to write results (default: benchmarks/results).",
    )
    args = parser.parse_args(argv)
    wanted = []
    for name in args.workloads:
        if name == "all":
            wanted += ALL
        elif name in WORKLOADS:
            wanted.append(name)
        else:
            parser.error(f"unknown workload {name!r}; choose all or {names}")
    args.workloads = list(dict.fromkeys(wanted))
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {BACKENDS}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = " ".join(["python", "-m", "benchmarks", *argv])
    date = datetime.date.today().isoformat()
    load = common.load_average()
    if load and load[0] > 0.5:
        print(
            f"Warning: load average {load[0]:.2f} before starting; other "
            "work on this machine will distort the timings.",
            flush=True,
        )
    start = time.perf_counter()
    summary = {}
    for name in args.workloads:
        summary[name] = run_workload(name, args, args.backends, command, date)
    print(f"== all done in {time.perf_counter() - start:.0f} s ==")
    failed = False
    for name, statuses in summary.items():
        line = ", ".join(f"{b} {s}" for b, s in statuses.items())
        print(f"  {name}: {line}")
        failed |= any(s.startswith("failed") for s in statuses.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
