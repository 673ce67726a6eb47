"""Callbacks that measure memory and speed during `fit`, on every backend.

    memory = kl.callbacks.MemoryUsage(batches=(1, 10))
    timer = kl.callbacks.StepTimer(batch_size=8, sequence_length=128)
    # or StepTimer() for step times alone, StepTimer(example_batch=x[:8])
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

    Step times and steps/s need nothing else. Samples/s need the batch
    size and tokens/s the sequence length too: pass them, or pass one
    batch of inputs as `example_batch` and they are read from its shape
    (the leading axis is the batch; the second axis of a token-id array,
    `token_ids` in a dict, is the sequence).

    Args:
        batch_size: samples per step, for samples/s (optional).
        sequence_length: tokens per sample, for tokens/s (optional).
        warmup: steps not counted (compilation, caches). Default 2.
        example_batch: one batch of inputs (an array, a dict or a tuple
            of arrays, or anything with `.shape`), read for whichever of
            `batch_size` and `sequence_length` is not given.

    Example:

    ```python
    timer = kl.callbacks.StepTimer()
    model.fit(x, y, batch_size=8, callbacks=[timer])
    timer.median_step_time, timer.steps_per_second
    timer = kl.callbacks.StepTimer(example_batch=x[:8])  # + samples/s
    ```
    """

    def __init__(
        self,
        batch_size=None,
        sequence_length=None,
        warmup=2,
        example_batch=None,
    ):
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("sequence_length", sequence_length),
        ):
            if value is not None and not _is_step(value):
                raise ValueError(
                    f"StepTimer: {name} must be a positive integer or None; "
                    f"got {value!r}."
                )
        if not isinstance(warmup, int) or isinstance(warmup, bool):
            raise ValueError(
                f"StepTimer: warmup must be an integer >= 0; got {warmup!r}."
            )
        if warmup < 0:
            raise ValueError(
                f"StepTimer: warmup must be an integer >= 0; got {warmup!r}."
            )
        if example_batch is not None:
            read_batch, read_length = batch_sizes(example_batch)
            batch_size = batch_size if batch_size is not None else read_batch
            if sequence_length is None:
                sequence_length = read_length
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
    def steps_per_second(self):
        """`1 / median_step_time` (`None` if no step was timed)."""
        median = self.median_step_time
        return None if median is None else 1.0 / median

    @property
    def samples_per_second(self):
        """Samples per second at the median step (needs `batch_size`)."""
        steps = self.steps_per_second
        if steps is None or self.batch_size is None:
            return None
        return steps * self.batch_size

    @property
    def tokens_per_second(self):
        """Tokens per second (needs `batch_size` and `sequence_length`)."""
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
            "steps_per_second": self.steps_per_second,
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


def batch_sizes(example_batch):
    """`(batch_size, sequence_length)` read from one batch of inputs.

    `example_batch` is the inputs `x` of one batch: an array (anything
    with `.shape`) or a dict of arrays (keras-hub's `{"token_ids": ...,
    "padding_mask": ...}`); a list or tuple is read as `(x, y[,
    sample_weight])`, and a batched `tf.data.Dataset` by its
    `element_spec` (nothing is iterated). The batch size is the leading
    axis of the first array found (`None` if unknown). The sequence length
    is the second axis of `token_ids` if present, else of the first array
    with an integer dtype and at least two axes (token ids), else `None`.
    """
    if hasattr(example_batch, "element_spec"):  # a tf.data.Dataset
        example_batch = example_batch.element_spec
    if isinstance(example_batch, (list, tuple)) and example_batch:
        example_batch = example_batch[0]  # (x, y[, sample_weight]): x
    arrays = list(_leaves(example_batch))
    if not arrays:
        raise ValueError(
            "StepTimer: example_batch holds no arrays; pass one batch of "
            "inputs (an array or a dict/tuple of arrays), or give "
            "batch_size and sequence_length instead."
        )
    batch_size = _dimension(arrays[0], 0)
    tokens = None
    if isinstance(example_batch, dict) and "token_ids" in example_batch:
        tokens = example_batch["token_ids"]
    else:
        for array in arrays:
            if len(array.shape) >= 2 and _is_integer(array):
                tokens = array
                break
    length = None if tokens is None else _dimension(tokens, 1)
    return batch_size, length


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif hasattr(value, "shape"):
        yield value


def _dimension(array, axis):
    shape = tuple(array.shape)
    if len(shape) <= axis or shape[axis] is None:
        return None
    size = int(shape[axis])
    return size if size > 0 else None


def _is_integer(array):
    name = str(getattr(array, "dtype", ""))
    return "int" in name
