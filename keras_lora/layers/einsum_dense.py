"""`LoraEinsumDense`: a `keras.layers.EinsumDense` with low-rank adapters."""

import keras
import numpy as np
from keras import ops

from keras_lora.layers.base import LoraLayer
from keras_lora.layers.construction import split_kwargs
from keras_lora.layers.equation import factor_equation
from keras_lora.layers.projection import matmul_trailing
from keras_lora.layers.registry import register_lora_layer


@register_lora_layer
@keras.saving.register_keras_serializable(package="keras_lora")
class LoraEinsumDense(LoraLayer):
    """EinsumDense with textbook LoRA on the kernel viewed as a matrix.

    The kernel's axes contracted with the input form the matrix rows and its
    output axes the columns, so for MultiHeadAttention's query projection
    `abc,cde->abde` (kernel `(hidden, heads, head_dim)`) the adapter is
    `A: (hidden, r)` and `B: (r, heads, head_dim)`, and for its output
    projection `abcd,cde->abe` it is `A: (heads, head_dim, r)`,
    `B: (r, hidden)`. The unmerged branch is two matrix products (2-D
    products on reshaped views when the equation allows, einsums
    otherwise) and never builds `A @ B`. Equations whose kernel shares an
    axis with both input and output cannot be factored and raise
    `ValueError`.

    Args:
        equation: as for `EinsumDense`.
        output_shape: as for `EinsumDense`.
        rank, alpha, dropout, use_rslora, a_initializer, b_initializer,
        adapter_name, bias_trainable: as for `LoraDense`.
        **kwargs: any other `keras.layers.EinsumDense` argument
            (`bias_axes`, `activation`, `kernel_initializer`, ...).

    Example:

    >>> import numpy as np
    >>> layer = LoraEinsumDense("abc,cde->abde", (None, 2, 4), rank=2)
    >>> layer(np.ones((1, 3, 8))).shape
    (1, 3, 2, 4)
    >>> [tuple(w.shape) for w in layer.trainable_weights]
    [(8, 2), (2, 2, 4)]
    """

    wraps = (keras.layers.EinsumDense,)

    def __init__(
        self, equation=None, output_shape=None, base_layer=None, **kwargs
    ):
        wrapper_kwargs, einsum_kwargs = split_kwargs(kwargs)
        dtype = einsum_kwargs.pop("dtype", None)
        if base_layer is None:
            if equation is None or output_shape is None:
                raise ValueError(
                    "LoraEinsumDense needs `equation` and `output_shape` (as "
                    "for EinsumDense), or use LoraEinsumDense.from_layer()."
                )
            name = wrapper_kwargs.get("name")
            factor_equation(equation, name or "LoraEinsumDense")
            base_layer = keras.layers.EinsumDense(
                equation,
                output_shape,
                dtype=dtype,
                name=f"{name}_base" if name else None,
                **einsum_kwargs,
            )
        elif einsum_kwargs:
            raise TypeError(
                "LoraEinsumDense: unexpected arguments "
                f"{sorted(einsum_kwargs)}."
            )
        factorization = factor_equation(
            base_layer.equation, wrapper_kwargs.get("name") or base_layer.name
        )
        super().__init__(base_layer, dtype=dtype, **wrapper_kwargs)
        self.factorization = factorization

    @classmethod
    def check_factorable(cls, layer):
        if isinstance(layer, keras.layers.EinsumDense):
            factor_equation(layer.equation, layer.name)

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        factors = factor_equation(base_layer.equation, base_layer.name)
        a_shape, b_shape = factors.adapter_shapes(
            cls.kernel_shape_of(base_layer), rank
        )
        return tuple(a_shape), tuple(b_shape)

    @classmethod
    def describe(cls, base_layer):
        return {**super().describe(base_layer), "equation": base_layer.equation}

    @property
    def equation(self):
        return self.base_layer.equation

    @classmethod
    def kernel_probe(cls, base_layer):
        f = factor_equation(base_layer.equation, base_layer.name)
        inputs, rest = f.equation.split(",")
        kernel, output = rest.split("->")
        dims = dict(zip(kernel, cls.kernel_shape_of(base_layer), strict=True))
        rows = int(np.prod([dims[c] for c in f.contracted]))
        # One probe row per contracted position: its first axis (the
        # ellipsis, or a kept letter) carries the rows, other kept axes 1.
        letters = inputs.replace("...", "")
        if not inputs.startswith("...") and letters[0] in f.contracted:
            return None
        if not inputs.startswith("..."):
            letters = letters[1:]
        eye = np.eye(rows, dtype="float32").reshape(
            (rows,) + tuple(dims[c] for c in f.contracted)
        )
        order = [c for c in letters if c in f.contracted]
        eye = np.transpose(
            eye, [0] + [1 + f.contracted.index(c) for c in order]
        )
        shape = [rows] + [dims[c] if c in f.contracted else 1 for c in letters]
        out = output.replace("...", "")
        if not output.startswith("..."):
            out = out[1:]

        def to_kernel(y):
            # Keep the rows and the output units (kernel order), drop the
            # kept axes of size 1.
            index = tuple(slice(None) if c in f.outputs else 0 for c in out)
            y = y[(slice(None),) + index]
            units = [c for c in out if c in f.outputs]
            y = np.transpose(y, [0] + [1 + units.index(c) for c in f.outputs])
            y = y.reshape(tuple(dims[c] for c in f.contracted + f.outputs))
            axes = [(f.contracted + f.outputs).index(c) for c in kernel]
            return np.transpose(y, axes)

        return eye.reshape(shape), to_kernel

    def project_down(self, x, a):
        f = self.factorization
        if f.flat:
            return matmul_trailing(x, a, len(f.contracted))  # (..., r)
        return ops.einsum(f.down, x, a)

    def project_up(self, hidden, b):
        f = self.factorization
        if f.flat:
            return matmul_trailing(hidden, b)
        return ops.einsum(f.up, hidden, b)

    def kernel_delta(self, a, b):
        return ops.einsum(self.factorization.delta, a, b)  # kernel-shaped

    def routing_equations(self):
        return self.factorization.down, self.factorization.up

    @classmethod
    def kernel_output_axes(cls, base_layer):
        factors = factor_equation(base_layer.equation, base_layer.name)
        kernel = factors.equation.split(",")[1].split("->")[0]
        return tuple(kernel.index(c) for c in factors.outputs)

    def scale_output_units(self, outputs, factor):
        f = self.factorization
        if f.flat:  # the output units are the trailing axes
            return outputs * factor
        out = f.equation.split("->")[1]
        return ops.einsum(f"{out},{f.outputs}->{out}", outputs, factor)

    def kernel_matrix(self, kernel):
        f = self.factorization
        letters = f.equation.split(",")[1].split("->")[0]
        order = [letters.index(c) for c in f.contracted + f.outputs]
        rows = int(
            np.prod([kernel.shape[letters.index(c)] for c in f.contracted])
        )
        return np.transpose(kernel, order).reshape(rows, -1)
