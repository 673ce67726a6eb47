"""Memory probes: current and peak memory of the device a model runs on.

`memory_probe()` picks one for the running Keras backend:

- a GPU when the backend places work on one: TensorFlow
  (`tf.config.experimental.get_memory_info` / `reset_memory_stats`),
  PyTorch (`torch.cuda.memory_allocated` / `max_memory_allocated` /
  `reset_peak_memory_stats`), JAX (`device.memory_stats()`);
- otherwise the process's resident memory (kind `"cpu-rss"`): on Linux the
  kernel's high-water mark `VmHWM`, which writing `5` to
  `/proc/self/clear_refs` resets; elsewhere `ru_maxrss`, which cannot be
  reset (the probe then says so in `peak_scope`).

Every probe has `device` (a label), `kind` (`"gpu"` or `"cpu-rss"`),
`peak_scope` (`"since-reset"` or `"process"`), `current()`, `peak()` and
`reset_peak()`, with memory in bytes.
"""

import os
import resource
import sys

import keras

_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"


def memory_probe(device="auto"):
    """Returns the probe for `device`: `"auto"`, `"gpu"` or `"cpu"`.

    `"auto"` uses the GPU when the running backend would put the model on
    one, else the CPU. `"gpu"` raises `RuntimeError` when no GPU is visible.
    """
    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(
            f"MemoryUsage: device={device!r} is not one of 'auto', 'gpu', "
            "'cpu'."
        )
    if device != "cpu":
        probe = _gpu_probe(keras.backend.backend())
        if probe is not None:
            return probe
        if device == "gpu":
            raise RuntimeError(
                f"MemoryUsage: device='gpu' but the "
                f"{keras.backend.backend()} backend sees no GPU. Use "
                "device='auto' or 'cpu' to record host memory instead."
            )
    return CpuProbe()


def _gpu_probe(backend):
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return TensorFlowGpuProbe(gpus[0].name) if gpus else None
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return TorchGpuProbe(torch.cuda.current_device())
        return None
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu" and device.memory_stats() is not None:
            return JaxGpuProbe(device)
        return None
    return None


class CpuProbe:
    """The process's resident memory (RSS); peak resettable on Linux."""

    kind = "cpu-rss"
    device = "cpu (process resident memory)"

    def __init__(self):
        self._linux = _can_reset_hwm()
        self.peak_scope = "since-reset" if self._linux else "process"

    def current(self):
        if self._linux:
            return _proc_status_bytes("VmRSS")
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return None

    def peak(self):
        if self._linux:
            return _proc_status_bytes("VmHWM")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in bytes on macOS and in kilobytes elsewhere, and the
        # kernel updates it lazily: it can trail the current RSS slightly.
        peak = peak if sys.platform == "darwin" else peak * 1024
        return max(peak, self.current() or 0)

    def reset_peak(self):
        if self._linux:
            with open(_PROC_CLEAR_REFS, "w") as f:
                f.write("5")


def _can_reset_hwm():
    if not (os.path.exists(_PROC_STATUS) and os.path.exists(_PROC_CLEAR_REFS)):
        return False
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _proc_status_bytes(field):
    with open(_PROC_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
    return None


class TensorFlowGpuProbe:
    """TensorFlow's allocator statistics for one GPU."""

    kind = "gpu"
    peak_scope = "since-reset"

    def __init__(self, name):
        # Logical device names look like "/device:GPU:0"; the memory API
        # wants "GPU:0".
        self._name = name.split("device:")[-1]
        self.device = f"tensorflow {self._name}"

    def _info(self):
        import tensorflow as tf

        return tf.config.experimental.get_memory_info(self._name)

    def current(self):
        return int(self._info()["current"])

    def peak(self):
        return int(self._info()["peak"])

    def reset_peak(self):
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats(self._name)


class TorchGpuProbe:
    """PyTorch's CUDA caching-allocator statistics for one GPU."""

    kind = "gpu"
    peak_scope = "since-reset"

    def __init__(self, index):
        import torch

        self._index = index
        self.device = (
            f"torch cuda:{index} ({torch.cuda.get_device_name(index)})"
        )

    def current(self):
        import torch

        return int(torch.cuda.memory_allocated(self._index))

    def peak(self):
        import torch

        return int(torch.cuda.max_memory_allocated(self._index))

    def reset_peak(self):
        import torch

        torch.cuda.reset_peak_memory_stats(self._index)


class JaxGpuProbe:
    """XLA's allocator statistics for one JAX device.

    JAX has no public call that resets the peak, so `peak()` is the peak
    since the process started (`peak_scope == "process"`).
    """

    kind = "gpu"
    peak_scope = "process"

    def __init__(self, device):
        self._device = device
        self.device = (
            f"jax {device.platform}:{device.id} ({device.device_kind})"
        )

    def current(self):
        return int(self._device.memory_stats()["bytes_in_use"])

    def peak(self):
        stats = self._device.memory_stats()
        return int(stats.get("peak_bytes_in_use", stats["bytes_in_use"]))

    def reset_peak(self):
        return None
