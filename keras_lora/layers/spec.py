"""Adapter hyper-parameters and the one place that validates them.

`AdapterSpec` is what one named adapter of one layer is made of (plain,
JSON-friendly data). The `check_*` functions are the single validation of
those values: `AdapterSpec`, `LoraConfig`, adapter files and the server all
call them, each passing a `label` that says where the value came from
(`"LoraConfig.alpha"`, "Layer 'q', adapter 'x': `alpha`"), so every error
names the field and the fix the same way.
"""

import dataclasses
import math
import numbers
import re

import keras

from keras_lora.layers.variants import get_variant

DEFAULT_ADAPTER = "default"
ADAPTER_NAME_RULE = "Use letters, digits, '_' or '-' only."
# Adapter names appear in variable paths, file keys and URLs.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# A larger alpha / r scale overflows float32 activations (3.4e38) long
# before it is useful; PEFT recipes use alphas up to a few thousand.
MAX_ALPHA = 1e6


def is_int(value):
    """True for Python and numpy integers, not for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """True for real numbers, not for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_adapter_name(name):
    return isinstance(name, str) and bool(_ADAPTER_NAME.match(name))


def check_adapter_name(name, where, label="adapter name"):
    """Raises `ValueError` unless `name` is a valid adapter name."""
    if not is_adapter_name(name):
        raise ValueError(
            f"{where}: invalid {label} {name!r}. {ADAPTER_NAME_RULE}"
        )
    return name


def check_rank(rank, label):
    if not is_int(rank) or rank <= 0:
        raise ValueError(
            f"{label} must be a positive integer, got {rank!r}. Pass e.g. 8."
        )
    return int(rank)


def check_alpha(alpha, label):
    if not is_number(alpha):
        raise ValueError(
            f"{label} must be a positive number, got {alpha!r}. Pass e.g. "
            "the rank (scale 1)."
        )
    if not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(
            f"{label} must be > 0, got {alpha!r}: a positive, finite number "
            f"<= {MAX_ALPHA:g} (the branch is scaled by alpha / rank). Pass "
            "e.g. the rank (scale 1)."
        )
    return alpha


def check_dropout(dropout, label):
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"{label} must be in [0, 1), got {dropout!r}. Pass e.g. 0.1, "
            "or 0.0 for none."
        )
    return dropout


def check_flag(value, label):
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be True or False, got {value!r}.")
    return value


def variant_for(use_dora, label):
    """The variant name `use_dora` selects: `"dora"` or plain `"lora"`."""
    return "dora" if check_flag(use_dora, label) else "lora"


def kaiming_uniform():
    """loralib's A initializer: uniform in +-1/sqrt(fan_in).

    This is torch's `kaiming_uniform_(a=sqrt(5))`, which is what loralib and
    PEFT use for A; in Keras terms a variance-scaling uniform with scale 1/3.
    """
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


@dataclasses.dataclass
class AdapterSpec:
    """Hyper-parameters of one named adapter (plain data, JSON-friendly).

    `variant` names how the adapter computes (`"lora"`: the textbook
    low-rank branch; see `keras_lora.layers.variants`).
    """

    name: str = DEFAULT_ADAPTER
    rank: int = 8
    alpha: float = None
    dropout: float = 0.0
    use_rslora: bool = False
    a_initializer: object = None
    b_initializer: object = "zeros"
    variant: str = "lora"

    def __post_init__(self):
        if self.alpha is None and is_int(self.rank):
            self.alpha = self.rank
        if self.a_initializer is not None and not isinstance(
            self.a_initializer, (str, dict)
        ):
            self.a_initializer = keras.initializers.serialize(
                keras.initializers.get(self.a_initializer)
            )
        if not isinstance(self.b_initializer, (str, dict)):
            self.b_initializer = keras.initializers.serialize(
                keras.initializers.get(self.b_initializer)
            )

    @property
    def scale(self):
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        denominator = math.sqrt(self.rank) if self.use_rslora else self.rank
        return float(self.alpha) / denominator

    def validate(self, layer_name):
        """Raises `ValueError` naming `layer_name` for bad values."""
        check_adapter_name(self.name, f"Layer '{layer_name}'")
        where = f"Layer '{layer_name}', adapter '{self.name}'"
        check_rank(self.rank, f"{where}: `rank`")
        check_alpha(self.alpha, f"{where}: `alpha`")
        check_dropout(self.dropout, f"{where}: `dropout`")
        check_flag(self.use_rslora, f"{where}: `use_rslora`")
        get_variant(self.variant, where)

    def a_init(self):
        if self.a_initializer is None:
            return kaiming_uniform()
        return keras.initializers.get(self.a_initializer)

    def b_init(self):
        return keras.initializers.get(self.b_initializer)

    def get_config(self):
        return dataclasses.asdict(self)
