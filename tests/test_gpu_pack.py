"""The GPU pack (scripts/gpu_check.sh, scripts/gpu_bundle.sh) on the CPU.

`gpu_check.sh --dry-run` runs every step of the pack at tiny sizes on the
CPU. It starts one process per backend (jax and torch) itself, so the
tests that run it run under KERAS_BACKEND=jax only and are skipped under
the other backends (about 3 minutes of CPU time for both backends on the
2-core machine). The bundle's requirement check, the reports' targets and
the device-memory meter are tested on made-up inputs, under every backend.
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from benchmarks import (
    device_memory,
    gpu_bundle,
    gpu_check,
    gpu_processes,
    gpu_report,
)
from benchmarks.gpu_units import TRAIN_UNITS, UNITS
from tests.conftest import BACKEND

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
drives_both_backends = pytest.mark.skipif(
    BACKEND != "jax",
    reason="gpu_check.sh runs both backends itself: tested once, under jax",
)


def run_pack(out, *args):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", SCRIPT, "--dry-run", "--out", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    with open(os.path.join(out, "gpu_check.json")) as f:
        record = json.load(f)
    with open(os.path.join(out, "gpu_check.md")) as f:
        markdown = f.read()
    return result, record, markdown


def failing_steps(record):
    """What failed, step by step (failed checks, errors): the whole log is
    too long for a CI report's tail."""
    lines = []
    for step in record["steps"]:
        if step["status"] == "ok":
            continue
        failed = [c for c in step.get("checks", []) if not c["ok"]]
        skip = ("result", "checks")
        details = {k: v for k, v in step.items() if k not in skip}
        lines.append(f"{step['backend']} {step['unit']}: {details}")
        lines.extend(f"    {c['check']}: {c['detail']}" for c in failed)
    return "\n".join(lines)


def by_step(record):
    return {(s["backend"], s["unit"]): s for s in record["steps"]}


@drives_both_backends
def test_dry_run_runs_every_step_on_both_backends(tmp_path):
    result, record, markdown = run_pack(tmp_path)
    why = failing_steps(record) or result.stdout[-4000:]
    assert result.returncode == 0, why
    assert sorted(os.listdir(tmp_path)) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
    ]
    steps = by_step(record)
    assert set(steps) == {
        (b, u) for b in ("jax", "torch") for u in gpu_check.ALL_UNITS
    }
    assert {s["status"] for s in steps.values()} == {"ok"}
    assert record["mode"] == "dry-run" and record["exit_status"] == 0
    for backend in ("jax", "torch"):
        environment = record["environments"][backend]
        assert environment["accelerator"]["platform"] == "cpu"
        assert environment["keras_lora"]["file"].startswith(REPO)
        memory = steps[(backend, "memory")]["result"]
        assert memory["with"]["overhead_bytes"] >= 0.95 * memory["known_bytes"]
        assert memory["without"]["overhead_bytes"] < memory["known_bytes"]
        tests = steps[(backend, "tests")]["result"]
        assert tests["failed"] == tests["errors"] == 0 and tests["passed"]
        generate = steps[(backend, "generate")]["result"]
        assert generate["adapters"] == 4
        assert generate["differing_tokens_routed_vs_loop"] == 0
        for unit in TRAIN_UNITS:
            train = steps[(backend, unit)]["result"]
            assert list(train["variants"]) == list(
                ("keras_lora", "builtin", "full", "peft")
            )
            losses = [
                train["variants"][n]["first_loss"]
                for n in ("keras_lora", "builtin", "full")
            ]
            assert max(losses) - min(losses) <= 1e-3
            assert train["precision"]["dtype_policy"] == unit.split("-")[2]
    # Every target row of W2: 3 on jax (with PEFT's), 2 on torch, per
    # precision; on the CPU memory falls back to the host's RSS.
    rows = gpu_report.target_rows(record["steps"])
    assert len(rows) == 2 * (3 + 2)
    assert all(
        "host RSS" in r["target"] for r in rows if "memory" in r["target"]
    )
    for heading in (
        "## (a) Tests on the device",
        "## (b) MemoryUsage on the device allocator",
        "## (c) Training step",
        "### Targets",
        "## (d) Routed vs looped generation",
        "step keras_lora/full <= 0.70",
        "dry run: CPU, tiny sizes",
    ):
        assert heading in markdown
    assert "## Failures" not in markdown


@drives_both_backends
def test_a_failed_step_is_recorded_and_the_next_one_runs(tmp_path):
    result, record, markdown = run_pack(
        tmp_path,
        "--backends",
        "torch",
        "--units",
        "memory,generate",
        "--fail",
        "torch:memory",
    )
    assert result.returncode == 1
    steps = by_step(record)
    assert steps[("torch", "memory")]["status"] == "failed"
    assert "injected failure" in steps[("torch", "memory")]["error"]
    assert steps[("torch", "generate")]["status"] == "ok"
    assert "## Failures" in markdown and "injected failure" in markdown
    assert "**FAILED**" in markdown


@drives_both_backends
def test_a_spent_budget_skips_steps_with_the_reason(tmp_path):
    result, record, markdown = run_pack(tmp_path, "--budget", "0")
    assert result.returncode == 2, result.stdout[-2000:]
    assert record["steps"] and all(
        s["status"] == "skipped" and "time budget" in s["reason"]
        for s in record["steps"]
    )
    assert "time budget" in markdown


def test_the_script_needs_an_output_folder():
    result = subprocess.run(
        ["bash", SCRIPT, "--dry-run"], capture_output=True, text=True
    )
    assert result.returncode == 64
    assert "--out DIR is required" in result.stderr


def test_plan_order_and_process_grouping():
    units = set(gpu_check.ALL_UNITS)
    for dry_run in (False, True):
        steps = gpu_check.plan(dry_run, gpu_check.BACKENDS, units)
        for backend in gpu_check.BACKENDS:
            planned = [u for b, us, _ in steps if b == backend for u in us]
            assert sorted(planned) == sorted(units)
        for _, chosen, cap in steps:
            # MemoryUsage's check reads a peak: first in its process.
            assert "memory" not in chosen or chosen[0] == "memory"
            assert chosen == ["tests"] or "tests" not in chosen
            assert (cap is None) == dry_run
    first = gpu_check.plan(False, gpu_check.BACKENDS, units)[:2]
    assert [s[1] for s in first] == [["train-w2-float32"]] * 2
    # JAX cannot reset its peak: one JAX training unit per process.
    for _, chosen, _ in gpu_check.plan(False, ["jax"], units):
        if any(u.startswith("train-") for u in chosen):
            assert len(chosen) == 1
    assert set(gpu_check.ALL_UNITS) == set(UNITS) | {"tests"}
    only = gpu_check.plan(False, ["torch"], {"memory", "tests"})
    assert only == [("torch", ["memory"], 120), ("torch", ["tests"], 120)]


def test_a_child_past_its_limit_is_killed_and_its_steps_recorded():
    lines = []
    status, tail, seconds = gpu_processes.run_child(
        [sys.executable, "-c", "import time; print('started', flush=True); "
         "time.sleep(60)"],
        dict(os.environ), timeout=3, log=lines.append,
    )  # fmt: skip
    assert status == "timeout" and seconds < 30
    assert tail == lines == ["started"]
    written = {"units": {"memory": {"status": "ok", "result": {}},
                         "generate": {"status": "running"}}}  # fmt: skip
    units = ["memory", "generate", "train-w2-float32"]
    entries = gpu_processes.unit_entries(written, units, "timeout", 3, tail)
    assert [e["status"] for e in entries] == ["ok", "timeout", "skipped"]
    assert "limit (3 s)" in entries[1]["error"]
    assert entries[1]["output_tail"] == ["started"]
    assert "before this step began" in entries[2]["reason"]
    crashed = gpu_processes.unit_entries(written, units, -11, 3, tail)
    assert [e["status"] for e in crashed] == ["ok", "failed", "failed"]
    assert "exit -11" in crashed[2]["error"]


def test_junit_summary_counts_and_names_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" '
        'skipped="1"><testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure '
        'message="assert 1 == 2&#10;more">x</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><error '
        'message="boom"/></testcase></testsuite></testsuites>'
    )
    summary = gpu_processes.junit_summary(str(path))
    assert {k: summary[k] for k in ("total", "passed", "failed")} == {
        "total": 4,
        "passed": 1,
        "failed": 1,
    }
    assert summary["errors"] == summary["skipped"] == 1
    assert summary["failures"] == [
        {
            "test": "tests.test_x::test_b",
            "outcome": "failure",
            "message": "assert 1 == 2",
        },
        {"test": "tests.test_x::test_c", "outcome": "error", "message": "boom"},
    ]
    assert gpu_processes.junit_summary(str(tmp_path / "missing.xml")) == {}


def _train_step(backend, unit, step_ratios, peaks, exact=None):
    exact = exact or {}
    variants = {
        name: {
            "memory": {
                "peak_overhead_mb": 1.0,
                "device_peak_mb": peak,
                "device_peak_exact": exact.get(name, True),
            }
        }
        for name, peak in peaks.items()
    }
    return {
        "backend": backend,
        "unit": unit,
        "status": "ok",
        "result": {"ratios": {"step": step_ratios}, "variants": variants},
    }


def test_targets_use_the_device_peak_and_its_bounds():
    peaks = {"keras_lora": 600.0, "builtin": 900.0, "full": 1000.0, "peft": 1}
    steps = [
        _train_step(
            "jax",
            "train-w2-float32",
            {"keras_lora/full": 0.5, "keras_lora/peft": 0.9},
            peaks,
        ),
        _train_step(
            "torch",
            "train-w2-mixed_bfloat16",
            {"keras_lora/full": 0.8},
            peaks,
            exact={"full": False},
        ),
        _train_step("jax", "train-w1-float32", {}, peaks),  # no W1 targets
    ]
    rows = {
        (r["backend"], r["target"]): r for r in gpu_report.target_rows(steps)
    }
    assert len(rows) == 5
    step = rows[("jax", "step keras_lora/full <= 0.70")]
    assert (step["measured"], step["met"]) == (0.5, "yes")
    memory = rows[("jax", "memory (device peak) keras_lora/full <= 0.65")]
    assert memory["measured"] == pytest.approx(0.6) and memory["met"] == "yes"
    peft = rows[("jax", "step keras_lora/peft <= 0.80")]
    assert peft["met"] == "**no**"
    # full's peak only an upper bound: the ratio is a lower bound.
    inexact = rows[("torch", "memory (device peak) keras_lora/full <= 0.65")]
    assert inexact["measured"] == ">= 0.60"
    assert inexact["met"] == "n/a (JAX peak not exact)"
    assert rows[("torch", "step keras_lora/full <= 0.70")]["met"] == "**no**"
    assert not any(
        "peft" in target for backend, target in rows if backend == "torch"
    )


@pytest.mark.parametrize(
    "value, kind, met",
    [
        (0.6, "", True),
        (0.7, "", False),
        (0.6, "<=", True),  # an upper bound under the limit
        (0.7, "<=", None),
        (0.6, ">=", None),
        (0.7, ">=", False),  # a lower bound over the limit
        (0.6, "?", None),
        (None, "", None),
    ],
)
def test_a_bounded_ratio_meets_a_target_only_when_it_can_tell(value, kind, met):
    assert gpu_report.meets(value, kind, 0.65) is met


class FakeProbe:
    device = "fake gpu"

    def __init__(self, scope):
        self.peak_scope = scope
        self.in_use, self.high = 100, 500

    def current(self):
        return self.in_use

    def peak(self):
        return self.high

    def reset_peak(self):
        self.high = self.in_use

    def use(self, n_bytes):
        self.in_use += n_bytes
        self.high = max(self.high, self.in_use)


@pytest.mark.parametrize(
    "scope, extra, exact",
    [("since-reset", 50, True), ("process", 50, False), ("process", 900, True)],
)
def test_device_meter_says_when_a_peak_is_exact(scope, extra, exact):
    mib = 2**20
    probe = FakeProbe(scope)
    probe.in_use, probe.high = 100 * mib, 500 * mib
    meter = device_memory.DeviceMeter(probe)
    meter.start()
    probe.use(200 * mib)  # the model
    meter.mark_built()
    probe.use(extra * mib)  # a training step's peak
    probe.use(-extra * mib)
    figures = meter.finish()
    assert figures["device_peak_exact"] is exact
    if exact:
        assert figures["device_peak_mb"] == 200 + extra
        assert figures["device_overhead_mb"] == extra
    else:  # an upper bound: the process's earlier peak
        assert figures["device_peak_mb"] == 400


def test_no_device_meter_on_the_cpu():
    assert device_memory.device_meter(BACKEND) is None
    assert device_memory.device_meter("torch") is None


def _wheel(directory, name, version, requires):
    path = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    lines = [f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(
            f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
            "Metadata-Version: 2.1\n" + "\n".join(lines) + "\n",
        )
    return str(path)


def test_bundle_check_finds_missing_and_conflicting_requirements(tmp_path):
    wheels = [
        _wheel(tmp_path, "keras", "3.15.1", ["numpy", "namex", "optree"]),
        _wheel(
            tmp_path,
            "keras-hub",
            "0.32.0",
            [
                "keras>=3.15",
                "regex",
                'tensorflow-text; platform_system != "Windows"',
                'grain; extra == "grain"',
                "kagglesdk==0.1.28",
            ],
        ),
        _wheel(tmp_path, "namex", "0.1.0", []),
        _wheel(tmp_path, "kagglesdk", "0.1.27", ["protobuf"]),
    ]
    problems, notes = gpu_bundle.check_requirements(wheels)
    assert problems == [
        "keras needs optree, which is neither in the bundle nor on the GPU "
        "machine: add it to BUNDLED",
        "keras-hub needs kagglesdk==0.1.28, the bundle has kagglesdk 0.1.27",
    ]
    assert len(notes) == 1 and notes[0].startswith(
        "keras-hub needs tensorflow-text: left out"
    )
    twice = wheels + [_wheel(tmp_path, "namex", "0.2.0", [])]
    problems, _ = gpu_bundle.check_requirements(twice)
    assert any("namex is in the bundle twice" in p for p in problems)


def test_bundle_size_report_counts_the_tree_and_the_bundle(tmp_path):
    (tmp_path / "a.whl").write_bytes(b"x" * 2**20)
    lines, over = gpu_bundle.size_report(str(tmp_path))
    assert lines[0].endswith(": 1.00 MiB") and not over
    tree = gpu_bundle.travelling_bytes()
    assert 0 < tree < gpu_bundle.LIMIT_BYTES
    assert f"{(tree + 2**20) / 2**20:.2f} MiB of the 64 MiB limit" in lines[2]
