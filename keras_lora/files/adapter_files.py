"""Adapter files: save one named adapter, load it into any compatible model.

A saved adapter is a directory, as in PEFT:

    directory/
        adapter_config.json          what was adapted, how, for which base
        adapter_model.safetensors    the tensors (safetensors, never pickle)

Tensor keys use the stable layer path of `keras_lora.model.surgery.walk`: layer
names joined by `/` from the model down, without the model's own name
(`"transformer_layer_0/self_attention/query"` in a keras-hub GPT-2, `"fc1"`
in a Sequential). Two kinds of keys:

    "{path}.{tensor}"  a tensor of the adapter at `path`, float32, exactly
                       as the layer stores it; which tensors, is the
                       adapter variant's business. Plain LoRA has
                       "{path}.lora_a" (A, shape `(contracted..., r)`) and
                       "{path}.lora_b" (B, shape `(r, outputs...)`).
    "{path}/{name}"    a whole variable saved with the adapter, keyed by the
                       path of the layer that owns it and the variable's
                       name: the variables of `modules_to_save` layers
                       (`"head/kernel"`, `"head/bias"`) and, for
                       `bias="lora_only"|"all"`, the trained biases
                       (`"fc1/bias"`; for a LoRA layer, its base layer's).

Layer paths are built from layer names, so give layers explicit names where
Keras would number them (`dense_3`, `multi_head_attention_1` differ between
two copies of a model built in one process); keras-hub models already name
their layers.

`adapter_config.json` holds the format version, the keras_lora version, the
adapter name, the `LoraConfig` (the one `apply_lora` recorded, or one
rebuilt from the layers), per-layer specs (variant, rank, alpha, dropout,
rsLoRA, the LoRA class's description of the base layer (base class, kernel
shape, equation), the shape of every tensor), the entries of the
whole-variable keys, a description of the base model (class, name, kernel
shape of every adapted layer) and the sha256 of the safetensors file.

`save_adapter` writes both files into a temporary directory beside the
target and swaps it into place, so an interrupted save leaves the previous
adapter intact. `load_adapter` checks everything (files, checksum, paths,
shapes, base model) before it changes the model.
"""

import hashlib
import json
import os
import re

import keras
import numpy as np
import safetensors
import safetensors.numpy

from keras_lora.files.atomic import (
    OLD_TAG,
    atomic_write_dir,
    fsync_file,
    leftovers,
    reading,
)
from keras_lora.files.fingerprint import kernel_fingerprint
from keras_lora.files.loading import (
    FORMAT,
    FORMAT_VERSION,
    adapter_names_in,
    check_meta,
    check_tensors,
    execute_load_plan,
    plan_load,
)
from keras_lora.files.paths import (
    SiteIndex,
    bias_variables,
    check_unique_paths,
    modules_to_save_sites,
    nested_models,
)
from keras_lora.layers import LoraLayer
from keras_lora.layers.spec import check_adapter_name
from keras_lora.model import surgery
from keras_lora.model.config import LoraConfig
from keras_lora.model.records import applied_config, check_portable
from keras_lora.version import VERSION

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# -- saving -------------------------------------------------------------------


def save_adapter(model, directory, adapter_name="default"):
    """Saves adapter `adapter_name` of `model` to `directory`.

    Writes `adapter_config.json` and `adapter_model.safetensors` (see the
    module docstring for the layout). The write is atomic: both files go
    into a fresh directory beside `directory`, which then replaces it; an
    interrupted save leaves the previous adapter in `directory` intact.
    Other files already in `directory` (a README, a tokenizer) are kept.

    Args:
        model: a model with LoRA layers holding adapter `adapter_name`.
        directory: the directory to write (created if needed).
        adapter_name: which adapter to save.

    Returns:
        The directory's path.

    Raises:
        ValueError: if no layer holds `adapter_name`, if two saved layers
            share a path, or if the adapter was PiSSA-initialised (PiSSA
            changes the base kernel, so an adapter file alone cannot
            restore it: save the whole model instead).

    Example:

    >>> kl.apply_lora(model, kl.LoraConfig(rank=4))          # doctest: +SKIP
    >>> kl.save_adapter(model, "my_adapter")                 # doctest: +SKIP
    >>> kl.load_adapter(fresh_base_model, "my_adapter")      # doctest: +SKIP
    """
    tensors, meta = collect_adapter(model, adapter_name)
    directory = os.path.abspath(os.fspath(directory))

    def write(tmp):
        weights_path = os.path.join(tmp, WEIGHTS_NAME)
        safetensors.numpy.save_file(
            tensors,
            weights_path,
            metadata={"format": FORMAT, "adapter_name": adapter_name},
        )
        fsync_file(weights_path)
        meta["safetensors_sha256"] = _sha256(weights_path)
        config_path = os.path.join(tmp, CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write_dir(directory, write, keep=(CONFIG_NAME, WEIGHTS_NAME))
    return directory


def collect_adapter(model, adapter_name):
    """`(tensors, metadata)` of adapter `adapter_name`; changes nothing.

    What `save_adapter` writes; also used by `AdapterBank.register` for
    in-memory models.
    """
    sites = list(surgery.walk(model))
    layer_sites = [
        s
        for s in sites
        if isinstance(s.layer, LoraLayer) and adapter_name in s.layer.adapters
    ]
    if not layer_sites:
        known = sorted(adapter_names_in(model))
        raise ValueError(
            f"save_adapter: model '{model.name}' has no adapter named "
            f"{adapter_name!r}. Its adapters are: {known or 'none'} "
            "(apply one with keras_lora.apply_lora(model, config))."
        )
    check_unique_paths(layer_sites, "save_adapter")
    unbuilt = [s.path for s in layer_sites if not s.layer.built]
    if unbuilt:
        raise ValueError(
            f"save_adapter: layers {unbuilt} are not built yet, so adapter "
            f"{adapter_name!r} has no weights. Call the model on data once "
            "first."
        )
    recorded = applied_config(model, adapter_name)
    check_portable(
        model,
        adapter_name,
        "save_adapter",
        "Save the whole model instead (keras_lora.save_model or model.save)",
    )

    tensors = {}
    layers = {}
    kernel_shapes = {}
    fingerprints = {}
    for site in layer_sites:
        layer = site.layer
        adapter = layer.adapter(adapter_name)
        spec = adapter.spec
        shapes = {}
        for tensor, variable in adapter.variables.items():
            value = _to_numpy(variable).astype("float32")
            tensors[f"{site.path}.{tensor}"] = value
            shapes[tensor] = list(value.shape)
        description = layer.describe(layer.base_layer)
        kernel_shapes[site.path] = description["kernel_shape"]
        fingerprint = kernel_fingerprint(type(layer), layer.base_layer)
        if fingerprint is not None:
            fingerprints[site.path] = fingerprint
        layers[site.path] = {
            **description,
            "variant": spec.variant,
            "rank": spec.rank,
            "alpha": spec.alpha,
            "dropout": spec.dropout,
            "use_rslora": spec.use_rslora,
            "tensors": shapes,
        }

    config = recorded
    source = "recorded"
    if config is None:
        config = _config_from_layers(layer_sites, adapter_name)
        source = "reconstructed"

    index = SiteIndex(sites)
    module_sites = modules_to_save_sites(index, config.modules_to_save)
    check_unique_paths(module_sites, "save_adapter")
    extras = {}
    for site in module_sites:
        extras.update(index.module_variables(site))
    extras.update(bias_variables(index, config.bias, layer_sites))
    weights = {}
    for key, (path, variable) in extras.items():
        if key in tensors:
            raise ValueError(
                f"save_adapter: the key {key!r} of variable "
                f"'{variable.path}' clashes with another tensor key."
            )
        value = _to_numpy(variable)
        if value.dtype.kind == "f" and value.dtype.name not in (
            "float16",
            "float32",
            "float64",
        ):
            value = value.astype("float32")  # bfloat16 & co.
        tensors[key] = value
        weights[key] = {
            "layer": path,
            "variable": variable.name,
            "shape": list(value.shape),
            "dtype": str(variable.dtype),
        }

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": VERSION,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "config_source": source,
        "layers": layers,
        "modules_to_save": [s.path for s in module_sites],
        "weights": weights,
        "base_model": {
            "class": type(model).__name__,
            "name": model.name,
            "models": nested_models(model, sites),
            "kernel_shapes": kernel_shapes,
            "fingerprints": fingerprints,
        },
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return tensors, meta


def _config_from_layers(layer_sites, adapter_name):
    """A `LoraConfig` that targets exactly the layers holding the adapter."""
    specs = {s.path: s.layer.adapter_spec(adapter_name) for s in layer_sites}
    first = next(iter(specs.values()))
    bias = "none"
    if any(s.layer.bias_trainable for s in layer_sites):
        bias = "lora_only"
    return LoraConfig(
        rank=first.rank,
        alpha=first.alpha,
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        use_dora=first.variant == "dora",
        target_modules=[re.escape(p) for p in specs],
        rank_pattern={
            re.escape(p): s.rank
            for p, s in specs.items()
            if s.rank != first.rank
        },
        alpha_pattern={
            re.escape(p): s.alpha
            for p, s in specs.items()
            if s.alpha != first.alpha
        },
        bias=bias,
    )


# -- loading ------------------------------------------------------------------


def load_adapter(model, directory, adapter_name=None, is_trainable=True):
    """Loads an adapter saved by `save_adapter` into `model`, in place.

    The model may be a fresh, never-adapted copy of the base model (the
    saved layers are wrapped with LoRA, as `apply_lora` would) or a model
    that already has LoRA layers (the adapter is added beside the others).
    Everything is checked before the model changes: a failed load leaves it
    as it was.

    As in PEFT, the active adapter does not change if the model already had
    adapters (activate the new one with `keras_lora.set_adapter`); in a
    model without adapters the loaded one becomes active.

    Args:
        model: the base model (same class, layer paths and kernel shapes as
            the one the adapter was saved from), built.
        directory: a directory written by `save_adapter`.
        adapter_name: name to load the adapter under; defaults to the saved
            name.
        is_trainable: if False, the loaded adapter's variables (and its
            saved whole variables) are frozen, for inference. A later
            `apply_lora` (or `layer.trainable = True`) unfreezes them.

    Returns:
        `model`.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: a file is corrupt or truncated (checksum included), the
            adapter name is taken, or the model does not match the adapter
            (model class, a missing layer path, a shape or rank mismatch).
    """
    directory = os.path.abspath(os.fspath(directory))
    meta, tensors = read_adapter(directory)
    name = meta["adapter_name"] if adapter_name is None else adapter_name
    check_adapter_name(name, "load_adapter")
    plan = plan_load(model, meta, tensors, name, directory)
    execute_load_plan(model, plan, name, is_trainable)
    return model


def read_adapter(directory):
    """Reads and checks an adapter directory; returns `(config, tensors)`.

    `config` is the parsed `adapter_config.json`; `tensors` maps keys to
    numpy arrays. Nothing is loaded into a model.

    Raises:
        FileNotFoundError: the directory or a file is missing.
        ValueError: a file is corrupt, truncated or inconsistent.
    """
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    # Under a shared lock on the directory: a concurrent save replaces it
    # before or after both files are read, never between the reads.
    with reading(directory):
        if not os.path.isdir(directory):
            hint = ""
            backups = leftovers(directory, OLD_TAG)
            if backups:
                hint = (
                    f" An interrupted save left the previous adapter at "
                    f"'{backups[0]}'; rename it to '{directory}' to recover "
                    "it (the next save_adapter there does it itself)."
                )
            raise FileNotFoundError(
                f"load_adapter: no adapter directory at '{directory}'.{hint}"
            )
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"load_adapter: '{path}' is missing. An adapter "
                    f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                    "(written by keras_lora.save_adapter)."
                )
        with open(config_path, "rb") as f:
            raw_config = f.read()
        with open(weights_path, "rb") as f:
            data = f.read()
    try:
        meta = json.loads(raw_config.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        reason = (
            "nested too deeply" if isinstance(error, RecursionError) else error
        )
        raise ValueError(
            f"load_adapter: '{config_path}' is not valid JSON ({reason}); "
            "the file is corrupt or truncated."
        ) from None
    check_meta(meta, config_path)
    expected = meta.get("safetensors_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"load_adapter: '{weights_path}' is corrupt: its sha256 does not "
            f"match the one recorded in '{config_path}' (the file is "
            "truncated, modified, or from another save)."
        )
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as error:  # noqa: BLE001 - any parse failure is corrupt
        raise ValueError(
            f"load_adapter: '{weights_path}' is not a readable safetensors "
            f"file ({error}); the file is corrupt or truncated."
        ) from None
    check_tensors(meta, tensors, weights_path, config_path)
    return meta, tensors


def _to_numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
