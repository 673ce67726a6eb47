"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), as PEFT
computes it.

View the base kernel `W` as a `[contracted] x [output units]` matrix. A
DoRA adapter holds LoRA's `A` and `B` and one magnitude `m_j` per output
unit `j`; the adapted kernel is the LoRA-updated kernel renormalised per
output unit and rescaled by the magnitude:

    W'_j = m_j * (W_j + s (A B)_j) / ||W_j + s (A B)_j||

The layer never builds `W'`. With `f = m / ||W + s A B||` (one factor per
output unit) and `base(x) = x W + bias`, it computes, as PEFT's
`DoraLinearLayer` does,

    y = base(x) + (f - 1) * (base(x) - bias) + f * s * (x A) B

and, with dropout in training, `(f - 1) * (dropout(x) W) + f * s *
(dropout(x) A) B` added to `base(x)`. The norm is computed in float32 and
treated as a constant in the backward pass (`stop_gradient`, section 4.3
of the paper), so gradients of `A`, `B` and `m` are PEFT's. The magnitude
starts at `||W + s A B||` (the base kernel's norms, since `B` starts at
zero), so a fresh adapter changes nothing.

Which kernel axes are output units is the layer class's business
(`LoraLayer.kernel_output_axes`: Dense's units, EinsumDense's output axes,
an Embedding's output dimension, a Conv's filters), and so is multiplying
its outputs per unit (`scale_output_units`) and its bias (`output_bias`).

Merging writes `f * (W + s A B)` into the kernel and remembers the norms
(`Adapter.state`, kept in `.keras` files for merged adapters), so
unmerging is exact to float32 rounding. The norm is always that of the
kernel without merged adapters (PEFT's definition), so merging several
adapters in turn gives the outputs of the unmerged layer.

A tied embedding's reverse call (the logits) computes with the transposed
table, `x (f (E + s A B))^T`: the factor then scales the input's units.
Serving (`keras_lora.serving.routing`) computes `f` once per adapter when
it enters a slot (`routed_factor`); `add_weighted_adapter` combines DoRA
adapters through the same factors (`keras_lora.model.weighted`). DoRA
needs the float kernel on every step, so quantized bases are refused.
"""

import numpy as np
from keras import ops

from keras_lora.layers import quantization
from keras_lora.layers.variants import LoraVariant, register_variant

MAGNITUDE = "lora_magnitude"
_NORM = "weight_norm"  # Adapter.state key: the norms at merge time


def output_units_shape(lora_class, base_layer):
    """The shape of a per-output-unit vector (the kernel's output axes)."""
    shape = lora_class.kernel_shape_of(base_layer)
    return tuple(shape[i] for i in lora_class.kernel_output_axes(base_layer))


def check_float_base(base_layer, where):
    """Raises `ValueError` for a quantized base: DoRA reads the float
    kernel's norms on every step, and keras_lora does not dequantize."""
    mode = quantization.quantization_mode(base_layer)
    if mode is not None:
        raise ValueError(
            f"{where}: DoRA needs the float kernel of layer "
            f"'{base_layer.name}' (its norms per output unit, on every "
            f"step), but the layer is {mode}-quantized. Use plain LoRA on "
            "quantized bases (QLoRA), or DoRA on the float model before "
            "quantizing it."
        )


def float_kernel(layer):
    """The base kernel as a float32 tensor."""
    check_float_base(layer.base_layer, f"Layer '{layer.name}'")
    return ops.cast(layer.kernel_of(layer.base_layer), "float32")


def reference_kernel(layer):
    """The float32 kernel without the adapters merged into it."""
    kernel = float_kernel(layer)
    for name in reversed(layer.merged_adapters):
        adapter = layer.adapter(name)
        kernel = adapter.variant.unmerged_kernel(layer, adapter, kernel)
    return kernel


def unit_norms(layer, kernel):
    """The L2 norm of `kernel` per output unit (zero norms read as 1, so
    an all-zero unit gets a finite factor)."""
    outputs = layer.kernel_output_axes(layer.base_layer)
    axes = tuple(i for i in range(len(kernel.shape)) if i not in outputs)
    norms = ops.sqrt(ops.sum(ops.square(kernel), axis=axes))
    return ops.where(norms > 0, norms, ops.ones_like(norms))


def unit_view(layer, values):
    """A per-output-unit tensor reshaped to broadcast against the kernel."""
    base = layer.base_layer
    shape = layer.kernel_shape_of(base)
    outputs = layer.kernel_output_axes(base)
    view = [d if i in outputs else 1 for i, d in enumerate(shape)]
    return ops.reshape(values, view)


def lora_kernel(layer, kernel, a, b, scale):
    """`kernel + s * A @ B`, kernel-shaped, float32."""
    a = ops.cast(a, "float32")
    b = ops.cast(b, "float32")
    return kernel + layer.kernel_delta(a, b) * scale


class DoraVariant(LoraVariant):
    """DoRA adapters: `lora_a`, `lora_b` and `lora_magnitude` tensors."""

    name = "dora"
    # add_weighted_adapter combines DoRA adapters through their factors
    # (`routed_factor`, `set_factor`): "cat" exactly, "svd" truncated;
    # "linear" is refused (`rescales_outputs`).
    combinable = True
    rescales_outputs = True

    def tensor_shapes(self, lora_class, base_layer, spec):
        check_float_base(base_layer, f"Adapter '{spec.name}'")
        shapes = super().tensor_shapes(lora_class, base_layer, spec)
        shapes[MAGNITUDE] = output_units_shape(lora_class, base_layer)
        return shapes

    def initializer(self, tensor, spec):
        if tensor == MAGNITUDE:
            return "ones"  # replaced by `initialize`
        return super().initializer(tensor, spec)

    def initialize(self, layer, adapter):
        """The magnitude starts at the norms of `W + s A B` (PEFT's
        initialisation; with `B = 0`, the base kernel's own norms)."""
        try:
            norms = self.norms(layer, adapter)
        except ValueError:
            # A merged layer being rebuilt from a file: its merged
            # adapters cannot be replayed yet, and the file's values
            # replace the magnitude anyway.
            kernel = lora_kernel(
                layer,
                float_kernel(layer),
                *self._ab(adapter),
                adapter.spec.scale,
            )
            norms = unit_norms(layer, kernel)
        adapter.variables[MAGNITUDE].assign(norms)

    # -- the math -------------------------------------------------------------

    def norms(self, layer, adapter):
        """`||W + s A B||` per output unit, float32, without gradient."""
        a, b = (
            ops.stop_gradient(ops.convert_to_tensor(adapter.variables[t]))
            for t in ("lora_a", "lora_b")
        )
        kernel = lora_kernel(
            layer, reference_kernel(layer), a, b, adapter.spec.scale
        )
        return ops.stop_gradient(unit_norms(layer, kernel))

    def factor(self, layer, adapter):
        """`m / ||W + s A B||` per output unit (float32)."""
        magnitude = ops.convert_to_tensor(adapter.variables[MAGNITUDE])
        return ops.cast(magnitude, "float32") / self.norms(layer, adapter)

    def forward(self, layer, adapter, inputs, outputs, training):
        x = layer.branch_inputs(inputs, adapter.spec.dropout, training)
        if layer.kernel_transposed:
            return self._transposed_forward(layer, adapter, x, outputs)
        # PEFT scales the running result; with dropout, the base output
        # of the dropped input instead.
        base = outputs if x is inputs else layer.base_call(x)
        bias = layer.output_bias()
        if bias is not None:
            base = base - ops.cast(bias, base.dtype)
        factor = ops.cast(self.factor(layer, adapter), outputs.dtype)
        lora = self.low_rank(layer, adapter, x)  # s * (x A) B
        return (
            outputs
            + layer.scale_output_units(base, factor - 1.0)
            + layer.scale_output_units(lora, factor)
        )

    def _transposed_forward(self, layer, adapter, x, outputs):
        """`x @ (f * (W + s A B))^T` when the call uses the transposed
        kernel (a tied embedding's logits): the factor then scales the
        input's units, `outputs + base(x (f - 1)) + s ((x f) B^T) A^T`."""
        factor = ops.cast(self.factor(layer, adapter), x.dtype)
        extra = layer.base_call(x * (factor - 1.0))
        return outputs + extra + self.low_rank(layer, adapter, x * factor)

    def delta(self, layer, adapter):
        """`f * (W + s A B) - W`: what merging adds to the kernel."""
        kernel = reference_kernel(layer)
        merged = unit_view(layer, self.factor(layer, adapter)) * lora_kernel(
            layer, kernel, *self._ab(adapter), adapter.spec.scale
        )
        return merged - kernel

    # -- merge / unmerge ------------------------------------------------------

    def merge(self, layer, adapter):
        layer.check_mergeable()
        norms = self.norms(layer, adapter)
        factor = self._factor_from(adapter, norms)
        variable = layer.kernel_of(layer.base_layer)
        kernel = lora_kernel(
            layer,
            ops.cast(variable, "float32"),
            *self._ab(adapter),
            adapter.spec.scale,
        )
        variable.assign(
            ops.cast(unit_view(layer, factor) * kernel, variable.dtype)
        )
        adapter.state[_NORM] = np.asarray(ops.convert_to_numpy(norms))

    def unmerge(self, layer, adapter):
        layer.check_mergeable()
        variable = layer.kernel_of(layer.base_layer)
        kernel = self.unmerged_kernel(
            layer, adapter, ops.cast(variable, "float32")
        )
        variable.assign(ops.cast(kernel, variable.dtype))

    def unmerged_kernel(self, layer, adapter, kernel):
        norms = adapter.state.get(_NORM)
        if norms is None:
            raise ValueError(
                f"Layer '{layer.name}': DoRA adapter '{adapter.name}' is "
                "marked merged, but the norms it was merged with are "
                "unknown, so it cannot be unmerged exactly. Reload the "
                "model from a file saved with keras_lora.save_model."
            )
        factor = self._factor_from(adapter, ops.convert_to_tensor(norms))
        a, b = self._ab(adapter)
        unscaled = kernel / unit_view(layer, factor)
        return unscaled - layer.kernel_delta(a, b) * adapter.spec.scale

    # -- routing (keras_lora.serving.routing) ---------------------------------

    def routed_factor(self, layer, values, scale):
        kernel = lora_kernel(
            layer,
            reference_kernel(layer),
            values["lora_a"],
            values["lora_b"],
            scale,
        )
        norms = ops.convert_to_numpy(unit_norms(layer, kernel))
        return np.asarray(values[MAGNITUDE], "float32") / norms

    def set_factor(self, layer, adapter, factor):
        """Sets the magnitude so that the adapter's factor `m / ||W + s A
        B||` equals `factor` (per output unit; add_weighted_adapter)."""
        factor = ops.convert_to_tensor(np.asarray(factor, "float32"))
        adapter.variables[MAGNITUDE].assign(factor * self.norms(layer, adapter))

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _ab(adapter):
        return (
            ops.cast(adapter.variables["lora_a"], "float32"),
            ops.cast(adapter.variables["lora_b"], "float32"),
        )

    @staticmethod
    def _factor_from(adapter, norms):
        magnitude = ops.cast(adapter.variables[MAGNITUDE], "float32")
        return magnitude / norms


register_variant(DoraVariant())
