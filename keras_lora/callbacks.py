"""Callbacks that measure memory and speed during `fit`, on every backend.

    memory = kl.callbacks.MemoryUsage(batches=(1, 10))
    timer = kl.callbacks.StepTimer(batch_size=8, sequence_length=128)
    model.fit(x, y, epochs=2, callbacks=[memory, timer])
    memory.summary()["overhead_bytes"], timer.tokens_per_second

Steps are counted from 1 across epochs (the first training step is step 1).
"""

import json
import statistics
import time

import keras

from keras_lora.files.atomic import atomic_write_file
from keras_lora.memory import memory_probe


def _write_json(path, data):
    def write(tmp, _scratch):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write_file(path, write)


def _is_step(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class MemoryUsage(keras.callbacks.Callback):
    """Records peak memory during `fit` at chosen steps and at epoch ends.

    On a GPU (when the backend runs the model on one) it reads the backend's
    allocator statistics; on a CPU, the process's peak resident memory
    (kind `"cpu-rss"`). The peak is reset when training begins (where the
    backend allows it, see `peak_scope`), so `peak_bytes` is the high-water
    mark of this `fit` call and `overhead_bytes` what training added on top
    of the memory in use when it began (`baseline_bytes`).

    Args:
        batches: global step numbers (1-based, counted across epochs) at
            whose end to record. Default: the first step.
        every: also record every `every` steps.
        device: `"auto"` (GPU if the backend uses one, else CPU), `"gpu"` or
            `"cpu"`.

    Each record is a dict: `event` (`"train_begin"`, `"batch"`, `"epoch"`),
    `step`, `epoch`, `device`, `kind`, `peak_bytes`, `current_bytes`.
    """

    def __init__(self, batches=(1,), every=None, device="auto"):
        super().__init__()
        batches = tuple(batches or ())
        bad = [b for b in batches if not _is_step(b)]
        if bad:
            raise ValueError(
                f"MemoryUsage: batches must be step numbers >= 1 (steps count "
                f"from 1 across epochs); got {bad}."
            )
        if every is not None and not _is_step(every):
            raise ValueError(
                f"MemoryUsage: every must be a positive integer or None; got "
                f"{every!r}."
            )
        self.batches = frozenset(batches)
        self.every = every
        self._probe = memory_probe(device)
        self.records = []
        self._step = 0
        self._epoch = 0

    @property
    def device(self):
        return self._probe.device

    @property
    def kind(self):
        return self._probe.kind

    @property
    def peak_scope(self):
        return self._probe.peak_scope

    def _record(self, event):
        self.records.append(
            {
                "event": event,
                "step": self._step,
                "epoch": self._epoch,
                "device": self._probe.device,
                "kind": self._probe.kind,
                "peak_bytes": self._probe.peak(),
                "current_bytes": self._probe.current(),
            }
        )

    def on_train_begin(self, logs=None):
        self.records = []
        self._step = 0
        self._epoch = 0
        self._probe.reset_peak()
        self._record("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        wanted = self._step in self.batches or (
            self.every is not None and self._step % self.every == 0
        )
        if wanted:
            self._record("batch")

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch
        self._record("epoch")

    @property
    def baseline_bytes(self):
        """Memory in use when training began (`None` before `fit`)."""
        if not self.records:
            return None
        first = self.records[0]
        return first["current_bytes"]

    @property
    def peak_bytes(self):
        """Highest peak over the records (`None` before `fit`)."""
        if not self.records:
            return None
        return max(r["peak_bytes"] for r in self.records)

    @property
    def overhead_bytes(self):
        """`peak_bytes - baseline_bytes`: the memory training added."""
        if self.baseline_bytes is None:
            return None
        return self.peak_bytes - self.baseline_bytes

    def summary(self):
        return {
            "device": self.device,
            "kind": self.kind,
            "peak_scope": self.peak_scope,
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "overhead_bytes": self.overhead_bytes,
            "records": [dict(r) for r in self.records],
        }

    def to_json(self, path=None):
        """Returns `summary()`; also writes it to `path` (atomically)."""
        data = self.summary()
        if path is not None:
            _write_json(path, data)
        return data

    def plot(self, ax=None, label=None):
        """Plots peak and current memory (MiB) against the step.

        Returns the matplotlib figure (of `ax` when given, so several runs
        can share one axes).
        """
        import matplotlib.pyplot as plt

        if not self.records:
            raise RuntimeError(
                "MemoryUsage.plot: nothing recorded yet; pass the callback "
                "to fit() first."
            )
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
        else:
            fig = ax.figure
        mib = 1024.0**2
        steps = [r["step"] for r in self.records]
        name = f"{label} " if label else ""
        ax.plot(
            steps,
            [r["peak_bytes"] / mib for r in self.records],
            marker="o",
            label=f"{name}peak",
        )
        current = [r["current_bytes"] for r in self.records]
        if all(c is not None for c in current):
            ax.plot(
                steps,
                [c / mib for c in current],
                linestyle="--",
                marker=".",
                label=f"{name}in use",
            )
        ax.set_xlabel("training step")
        ax.set_ylabel("MiB")
        what = "GPU memory" if self.kind == "gpu" else "resident memory (RSS)"
        ax.set_title(f"{what}: {self.device}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return fig


class StepTimer(keras.callbacks.Callback):
    """Per-step wall time and throughput during `fit`, after warm-up.

    A step's time is the interval between the ends of consecutive training
    steps (the first step is timed from its start), so it covers everything
    the training loop does per step, data included. The logs are converted
    to Python numbers at each step end, which waits for the step's device
    work (asynchronous dispatch would otherwise hide it).

    Args:
        batch_size: samples per step, for samples/s.
        sequence_length: tokens per sample, for tokens/s (optional).
        warmup: steps not counted (compilation, caches). Default 2.
    """

    def __init__(self, batch_size, sequence_length=None, warmup=2):
        super().__init__()
        if not _is_step(batch_size):
            raise ValueError(
                f"StepTimer: batch_size must be a positive integer; got "
                f"{batch_size!r}."
            )
        if sequence_length is not None and not _is_step(sequence_length):
            raise ValueError(
                f"StepTimer: sequence_length must be a positive integer or "
                f"None; got {sequence_length!r}."
            )
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(
                f"StepTimer: warmup must be an integer >= 0; got {warmup!r}."
            )
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.warmup = warmup
        self.step_times = []
        self.warmup_times = []
        self._last = None

    def on_train_begin(self, logs=None):
        self.step_times = []
        self.warmup_times = []
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Reading the values blocks until the step has finished.
        for value in (logs or {}).values():
            float(keras.ops.convert_to_numpy(value))
        now = time.perf_counter()
        elapsed = now - self._last
        self._last = now
        if len(self.warmup_times) < self.warmup:
            self.warmup_times.append(elapsed)
        else:
            self.step_times.append(elapsed)

    def on_epoch_end(self, epoch, logs=None):
        # Validation and epoch-end work are not training steps: restart the
        # clock at the next step's beginning.
        self._last = None

    @property
    def median_step_time(self):
        """Median seconds per step after warm-up (`None` if none timed)."""
        if not self.step_times:
            return None
        return statistics.median(self.step_times)

    @property
    def samples_per_second(self):
        median = self.median_step_time
        return None if median is None else self.batch_size / median

    @property
    def tokens_per_second(self):
        samples = self.samples_per_second
        if samples is None or self.sequence_length is None:
            return None
        return samples * self.sequence_length

    def summary(self):
        return {
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "warmup_steps": len(self.warmup_times),
            "timed_steps": len(self.step_times),
            "median_step_time_s": self.median_step_time,
            "samples_per_second": self.samples_per_second,
            "tokens_per_second": self.tokens_per_second,
            "step_times_s": list(self.step_times),
        }

    def to_json(self, path=None):
        """Returns `summary()`; also writes it to `path` (atomically)."""
        data = self.summary()
        if path is not None:
            _write_json(path, data)
        return data
