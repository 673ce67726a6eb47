"""MemoryUsage and StepTimer: the CPU path for real, the GPU path on fakes.

The GPU tests replace the running backend's memory API (TensorFlow's
`tf.config`, `torch.cuda`, `jax.devices`) with recording fakes, because
this machine has no GPU: they check that the callback dispatches to the
right calls and reports what those calls return, not a real GPU.
"""

import json
import sys
import time
import types

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora import memory
from tests.conftest import BACKEND

MIB = 1024**2
# On a machine with a GPU (the GPU pack runs this suite there) the tests of
# the no-GPU behaviour are skipped and the CPU test asks for the CPU.
GPU_VISIBLE = memory._gpu_probe(BACKEND) is not None


def _tiny_fit(callbacks, epochs=1, steps=4, batch_size=4):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.rand(steps * batch_size, 8).astype("float32")
    y = np.random.rand(steps * batch_size, 4).astype("float32")
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, verbose=0,
        callbacks=callbacks,
    )  # fmt: skip


class _AllocateAt(keras.callbacks.Callback):
    """Touches `size` bytes at the end of step `step`, then frees them."""

    def __init__(self, step, size):
        super().__init__()
        self.step, self.size, self.seen = step, size, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            block = np.ones(self.size // 8)
            block.sum()
            del block


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only"
)
def test_memory_usage_cpu_sees_a_real_allocation():
    device = "cpu" if GPU_VISIBLE else "auto"
    usage = kl.callbacks.MemoryUsage(batches=(1, 3), device=device)
    assert usage.kind == "cpu-rss" and usage.peak_scope == "since-reset"
    # The allocator runs first, so step 2's record sees its 256 MiB peak.
    _tiny_fit([_AllocateAt(2, 256 * MIB), usage], epochs=2, steps=2)
    events = [(r["event"], r["step"], r["epoch"]) for r in usage.records]
    assert events == [
        ("train_begin", 0, 0),
        ("batch", 1, 0),
        ("epoch", 2, 0),
        ("batch", 3, 1),
        ("epoch", 4, 1),
    ]
    first, step1 = usage.records[0], usage.records[1]
    assert first["current_bytes"] > 10 * MIB
    assert step1["peak_bytes"] < first["current_bytes"] + 128 * MIB
    assert usage.overhead_bytes >= 240 * MIB
    assert usage.peak_bytes == max(r["peak_bytes"] for r in usage.records)
    peaks = [r["peak_bytes"] for r in usage.records]
    assert peaks == sorted(peaks), "the peak is a high-water mark"


def test_memory_usage_every_and_export(tmp_path):
    usage = kl.callbacks.MemoryUsage(batches=(), every=2, device="cpu")
    _tiny_fit([usage], steps=5)
    steps = [r["step"] for r in usage.records if r["event"] == "batch"]
    assert steps == [2, 4]
    path = tmp_path / "memory.json"
    data = usage.to_json(path)
    assert json.loads(path.read_text()) == data
    assert data["overhead_bytes"] == data["peak_bytes"] - data["baseline_bytes"]
    assert len(data["records"]) == 4  # train_begin, 2, 4, epoch end

    fig = usage.plot(label="run")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["run peak", "run in use"]
    # A second run can share the axes.
    assert usage.plot(ax=fig.axes[0], label="again") is fig
    assert len(fig.axes[0].get_lines()) == 4


def test_memory_usage_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps count from 1"):
        kl.callbacks.MemoryUsage(batches=(0,))
    with pytest.raises(ValueError, match="every must be a positive"):
        kl.callbacks.MemoryUsage(every=-3)
    with pytest.raises(ValueError, match="device='tpu'"):
        kl.callbacks.MemoryUsage(device="tpu")
    with pytest.raises(RuntimeError, match="nothing recorded"):
        kl.callbacks.MemoryUsage().plot()


@pytest.mark.skipif(GPU_VISIBLE, reason="a GPU is visible")
def test_memory_usage_gpu_request_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="sees no GPU"):
        kl.callbacks.MemoryUsage(device="gpu")


class _FakeAllocator:
    """Stands in for a GPU allocator: scripted peaks, recorded calls."""

    def __init__(self):
        self.calls = []
        self.current = 100 * MIB
        self.peak = 100 * MIB

    def step(self, extra):
        self.peak = max(self.peak, self.current + extra)


def _install_fake_gpu(monkeypatch, fake):
    """Replaces the running backend's GPU memory API with `fake`."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        real = tf.config.list_logical_devices

        def list_logical_devices(device_type=None):
            if device_type == "GPU":
                return [types.SimpleNamespace(name="/device:GPU:0")]
            return real(device_type)

        def get_memory_info(name):
            fake.calls.append(("info", name))
            return {"current": fake.current, "peak": fake.peak}

        def reset_memory_stats(name):
            fake.calls.append(("reset", name))
            fake.peak = fake.current

        monkeypatch.setattr(
            tf.config, "list_logical_devices", list_logical_devices
        )
        monkeypatch.setattr(
            tf.config.experimental, "get_memory_info", get_memory_info
        )
        monkeypatch.setattr(
            tf.config.experimental, "reset_memory_stats", reset_memory_stats
        )
        return "tensorflow GPU:0", "since-reset"
    if BACKEND == "torch":
        import torch

        def reset(index):
            fake.calls.append(("reset", index))
            fake.peak = fake.current

        def allocated(index):
            fake.calls.append(("info", index))
            return fake.current

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake")
        monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
        monkeypatch.setattr(
            torch.cuda, "max_memory_allocated", lambda i: fake.peak
        )
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
        return "torch cuda:0 (Fake)", "since-reset"
    import jax

    def memory_stats():
        fake.calls.append(("info", 0))
        return {"bytes_in_use": fake.current, "peak_bytes_in_use": fake.peak}

    device = types.SimpleNamespace(
        platform="gpu", id=0, device_kind="Fake", memory_stats=memory_stats
    )
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [device])
    return "jax gpu:0 (Fake)", "process"


def test_memory_usage_dispatches_to_the_backend_gpu_api(monkeypatch):
    fake = _FakeAllocator()
    label, scope = _install_fake_gpu(monkeypatch, fake)
    usage = kl.callbacks.MemoryUsage(batches=(1, 2))
    assert (usage.kind, usage.device, usage.peak_scope) == ("gpu", label, scope)
    # Drive the hooks as fit would, with the fake allocator's peak moving.
    usage.on_train_begin()
    if scope == "since-reset":
        assert ("reset", 0) in fake.calls or ("reset", "GPU:0") in fake.calls
    fake.step(50 * MIB)
    usage.on_epoch_begin(0)
    usage.on_train_batch_end(0)
    fake.step(20 * MIB)
    usage.on_train_batch_end(1)
    fake.step(70 * MIB)
    usage.on_train_batch_end(2)  # step 3: not recorded
    usage.on_epoch_end(0)
    peaks = [(r["event"], r["step"], r["peak_bytes"]) for r in usage.records]
    assert peaks == [
        ("train_begin", 0, 100 * MIB),
        ("batch", 1, 150 * MIB),
        ("batch", 2, 150 * MIB),
        ("epoch", 3, 170 * MIB),
    ]
    assert usage.baseline_bytes == 100 * MIB
    assert usage.overhead_bytes == 70 * MIB
    assert all(r["kind"] == "gpu" for r in usage.records)
    assert any(call[0] == "info" for call in fake.calls)


def test_cpu_probe_falls_back_to_ru_maxrss(monkeypatch):
    monkeypatch.setattr(memory, "_can_reset_hwm", lambda: False)
    probe = memory.CpuProbe()
    assert probe.peak_scope == "process"
    assert probe.peak() >= probe.current() > 0
    assert probe.reset_peak() is None


class _SleepAtEnd(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)


def test_step_timer_counts_steps_after_warmup(tmp_path):
    timer = kl.callbacks.StepTimer(batch_size=4, sequence_length=8, warmup=3)
    # The sleeping callback runs first, so every timed step includes it.
    _tiny_fit([_SleepAtEnd(), timer], epochs=2, steps=5)
    assert len(timer.warmup_times) == 3
    assert len(timer.step_times) == 7
    assert timer.median_step_time >= 0.05
    assert timer.samples_per_second == pytest.approx(4 / timer.median_step_time)
    assert timer.tokens_per_second == pytest.approx(
        8 * timer.samples_per_second
    )
    data = timer.to_json(tmp_path / "speed.json")
    assert json.loads((tmp_path / "speed.json").read_text()) == data
    assert data["timed_steps"] == 7 and data["warmup_steps"] == 3


def test_step_timer_without_sequence_length_and_bad_args():
    timer = kl.callbacks.StepTimer(batch_size=2, warmup=0)
    assert timer.median_step_time is None and timer.samples_per_second is None
    _tiny_fit([timer], steps=3, batch_size=2)
    assert len(timer.step_times) == 3 and timer.tokens_per_second is None
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        kl.callbacks.StepTimer(batch_size=0)
    with pytest.raises(ValueError, match="sequence_length"):
        kl.callbacks.StepTimer(batch_size=2, sequence_length=1.5)
    with pytest.raises(ValueError, match="warmup"):
        kl.callbacks.StepTimer(batch_size=2, warmup=-1)
    with pytest.raises(ValueError, match="example_batch holds no arrays"):
        kl.callbacks.StepTimer(example_batch={"a": [1, 2]})


def test_step_timer_without_any_size_gives_step_times():
    timer = kl.callbacks.StepTimer(warmup=1)
    assert timer.steps_per_second is None
    _tiny_fit([_SleepAtEnd(), timer], steps=4, batch_size=2)
    assert len(timer.step_times) == 3
    assert timer.batch_size is None and timer.sequence_length is None
    assert timer.steps_per_second == pytest.approx(1 / timer.median_step_time)
    assert timer.samples_per_second is None
    assert timer.tokens_per_second is None
    summary = timer.summary()
    assert summary["steps_per_second"] == timer.steps_per_second
    assert summary["samples_per_second"] is None
    assert json.dumps(summary)  # plain data


def test_step_timer_reads_sizes_from_an_example_batch():
    tokens = np.zeros((8, 128), "int32")
    batch = {"token_ids": tokens, "padding_mask": np.ones((8, 128), bool)}
    timer = kl.callbacks.StepTimer(example_batch=batch)
    assert (timer.batch_size, timer.sequence_length) == (8, 128)
    # (x, y): read from x; float features have no sequence length.
    features = np.zeros((4, 16), "float32")
    timer = kl.callbacks.StepTimer(example_batch=(features, np.zeros(4)))
    assert (timer.batch_size, timer.sequence_length) == (4, None)
    # Backend tensors work too; sizes given explicitly win.
    x = keras.ops.zeros((2, 32), "int32")
    timer = kl.callbacks.StepTimer(batch_size=3, example_batch=x)
    assert (timer.batch_size, timer.sequence_length) == (3, 32)
    sizes = kl.callbacks.batch_sizes([{"token_ids": tokens}, tokens])
    assert sizes == (8, 128)

    timer = kl.callbacks.StepTimer(warmup=0, example_batch=features)
    _tiny_fit([timer], steps=3, batch_size=4)
    assert timer.samples_per_second == pytest.approx(4 * timer.steps_per_second)
    assert timer.tokens_per_second is None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data on tensorflow")
def test_step_timer_reads_a_tf_data_element_spec():
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(
        (np.zeros((12, 10), "int32"), np.zeros((12, 10), "int32"))
    ).batch(4, drop_remainder=True)
    assert kl.callbacks.batch_sizes(dataset) == (4, 10)
    ragged = dataset.unbatch().batch(5)  # last batch smaller: unknown
    assert kl.callbacks.batch_sizes(ragged) == (None, 10)
