"""Whole-model `.keras` files for LoRA models, wherever the LoRA layers sit.

`model.save` + `keras.saving.load_model` round-trips a LoRA model only when
its LoRA layers are in the saved config (LoRA layers used directly in a
Sequential or Functional model). Layers that create their sublayers from
their own config (`MultiHeadAttention`, keras-hub transformer blocks and
backbones) come back with plain `Dense`/`EinsumDense` sublayers, and the
adapter variables in the file then fail to load.

`save_model` writes a normal `.keras` zip (Keras's own weights, assets and
optimizer state) whose `config.json` wraps the model's config in a small
`keras_lora>LoraModelLoader` object recording the applied LoRA: the
`LoraConfig` of every adapter (as `keras_lora.applied_configs` returns
them) and every LoRA layer's adapters (specs in order, active, merged,
enabled), plus the `trainable` flags of layers and variables. Keras calls
`LoraModelLoader.from_config` while loading: it rebuilds the model from the
wrapped config, puts the LoRA layers back, and returns the model, into
which Keras then loads the weights, assets and optimizer state and which it
compiles. So the file loads with `keras_lora.load_model(path)` and also with
plain `keras.saving.load_model(path)` once `keras_lora` is imported. The
same record is also written to a `keras_lora.json` entry of the zip, for
people and tools that inspect the file.

Merged adapters are re-merged (so the layers know they are merged) before
the weights load; the kernel values in the file, which contain the merge,
then overwrite the kernel.
"""

import json
import os
import shutil
import zipfile

import keras

from keras_lora.files.atomic import atomic_write_file
from keras_lora.files.paths import SiteIndex
from keras_lora.layers import LoraLayer, lora_class_for
from keras_lora.model import surgery
from keras_lora.model.config import LoraConfig
from keras_lora.model.records import applied_configs, replace_configs
from keras_lora.version import VERSION

RECORD_NAME = "keras_lora.json"
FORMAT = "keras_lora.model"
FORMAT_VERSION = 1
_CONFIG_NAME = "config.json"


def save_model(model, path):
    """Saves `model` (LoRA layers and all) to a `.keras` file, atomically.

    Use it instead of `model.save(path)` for models whose LoRA layers live
    inside MultiHeadAttention, keras-hub blocks or other layers that build
    their sublayers themselves; it works for every model. The file is
    written to a temporary file beside `path` and renamed into place, so an
    interrupted save leaves a previous file intact.

    Args:
        model: a Keras model, with or without LoRA layers.
        path: a path ending in `.keras`.

    Returns:
        The file's path.
    """
    path = _keras_path(path, "save_model")
    record = lora_record(model)

    def write(final, scratch):
        plain = scratch()
        model.save(plain)
        _rewrite_archive(plain, final, record)

    return atomic_write_file(path, write, suffix=".keras")


def save_merged_model(model, path, custom_objects=None):
    """Saves `model` with its adapters merged, as a plain Keras `.keras` file.

    The file holds no keras_lora layer: `keras.saving.load_model` loads it
    without keras_lora installed, and its outputs equal `model`'s (active
    adapters merged into the kernels; inactive adapters are dropped).
    `model` itself is not changed: a copy is merged, through a temporary
    `save_model` file (so this needs the memory of a second model). The
    file is written atomically and saved without compile state.

    Args:
        model: a Keras model, with or without LoRA layers.
        path: a path ending in `.keras`.
        custom_objects: passed to the loading of the temporary copy, for
            models with unregistered custom layers.

    Returns:
        The file's path.
    """
    from keras_lora.model.operations import merge_and_unload

    path = _keras_path(path, "save_merged_model")

    def write(final, scratch):
        source = scratch()
        save_model(model, source)
        copy = load_model(source, custom_objects=custom_objects, compile=False)
        layers = _lora_layers(copy)
        for layer in layers:
            if not layer.adapters_enabled and not layer.merged:
                layer.set_adapter([])  # disabled: outputs have no adapter
        if layers:
            merge_and_unload(copy)
        copy.save(final)

    return atomic_write_file(path, write, suffix=".keras")


def _keras_path(path, caller):
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".keras"):
        raise ValueError(
            f"{caller}: the path must end in '.keras', got '{path}'."
        )
    return path


def _lora_layers(model):
    return [
        s.layer for s in surgery.walk(model) if isinstance(s.layer, LoraLayer)
    ]


def load_model(path, custom_objects=None, compile=True, safe_mode=True):
    """Loads a `.keras` file, putting LoRA layers back where they were.

    Files from `save_model` come back with every adapter (trainable as
    saved, active and merged as saved) and, if compiled, with the optimizer
    state, so training continues. Other `.keras` files load as with
    `keras.saving.load_model`.

    Args:
        path: a `.keras` file.
        custom_objects, compile, safe_mode: as for `keras.saving.load_model`.

    Returns:
        The model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_model: no file at '{path}'.")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        size = os.path.getsize(path)
        raise ValueError(
            f"load_model: '{path}' is not a .keras archive ("
            + ("the file is empty" if size == 0 else f"{size} bytes, no zip")
            + "): it is truncated, corrupt or another format. An "
            "interrupted keras_lora.save_model never leaves such a file; "
            "re-save the model."
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if RECORD_NAME in archive.namelist():
                try:
                    record = json.loads(archive.read(RECORD_NAME))
                except (ValueError, RecursionError) as error:
                    raise ValueError(
                        f"load_model: the '{RECORD_NAME}' entry of '{path}' "
                        f"is not valid JSON ({error}); the file is corrupt."
                    ) from None
                _check_record(record, f"'{path}'")
    return keras.saving.load_model(
        path,
        custom_objects=custom_objects,
        compile=compile,
        safe_mode=safe_mode,
    )


@keras.saving.register_keras_serializable(
    package="keras_lora", name="LoraModelLoader"
)
class LoraModelLoader:
    """The top object of a `save_model` file's config.json.

    Its config is `{"model": <the model's serialized config>, "keras_lora":
    <the LoRA record>}`; `from_config` returns the model itself, rebuilt
    with its LoRA layers, so Keras loads the weights into it.
    """

    def __init__(self, model=None, keras_lora=None):
        self.model = model
        self.keras_lora = keras_lora

    def get_config(self):
        return {"model": self.model, "keras_lora": self.keras_lora}

    @classmethod
    def from_config(cls, config):
        record = config["keras_lora"]
        _check_record(record, "config.json")
        # Custom objects and safe mode of the enclosing load_model apply.
        model = keras.saving.deserialize_keras_object(config["model"])
        restore_lora(model, record)
        _compile_on_load(model)
        return model


def _compile_on_load(model):
    """Makes Keras's `compile_from_config` call compile `model` for real.

    After `from_config`, Keras compiles the loaded model with the saved
    compile config (unless loading with `compile=False`) and then loads the
    optimizer's variables. For a model that overrides `compile` (every
    keras-hub task) Keras's `compile_from_config` only warns, so the saved
    optimizer, its state and the loss would be silently replaced by the
    task's defaults. The override is set on this instance only and removes
    itself once called.
    """
    if not hasattr(model, "compile_from_config"):
        return

    def compile_from_config(compile_config):
        object.__delattr__(model, "compile_from_config")
        compile_config = keras.saving.deserialize_keras_object(compile_config)
        model.compile(**compile_config)
        if getattr(model, "optimizer", None) is not None and model.built:
            model.optimizer.build(model.trainable_variables)

    object.__setattr__(model, "compile_from_config", compile_from_config)


# -- the record ---------------------------------------------------------


def lora_record(model):
    """The JSON-friendly record of the LoRA in `model` that files keep.

    `{"adapters": {name: LoraConfig dict}, "layers": [{"path", "class",
    "adapters": [AdapterSpec dicts], "active", "merged", "enabled",
    "bias_trainable"}], "layer_trainable": {path: bool}, "trainable":
    {"<layer path>/<variable name>": bool}}`. Layers are listed in the
    order their variables appear in `model.weights`, which `restore_lora`
    reproduces (the optimizer's state is stored in that order).
    """
    sites = list(surgery.walk(model))
    index = SiteIndex(sites)
    position = {id(w): i for i, w in enumerate(model.weights)}
    lora_sites = [s for s in sites if isinstance(s.layer, LoraLayer)]
    for site in lora_sites:
        if len(index.by_path[site.path]) > 1:
            raise ValueError(
                f"save_model: two layers share the path '{site.path}', so "
                "the LoRA layers cannot be put back. Give them distinct "
                "names."
            )
    lora_sites.sort(
        key=lambda s: min(
            (position.get(id(w), len(position)) for w in s.layer.weights),
            default=len(position),
        )
    )
    layers = []
    for site in lora_sites:
        layer = site.layer
        layers.append(
            {
                "path": site.path,
                "class": type(layer).__name__,
                "adapters": [
                    layer.adapter_spec(n).get_config() for n in layer.adapters
                ],
                "active": layer.active_adapters,
                "merged": layer.merged_adapters,
                "enabled": layer.adapters_enabled,
                "bias_trainable": layer.bias_trainable,
            }
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": VERSION,
        "adapters": {n: c.to_dict() for n, c in applied_configs(model).items()},
        "layers": layers,
        "layer_trainable": _layer_flags(index),
        "trainable": {
            k: v.trainable for k, v in _variables_by_key(index).items()
        },
    }


def restore_lora(model, record):
    """Puts the LoRA layers of `record` (see `lora_record`) into `model`.

    `model` is the plain model rebuilt from its config; afterwards its
    structure and variables match the saved model's, ready for its
    weights. LoRA layers that came back from the config already are kept.
    """
    index = SiteIndex(list(surgery.walk(model)))
    for entry in record["layers"]:
        site = index.site(entry["path"], "load_model")
        layer = site.layer
        specs = entry["adapters"]
        if not isinstance(layer, LoraLayer):
            lora_class = lora_class_for(layer)
            if lora_class is None or lora_class.__name__ != entry["class"]:
                raise ValueError(
                    f"load_model: layer '{entry['path']}' is a "
                    f"{type(layer).__name__}; the file has a "
                    f"{entry['class']} there."
                )
            layer = lora_class.wrap(
                layer,
                adapters=specs,
                bias_trainable=entry["bias_trainable"],
            )
            surgery.replace(site, layer)
        for spec in specs:
            if spec["name"] not in layer.adapters:
                layer.add_adapter(**spec)
        names = [s["name"] for s in specs]
        if layer.adapters != names:
            raise ValueError(
                f"load_model: layer '{entry['path']}' has adapters "
                f"{layer.adapters}, the file has {names}."
            )
        if layer.merged_adapters != entry["merged"]:
            layer.unmerge()
            layer.set_adapter(entry["active"])
            if entry["merged"]:
                # Marks the layer merged; the merged kernel from the file
                # replaces the kernel this computes when the weights load.
                layer.merge(entry["merged"])
        elif layer.active_adapters != entry["active"]:
            layer.set_adapter(entry["active"])
        layer.adapters_enabled = entry["enabled"]
        layer.bias_trainable = entry["bias_trainable"]
    replace_configs(
        model,
        {
            name: LoraConfig.from_dict(config)
            for name, config in record["adapters"].items()
        },
    )
    index = SiteIndex(list(surgery.walk(model)))
    # Parents before children (walk order), then the variables themselves.
    flags = record.get("layer_trainable", {})
    for site in index.sites:
        flag = flags.get(site.path)
        if flag is not None and len(index.by_path[site.path]) == 1:
            site.layer.trainable = flag
    flags = record.get("trainable", {})
    for key, variable in _variables_by_key(index).items():
        if key in flags:
            variable.trainable = flags[key]
    surgery.reset_compiled_functions(model)
    return model


def _layer_flags(index):
    return {
        path: sites[0].layer.trainable
        for path, sites in index.by_path.items()
        if len(sites) == 1
    }


def _variables_by_key(index):
    """`{"<layer path>/<variable name>": variable}`, unambiguous keys only.

    A LoRA layer's key covers its adapters' variables and its base layer's.
    """
    result = {}
    clashes = set()
    for site in index.sites:
        if len(index.by_path[site.path]) > 1:
            continue
        layer = site.layer
        if isinstance(layer, LoraLayer):
            owned = [w for w in layer.weights]
        else:
            children = index.children.get(id(layer), [])
            taken = {id(w) for child in children for w in child.weights}
            owned = [w for w in layer.weights if id(w) not in taken]
        for variable in owned:
            key = f"{site.path}/{variable.name}"
            if key in result:
                clashes.add(key)
            result[key] = variable
    for key in clashes:
        del result[key]
    return result


def _check_record(record, where):
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(
            f"load_model: {where} has a malformed keras_lora record."
        )
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"load_model: {where} was written with keras_lora model format "
            f"{version!r}; keras_lora {VERSION} reads versions "
            f"up to {FORMAT_VERSION}. Upgrade keras_lora."
        )


# -- the archive --------------------------------------------------------


def _rewrite_archive(source, target, record):
    """Copies the `.keras` zip `source` to `target`, wrapping its config."""
    with zipfile.ZipFile(source) as zin:
        config = json.loads(zin.read(_CONFIG_NAME))
        compile_config = config.pop("compile_config", None)
        wrapped = {
            "module": "keras_lora.files.model_files",
            "class_name": "LoraModelLoader",
            "config": {"model": config, "keras_lora": record},
            "registered_name": "keras_lora>LoraModelLoader",
            "compile_config": compile_config,
        }
        with zipfile.ZipFile(target, "w") as zout:
            for info in zin.infolist():
                if info.filename in (_CONFIG_NAME, RECORD_NAME):
                    continue
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.compress_type = info.compress_type
                copy.external_attr = info.external_attr
                with zin.open(info) as src, zout.open(copy, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            zout.writestr(_CONFIG_NAME, json.dumps(wrapped), zipfile.ZIP_STORED)
            zout.writestr(
                RECORD_NAME, json.dumps(record, indent=2), zipfile.ZIP_STORED
            )
