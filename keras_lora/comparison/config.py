"""`ComparisonConfig`: every size and setting of a comparison run, as data.

Three starting points:

- `ComparisonConfig()`: the offline default. The small GPT-2 shipped
  inside the package (`shipped.py`: pre-trained offline on Python's
  documentation and most of its standard library's code), fine-tuned on a
  task over that code: answering ``### Source of `json.dumps` `` with the
  function (`data.function_documents`). `corpus="unseen-packages"`
  fine-tunes on code it never read instead (`data.FINETUNE_PACKAGES`).
  Sized so the whole first run takes a few minutes on a 2-core CPU; the
  learning rates come from `keras-lora compare --lr-sweep` (see
  `LEARNING_RATE_GRID`). `base="scratch"` pre-trains a small GPT-2 on
  `pydoc_data.topics` instead (a few minutes, cached).
- `ComparisonConfig.tiny()`: seconds-long, for tests and smoke runs (a
  from-scratch toy base).
- `ComparisonConfig.for_preset(name)`: a real keras-hub preset with the
  keras.io GPT-2 LoRA recipe (see `PRESET_RECIPE`).
"""

import dataclasses
import hashlib
import json

from keras_lora.comparison.data import CORPORA, FUNCTION_REQUEST

# The keras.io example "Parameter-efficient fine-tuning of GPT-2 with LoRA"
# (examples/nlp/parameter_efficient_finetuning_of_gpt2_with_lora.py in
# keras-team/keras-io) fine-tunes gpt2_base_en with: batch size 32, sequence
# length 128, LoRA rank 4 and alpha 32 on query/value, and the same AdamW for
# both runs (learning rate 5e-5, weight decay 0.01 with biases and layer-norm
# gamma/beta excluded, epsilon 1e-6, global gradient clipping at norm 1.0).
PRESET_RECIPE = dict(
    sequence_length=128,
    batch_size=32,
    rank=4,
    alpha=32.0,
    full_learning_rate=5e-5,
    lora_learning_rate=5e-5,
    weight_decay=0.01,
    epsilon=1e-6,
    clipnorm=1.0,
)

# What `--targets` accepts: LoRA on the attention query and value
# projections (the LoRA paper's and keras.io's choice), or on every linear
# layer of the blocks (query, key, value, attention output, both
# feed-forward layers).
TARGETS = ("query_value", "all-linear")

# Where the base model comes from without `preset`: the small GPT-2
# shipped inside the package, or one pre-trained here (and cached).
BASES = ("shipped", "scratch")

# The learning rates `keras-lora compare --lr-sweep` tries for each method
# (same data, steps and schedule as the default run).
LEARNING_RATE_GRID = {
    "full": (1e-3, 3e-3, 6e-3),
    "lora": (1e-2, 3e-2, 6e-2, 1e-1),
}

# Sample prompts for plain code (`--corpus unseen-packages`, `--data`).
CODE_PROMPTS = (
    "def ",
    "import os\n",
    "class ",
    "    for ",
)
# Sample prompts for the default corpus: requests in its format, for
# functions the base read (`data.function_documents`).
FUNCTION_PROMPTS = tuple(
    FUNCTION_REQUEST.format(name=name)
    for name in (
        "textwrap.dedent",
        "json.dumps",
        "shutil.copyfile",
        "os.makedirs",
    )
)

# Fields that decide the cached base model (tokenizer + pre-training).
_BASE_FIELDS = (
    "vocabulary_size",
    "num_layers",
    "num_heads",
    "hidden_dim",
    "intermediate_dim",
    "sequence_length",
    "dropout",
    "pretrain_bytes",
    "pretrain_code_bytes",
    "pretrain_steps",
    "pretrain_batch_size",
    "pretrain_learning_rate",
    "pretrain_warmup_fraction",
    "weight_decay",
    "epsilon",
    "clipnorm",
    "seed",
)
# Bump when the pre-training code changes what it produces.
BASE_FORMAT_VERSION = 4


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """Settings of one LoRA-versus-full-fine-tuning comparison.

    Args:
        preset: `None` (the small offline base model, see `base`), a
            keras-hub preset name (`"gpt2_base_en"`, downloaded by
            keras-hub) or a local preset directory.
        base: without `preset`: `"shipped"` (the pre-trained GPT-2 that
            ships inside the package, see `shipped.py`) or `"scratch"`
            (pre-train one of the sizes below on `pydoc_data.topics` on
            first use, then cached).
        vocabulary_size, num_layers, num_heads, hidden_dim,
        intermediate_dim, dropout: the small `GPT2Backbone` pre-trained
            from scratch (`base="scratch"`, and the shipped base's build).
        sequence_length: tokens per training window.
        pretrain_bytes: bytes of `pydoc_data.topics` to pre-train on
            (`None`: all of it, about 465 KB; `base="scratch"`).
        pretrain_code_bytes: bytes of the standard library's code to add
            to the scratch pre-training text (default 0: prose only; never
            the packages the fine-tunes train and validate on).
        pretrain_steps, pretrain_batch_size, pretrain_learning_rate,
        pretrain_warmup_fraction: pre-training from scratch (the same
            AdamW and schedule shape as the fine-tunes).
        corpus: the built-in fine-tuning text when `data` is `None`:
            `"functions"` (a task over code the shipped base read:
            requests such as ``### Source of `json.dumps` `` answered by
            the function's source, `data.function_documents`) or
            `"unseen-packages"` (the standard-library packages no base
            model read, as plain code: new knowledge,
            `data.FINETUNE_PACKAGES`).
        data: fine-tuning text instead of `corpus`: a text file or a
            directory of text files.
        data_bytes: at most this many bytes of fine-tuning text are read.
        validation_fraction: share of the token windows held out.
        max_validation_windows: at most this many windows are evaluated.
        steps: training steps of each fine-tune.
        batch_size: fine-tuning batch size.
        full_learning_rate, lora_learning_rate: AdamW peak learning rates.
        warmup_fraction: share of the steps spent warming the learning
            rate up linearly; a cosine decay to a tenth follows.
        weight_decay, epsilon, clipnorm: AdamW settings shared by both.
        rank, alpha: LoRA rank and alpha (scale `alpha / rank`).
        targets: `"query_value"` (the attention query and value
            projections) or `"all-linear"` (every linear layer of the
            blocks).
        prompts: prompts for the generated samples (default: requests
            in the `"functions"` format, `FUNCTION_PROMPTS`, or the
            starts of code lines, `CODE_PROMPTS`, for other text).
        generate_length: total tokens per sample (prompt included).
        sample_top_k, sample_seed: samples are drawn from the `top_k`
            most likely tokens with this fixed seed (`sample_top_k=1`:
            greedy).
        seed: seeds weights, data order and the base model.
        smoke_test: sizes too small for the results to mean anything
            (`tiny()`); the report says so instead of judging them.
    """

    preset: str = None
    base: str = "shipped"
    vocabulary_size: int = 2048
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    dropout: float = 0.0
    sequence_length: int = 128
    pretrain_bytes: int = None
    pretrain_code_bytes: int = 0
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 5e-3
    pretrain_warmup_fraction: float = 0.1
    corpus: str = "functions"
    data: str = None
    data_bytes: int = 1_000_000
    validation_fraction: float = 0.1
    max_validation_windows: int = 96
    steps: int = 150
    batch_size: int = 16
    full_learning_rate: float = 3e-3
    lora_learning_rate: float = 6e-2
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    epsilon: float = 1e-6
    clipnorm: float = 1.0
    rank: int = 4
    alpha: float = 8.0
    targets: str = "query_value"
    prompts: tuple = None
    generate_length: int = 48
    sample_top_k: int = 10
    sample_seed: int = 1
    seed: int = 0
    smoke_test: bool = False

    def __post_init__(self):
        if self.prompts is None:
            code = self.data is not None or self.corpus != "functions"
            prompts = CODE_PROMPTS if code else FUNCTION_PROMPTS
            object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "prompts", tuple(self.prompts))
        for name in (
            "vocabulary_size",
            "num_layers",
            "num_heads",
            "hidden_dim",
            "intermediate_dim",
            "sequence_length",
            "pretrain_steps",
            "pretrain_batch_size",
            "data_bytes",
            "max_validation_windows",
            "steps",
            "batch_size",
            "rank",
            "generate_length",
            "sample_top_k",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(
                    f"ComparisonConfig: `{name}` must be an int, got {value!r}."
                )
            if value < 1:
                raise ValueError(
                    f"ComparisonConfig: `{name}` must be at least 1, got "
                    f"{value}."
                )
        code = self.pretrain_code_bytes
        if not isinstance(code, int) or isinstance(code, bool) or code < 0:
            raise ValueError(
                "ComparisonConfig: `pretrain_code_bytes` must be an int >= 0, "
                f"got {code!r}."
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                "ComparisonConfig: `validation_fraction` must be between 0 "
                f"and 1 (exclusive), got {self.validation_fraction}."
            )
        for name in ("warmup_fraction", "pretrain_warmup_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"ComparisonConfig: `{name}` must be in [0, 1), got "
                    f"{getattr(self, name)}."
                )
        if self.corpus not in CORPORA:
            raise ValueError(
                f"ComparisonConfig: `corpus` must be one of {CORPORA} "
                f"(--corpus), got {self.corpus!r}."
            )
        if self.base not in BASES:
            raise ValueError(
                f"ComparisonConfig: `base` must be one of {BASES} (--base), "
                f"got {self.base!r}."
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"ComparisonConfig: `hidden_dim` ({self.hidden_dim}) must be "
                f"divisible by `num_heads` ({self.num_heads})."
            )
        if self.vocabulary_size < 260:
            raise ValueError(
                "ComparisonConfig: `vocabulary_size` must be at least 260 "
                "(a byte-level BPE starts from 256 byte tokens plus "
                f"<|endoftext|>), got {self.vocabulary_size}."
            )
        if self.targets not in TARGETS:
            raise ValueError(
                f"ComparisonConfig: `targets` must be one of {TARGETS} "
                f"(--targets), got {self.targets!r}."
            )
        for name in ("full_learning_rate", "lora_learning_rate", "alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"ComparisonConfig: `{name}` must be positive, got "
                    f"{getattr(self, name)!r}."
                )
        if not self.prompts:
            raise ValueError("ComparisonConfig: give at least one prompt.")

    def target_modules(self):
        """`target_modules` for `kl.LoraConfig` (see `targets`)."""
        if self.targets == "all-linear":
            return "all-linear"
        return ["query", "value"]

    def targets_label(self):
        return "query/value" if self.targets == "query_value" else "all linear"

    @classmethod
    def tiny(cls, **overrides):
        """A seconds-long configuration for tests and smoke runs."""
        settings = dict(
            vocabulary_size=300,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            sequence_length=16,
            pretrain_bytes=12_000,
            pretrain_steps=8,
            pretrain_batch_size=8,
            data_bytes=30_000,
            max_validation_windows=8,
            steps=6,
            batch_size=4,
            prompts=("def ", "import "),
            generate_length=8,
            base="scratch",
            smoke_test=True,
        )
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def for_preset(cls, preset, **overrides):
        """The keras.io recipe (`PRESET_RECIPE`) on keras-hub `preset`."""
        settings = dict(PRESET_RECIPE, preset=preset)
        settings.update(overrides)
        return cls(**settings)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["prompts"] = list(self.prompts)
        return out

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"ComparisonConfig: unknown fields {unknown}; known fields: "
                f"{sorted(known)}."
            )
        return cls(**values)

    def base_key(self):
        """A short hash naming the cached base model for this config."""
        values = {name: getattr(self, name) for name in _BASE_FIELDS}
        values["format"] = BASE_FORMAT_VERSION
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def lora_parameter_count(self, num_layers, hidden_dim, intermediate_dim):
        """Trainable LoRA parameters for `targets` in every block.

        A projection from `n` to `m` features gets A `n x r` and B
        `r x m`. Query and value (and key and the attention output) map
        `hidden_dim` to `hidden_dim` (heads x head size); the feed-forward
        layers map `hidden_dim` to `intermediate_dim` and back.
        """
        r, h = self.rank, hidden_dim
        per_block = 2 * (h * r + r * h)  # query, value
        if self.targets == "all-linear":
            per_block *= 2  # key, attention output
            per_block += 2 * (h * r + r * intermediate_dim)  # feed-forward
        return num_layers * per_block
