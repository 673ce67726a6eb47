"""LoftQ: LoRA initialised for a quantized base (Li et al. 2023).

Quantizing a kernel `W` loses information; a plain LoRA adapter starts
at zero, so fine-tuning starts from the quantized model's (worse) loss.
LoftQ picks the quantized base `Q` and the adapter together so that
`Q + s A B` is close to `W`, alternating two steps `iterations` times:

    Q_t = dequantize(quantize(W - s A_{t-1} B_{t-1}))     (A_0 B_0 = 0)
    s A_t B_t = the best rank-r approximation of W - Q_t  (truncated SVD)

The base then holds `quantize(W - s A_{T-1} B_{T-1})` and the adapter
`(A_T, B_T)`. With one iteration the base is the plain quantized kernel
and the adapter the top-r part of its quantization error.

Quantization is Keras's own (`layer.quantize(mode)`), run on scratch
copies of the float layer; the dequantized kernel is read back by calling
the quantized copy on one-hot inputs (the layer class's `kernel_probe`),
so LoftQ never re-implements Keras's (de)quantization.
"""

import contextlib
import dataclasses
import gc

import keras
import numpy as np

from keras_lora.layers.construction import variable_scopes_of

QUANTIZE_MODES = ("int4", "int8")


@dataclasses.dataclass
class LoftqPlan:
    """The LoftQ initialisation of one layer.

    Attributes:
        base: a new, quantized copy of the float layer (to replace it).
        a, b: the adapter's A and B (float32, adapter-shaped).
        quantized_error: `||W - Q||` for `Q` the plain quantized kernel
            (Frobenius norm, the float kernel `W` as reference).
        loftq_error: `||W - (Q_T + s A B)||`: LoftQ's reconstruction error.
    """

    base: keras.layers.Layer
    a: np.ndarray
    b: np.ndarray
    quantized_error: float
    loftq_error: float


def check_loftq_target(lora_class, base_layer, rank, where):
    """Raises `ValueError` (saying why and what to do) if LoftQ cannot
    initialise a rank-`rank` adapter on `base_layer`."""
    if getattr(base_layer, "quantization_mode", None) is not None:
        raise ValueError(
            f"{where}: init='loftq' needs the float kernel of layer "
            f"'{base_layer.name}' to approximate, but it is already "
            f"{base_layer.quantization_mode}-quantized. Apply LoftQ to the "
            "float model: keras_lora quantizes the layers it adapts itself "
            "(LoraConfig.loftq_mode)."
        )
    if lora_class.kernel_probe(base_layer) is None:
        raise ValueError(
            f"{where}: init='loftq' supports Dense and EinsumDense layers; "
            f"layer '{base_layer.name}' is a {type(base_layer).__name__}. "
            "Exclude it (exclude_modules) or use init='default'."
        )
    a_shape, b_shape = lora_class.adapter_shapes_for(base_layer, rank)
    rows, cols = int(np.prod(a_shape[:-1])), int(np.prod(b_shape[1:]))
    if rank > min(rows, cols):
        raise ValueError(
            f"{where}: init='loftq' needs rank <= {min(rows, cols)} at "
            f"layer '{base_layer.name}' (its kernel is a {rows}x{cols} "
            f"matrix), got rank {rank}. Lower the rank there (rank_pattern)."
        )


def plan_loftq(lora_class, base_layer, spec, mode, iterations):
    """The `LoftqPlan` of float `base_layer` for adapter `spec` (its rank
    and scale); changes nothing."""
    with _quick_collections():
        return _plan(lora_class, base_layer, spec, mode, iterations)


@contextlib.contextmanager
def _quick_collections():
    """Keras's `quantize` runs a full `gc.collect()` (when it drops the
    float kernel), which takes most of a second in a process holding a few
    million objects, and LoftQ quantizes scratch copies many times. The
    objects alive before stay out of those collections (`gc.freeze`) until
    LoftQ is done, unless the program manages frozen objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _plan(lora_class, base_layer, spec, mode, iterations):
    kernel = np.asarray(
        keras.ops.convert_to_numpy(lora_class.kernel_of(base_layer)),
        "float32",
    )
    # A wrapper around a float copy, for the class's kernel views.
    copy = _copy(lora_class, base_layer, kernel)
    helper = lora_class(base_layer=copy, adapters=[])
    a_shape, b_shape = lora_class.adapter_shapes_for(base_layer, spec.rank)
    reference = kernel.astype("float64")
    target, plain = kernel, None
    for _ in range(iterations):
        quantized_from = target
        dequantized = _dequantized(lora_class, base_layer, target, mode)
        plain = dequantized if plain is None else plain
        residual = helper.kernel_matrix(reference - dequantized)
        u, s, vt = np.linalg.svd(residual, full_matrices=False)
        root = np.sqrt(s[: spec.rank] / spec.scale)
        a = (u[:, : spec.rank] * root).astype("float32").reshape(a_shape)
        b = (root[:, None] * vt[: spec.rank]).astype("float32")
        b = b.reshape(b_shape)
        low_rank = spec.scale * np.asarray(
            keras.ops.convert_to_numpy(helper.kernel_delta(a, b)), "float64"
        )
        target = (reference - low_rank).astype("float32")
    base = _copy(lora_class, base_layer, quantized_from, scratch=False)
    with variable_scopes_of(base_layer):
        base.quantize(mode)
    return LoftqPlan(
        base=base,
        a=a,
        b=b,
        quantized_error=float(np.linalg.norm(reference - plain)),
        loftq_error=float(np.linalg.norm(reference - (dequantized + low_rank))),
    )


def effective_kernel(layer, adapter_name):
    """What LoRA `layer` computes with: its (dequantized) base kernel plus
    adapter `adapter_name`'s `s A B`, float64 numpy (for measuring)."""
    base = layer.base_layer
    inputs, to_kernel = layer.kernel_probe(base)
    outputs = base(inputs)
    bias = layer.output_bias()
    if bias is not None:
        outputs = outputs - keras.ops.cast(bias, outputs.dtype)
    kernel = np.asarray(to_kernel(keras.ops.convert_to_numpy(outputs)))
    delta = keras.ops.convert_to_numpy(layer.delta_weight(adapter_name))
    return kernel.astype("float64") + delta


def _dequantized(lora_class, base_layer, kernel, mode):
    """`dequantize(quantize(kernel))` as Keras quantizes `base_layer`."""
    copy = _copy(lora_class, base_layer, kernel)
    copy.quantize(mode)
    inputs, to_kernel = lora_class.kernel_probe(copy)
    outputs = keras.ops.convert_to_numpy(copy(inputs))
    return np.asarray(to_kernel(outputs), "float64")


def _copy(lora_class, layer, kernel, scratch=True):
    """A new built copy of float `layer` from its config, with its
    weights and `kernel` as its kernel. A scratch copy computes in float32
    without bias or activation (its calls give the kernel); otherwise the
    copy keeps all but the kernel (the replacement base)."""
    config = dict(layer.get_config())
    if scratch:
        config["dtype"] = "float32"
        if "activation" in config:
            config["activation"] = None
    copy = type(layer).from_config(config)
    with variable_scopes_of(layer):
        copy.build((layer.get_build_config() or {}).get("input_shape"))
    values = {v.name: v for v in layer.weights}
    for variable in copy.weights:
        variable.assign(values[variable.name])
    lora_class.kernel_of(copy).assign(kernel)
    bias = getattr(copy, "bias", None)
    if scratch and bias is not None:
        bias.assign(np.zeros(bias.shape, bias.dtype))
    return copy
