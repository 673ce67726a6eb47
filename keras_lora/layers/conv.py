"""`LoraConv`: `keras.layers.Conv1D`/`Conv2D`/`Conv3D` with low-rank
adapters."""

import keras
import numpy as np
from keras import ops

from keras_lora.layers.base import LoraLayer
from keras_lora.layers.construction import split_kwargs
from keras_lora.layers.projection import matmul_trailing
from keras_lora.layers.registry import register_lora_layer

_CONVS = {
    1: keras.layers.Conv1D,
    2: keras.layers.Conv2D,
    3: keras.layers.Conv3D,
}
_PER_CHANNEL = (
    "its kernel convolves each input channel separately (a per-channel "
    "kernel, not one [inputs] x [filters] matrix), so A @ B has no place "
    "in it. Adapt the pointwise/regular convolutions around it instead"
)


@register_lora_layer
@keras.saving.register_keras_serializable(package="keras_lora")
class LoraConv(LoraLayer):
    """A convolution with LoRA, in PEFT's layout.

    The kernel `(*kernel_size, in_channels, filters)` is viewed as a
    `[kernel window x in_channels] x [filters]` matrix. `A` is itself a
    convolution with the base's kernel size, strides, padding and dilation
    and `r` filters, `(*kernel_size, in_channels, r)`, and `B` a 1x1
    convolution to the base's filters, `(r, filters)`:

        y = conv(x, W) + b + s * conv(dropout(x), A) @ B

    which equals `conv(x, W + s A B)` (merging is exact). PEFT stores the
    same tensors as torch conv weights: `lora_A (r, in_channels,
    *kernel_size)`, `lora_B (filters, r, 1, ...)`. Grouped convolutions
    (`groups > 1`) have a block-diagonal kernel and are refused, as are
    depthwise and separable convolutions.

    Args:
        filters, kernel_size: as for the convolution.
        spatial_dims: 1, 2 or 3 (which of Conv1D/2D/3D the drop-in
            constructor builds).
        rank, alpha, dropout, use_rslora, a_initializer, b_initializer,
        adapter_name, bias_trainable: as for `LoraDense`.
        **kwargs: any other argument of the convolution (`strides`,
            `padding`, `data_format`, `dilation_rate`, `activation`, ...).

    Example:

    >>> import numpy as np
    >>> layer = LoraConv(8, 3, spatial_dims=2, rank=2, padding="same")
    >>> layer(np.ones((1, 5, 5, 4), "float32")).shape
    (1, 5, 5, 8)
    >>> [tuple(w.shape) for w in layer.trainable_weights]
    [(3, 3, 4, 2), (2, 8)]
    """

    wraps = tuple(_CONVS.values())
    category = "conv"
    refuses = {
        keras.layers.DepthwiseConv1D: _PER_CHANNEL,
        keras.layers.DepthwiseConv2D: _PER_CHANNEL,
        keras.layers.SeparableConv1D: _PER_CHANNEL,
        keras.layers.SeparableConv2D: _PER_CHANNEL,
    }

    def __init__(
        self,
        filters=None,
        kernel_size=None,
        spatial_dims=2,
        base_layer=None,
        **kwargs,
    ):
        wrapper_kwargs, conv_kwargs = split_kwargs(kwargs)
        dtype = conv_kwargs.pop("dtype", None)
        if base_layer is None:
            if filters is None or kernel_size is None:
                raise ValueError(
                    "LoraConv needs `filters` and `kernel_size` (as for "
                    "Conv2D), or use LoraConv.from_layer(conv) to wrap an "
                    "existing layer."
                )
            if spatial_dims not in _CONVS:
                raise ValueError(
                    f"LoraConv: `spatial_dims` must be 1, 2 or 3, got "
                    f"{spatial_dims!r}."
                )
            name = wrapper_kwargs.get("name")
            base_layer = _CONVS[spatial_dims](
                filters,
                kernel_size,
                dtype=dtype,
                name=f"{name}_base" if name else None,
                **conv_kwargs,
            )
        elif conv_kwargs:
            raise TypeError(
                f"LoraConv: unexpected arguments {sorted(conv_kwargs)}."
            )
        self.check_factorable(base_layer)
        super().__init__(base_layer, dtype=dtype, **wrapper_kwargs)

    @property
    def filters(self):
        return self.base_layer.filters

    # -- layer-type hooks ----------------------------------------------------

    @classmethod
    def check_factorable(cls, layer):
        groups = getattr(layer, "groups", 1)
        if isinstance(layer, cls.wraps) and groups != 1:
            raise ValueError(
                f"Layer '{layer.name}' is a grouped convolution "
                f"(groups={groups}): its kernel maps each group of input "
                "channels to its own filters (a block-diagonal matrix), "
                "which one A @ B cannot keep. Exclude it from LoRA "
                "(LoraConfig(exclude_modules=[...])) or use groups=1."
            )

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        shape = cls.kernel_shape_of(base_layer)
        return tuple(shape[:-1]) + (rank,), (rank, shape[-1])

    def project_down(self, x, a):
        return self._convolve(x, a)  # (batch, *spatial, r) or (batch, r, ...)

    def project_up(self, hidden, b):
        if self._channels_first:
            return ops.einsum("ar...,rf->af...", hidden, b)
        return matmul_trailing(hidden, b)  # (batch, *spatial, filters)

    def kernel_delta(self, a, b):
        return ops.tensordot(a, b, axes=1)  # (*kernel_size, in, filters)

    def kernel_matrix(self, kernel):
        return np.reshape(kernel, (-1, kernel.shape[-1]))

    def scale_output_units(self, outputs, factor):
        if self._channels_first:
            return outputs * ops.reshape(factor, self._unit_view())
        return outputs * factor

    def output_bias(self):
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or not self._channels_first:
            return bias
        return ops.reshape(bias, self._unit_view())

    def routing_equations(self):
        # Routed slots see the input as patches (`routed_project_down`),
        # channels last: `(batch, *spatial, window x in_channels)`.
        return "...p,pr->...r", "...r,rf->...f"

    def routed_project_down(self, x, a, equation):
        patches = self._patches(x)  # (batch, *spatial, p)
        window = int(np.prod(a.shape[1:-1]))
        a = ops.reshape(a, (-1, window, a.shape[-1]))  # (batch, p, r)
        return ops.einsum(equation, patches, a)

    def routed_project_up(self, hidden, b, equation):
        outputs = ops.einsum(equation, hidden, b)  # channels last
        if self._channels_first:
            return ops.moveaxis(outputs, -1, 1)
        return outputs

    # -- internals -----------------------------------------------------------

    @property
    def _channels_first(self):
        return self.base_layer.data_format == "channels_first"

    def _unit_view(self):
        return (self.filters,) + (1,) * len(self.base_layer.kernel_size)

    def _convolve(self, x, kernel):
        """`x` convolved with `kernel` the way the base layer convolves."""
        base = self.base_layer
        padding = base.padding
        if padding == "causal":  # Conv1D: pad the past, then "valid"
            left = base.dilation_rate[0] * (base.kernel_size[0] - 1)
            pads = [[0, 0], [left, 0], [0, 0]]  # batch, steps, channels
            if self._channels_first:
                pads = [[0, 0], [0, 0], [left, 0]]
            x = ops.pad(x, pads)
            padding = "valid"
        return ops.conv(
            x,
            kernel,
            strides=list(base.strides),
            padding=padding,
            dilation_rate=base.dilation_rate,
            data_format=base.data_format,
        )

    def _patches(self, x):
        """Every output position's input window, flattened in kernel order
        (`(batch, *spatial, window x in_channels)`): a convolution with an
        identity kernel, so strides, padding and dilation are the base's."""
        shape = self.kernel_shape_of(self.base_layer)[:-1]
        window = int(np.prod(shape))
        eye = np.eye(window, dtype="float32").reshape(tuple(shape) + (window,))
        patches = self._convolve(x, ops.cast(eye, x.dtype))
        if self._channels_first:
            return ops.moveaxis(patches, 1, -1)
        return patches
