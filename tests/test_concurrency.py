"""Concurrent saves and loads of one adapter directory (issue 14 item 11).

Separate processes, as in a real deployment: readers never see a missing
directory or a mix of two saves while a writer replaces it, and
concurrent writers wait for each other. The file logic does not depend on
the Keras backend, so the workers run on torch (the quickest import).
"""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_lora as kl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX locks coordinate the processes"
)


def _saved(tmp_path, name, seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(64, name="d")], name="m"
    )
    kl.apply_lora(model, kl.LoraConfig(rank=8, target_modules=["d"]), name)
    for layer in kl.lora_layers(model):
        for variable in layer.adapter_variables(name).values():
            variable.assign(np.full(variable.shape, seed, "float32"))
    return str(kl.save_adapter(model, tmp_path / name, adapter_name=name))


def _start(*args):
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.concurrent_io", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def _copy_into(source):
    def fill(tmp):
        for name in os.listdir(source):
            os.link(os.path.join(source, name), os.path.join(tmp, name))

    return fill


def test_readers_and_writers_never_collide(tmp_path):
    """2 readers load while 2 writers re-save: no reader sees a missing
    directory or files of two saves, no writer fails, nothing is left."""
    a, b = _saved(tmp_path, "one", 1), _saved(tmp_path, "two", 2)
    target = str(tmp_path / "served")
    kl.files.atomic.atomic_write_dir(target, _copy_into(a))
    stop = str(tmp_path / "stop")
    readers = [_start("read", target, stop) for _ in range(2)]
    deadline = time.time() + 120
    while len([f for f in os.listdir(tmp_path) if ".ready-" in f]) < 2:
        assert time.time() < deadline, "readers did not start"
        time.sleep(0.2)
    writers = [_start("write", target, a, b, "60") for _ in range(2)]
    written = [_result(w) for w in writers]
    open(stop, "w").close()
    results = [_result(r) for r in readers]
    for result in written:
        assert result["errors"] == {}, result
    for result in results:
        assert result["errors"] == {}, result
        assert result["reads"] > 0
    left = [f for f in os.listdir(tmp_path) if not f.startswith("stop")]
    assert sorted(left) == ["one", "served", "two"]
    assert kl.read_adapter(target)[0]["adapter_name"] in ("one", "two")


def test_a_killed_save_is_cleaned_up_by_the_next(tmp_path):
    a = _saved(tmp_path, "one", 1)
    target = str(tmp_path / "served")
    kl.files.atomic.atomic_write_dir(
        target,
        lambda tmp: [
            os.link(os.path.join(a, f), os.path.join(tmp, f))
            for f in os.listdir(a)
        ],
    )
    # What kill -9 leaves: a temporary beside the target, and a backup
    # with the target missing (killed between the two renames).
    os.mkdir(tmp_path / ".served.keras_lora-tmp-dead")
    os.replace(target, tmp_path / ".served.keras_lora-old-dead")
    with pytest.raises(FileNotFoundError, match="interrupted save"):
        kl.read_adapter(target)
    b = _saved(tmp_path, "two", 2)
    kl.files.atomic.atomic_write_dir(target, _copy_into(b))
    assert sorted(os.listdir(tmp_path)) == ["one", "served", "two"]
    assert kl.read_adapter(target)[0]["adapter_name"] == "two"
