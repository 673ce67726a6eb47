"""The low-rank branch's matrix products, shaped for every backend."""

import math

import keras
from keras import ops


def matmul_trailing(x, kernel, contracted_ndim=1):
    """`x (..., K1..Kc) @ kernel (K1..Kc, N1..Nm) -> (..., N1..Nm)`.

    On JAX and TensorFlow this is one 2-D matrix product on reshaped views
    (the leading axes of `x` folded into rows). The LoRA branches go
    through here because the gradient is then computed differently: for a
    3-D input, autodiff of a 3-D product contracts the weight gradient over
    two axes, and XLA:CPU copies the output gradient into a transposed
    layout for it, once per adapter (GPT-2 base shape with LoRA on every
    linear layer: a quarter of the JAX step; the 2-D form needs no copy).
    PyTorch folds the leading axes itself inside `tensordot`, which is
    about 2% faster in eager mode than reshaping from Python.
    """
    if keras.backend.backend() == "torch":
        return ops.tensordot(x, kernel, axes=contracted_ndim)
    shape = ops.shape(x)
    batch = tuple(shape[: len(shape) - contracted_ndim])
    rows = math.prod(kernel.shape[:contracted_ndim])
    outputs = tuple(kernel.shape[contracted_ndim:])
    product = ops.matmul(
        ops.reshape(x, (-1, rows)), ops.reshape(kernel, (rows, -1))
    )
    return ops.reshape(product, batch + outputs)
