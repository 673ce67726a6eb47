"""Checks of what clients send: request fields.

Request checks raise `RequestError` with the field as `param`. Messages
show at most a short prefix of a client's value, so a huge or odd value
never makes a huge or unencodable answer. Adapters a client registers are
checked as adapter files are (`keras_lora.files.loading.check_meta` and
`check_tensors`: finite values, alpha and update in range).
"""

import math

from keras_lora.serving.errors import RequestError

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
