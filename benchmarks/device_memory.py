"""Peak GPU memory of one benchmark variant, through keras_lora's probes.

`device_meter(framework)` returns a `DeviceMeter` over the allocator of the
GPU that `framework` ("jax", "tensorflow", "torch") runs on, or None where
it runs on the CPU. A meter spans one variant: `start()` before the model
is built, `mark_built()` once it is, `finish()` after its last measured
step, which returns

- `device_peak_mb`: the highest device memory in use, minus what was in use
  at `start()` (the variant's weights, optimizer state, gradients,
  activations and workspaces);
- `device_overhead_mb`: the same minus what was in use at `mark_built()`
  (what training adds to the built model);
- `device_peak_exact`: whether that peak is the variant's own. PyTorch and
  TensorFlow reset their peak counter at `start()`, so it always is. JAX
  has no reset: its counter is the peak since the process started, so the
  figure is exact only when this variant raised it; otherwise it is an
  upper bound (which is why the pack runs JAX variants in rising order of
  memory, and each JAX training workload in its own process).
"""

import keras

from keras_lora import memory


def device_probe(framework):
    """keras_lora's memory probe for the GPU `framework` uses, or None.

    PyTorch is asked directly (PEFT uses it under any Keras backend); JAX
    and TensorFlow only when they are the running Keras backend.
    """
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            return memory.TorchGpuProbe(torch.cuda.current_device())
        return None
    if framework != keras.backend.backend():
        return None
    try:
        return memory.memory_probe("gpu")
    except RuntimeError:  # this backend sees no GPU
        return None


def device_meter(framework):
    probe = device_probe(framework)
    return None if probe is None else DeviceMeter(probe)


class DeviceMeter:
    """Device memory from a variant's build to its last measured step."""

    def __init__(self, probe):
        self.probe = probe
        self._before = self._built = self._peak_before = None

    def start(self):
        if self.probe.peak_scope == "since-reset":
            self.probe.reset_peak()
        self._before = self.probe.current()
        self._peak_before = self.probe.peak()

    def mark_built(self):
        self._built = self.probe.current()

    def finish(self):
        peak = self.probe.peak()
        exact = self.probe.peak_scope == "since-reset" or (
            peak > self._peak_before
        )
        built = self._before if self._built is None else self._built
        return {
            "device": self.probe.device,
            "device_peak_mb": _mb(peak - self._before),
            "device_overhead_mb": _mb(peak - built),
            "device_peak_exact": bool(exact),
        }


def _mb(n_bytes):
    return round(n_bytes / 2**20, 1)
