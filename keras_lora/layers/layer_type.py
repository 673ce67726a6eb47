"""What a layer type answers: the hooks each LoRA layer class implements.

`LayerType` is the part of `LoraLayer` that a class wrapping one kind of
Keras layer overrides (`dense.py`, `einsum_dense.py`, `embedding.py`,
`conv.py`, or a user's own): adapter tensor shapes, reading the base
kernel (float or quantized), the kernel-shaped delta, the projections of
the low-rank branch and their routed forms, its description in adapter
files. Everything above `keras_lora.layers` asks these methods instead of
naming a layer type.
"""

from keras import ops

from keras_lora.layers import quantization
from keras_lora.layers.registry import lora_class_for


class LayerType:
    """Type-specific hooks of a LoRA layer (mixed into `LoraLayer`)."""

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        """`(a_shape, b_shape)` of a rank-`rank` adapter on built
        `base_layer`."""
        raise NotImplementedError

    @classmethod
    def kernel_of(cls, base_layer):
        """The base layer's kernel as its public property gives it: the
        float kernel variable (what merges change), or for a quantized
        base its integer values (unpacked for int4, not dequantized),
        shaped like the float kernel."""
        return base_layer.kernel

    @classmethod
    def kernel_variables(cls, base_layer):
        """The variables a merge may rewrite: the kernel, or every
        variable of a quantized base (a requantizing merge rewrites its
        scales and zero points too)."""
        if quantization.is_quantized(base_layer):
            return list(base_layer.weights)
        return [cls.kernel_of(base_layer)]

    @classmethod
    def probe_inputs(cls, base_layer):
        """Inputs on which a requantizing merge measures its drift."""
        return quantization.gaussian_probe(base_layer)

    @classmethod
    def left_out_warning(cls, base_layer):
        """What `apply_lora` warns about when `base_layer` stays unwrapped
        (e.g. it then trains wrong), or None."""
        return None

    @classmethod
    def kernel_shape_of(cls, base_layer):
        """The base kernel's shape, or None while `base_layer` is unbuilt."""
        if not base_layer.built:
            return None
        return tuple(int(d) for d in cls.kernel_of(base_layer).shape)

    @classmethod
    def kind_of(cls, base_layer):
        """The base layer's kind as adapter files record it (`"Dense"`)."""
        for base_type in cls.wraps:
            if isinstance(base_layer, base_type):
                return base_type.__name__
        return type(base_layer).__name__

    @classmethod
    def describe(cls, base_layer):
        """What adapter files record about the base layer (JSON data)."""
        shape = cls.kernel_shape_of(base_layer)
        return {
            "lora_class": cls.__name__,
            "base_class": cls.kind_of(base_layer),
            "kernel_shape": list(shape or ()),
        }

    @classmethod
    def check_description(cls, base_layer, saved, where, path):
        """Raises `ValueError` if `saved` (from `describe`) does not fit
        `base_layer`."""
        kind = cls.kind_of(base_layer)
        if saved.get("base_class") not in (None, kind):
            raise ValueError(
                f"{where}: layer '{path}' is a {kind}, but the adapter was "
                f"saved for a {saved['base_class']}."
            )
        current = cls.describe(base_layer)
        for field, value in saved.items():
            if field in ("lora_class", "base_class", "kernel_shape"):
                continue
            if field in current and current[field] != value:
                raise ValueError(
                    f"{where}: layer '{path}' has {field} "
                    f"{current[field]!r}, but the adapter was saved for "
                    f"{value!r}."
                )

    @classmethod
    def check_wrappable(cls, layer, require_built=True):
        """Raises (naming the layer and the fix) if `layer` can't be
        wrapped by this class."""
        if isinstance(layer, LayerType):
            raise TypeError(
                f"Layer '{layer.name}' is already a LoRA layer "
                f"({type(layer).__name__}); add more adapters with "
                "`layer.add_adapter(name, rank=...)` instead of wrapping it."
            )
        if not isinstance(layer, cls.wraps):
            other = lora_class_for(layer)
            hint = (
                f"Use {other.__name__} for it."
                if other is not None
                else "keras_lora has no LoRA class for that type."
            )
            wanted = " or ".join(
                f"keras.layers.{t.__name__}" for t in cls.wraps
            )
            raise TypeError(
                f"{cls.__name__}.from_layer expects a {wanted}, but layer "
                f"'{getattr(layer, 'name', layer)}' is a "
                f"{type(layer).__name__}. {hint}"
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' has Keras's built-in LoRA enabled "
                "(`enable_lora`). Wrap the layer before calling enable_lora, "
                "or use one LoRA implementation only."
            )
        cls.check_factorable(layer)
        quantization.check_supported(layer, f"{cls.__name__}.from_layer")
        if require_built and not layer.built:
            raise ValueError(
                f"Layer '{layer.name}' is not built yet, so it has no kernel "
                "to share. Call it on data or `layer.build(input_shape)` "
                f"first, or create a {cls.__name__} with its drop-in "
                "constructor."
            )

    @classmethod
    def check_factorable(cls, layer):
        """Raises if `layer`'s kernel cannot take a LoRA adapter."""

    def project_down(self, x, a):
        """`x @ A`: the input projected to the rank axis, `(..., r)`."""
        raise NotImplementedError

    def project_up(self, hidden, b):
        """`hidden @ B`: the rank axis projected to the layer's output."""
        raise NotImplementedError

    def kernel_delta(self, a, b):
        """`A @ B` shaped like the base kernel (used by merges)."""
        raise NotImplementedError

    def kernel_matrix(self, kernel):
        """The numpy `kernel` as a `(contracted, outputs)` matrix."""
        raise NotImplementedError

    @classmethod
    def kernel_probe(cls, base_layer):
        """`(inputs, to_kernel)`: numpy one-hot inputs on which a call of
        `base_layer` without its bias gives the kernel it computes with,
        and the function turning those outputs into the kernel (LoftQ
        reads quantized kernels back through Keras's own quantized call
        this way). None if the layer type cannot."""
        return None

    @classmethod
    def kernel_output_axes(cls, base_layer):
        """The kernel axes that are output units (DoRA's magnitude has
        one entry per unit). The default: the kernel's last axis."""
        return (len(cls.kernel_shape_of(base_layer)) - 1,)

    def scale_output_units(self, outputs, factor):
        """`outputs` times `factor`, one value per output unit (shaped as
        the kernel's output axes). The default fits layers whose output
        units are the output's trailing axes, in kernel order."""
        return outputs * factor

    def output_bias(self):
        """The base layer's bias as its call adds it to the outputs
        (broadcastable against them), or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def kernel_transposed(self):
        """True while the call in progress computes with the kernel
        transposed (a tied embedding's reverse call): the kernel's output
        units are then the input's last axis."""
        return False

    def routing_equations(self):
        """`(down, up)` einsums of `project_down`/`project_up`, for routed
        slots (`keras_lora.serving.routing` adds the batch axis to A and
        B). The default fits a matrix kernel."""
        return "...i,ir->...r", "...r,ro->...o"

    def branch_factors(self, x, a, b):
        """The `(A, B)` that `project_down`/`project_up` apply to input `x`
        (plain or stacked per batch row), in the branch's dtype. The
        default: `a`, `b` cast to `x`'s dtype."""
        return ops.cast(a, x.dtype), ops.cast(b, x.dtype)

    def routed_project_down(self, x, a, equation):
        """`project_down` with one A per batch row (`a`: `(batch, ...)`);
        `equation` is `routing_equations()[0]` with the batch axis."""
        return ops.einsum(equation, x, a)

    def routed_project_up(self, hidden, b, equation):
        """`project_up` with one B per batch row, as `routed_project_down`."""
        return ops.einsum(equation, hidden, b)
