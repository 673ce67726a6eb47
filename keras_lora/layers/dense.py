"""`LoraDense`: a `keras.layers.Dense` with low-rank adapters."""

import keras
import numpy as np
from keras import ops

from keras_lora.layers.base import LoraLayer
from keras_lora.layers.construction import split_kwargs
from keras_lora.layers.projection import matmul_trailing
from keras_lora.layers.registry import register_lora_layer


@register_lora_layer
@keras.saving.register_keras_serializable(package="keras_lora")
class LoraDense(LoraLayer):
    """Dense layer with textbook LoRA: `y = act(xW + b + s * (x @ A) @ B)`.

    Use it as a drop-in `Dense` (the base kernel is created frozen, to be
    filled with pre-trained weights) or wrap a built `Dense` with
    `LoraDense.from_layer(dense, rank=...)`, which shares its kernel and bias.

    Args:
        units: output size, as for `Dense`.
        rank: LoRA rank `r` (positive int).
        alpha: LoRA alpha; the branch is scaled by `alpha / r`. Defaults to
            `rank` (scale 1).
        dropout: dropout rate on the branch input, applied only in training.
        use_rslora: scale by `alpha / sqrt(r)` instead (rank-stabilised LoRA).
        a_initializer: initializer of A, shape `(input_dim, r)`. Defaults to
            loralib's Kaiming-uniform.
        b_initializer: initializer of B, shape `(r, units)`. Defaults to
            zeros, so a fresh adapter leaves outputs unchanged.
        adapter_name: name of the first adapter (`"default"`).
        bias_trainable: keep training the base bias (loralib's
            `bias="all"`); the kernel stays frozen.
        **kwargs: any other `keras.layers.Dense` argument (`activation`,
            `use_bias`, `kernel_initializer`, `dtype`, ...).

    Input shape: `(..., input_dim)`. Output shape: `(..., units)`.

    Example:

    >>> import numpy as np
    >>> layer = LoraDense(4, rank=2)
    >>> layer(np.ones((3, 8))).shape
    (3, 4)
    >>> [w.name for w in layer.trainable_weights]
    ['lora_a_default', 'lora_b_default']
    """

    wraps = (keras.layers.Dense,)

    def __init__(self, units=None, base_layer=None, **kwargs):
        wrapper_kwargs, dense_kwargs = split_kwargs(kwargs)
        dtype = dense_kwargs.pop("dtype", None)
        if base_layer is None:
            if units is None:
                raise ValueError(
                    "LoraDense needs `units` (as for Dense), or use "
                    "LoraDense.from_layer(dense) to wrap an existing layer."
                )
            name = wrapper_kwargs.get("name")
            base_layer = keras.layers.Dense(
                units,
                dtype=dtype,
                name=f"{name}_base" if name else None,
                **dense_kwargs,
            )
        elif dense_kwargs:
            raise TypeError(
                f"LoraDense: unexpected arguments {sorted(dense_kwargs)}."
            )
        super().__init__(base_layer, dtype=dtype, **wrapper_kwargs)

    @property
    def units(self):
        return self.base_layer.units

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        input_dim, units = cls.kernel_shape_of(base_layer)
        return (input_dim, rank), (rank, units)

    @classmethod
    def kernel_probe(cls, base_layer):
        input_dim, _ = cls.kernel_shape_of(base_layer)
        return np.eye(input_dim, dtype="float32"), lambda y: y

    def project_down(self, x, a):
        return matmul_trailing(x, a)  # (..., r)

    def project_up(self, hidden, b):
        return matmul_trailing(hidden, b)  # (..., units)

    def kernel_delta(self, a, b):
        return ops.matmul(a, b)  # (input_dim, units)

    def kernel_matrix(self, kernel):
        return kernel
