"""Running a test file on 8 simulated JAX devices.

JAX fixes its device count when it starts, from
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, and the test process
has usually started JAX with one CPU device already. A test file that needs
8 devices marks its tests `@needs_devices` and defines

    def test_in_8_device_process():
        run_in_device_process(__file__)

With fewer devices (a plain `pytest` run, as `scripts/test.sh` does), the
marked tests skip and that one test re-runs the whole file with pytest in
a fresh process with 8 devices, failing with the child's output if any
test there fails. Run with 8 devices already, the marked tests run here
and the re-run skips. On backends other than JAX everything skips:
`keras.distribution` shards variables on JAX only.
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import BACKEND

DEVICES = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_JAX = "keras.distribution shards variables on the JAX backend only"


def device_count():
    if BACKEND != "jax":
        return 0
    import jax

    return jax.device_count()


HAS_DEVICES = device_count() >= DEVICES
needs_devices = pytest.mark.skipif(
    not HAS_DEVICES,
    reason=f"needs {DEVICES} JAX devices; test_in_8_device_process runs "
    "this file in a process with XLA_FLAGS=--xla_force_host_platform_"
    f"device_count={DEVICES}",
)
jax_only = pytest.mark.skipif(BACKEND != "jax", reason=NOT_JAX)


def device_env(devices=DEVICES):
    """The environment of a child process with `devices` CPU devices."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    return env


def run_in_device_process(test_file, timeout=900):
    """Runs pytest on `test_file` in a child with 8 devices; fails with
    its output unless every test there passed (or skipped)."""
    if BACKEND != "jax":
        pytest.skip(NOT_JAX)
    if HAS_DEVICES:
        pytest.skip(f"this process has {DEVICES} devices: the tests ran here")
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.relpath(test_file, REPO_ROOT),
        ],
        env=device_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = child.stdout + child.stderr
    assert child.returncode == 0, (
        f"tests in {os.path.basename(test_file)} failed on {DEVICES} "
        f"devices:\n{output[-12000:]}"
    )
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert " passed" in summary, output[-4000:]
