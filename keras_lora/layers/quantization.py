"""LoRA on bases quantized by Keras (`model.quantize("int8" | "int4")`).

QLoRA in Keras terms: the base layer stays frozen in its quantized form
and runs its own (quantized) call; the adapters are float32 and add their
branch to its output. Everything quantization-specific that the LoRA layer
classes need is here, once:

- `quantization_mode(layer)`: the base's mode (`None`, `"int8"`, ...), and
  `check_supported(layer, where)`, which refuses the modes LoRA cannot be
  combined with (with the reason and the fix);
- `float_policy(policy)`: the dtype policy of the LoRA wrapper around a
  quantized base (the float policy it was quantized from: the wrapper
  itself holds only float adapters, and Keras would otherwise send its
  call to a quantized-call method it does not have);
- `requantized_add(base_layer, delta)`: the explicit, lossy merge:
  dequantize, add a kernel-shaped delta, requantize. This runs Keras's own
  code (the merge its built-in LoRA does when it saves a quantized layer),
  on a scratch copy of the base layer, and writes the result back with
  the layer's own `load_own_variables`; keras_lora never re-implements
  quantization;
- `Drift`: what a requantizing merge cost, measured on the layer's outputs;
- `dequantized_rows(layer, start, rows)`: a block of rows of a quantized
  embedding table in float32, the one place that applies Keras's
  dequantization formulas itself (see its docstring for why).
"""

import dataclasses

import keras
import numpy as np
from keras import ops

SUPPORTED_MODES = ("int8", "int4")

# Why a mode cannot carry LoRA adapters here, and what to do instead.
_UNSUPPORTED = {
    "float8": (
        "float8 is Keras's float8 *training* mode: the kernel stays a "
        "float variable and Keras rescales it every step, and Keras "
        "itself refuses LoRA on it"
    ),
    "gptq": (
        "a GPTQ kernel is calibrated and stored transposed and packed, "
        "and Keras does not support LoRA on it"
    ),
    "awq": (
        "an AWQ kernel is calibrated, packed and rescaled per input "
        "channel; Keras's built-in LoRA silently ignores its adapter there"
    ),
}


def quantization_mode(layer):
    """The layer's Keras quantization mode, or None if it is not quantized."""
    return getattr(layer, "quantization_mode", None)


def is_quantized(layer):
    return quantization_mode(layer) is not None


def check_supported(layer, where):
    """Raises `ValueError` if `layer` is quantized in a mode that cannot
    take LoRA adapters; says why and what to do."""
    mode = quantization_mode(layer)
    if mode is None or mode in SUPPORTED_MODES:
        return
    reason = _UNSUPPORTED.get(mode, "keras_lora does not know this mode")
    raise ValueError(
        f"{where}: layer '{layer.name}' is quantized with mode {mode!r}, "
        f"which keras_lora cannot combine with LoRA: {reason}. Quantize "
        f"with one of {SUPPORTED_MODES} instead (model.quantize('int8') or "
        "'int4': the base stays quantized and frozen, adapters train in "
        "float32), or apply LoRA to the float model."
    )


def float_policy(policy):
    """The float dtype policy a quantized `policy` was derived from.

    Keras names a quantized policy `"<mode>_from_<source>"` (e.g.
    `"int8_from_mixed_bfloat16"`); any other policy is returned unchanged.
    """
    mode = getattr(policy, "quantization_mode", None)
    if mode is None:
        return policy
    return keras.dtype_policies.get(policy.name.split("_from_", 1)[1])


def refusal(mode, where):
    """The error message for an implicit merge into a `mode` kernel."""
    return (
        f"Layer '{where}': cannot merge into its {mode}-quantized base "
        f"kernel: the sum would have to be rounded back to {mode}, so the "
        "merged model would drift from the adapted one. Keep the adapter "
        "unmerged (it runs on top of the quantized base, as in QLoRA), "
        "merge into the float model before quantizing it, or merge "
        "explicitly with keras_lora.merge_adapters(model, requantize=True) "
        "(or merge_and_unload(model, requantize=True), layer.merge("
        "requantize=True)), which dequantizes, adds, requantizes and "
        "reports the drift."
    )


def requantized_add(base_layer, delta):
    """`kernel = quantize(dequantize(kernel) + delta)`, in place.

    `delta` is float32 and shaped like the base's (unpacked) kernel. The
    arithmetic is Keras's own: a scratch copy of `base_layer` gets Keras's
    built-in LoRA with `A = delta` and `B = I` (so `A @ B = delta`
    exactly, for every layer type Keras quantizes), and its
    `save_own_variables` dequantizes, adds and requantizes as Keras does
    when it saves a quantized layer with LoRA. `base_layer` then loads
    those values with its own `load_own_variables`.
    """
    scratch = type(base_layer).from_config(base_layer.get_config())
    scratch.build((base_layer.get_build_config() or {}).get("input_shape"))
    values = {v.name: v for v in base_layer.weights}
    for variable in scratch.weights:
        variable.assign(values[variable.name])
    delta = ops.convert_to_numpy(delta).astype("float32")
    units = int(delta.shape[-1])
    scratch.enable_lora(units, a_initializer="zeros")  # scale alpha/r = 1
    new = [v for v in scratch.weights if v.name not in values]
    a, b = sorted(new, key=lambda v: v.name)  # "..._a", "..._b"
    a.assign(np.reshape(delta, a.shape))
    b.assign(np.eye(units, dtype="float32"))
    store = {}
    scratch.save_own_variables(store)
    base_layer.load_own_variables(store)


@dataclasses.dataclass
class Drift:
    """What a requantizing merge changed beyond the adapter, measured on
    the layer's outputs for probe inputs.

    Attributes:
        layer: the LoRA layer's name.
        mode: the base's quantization mode.
        output_drift: `|y_merged - y_exact| / |y_exact|` (Frobenius norms),
            where `y_exact` is the unmerged output (quantized base plus the
            float adapter branch).
        adapter_drift: `|y_merged - y_exact| / |y_exact - y_base|`: the
            error as a fraction of what the adapter changes (0: the merged
            model computes exactly what the adapter did; near 1: the
            adapter's effect is mostly lost in rounding).
        max_abs_error: the largest `|y_merged - y_exact|`.
    """

    layer: str
    mode: str
    output_drift: float
    adapter_drift: float
    max_abs_error: float

    def describe(self):
        return (
            f"'{self.layer}' ({self.mode}): output drift "
            f"{self.output_drift:.3%}, {self.adapter_drift:.1%} of the "
            f"adapter's change, max abs error {self.max_abs_error:.3g}"
        )


def measure_drift(name, mode, y_base, y_exact, y_merged):
    """A `Drift` from numpy outputs before and after the merge."""
    y_base, y_exact, y_merged = (
        np.asarray(y, "float64") for y in (y_base, y_exact, y_merged)
    )
    error = y_merged - y_exact
    norm = float(np.linalg.norm(error))
    return Drift(
        layer=name,
        mode=mode,
        output_drift=norm / max(float(np.linalg.norm(y_exact)), 1e-30),
        adapter_drift=norm
        / max(float(np.linalg.norm(y_exact - y_base)), 1e-30),
        max_abs_error=float(np.abs(error).max()) if error.size else 0.0,
    )


def gaussian_probe(base_layer, rows=64, seed=0):
    """Standard-normal inputs shaped like the base layer's built input
    (`rows` in the first axis, 1 for other unknown axes), to measure a
    merge's drift on."""
    shape = (base_layer.get_build_config() or {}).get("input_shape")
    if not shape:
        raise ValueError(
            f"Layer '{base_layer.name}' has no recorded input shape to "
            "probe; call it on data once first."
        )
    shape = [rows] + [1 if d is None else int(d) for d in shape[1:]]
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype("float32")


def dequantized_rows(layer, start, rows):
    """Rows `start:start + rows` of a quantized `Embedding`'s table, as
    float32: what Keras's own lookup `layer(ids)` returns for those ids.

    Keras's int4 lookup unpacks the *whole* packed table on every call, so
    reading a vocabulary-sized table in blocks through it costs one full
    unpack per block (on PyTorch, most of a GPT-2 step's time). Here only
    the block's stored rows are sliced, then unpacked with Keras's
    `keras.quantizers.unpack_int4` and dequantized with the formulas of
    Keras's `Embedding._int8_call` / `_int4_call` (Keras 3.15): int8 and
    per-channel int4 `q / scale[row]`, int4 in groups `(q - zero[row,
    group]) * scale[row, group]`. This is the only place keras_lora
    applies Keras's dequantization itself; `tests/test_quantized.py`
    checks it against `layer(ids)` on every layout, so a change in Keras
    fails there. `start` may be a traced integer (inside a loop); `rows`
    is a Python int. The layer's variables are found by name in
    `layer.weights`.
    """
    mode = quantization_mode(layer)
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"dequantized_rows: layer '{layer.name}' is not quantized with "
            f"one of {SUPPORTED_MODES} (mode {mode!r})."
        )
    stored = {v.name: v for v in layer.weights}

    def block(name):
        variable = stored[name]
        tail = tuple(variable.shape[1:])
        return ops.slice(
            ops.convert_to_tensor(variable),
            (start,) + (0,) * len(tail),
            (rows,) + tail,
        )

    table = block("embeddings")
    if mode == "int4":
        table = keras.quantizers.unpack_int4(table, layer.output_dim, axis=-1)
    table = ops.cast(table, "float32")
    scale = ops.cast(block("embeddings_scale"), "float32")
    if "embeddings_zero" in stored:  # int4 in groups, with zero points
        groups = ops.cast(stored["g_idx"], "int32")
        zero = ops.cast(block("embeddings_zero"), "float32")
        return ops.multiply(
            ops.subtract(table, ops.take(zero, groups, axis=-1)),
            ops.take(scale, groups, axis=-1),
        )
    return ops.divide(table, ops.reshape(scale, (rows, 1)))
