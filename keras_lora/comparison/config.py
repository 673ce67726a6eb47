"""`ComparisonConfig`: every size and setting of a comparison run, as data.

Three starting points:

- `ComparisonConfig()`: the offline default. A small GPT-2 (4 blocks,
  hidden 128, vocabulary 4,096, sequence length 128) pre-trained briefly on
  `pydoc_data.topics`, then fine-tuned on the standard library's source.
  Sized so the whole run (tokenizer, pre-training, both fine-tunes) takes a
  few minutes on a 2-core CPU.
- `ComparisonConfig.tiny()`: seconds-long, for tests and smoke runs.
- `ComparisonConfig.for_preset(name)`: a real keras-hub preset with the
  keras.io GPT-2 LoRA recipe (see `PRESET_RECIPE`).
"""

import dataclasses
import hashlib
import json

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

DEFAULT_PROMPTS = (
    "def ",
    "import os\n",
    "class ",
    "    for ",
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
    "pretrain_epochs",
    "pretrain_batch_size",
    "pretrain_learning_rate",
    "seed",
)
# Bump when the pre-training code changes what it produces.
BASE_FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """Settings of one LoRA-versus-full-fine-tuning comparison.

    Args:
        preset: `None` (build and pre-train the small offline base model),
            a keras-hub preset name (`"gpt2_base_en"`, downloaded by
            keras-hub) or a local preset directory.
        vocabulary_size, num_layers, num_heads, hidden_dim,
        intermediate_dim, dropout: the small `GPT2Backbone` (ignored with
            `preset`).
        sequence_length: tokens per training window.
        pretrain_bytes: bytes of `pydoc_data.topics` to pre-train on
            (`None`: all of it, about 465 KB).
        pretrain_epochs, pretrain_batch_size, pretrain_learning_rate:
            pre-training of the small base model.
        data: fine-tuning text: `None` (the Python standard library's own
            `.py` sources) or a text file or a directory of text files.
        data_bytes: at most this many bytes of fine-tuning text are read.
        validation_fraction: share of the token windows held out.
        max_validation_windows: at most this many windows are evaluated.
        steps: training steps of each fine-tune.
        batch_size: fine-tuning batch size.
        full_learning_rate, lora_learning_rate: AdamW learning rates.
        weight_decay, epsilon, clipnorm: AdamW settings shared by both.
        rank, alpha: LoRA rank and alpha (scale `alpha / rank`) on the
            attention query and value projections.
        prompts: prompts for the generated samples (greedy decoding).
        generate_length: total tokens per sample (prompt included).
        seed: seeds weights, data order and the base model.
    """

    preset: str = None
    vocabulary_size: int = 4096
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    dropout: float = 0.0
    sequence_length: int = 128
    pretrain_bytes: int = None
    pretrain_epochs: int = 3
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 2e-3
    data: str = None
    data_bytes: int = 1_000_000
    validation_fraction: float = 0.1
    max_validation_windows: int = 96
    steps: int = 150
    batch_size: int = 16
    full_learning_rate: float = 5e-4
    lora_learning_rate: float = 3e-3
    weight_decay: float = 0.01
    epsilon: float = 1e-6
    clipnorm: float = 1.0
    rank: int = 4
    alpha: float = 8.0
    prompts: tuple = DEFAULT_PROMPTS
    generate_length: int = 32
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        for name in (
            "vocabulary_size",
            "num_layers",
            "num_heads",
            "hidden_dim",
            "intermediate_dim",
            "sequence_length",
            "pretrain_epochs",
            "pretrain_batch_size",
            "data_bytes",
            "max_validation_windows",
            "steps",
            "batch_size",
            "rank",
            "generate_length",
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
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                "ComparisonConfig: `validation_fraction` must be between 0 "
                f"and 1 (exclusive), got {self.validation_fraction}."
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
        if not self.prompts:
            raise ValueError("ComparisonConfig: give at least one prompt.")

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
            pretrain_epochs=1,
            pretrain_batch_size=8,
            data_bytes=30_000,
            max_validation_windows=8,
            steps=6,
            batch_size=4,
            prompts=("def ", "import "),
            generate_length=8,
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

    def lora_parameter_count(self, num_layers, hidden_dim):
        """Trainable LoRA parameters on query and value of every block.

        Each projection maps `hidden_dim` to `hidden_dim` (heads x head
        size): A is `hidden_dim x r` and B is `r x hidden_dim`.
        """
        return num_layers * 2 * 2 * hidden_dim * self.rank
