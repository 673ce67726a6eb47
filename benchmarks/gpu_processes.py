"""The GPU pack's child processes: starting them under a time limit and
reading back what they recorded.

`run_units` runs `benchmarks.gpu_steps` (units of one backend in one
process) and `run_tests` runs pytest on the device-relevant test files;
both return the steps' entries for `benchmarks.gpu_check`'s record. A child
that outlives its limit is killed with everything it started; its units
that were running are recorded as timed out, those still waiting as
skipped, and what it wrote before stays.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree

from benchmarks.__main__ import REPO_ROOT, child_env

# (a): the tests of what runs on the device (layers, model-level
# operations, routing and serving, callbacks, adapter files, the loss).
TEST_FILES = (
    "tests/test_dense.py",
    "tests/test_einsum_dense.py",
    "tests/test_apply.py",
    "tests/test_model_ops.py",
    "tests/test_merge.py",
    "tests/test_adapters.py",
    "tests/test_weighted.py",
    "tests/test_routing.py",
    "tests/test_bank.py",
    "tests/test_generate.py",
    "tests/test_callbacks.py",
    "tests/test_adapter_files.py",
    "tests/test_losses.py",
    "tests/test_registry.py",
    "tests/test_transactions.py",
)
DRY_TEST_FILES = ("tests/test_callbacks.py",)
TAIL_LINES = 40


def child_environment(backend, dry_run):
    env = child_env(backend)
    env["PYTHONUNBUFFERED"] = "1"
    # JAX would take 75% of the GPU at start: PEFT (PyTorch) shares it, and
    # the peak counter should show what the program uses.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
        # Compiling tiny programs is most of a dry run's time: XLA's CPU
        # backend without its expensive optimizations takes about 20% less.
        quick = "--xla_backend_optimization_level=0 "
        quick += "--xla_llvm_disable_expensive_passes=true"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {quick}".strip()
    return env


def run_child(argv, env, timeout, log):
    """Runs `argv`, echoing its output; returns `(status, tail, seconds)`
    where status is the exit code or "timeout" (the child and everything
    it started are killed)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    tail = []

    def pump():
        for line in process.stdout:
            log(line.rstrip("\n"))
            tail.append(line.rstrip("\n"))
            del tail[:-TAIL_LINES]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "timeout"
    reader.join(timeout=5)
    return status, tail, round(time.perf_counter() - start, 1)


def run_units(backend, units, timeout, args, workdir, log):
    """One `benchmarks.gpu_steps` child; returns the units' entries."""
    part = os.path.join(workdir, f"{backend}-{units[0]}.json")
    argv = [sys.executable, "-m", "benchmarks.gpu_steps", "--out", part]
    argv += ["--units", ",".join(units)]
    argv += ["--deadline", str(time.time() + timeout - 2)]
    if args.dry_run:
        argv.append("--dry-run")
    fail = [
        unit
        for name, _, unit in (f.partition(":") for f in args.fail)
        if name == backend
    ]
    if fail:
        argv += ["--fail", ",".join(fail)]
    env = child_environment(backend, args.dry_run)
    status, tail, seconds = run_child(argv, env, timeout, log)
    try:
        with open(part) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"units": {}}
    entries = unit_entries(data, units, status, timeout, tail)
    for entry in entries:
        entry.update(backend=backend, process_seconds=seconds)
    return entries, data.get("environment")


def unit_entries(data, units, status, timeout, tail):
    """The record's entries for `units`, from what their process wrote
    (`data`) and how it ended (`status`: exit code or "timeout")."""
    entries = []
    for unit in units:
        entry = dict(data["units"].get(unit, {"status": "waiting"}))
        if status == "timeout" and entry["status"] == "running":
            entry["status"] = "timeout"
            entry["error"] = f"killed at its process's limit ({timeout:.0f} s)"
            entry["output_tail"] = tail
        elif status == "timeout" and entry["status"] == "waiting":
            entry["status"] = "skipped"
            entry["reason"] = (
                f"time budget: its process reached its limit "
                f"({timeout:.0f} s) before this step began"
            )
        elif entry["status"] in ("running", "waiting"):
            entry["status"] = "failed"
            entry["error"] = f"the process ended (exit {status}) before it did"
            entry["output_tail"] = tail
        entry["unit"] = unit
        entries.append(entry)
    return entries


def run_tests(backend, timeout, args, workdir, log):
    """(a): pytest on the device-relevant test files."""
    wanted = DRY_TEST_FILES if args.dry_run else TEST_FILES
    files = [f for f in wanted if os.path.exists(os.path.join(REPO_ROOT, f))]
    junit = os.path.join(workdir, f"junit-{backend}.xml")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv += ["-o", "addopts=-ra", f"--junitxml={junit}", *files]
    if not args.dry_run and _has_module("xdist"):
        argv += ["-n", "4", "--dist", "loadfile"]
    env = child_environment(backend, args.dry_run)
    # The tests compare against float32 references: no TF32 on JAX (PyTorch
    # keeps full float32 matrix products by default).
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    status, tail, seconds = run_child(argv, env, timeout, log)
    result = {
        "files": files,
        "missing_files": [f for f in wanted if f not in files],
        "command": " ".join(argv[1:]),
        "jax_default_matmul_precision": "highest",
        **junit_summary(junit),
    }
    entry = {"backend": backend, "unit": "tests", "seconds": seconds}
    entry["result"] = result
    if status == 0:
        entry["status"] = "ok"
    elif status == "timeout":
        entry.update(status="timeout", output_tail=tail)
        entry["error"] = f"killed at its time limit ({timeout:.0f} s)"
    else:
        entry.update(status="failed", output_tail=tail[-20:])
        entry["error"] = (
            f"pytest exit {status}: {result.get('failed', '?')} failed, "
            f"{result.get('errors', '?')} errors"
        )
    return [entry]


def junit_summary(path):
    """Counts and failed test names from a pytest JUnit XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for outcome in ("failure", "error"):
                node = case.find(outcome)
                if node is not None:
                    message = (node.get("message") or "").splitlines()
                    failed.append(
                        {
                            "test": f"{case.get('classname')}::"
                            f"{case.get('name')}",
                            "outcome": outcome,
                            "message": (message[0] if message else "")[:300],
                        }
                    )
    return {
        "total": counts["tests"],
        "passed": counts["tests"]
        - counts["failures"]
        - counts["errors"]
        - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failed,
    }


def _has_module(name):
    check = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True
    )
    return check.returncode == 0
