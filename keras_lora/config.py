"""`LoraConfig`: what to adapt and how, validated in one place."""

import dataclasses
import json
import re

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "pissa")
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
            expression matched against the whole path. `"all-linear"`:
            every Dense/EinsumDense except the model's output layer.
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
        init: `"default"` (Kaiming-uniform A, zero B), `"gaussian"`
            (A ~ N(0, 1/r), zero B) or `"pissa"` (A, B from the top-r SVD
            of the kernel; the residual stays in the base, outputs unchanged).
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
    init: str = "default"

    def __post_init__(self):
        if self.alpha is None and _is_int(self.rank):
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
        if not _is_int(self.rank) or self.rank <= 0:
            raise ValueError(
                f"LoraConfig.rank must be a positive integer, got "
                f"{self.rank!r}."
            )
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(
                f"LoraConfig.alpha must be a positive number, got "
                f"{self.alpha!r}."
            )
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(
                f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}."
            )
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if value is None or isinstance(value, str):
                if isinstance(value, str):
                    _check_regex(field, value)
                continue
            if not isinstance(value, list) or not all(
                isinstance(v, str) for v in value
            ):
                raise ValueError(
                    f"LoraConfig.{field} must be None, a regex string or a "
                    f"list of names, got {value!r}."
                )
            if field == "target_modules" and not value:
                raise ValueError(
                    "LoraConfig.target_modules is an empty list: name at "
                    "least one layer, or pass None for the default "
                    "(attention query/value)."
                )
        for field, check in (
            ("rank_pattern", lambda v: _is_int(v) and v > 0),
            ("alpha_pattern", lambda v: _is_number(v) and v > 0),
        ):
            mapping = getattr(self, field)
            if not isinstance(mapping, dict):
                raise ValueError(
                    f"LoraConfig.{field} must be a dict, got {mapping!r}."
                )
            for pattern, value in mapping.items():
                _check_regex(field, pattern)
                if not check(value):
                    raise ValueError(
                        f"LoraConfig.{field}[{pattern!r}] must be a positive "
                        f"{'integer' if field == 'rank_pattern' else 'number'}"
                        f", got {value!r}."
                    )
        if self.layers_to_transform is not None and (
            not isinstance(self.layers_to_transform, list)
            or not all(_is_int(i) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ValueError(
                "LoraConfig.layers_to_transform must be a non-negative int "
                f"or a list of them, got {self.layers_to_transform!r}."
            )
        if self.layers_pattern is not None:
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
        if not isinstance(self.use_rslora, bool):
            raise ValueError(
                "LoraConfig.use_rslora must be True or False, got "
                f"{self.use_rslora!r}."
            )

    # -- per-layer values ------------------------------------------------

    def rank_for(self, path):
        return _lookup(self.rank_pattern, path, self.rank)

    def alpha_for(self, path):
        return _lookup(self.alpha_pattern, path, self.alpha)

    # -- JSON ----------------------------------------------------------------

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
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
        return cls.from_dict(json.loads(text))


def path_matches(pattern, path):
    """True if `pattern` is `path`, a `/`-suffix of it, or a regex on it."""
    if path == pattern or path.endswith("/" + pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def _lookup(mapping, path, default):
    for pattern, value in mapping.items():
        if path_matches(pattern, path):
            return value
    return default


def _check_regex(field, pattern):
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"LoraConfig.{field}: {pattern!r} is not a valid regular "
            f"expression ({error})."
        ) from None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
