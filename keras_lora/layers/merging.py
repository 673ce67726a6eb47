"""Merge and unmerge: folding adapters into the base kernel and back.

`Merging` is the part of `LoraLayer` that changes the base kernel: merge
and unmerge (exact in float32; on a quantized base only on request, by
dequantizing, adding and requantizing with the measured drift), PiSSA's
initialisation, and the kernel arithmetic variants call.
"""

import numpy as np
from keras import ops

from keras_lora.layers import quantization
from keras_lora.layers.spec import DEFAULT_ADAPTER

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Merging:
    """Merge/unmerge of a LoRA layer's adapters (mixed into `LoraLayer`)."""

    @property
    def merged(self):
        """True when adapters are folded into the base kernel."""
        return bool(self._merged)

    @property
    def merged_adapters(self):
        return list(self._merged)

    def merge(self, adapter_names=None, requantize=False):
        """Folds the active (or named) adapters into the base kernel.

        Computed in float32. Refused if the layer is already merged. A
        quantized base (`model.quantize("int8" | "int4")`) is merged only
        with `requantize=True`: the kernel is dequantized, the update
        added and the sum requantized by Keras's own code, which rounds;
        the measured cost is then in `merge_drift` (a
        `keras_lora.layers.quantization.Drift`), and `unmerge()` restores
        the quantized kernel exactly (from a copy kept in memory).
        """
        if self._merged:
            raise ValueError(
                f"Layer '{self.name}' is already merged (adapters "
                f"{self._merged}). Call `unmerge()` first; merging twice "
                "would add the update twice."
            )
        names = self._active if adapter_names is None else adapter_names
        names = [names] if isinstance(names, str) else list(names)
        self._check_known(names)
        if names:
            self.check_mergeable(requantize)
        base = self.base_layer
        requantizing = bool(names) and quantization.is_quantized(base)
        if requantizing:
            probe = self.probe_inputs(base)
            y_base, y_exact = self._probe_outputs(probe, names)
            self._requantized_from = {
                v.name: np.array(ops.convert_to_numpy(v)) for v in base.weights
            }
        done = []
        self._requantizing = requantizing
        try:
            for name in names:
                adapter = self._adapters[name]
                adapter.variant.merge(self, adapter)
                done.append(adapter)
                # Variants see what is merged before them (DoRA's norm
                # is that of the kernel without merged adapters).
                self._merged = [a.name for a in done]
        except BaseException:
            if requantizing:
                self._restore_quantized()
            else:
                for adapter in reversed(done):
                    adapter.variant.unmerge(self, adapter)
            self._merged = []
            raise
        finally:
            self._requantizing = False
        self._merged = names
        if requantizing:
            y_merged = ops.convert_to_numpy(self.base_call(probe))
            self.merge_drift = quantization.measure_drift(
                self.name,
                quantization.quantization_mode(base),
                y_base,
                y_exact,
                y_merged,
            )

    def unmerge(self):
        """Takes merged adapters back out of the kernel (no-op if none).

        After a requantizing merge the quantized kernel from before it
        comes back exactly. Without that copy (a model saved merged and
        loaded again) the update is subtracted and the kernel requantized,
        which rounds again.
        """
        if self._merged and self._requantized_from is not None:
            self._restore_quantized()
            self._merged = []
            return
        self._requantizing = quantization.is_quantized(self.base_layer)
        try:
            for name in reversed(self._merged):
                adapter = self._adapters[name]
                adapter.variant.unmerge(self, adapter)
        finally:
            self._requantizing = False
        self._merged = []

    def check_mergeable(self, requantize=False):
        """Raises (saying why and what to do) if adapters cannot be folded
        into the base kernel (a quantized one only with `requantize`)."""
        self.check_mergeable_kernel(self.base_layer, self.name, requantize)

    @classmethod
    def check_mergeable_kernel(cls, base_layer, where, requantize=False):
        """Raises if `base_layer`'s kernel cannot take a merged delta."""
        mode = quantization.quantization_mode(base_layer)
        if mode is not None:
            quantization.check_supported(base_layer, f"Layer '{where}'")
            if not requantize:
                raise ValueError(quantization.refusal(mode, where))
            return
        kernel = cls.kernel_of(base_layer)
        if kernel.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"Layer '{where}': cannot merge into a {kernel.dtype} "
                "kernel (quantized base). Keep the adapter unmerged, or "
                "merge before quantizing."
            )

    def pissa_init(self, name=DEFAULT_ADAPTER):
        """PiSSA: A, B from the top-r SVD of the kernel; residual in base.

        With the kernel as a matrix `W = U S V^T`, sets `A = U_r sqrt(S_r/s)`
        and `B = sqrt(S_r/s) V_r^T` and the base kernel to `W - s A B`, so
        outputs are unchanged. Computed in float32 on the host. Everything
        is checked before anything changes.
        """
        self._check_known([name])
        if name in self._merged:
            raise ValueError(
                f"Layer '{self.name}': unmerge before re-initialising '{name}'."
            )
        self.check_mergeable()
        adapter = self.adapter(name)
        if adapter.spec.variant != "lora":
            raise ValueError(
                f"Layer '{self.name}': PiSSA initialises plain LoRA adapters "
                f"only; adapter '{name}' is a {adapter.spec.variant!r} "
                "adapter."
            )
        spec = adapter.spec
        kernel = self.kernel_of(self.base_layer)
        matrix = self.kernel_matrix(ops.convert_to_numpy(kernel))
        u, s, vt = np.linalg.svd(matrix.astype("float64"), full_matrices=False)
        r = spec.rank
        if r > len(s):
            raise ValueError(
                f"Layer '{self.name}': PiSSA rank {r} exceeds the kernel's "
                f"rank {len(s)}."
            )
        root = np.sqrt(s[:r] / spec.scale)
        a = (u[:, :r] * root).astype("float32")
        b = (root[:, None] * vt[:r]).astype("float32")
        a_var, b_var = self.lora_weights(name)
        a_var.assign(a.reshape(a_var.shape))
        b_var.assign(b.reshape(b_var.shape))
        adapter.variant.unmerge(self, adapter)

    def delta_weight(self, name=DEFAULT_ADAPTER):
        """The kernel-shaped float32 change adapter `name` amounts to
        (`s * A @ B` for plain LoRA)."""
        adapter = self.adapter(name)
        return adapter.variant.delta(self, adapter)

    def add_to_kernel(self, delta, sign):
        """`kernel += sign * delta`, computed in float32 (dequantized,
        added and requantized inside a requantizing merge)."""
        self.check_mergeable(self._requantizing)
        if self._requantizing:
            quantization.requantized_add(self.base_layer, sign * delta)
            return
        kernel = self.kernel_of(self.base_layer)
        updated = ops.cast(kernel, "float32") + sign * delta
        kernel.assign(ops.cast(updated, kernel.dtype))

    def _probe_outputs(self, probe, names):
        """`(base output, output with adapters `names`)` for `probe`, as
        numpy (before the activation)."""
        y_base = self.base_call(probe)
        y = y_base
        for name in names:
            adapter = self._adapters[name]
            y = adapter.variant.forward(self, adapter, probe, y, False)
        return ops.convert_to_numpy(y_base), ops.convert_to_numpy(y)

    def _restore_quantized(self):
        """Puts back the quantized values a requantizing merge replaced."""
        saved = self._requantized_from
        for variable in self.base_layer.weights:
            variable.assign(saved[variable.name])
        self._requantized_from = None
        self.merge_drift = None
