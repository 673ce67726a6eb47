"""The GPU validation pack's driver: plans, runs and records every step.

Run by `scripts/gpu_check.sh` (which installs the wheel bundle first):

    python -m benchmarks.gpu_check --out DIR [--dry-run] [--budget 480]

For `KERAS_BACKEND=jax` and `torch` it runs (a) the GPU-relevant tests,
(b) `MemoryUsage` on the device allocator, (c) the W1/W2 training steps in
float32 and mixed bfloat16, (d) routed vs looped generation for 32
adapters; (b)-(d) are units of `benchmarks.gpu_steps`, run in child
processes as `PLAN` groups them. Steps run in `PLAN`'s order (most wanted
figures first), each child under a time limit taken from what is left of
the budget; once the budget is spent, the remaining steps are recorded as
skipped with the reason. A failing step is recorded with its error and the
next one still runs.

Writes `gpu_check.json` (everything) and `gpu_check.md` (the tables) to
`--out`, rewritten after every child so a run cut short still leaves its
results. Exit status: 0 all steps passed, 1 a step failed or timed out (or
the bundle did not install), 2 none failed but some were skipped.
"""

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common, gpu_report
from benchmarks.gpu_processes import run_tests, run_units

BACKENDS = ("jax", "torch")
# Seconds for the whole run: on a GPU the "at most 8 minutes"; a
# dry run on a busy 2-core machine may need longer.
DEFAULT_BUDGET = {"gpu": 480.0, "dry-run": 1200.0}
FINAL_RESERVE = 5.0  # seconds kept for writing the results
MIN_START = {"gpu": 45.0, "dry-run": 3.0}  # no child starts with less left
# Each entry is one child process: (backend, units, cap in seconds on a
# GPU). JAX's peak memory counter cannot be reset, so each JAX training
# unit gets its own process (benchmarks.device_memory); `memory` runs
# first in its process for the same reason.
PLAN = (
    ("jax", ("train-w2-float32",), 210),
    ("torch", ("train-w2-float32",), 150),
    ("jax", ("memory", "generate"), 120),
    ("torch", ("memory", "generate"), 120),
    ("jax", ("train-w2-mixed_bfloat16",), 210),
    ("torch", ("train-w2-mixed_bfloat16",), 150),
    ("jax", ("tests",), 150),
    ("torch", ("tests",), 120),
    ("torch", ("train-w1-float32", "train-w1-mixed_bfloat16"), 120),
    ("jax", ("train-w1-float32",), 90),
    ("jax", ("train-w1-mixed_bfloat16",), 90),
)
# On the CPU the peak question does not arise: one child per backend.
DRY_PLAN = tuple(
    (backend, units, None)
    for backend in BACKENDS
    for units in (
        (
            "memory",
            "generate",
            "train-w2-float32",
            "train-w2-mixed_bfloat16",
            "train-w1-float32",
            "train-w1-mixed_bfloat16",
        ),
        ("tests",),
    )
)
ALL_UNITS = ("tests", "memory", "generate") + tuple(
    f"train-{w}-{p}"
    for w in ("w2", "w1")
    for p in ("float32", "mixed_bfloat16")
)


class Budget:
    def __init__(self, started, seconds):
        self.deadline = started + seconds
        self.seconds = seconds

    def left(self):
        return self.deadline - time.time() - FINAL_RESERVE


def plan(dry_run, backends, units):
    """The children to run: `[(backend, [units], cap)]`, filtered."""
    steps = []
    for backend, wanted, cap in DRY_PLAN if dry_run else PLAN:
        chosen = [u for u in wanted if u in units]
        if backend in backends and chosen:
            steps.append((backend, chosen, cap))
    return steps


def gpu_description():
    """`nvidia-smi`'s GPU name, driver and memory, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total"
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip() or result.stderr.strip() or None


def exit_status(record):
    statuses = [s["status"] for s in record["steps"]]
    if record["bundle"].get("status") == "failed" or any(
        s in ("failed", "timeout") for s in statuses
    ):
        return 1
    return 2 if "skipped" in statuses else 0


def write(record, out, log):
    record["elapsed_s"] = round(time.time() - record["started_epoch"], 1)
    record["exit_status"] = exit_status(record)
    common.write_json(os.path.join(out, "gpu_check.json"), record)
    common.write_text(
        os.path.join(out, "gpu_check.md"), gpu_report.render(record)
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="keras_lora's GPU validation pack (run it through "
        "scripts/gpu_check.sh, which installs the wheel bundle first).",
    )
    parser.add_argument("--out", required=True, help="Folder for results.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Tiny sizes, on the CPU."
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="Seconds for the whole run (default "
        f"{DEFAULT_BUDGET['gpu']:.0f}, dry run "
        f"{DEFAULT_BUDGET['dry-run']:.0f}).",
    )
    parser.add_argument(
        "--started",
        type=float,
        help="When the run began (seconds since "
        "the epoch; default now): the budget counts from it.",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="Comma-separated (default jax,torch).",
    )
    parser.add_argument(
        "--units",
        default=",".join(ALL_UNITS),
        help=f"Comma-separated steps (default all: {','.join(ALL_UNITS)}).",
    )
    parser.add_argument(
        "--bundle-status",
        default="absent",
        help="What scripts/gpu_check.sh did with the bundle.",
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="BACKEND:UNIT",
        help="Make a unit fail on purpose (to test the pack).",
    )
    parser.add_argument("--command", help="The command line, for the record.")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.units = [u for u in args.units.split(",") if u]
    for values, known, what in (
        (args.backends, BACKENDS, "backend"),
        (args.units, ALL_UNITS, "unit"),
    ):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {known}")
    if args.budget is None:
        args.budget = DEFAULT_BUDGET["dry-run" if args.dry_run else "gpu"]
    if args.budget < 0:
        parser.error("--budget must be >= 0 seconds")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.time() if args.started is None else args.started
    budget = Budget(started, args.budget)
    mode = "dry-run" if args.dry_run else "gpu"
    os.makedirs(args.out, exist_ok=True)

    def log(message):
        print(message, flush=True)

    bundle_status, _, bundle_detail = args.bundle_status.partition(":")
    record = {
        "pack": "keras_lora GPU validation pack",
        "mode": mode,
        "command": args.command
        or " ".join(["python -m benchmarks.gpu_check", *argv]),
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.fromtimestamp(started).isoformat(
            timespec="seconds"
        ),
        "started_epoch": started,
        "budget_s": args.budget,
        "host": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": common.cpu_model(),
            "cores": os.cpu_count(),
            "gpu": gpu_description(),
        },
        "bundle": {"status": bundle_status, "detail": bundle_detail},
        "environments": {},
        "steps": [],
    }
    steps = plan(args.dry_run, args.backends, args.units)
    log(
        f"== GPU pack ({mode}): {len(steps)} processes, budget "
        f"{args.budget:.0f} s, {budget.left():.0f} s left =="
    )
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        for backend, units, cap in steps:
            left = budget.left()
            if left < MIN_START[mode]:
                reason = (
                    f"time budget: {max(left, 0):.0f} s of {args.budget:.0f}"
                    " s left when its turn came"
                )
                record["steps"] += [
                    {
                        "backend": backend,
                        "unit": u,
                        "status": "skipped",
                        "reason": reason,
                    }
                    for u in units
                ]
                log(f"== {backend} {', '.join(units)}: skipped ({reason}) ==")
                continue
            timeout = left if cap is None else min(cap, left)
            log(
                f"== {backend}: {', '.join(units)} (limit {timeout:.0f} s, "
                f"{left:.0f} s left) =="
            )
            if units == ["tests"]:
                entries = run_tests(backend, timeout, args, workdir, log)
            else:
                entries, environment = run_units(
                    backend, units, timeout, args, workdir, log
                )
                if environment:
                    record["environments"].setdefault(backend, environment)
            for entry in entries:
                log(
                    f"== {backend} {entry['unit']}: {entry['status']}"
                    + (f": {entry['error']}" if entry.get("error") else "")
                    + (f": {entry['reason']}" if entry.get("reason") else "")
                    + " =="
                )
            record["steps"] += entries
            write(record, args.out, log)
    write(record, args.out, log)
    counts = {}
    for step in record["steps"]:
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    log(
        f"== done in {record['elapsed_s']:.0f} s: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"; exit {record['exit_status']}; wrote {args.out}/gpu_check.json"
        " and gpu_check.md =="
    )
    return record["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
