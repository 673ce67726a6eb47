"""A small fingerprint of the base weights an adapter was trained on.

An adapter only reproduces its fine-tuned model on the base weights it was
trained on; a different base of the same architecture (another random
initialisation, another checkpoint) loads without any shape error. Adapter
files therefore record, per adapted layer, the norm of the base kernel and
16 of its values at fixed positions, and `load_adapter` warns when the
model's kernels do not match them. The comparison is tolerant (norms
within 5%, samples correlated above 0.9), so the same base in another
dtype still matches; quantized kernels are not compared.
"""

import keras
import numpy as np

from keras_lora.layers.merging import FLOAT_DTYPES

SAMPLES = 16
_NORM_TOLERANCE = 0.05
_MIN_CORRELATION = 0.9


def kernel_fingerprint(lora_class, base_layer):
    """`{"norm": float, "samples": [16 floats]}`, or None if the kernel is
    not a float tensor (quantized)."""
    kernel = lora_class.kernel_of(base_layer)
    if str(kernel.dtype) not in FLOAT_DTYPES:
        return None
    values = np.asarray(keras.ops.convert_to_numpy(kernel), "float64")
    flat = values.reshape(-1)
    positions = np.linspace(0, flat.size - 1, SAMPLES).astype(int)
    return {
        "norm": float(np.linalg.norm(flat)),
        "samples": [float(v) for v in flat[positions]],
    }


def matches(saved, current):
    """True if `current` (from `kernel_fingerprint`) fits `saved`."""
    if not isinstance(saved, dict) or current is None:
        return True  # nothing recorded, or nothing comparable
    norm = saved.get("norm")
    samples = saved.get("samples")
    if not isinstance(norm, (int, float)) or not isinstance(samples, list):
        return True
    scale = max(abs(norm), abs(current["norm"]), 1e-12)
    if abs(norm - current["norm"]) / scale > _NORM_TOLERANCE:
        return False
    a = np.asarray(samples, "float64")
    b = np.asarray(current["samples"], "float64")
    if a.shape != b.shape:
        return False
    if a.std() == 0 or b.std() == 0:
        return np.allclose(a, b, rtol=_NORM_TOLERANCE, atol=1e-6)
    return float(np.corrcoef(a, b)[0, 1]) >= _MIN_CORRELATION
