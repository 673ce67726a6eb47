"""A 2-process LoRA training job on localhost gives the 1-process result.

`keras-lora train-distributed --local-processes 2` (keras_lora.distributed.
command) starts 2 processes x 4 simulated CPU devices that join through a
localhost coordinator and exchange data with gloo; the model is split
over a (batch 2, model 4) mesh, the batch axis across the processes. The
single-process reference runs here meanwhile. JAX only.
"""

import json
import os
import subprocess
import sys

import numpy as np

import keras_lora as kl
from keras_lora.distributed import job
from tests.devices import REPO_ROOT, jax_only

pytestmark = jax_only
TARGETS = "query,value,attention_output,feedforward_intermediate_dense"


def test_two_processes_give_the_single_process_result(tmp_path):
    report, adapter = tmp_path / "report.json", tmp_path / "adapter"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keras_lora.distributed.command",
                "--local-processes",
                "2",
                "--devices-per-process",
                "4",
                "--model",
                "tiny-gpt2",
                "--parallel",
                "model",
                "--target-modules",
                TARGETS,
                "--report",
                str(report),
                "--save-adapter",
                str(adapter),
            ],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            expected = job.run(
                job.JobConfig(
                    model="tiny-gpt2",
                    parallel="none",
                    target_modules=tuple(TARGETS.split(",")),
                    save_adapter=str(tmp_path / "reference"),
                ),
                log=lambda line: None,
            )
            status = launcher.wait(timeout=600)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    output = log.read_text()
    assert status == 0, output[-8000:]
    with open(report) as f:
        got = json.load(f)
    assert got["process_count"] == 2 and got["device_count"] == 8
    assert got["mesh"] == {"batch": 2, "model": 4}
    assert "step 5/5" in output  # process 0 reports its progress
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
    np.testing.assert_allclose(
        got["eval_loss"], expected["eval_loss"], rtol=1e-5
    )
    # Process 0 saved the adapter trained across both processes.
    _, tensors = kl.read_adapter(adapter)
    _, reference = kl.read_adapter(tmp_path / "reference")
    assert sorted(tensors) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(tensors[key], value, atol=1e-5, err_msg=key)
