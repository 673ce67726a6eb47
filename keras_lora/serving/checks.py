"""Checks of what clients send: request fields and adapter values.

Request checks raise `RequestError` with the field as `param`; the adapter
check raises `ValueError` naming the file and the key. Messages show at
most a short prefix of a client's value, so a huge or odd value never
makes a huge or unencodable answer.
"""

import math

import numpy as np

from keras_lora.serving.errors import RequestError

_FLOAT32_MAX = float(np.finfo("float32").max)
# Seeds are 63-bit, as in OpenAI-style APIs (a signed 64-bit integer >= 0).
MAX_SEED = 2**63 - 1


def show(value, limit=40):
    """A short, ASCII-safe rendering of a client's value for messages."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(value, field, low, high=None):
    """`value` is an int (not a bool) in `[low, high]` (`high` None: any)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(
            f"'{field}' must be an integer, got {type(value).__name__}.",
            field,
        )
    if value < low:
        raise RequestError(
            f"'{field}' must be >= {low}, got {show(value)}.", field
        )
    if high is not None and value > high:
        raise RequestError(
            f"'{field}' must be <= {high}, got {show(value)}.", field
        )


def check_number(value, field, low, high, low_open=False):
    """`value` is a finite int or float in `[low, high]` (`(low, high]`
    with `low_open`)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(
            f"'{field}' must be a number, got {type(value).__name__}.", field
        )
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        bracket = "(" if low_open else "["
        raise RequestError(
            f"'{field}' must be in {bracket}{low:g}, {high:g}], got "
            f"{show(value)}.",
            field,
        )


def check_text(value, field):
    """`value` is a string that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str):
        raise RequestError(
            f"'{field}' must be a string, got {type(value).__name__}.", field
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(
            f"'{field}' is not valid Unicode text: character "
            f"{show(value[error.start])} at index {error.start} is a lone "
            "surrogate (encode text as UTF-8, or escape characters outside "
            "the Basic Multilingual Plane as a surrogate pair).",
            field,
        ) from None


def check_adapter_values(meta, tensors, where):
    """Refuses an adapter whose scales or tensors are not finite.

    A NaN or infinite alpha or tensor entry, or a scale so large that the
    low-rank update overflows float32, turns every output of a routed row
    into NaN or inf. `meta` and `tensors` are what
    `keras_lora.read_adapter` returns; `where` names the adapter.

    Raises:
        ValueError: naming the file, the layer and the key.
    """
    for key, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise ValueError(
                f"{where}: tensor '{key}' in adapter_model.safetensors has "
                f"dtype {array.dtype}; adapter tensors are numbers."
            )
        bad = array.size - int(np.isfinite(array.astype("float32")).sum())
        if bad:
            raise ValueError(
                f"{where}: tensor '{key}' in adapter_model.safetensors holds "
                f"{bad} value(s) that are NaN or infinite in float32; every "
                "output of the adapter would be NaN. Re-save the adapter "
                "from a model whose LoRA weights are finite."
            )
    for path, spec in meta.get("layers", {}).items():
        _check_layer_scale(path, spec, tensors, where)


def _check_layer_scale(path, spec, tensors, where):
    label = f"{where}: adapter_config.json: layer '{path}'"
    alpha, rank = spec.get("alpha"), spec.get("rank")
    if not _is_real(alpha) or not math.isfinite(alpha):
        raise ValueError(
            f"{label}: 'alpha' is {show(alpha)}; it must be a finite number."
        )
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(
            f"{label}: 'rank' is {show(rank)}; it must be a positive integer."
        )
    root = math.sqrt(rank) if spec.get("use_rslora") else rank
    # `scale * max|A| * max|B|`: one term of the update for an input of
    # ones. Past float32's range, the update overflows for any input of
    # ordinary size.
    bound = abs(alpha) / root
    for key, value in tensors.items():
        if key.startswith(f"{path}.") and np.size(value):
            bound *= float(np.max(np.abs(np.asarray(value, "float64"))))
    if not bound <= _FLOAT32_MAX:
        raise ValueError(
            f"{label}: 'alpha' {show(alpha)} with these tensors scales the "
            f"update past float32's range ({bound:.3g}); every output would "
            "be inf or NaN. Use a smaller alpha."
        )


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
