"""`LoraConfig`: what to adapt and how, validated in one place."""

import dataclasses
import json
import re

from keras_lora.layers.registry import registered_classes
from keras_lora.layers.spec import (
    check_alpha,
    check_dropout,
    check_flag,
    check_rank,
    is_int,
    variant_for,
)
from keras_lora.model.matching import lookup

BIAS_MODES = ("none", "all", "lora_only")
# `target_modules` presets: "all-<category>" selects every layer of that
# LoRA category ("linear", "embedding", "conv", ...).
PRESET_PREFIX = "all-"
INIT_MODES = ("default", "gaussian", "pissa", "loftq")
LOFTQ_MODES = ("int4", "int8")
MAX_LOFTQ_ITERATIONS = 100
# Block-container names tried by `layers_to_transform` when no
# `layers_pattern` is given (keras-hub names its blocks
# `transformer_layer_<i>`).
DEFAULT_LAYERS_PATTERNS = (
    "transformer_layer",
    "layers",
    "layer",
    "blocks",
    "block",
    "h",
)


@dataclasses.dataclass
class LoraConfig:
    """Model-level LoRA settings, saved as JSON next to adapter weights.

    Args:
        rank: LoRA rank `r` for every target (see `rank_pattern`).
        alpha: scale numerator; the branch is scaled by `alpha / r`.
            Defaults to `rank`.
        dropout: dropout on the branch input during training.
        target_modules: which layers get LoRA. `None` (default): the query
            and value projections of every `MultiHeadAttention` (keras-hub's
            `CachedMultiHeadAttention` included). A list of names: a layer
            matches when its name or a path suffix equals an entry
            (`"query"`, `"self_attention/query"`). A string: a regular
            expression matched against the whole path. Presets select
            layers by kind: `"all-linear"` every Dense/EinsumDense except
            the model's output layer (PEFT's meaning), `"all-embedding"`
            every Embedding/ReversibleEmbedding (a tied token embedding
            adapts the logits too), `"all-conv"` every Conv1D/2D/3D
            (grouped ones are skipped); in general `"all-<category>"` for
            each registered layer category. A list may mix presets and
            names: `["all-linear", "all-embedding"]`.
        exclude_modules: same forms; matching layers are skipped.
        rank_pattern: `{pattern: rank}` per-layer overrides; a pattern is a
            name, a path suffix or a regex on the path.
        alpha_pattern: `{pattern: alpha}`, as `rank_pattern`.
        layers_to_transform: an int or list of block indices; only layers
            inside those blocks are adapted.
        layers_pattern: the block container's name (regex), e.g.
            `"transformer_layer"`; blocks are path components `<name>_<i>`.
        bias: `"none"` (all biases frozen), `"all"` (every bias in the model
            trains), `"lora_only"` (biases of adapted layers train).
        modules_to_save: names/path suffixes/regex of extra layers that train
            fully and are saved with the adapter (e.g. a new head).
        use_rslora: scale by `alpha / sqrt(r)`.
        use_dora: DoRA adapters (weight-decomposed LoRA, as PEFT's
            `use_dora=True`): a trainable magnitude per output unit on
            top of A and B (`keras_lora.layers.dora`).
        init: `"default"` (Kaiming-uniform A, zero B), `"gaussian"`
            (A ~ N(0, 1/r), zero B) or `"pissa"` (A, B from the top-r SVD
            of the kernel; the residual stays in the base, outputs unchanged)
            or `"loftq"` (LoftQ, for quantized bases: the float targets
            are quantized with `loftq_mode` by Keras, and A, B chosen so
            that the quantized kernel plus `s A B` is close to the float
            one, by `loftq_iterations` alternating quantize/SVD steps;
            see `keras_lora.layers.loftq`).
        loftq_mode: `"int4"` or `"int8"`: how `init="loftq"` quantizes.
        loftq_iterations: LoftQ's alternating steps (5, as in the LoftQ
            paper; with 1, PEFT's default, the base is the plainly
            quantized kernel and the adapter the top of its error).
    """

    rank: int = 8
    alpha: float = None
    dropout: float = 0.0
    target_modules: object = None
    exclude_modules: object = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    layers_to_transform: object = None
    layers_pattern: str = None
    bias: str = "none"
    modules_to_save: list = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    loftq_mode: str = "int4"
    loftq_iterations: int = 5

    def __post_init__(self):
        if self.alpha is None and is_int(self.rank):
            self.alpha = self.rank
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(
            self.layers_to_transform, bool
        ):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self):
        """Raises `ValueError` naming the bad field and the fix."""
        check_rank(self.rank, "LoraConfig.rank")
        check_alpha(self.alpha, "LoraConfig.alpha")
        check_dropout(self.dropout, "LoraConfig.dropout")
        for field in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, str) and field != "modules_to_save":
                _check_regex(field, value)
                _check_preset(field, value)
                continue
            if not isinstance(value, list) or not all(
                isinstance(v, str) for v in value
            ):
                raise ValueError(
                    f"LoraConfig.{field} must be None, a regex string or a "
                    f"list of names, got {value!r}."
                )
            for pattern in value:
                _check_regex(field, pattern)
                _check_preset(field, pattern)
            if field == "target_modules" and not value:
                raise ValueError(
                    "LoraConfig.target_modules is an empty list: name at "
                    "least one layer, or pass None for the default "
                    "(attention query/value)."
                )
        for field, check in (
            ("rank_pattern", check_rank),
            ("alpha_pattern", check_alpha),
        ):
            mapping = getattr(self, field)
            if not isinstance(mapping, dict):
                raise ValueError(
                    f"LoraConfig.{field} must be a dict, got {mapping!r}."
                )
            for pattern, value in mapping.items():
                if not isinstance(pattern, str):
                    raise ValueError(
                        f"LoraConfig.{field} keys must be strings (layer "
                        f"names or regexes), got {pattern!r}."
                    )
                _check_regex(field, pattern)
                check(value, f"LoraConfig.{field}[{pattern!r}]")
        if self.layers_to_transform is not None and (
            not isinstance(self.layers_to_transform, list)
            or not all(is_int(i) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ValueError(
                "LoraConfig.layers_to_transform must be a non-negative int "
                f"or a list of them, got {self.layers_to_transform!r}."
            )
        if self.layers_pattern is not None:
            if not isinstance(self.layers_pattern, str):
                raise ValueError(
                    "LoraConfig.layers_pattern must be a regex string, got "
                    f"{self.layers_pattern!r}."
                )
            _check_regex("layers_pattern", self.layers_pattern)
        if self.bias not in BIAS_MODES:
            raise ValueError(
                f"LoraConfig.bias must be one of {BIAS_MODES}, got "
                f"{self.bias!r}."
            )
        if self.init not in INIT_MODES:
            raise ValueError(
                f"LoraConfig.init must be one of {INIT_MODES}, got "
                f"{self.init!r}."
            )
        check_flag(self.use_rslora, "LoraConfig.use_rslora")
        check_flag(self.use_dora, "LoraConfig.use_dora")
        if self.use_dora and self.init in ("pissa", "loftq"):
            raise ValueError(
                f"LoraConfig: init={self.init!r} initialises plain LoRA "
                "adapters only; use it with use_dora=False, or "
                "init='default' for DoRA."
            )
        if self.loftq_mode not in LOFTQ_MODES:
            raise ValueError(
                f"LoraConfig.loftq_mode must be one of {LOFTQ_MODES}, got "
                f"{self.loftq_mode!r}."
            )
        iterations = self.loftq_iterations
        if not is_int(iterations) or not 1 <= iterations <= (
            MAX_LOFTQ_ITERATIONS
        ):
            raise ValueError(
                "LoraConfig.loftq_iterations must be an integer in [1, "
                f"{MAX_LOFTQ_ITERATIONS}], got {iterations!r}. Pass e.g. 1 "
                "(PEFT's default) or 5."
            )

    @property
    def variant(self):
        """The adapter variant: `"dora"` with `use_dora`, else `"lora"`."""
        return variant_for(self.use_dora, "LoraConfig.use_dora")

    # -- per-layer values ------------------------------------------------

    def rank_for(self, path):
        return lookup(self.rank_pattern, path, self.rank)

    def alpha_for(self, path):
        return lookup(self.alpha_pattern, path, self.alpha)

    # -- JSON ----------------------------------------------------------------

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ValueError(
                "LoraConfig.from_dict expects a JSON object (a dict of "
                f"LoraConfig fields), got {type(data).__name__} {data!r:.80}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"LoraConfig: unknown fields {unknown}. Known fields: "
                f"{sorted(known)}."
            )
        return cls(**data)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as error:
            raise ValueError(
                f"LoraConfig.from_json: not valid JSON ({error})."
            ) from None
        return cls.from_dict(data)


def preset_category(pattern):
    """The layer category of preset `pattern` (`"all-conv"` -> `"conv"`),
    or None if `pattern` is not a preset."""
    if not isinstance(pattern, str) or not pattern.startswith(PRESET_PREFIX):
        return None
    category = pattern[len(PRESET_PREFIX) :]
    return category if category in preset_categories() else None


def preset_categories():
    """The categories of the registered LoRA layer classes."""
    return sorted({cls.category for cls in registered_classes()})


def _check_preset(field, pattern):
    """A pattern that looks like a preset must be one (catches typos)."""
    if (
        field == "target_modules"
        and pattern.startswith(PRESET_PREFIX)
        and preset_category(pattern) is None
    ):
        known = [PRESET_PREFIX + c for c in preset_categories()]
        raise ValueError(
            f"LoraConfig.target_modules: unknown preset {pattern!r}. "
            f"Presets: {known}; or name layers by path."
        )


def _check_regex(field, pattern):
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"LoraConfig.{field}: {pattern!r} is not a valid regular "
            f"expression ({error})."
        ) from None
