"""PEFT's adapter directory: reading, checking and writing it.

A PEFT LoRA adapter is `adapter_config.json` (a serialized
`peft.LoraConfig`) and `adapter_model.safetensors`, whose keys are the
wrapped model's module paths:

    base_model.model.<module>.lora_A.weight    (r, in_features)
    base_model.model.<module>.lora_B.weight    (out_features, r)

and for an embedding (`nn.Embedding`, same layout: A reads the vocabulary)

    base_model.model.<module>.lora_embedding_A (r, num_embeddings)
    base_model.model.<module>.lora_embedding_B (embedding_dim, r)
    base_model.model.<module>.lora_magnitude_vector    (out_features,)

(the magnitude only with `use_dora=True`: DoRA, one value per output
feature, `keras_lora.layers.dora`).

`<module>` is the path in the HF model PEFT wrapped: `transformer.h.0.attn.
c_attn` in `GPT2LMHeadModel`, `h.0.attn.c_attn` in `GPT2Model`. Ranks and
alphas come from `r`/`lora_alpha`, overridden per module by `rank_pattern`/
`alpha_pattern`, whose keys are regexes matched as PEFT does
(`(.*\\.)?<key>$` against the module path, first match wins); the branch is
scaled by `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
"""

import json
import math
import os
import re

import numpy as np
import safetensors.numpy

from keras_lora.files.atomic import atomic_write_dir, fsync_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB])"
    r"|(?P<magnitude>lora_magnitude_vector))$"
)
# PEFT's tensor names per kind of module (`HfModule.kind`).
TENSOR_KEYS = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}
MAGNITUDE_SUFFIX = "lora_magnitude_vector"

# PEFT settings keras_lora cannot reproduce: (field, what it is, the fix).
# Any value other than None/False/empty turns the variant on.
_VARIANTS = (
    ("lora_bias", "a trained bias on lora_B (lora_bias=True)", None),
    ("use_qalora", "QA-LoRA (use_qalora=True)", None),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)", None),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)", None),
    ("layer_replication", "layer replication (layer_replication)", None),
    ("target_parameters", "LoRA on parameters (target_parameters)", None),
    ("trainable_token_indices", "trainable tokens", None),
    ("megatron_config", "Megatron parallel layers (megatron_config)", None),
    ("arrow_config", "Arrow routing (arrow_config)", None),
    ("kasa_config", "KaSA (kasa_config)", None),
    ("velora_config", "VeLoRA (velora_config)", None),
    ("monteclora_config", "MonteCLoRA (monteclora_config)", None),
    (
        "modules_to_save",
        "modules_to_save (whole trained modules such as a new head)",
        "save those modules' weights separately and load them with "
        "keras-hub's converter",
    ),
)
# Initialisations that change the base weights: the adapter alone does not
# reproduce the fine-tuned model unless PEFT converted it to plain LoRA.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
_DEFAULT_FIX = (
    "keras_lora implements plain LoRA and DoRA; merge the adapter into "
    "the base model in PEFT (merge_and_unload) and convert the merged "
    "model instead"
)


def read(directory, where):
    """Reads and checks a PEFT LoRA adapter; returns `(config, tensors)`.

    `tensors` maps keys to float32 numpy arrays. Raises `FileNotFoundError`
    for missing files and `ValueError` (naming the setting and the fix) for
    anything keras_lora cannot import.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{where}: no adapter directory at '{directory}'."
        )
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{where}: '{config_path}' is missing; a PEFT adapter "
            f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME} (written by "
            "PeftModel.save_pretrained)."
        )
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(directory, PICKLE_NAME)):
            raise ValueError(
                f"{where}: '{directory}' holds {PICKLE_NAME} (a pickle), "
                "which keras_lora never loads. Re-save the adapter with "
                "PeftModel.save_pretrained(..., safe_serialization=True) "
                f"to get {WEIGHTS_NAME}."
            )
        raise FileNotFoundError(f"{where}: '{weights_path}' is missing.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(
            f"{where}: '{config_path}' is not valid JSON ({error})."
        ) from None
    check_config(config, config_path, where)
    try:
        raw = safetensors.numpy.load_file(weights_path)
    except Exception as error:  # noqa: BLE001 - any parse failure is corrupt
        raise ValueError(
            f"{where}: cannot read '{weights_path}' ({error}). The file is "
            "corrupt, or holds a dtype numpy lacks (bfloat16: re-save the "
            "adapter in float32)."
        ) from None
    tensors = {}
    for key, value in raw.items():
        if value.dtype.kind != "f":
            raise ValueError(
                f"{where}: tensor '{key}' in '{weights_path}' is "
                f"{value.dtype}, not floating point."
            )
        tensors[key] = value.astype("float32")
    return config, tensors


def check_config(config, config_path, where):
    """Raises `ValueError` for a config keras_lora cannot import exactly."""

    def fail(what, fix=_DEFAULT_FIX):
        raise ValueError(f"{where}: '{config_path}' {what}. Fix: {fix}.")

    if not isinstance(config, dict):
        fail("is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        fail(
            f"is a {peft_type!r} adapter; keras_lora imports LoRA adapters "
            "(peft_type 'LORA') only",
            "convert it to a LoRA adapter, or merge it into the base model "
            "in PEFT and convert the merged model",
        )
    for field, what, fix in _VARIANTS:
        if config.get(field) not in (None, False, [], {}, ""):
            fail(
                f"uses {what}, which keras_lora does not implement",
                fix or _DEFAULT_FIX,
            )
    bias = config.get("bias", "none")
    if bias != "none":
        fail(
            f"trains biases (bias={bias!r}); keras_lora imports adapters "
            "with bias='none' only",
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        fail(
            f"was initialised with init_lora_weights={init!r}, which changes "
            "the base weights or the layer (a LoRA variant), so the adapter "
            "alone does not reproduce the fine-tuned model",
            "save it from PEFT with path_initial_model_for_weight_conversion "
            "(plain LoRA), or merge it and convert the merged model",
        )
    if config.get("use_dora", False) not in (True, False):
        fail(
            f"has an invalid 'use_dora': {config['use_dora']!r}", "fix the file"
        )
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if not _is_number(value) or value <= 0:
            fail(f"has an invalid {field!r}: {value!r}", "fix the file")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        fail(f"has an invalid 'lora_dropout': {dropout!r}", "fix the file")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(
            _is_number(v) and v > 0 for v in patterns.values()
        ):
            fail(f"has an invalid {field!r}: {patterns!r}", "fix the file")


def group_by_module(tensors, use_dora, where):
    """`{module: (A, B, magnitude)}` from PEFT tensor keys (the magnitude
    None unless `use_dora`); raises on any other key or a missing one.
    `kind_of_module(tensors)` says which modules are embeddings."""
    parts = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{where}: {_unknown_key_message(key)}")
        part = "M" if match.group("magnitude") else None
        part = part or match.group("ab") or match.group("eab")
        parts.setdefault(match.group("module"), {})[part] = value
    want = {"A", "B", "M"} if use_dora else {"A", "B"}
    names = {"A": "lora_A", "B": "lora_B", "M": MAGNITUDE_SUFFIX}
    for module, found in parts.items():
        if "M" in found and not use_dora:
            raise ValueError(
                f"{where}: module '{module}' has a DoRA magnitude "
                f"({MAGNITUDE_SUFFIX}) but the config does not set "
                "use_dora=True; the files are inconsistent."
            )
        missing = sorted(names[p] for p in want - set(found))
        if missing:
            raise ValueError(
                f"{where}: module '{module}' has "
                f"{sorted(names[p] for p in found)} but not {missing}; the "
                "adapter file is incomplete."
            )
    return {m: (p["A"], p["B"], p.get("M")) for m, p in parts.items()}


_BASE_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$"
)


def split_base_weights(tensors):
    """`(adapter tensors, {module: weight})`: PEFT also saves the whole
    weight of an adapted embedding (`<module>.base_layer.weight`, with
    `save_embedding_layers`), in case the vocabulary was resized."""
    adapter, base = {}, {}
    for key, value in tensors.items():
        match = _BASE_KEY.match(key)
        if match is None:
            adapter[key] = value
        else:
            base[match.group("module")] = value
    return adapter, base


def kind_of_module(tensors):
    """`{module: "linear" | "embedding"}` by the keys' tensor names."""
    kinds = {}
    for key in tensors:
        match = _KEY.match(key)
        if match is not None and not match.group("magnitude"):
            kind = "embedding" if match.group("eab") else "linear"
            kinds[match.group("module")] = kind
    return kinds


def _unknown_key_message(key):
    return (
        f"tensor '{key}' is not a LoRA A/B weight "
        "('base_model.model.<module>.lora_A.weight'); keras_lora cannot "
        f"import it. Fix: {_DEFAULT_FIX}."
    )


def pattern_value(patterns, module, default):
    """PEFT's per-module lookup in `rank_pattern`/`alpha_pattern`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scale(alpha, rank, use_rslora):
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def write(directory, config, tensors, metadata):
    """Writes a PEFT adapter directory atomically (temp dir + rename)."""
    tensors = {
        k: np.ascontiguousarray(v, dtype="float32") for k, v in tensors.items()
    }

    def fill(tmp):
        weights_path = os.path.join(tmp, WEIGHTS_NAME)
        safetensors.numpy.save_file(tensors, weights_path, metadata=metadata)
        fsync_file(weights_path)
        config_path = os.path.join(tmp, CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write_dir(directory, fill, keep=(CONFIG_NAME, WEIGHTS_NAME))
    return directory


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
