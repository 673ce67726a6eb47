"""Checking a read adapter and planning its load into a model.

`check_meta` and `check_tensors` validate the two files of an adapter
directory; `plan_load` checks that the adapter fits a model (paths, layer
kinds, shapes) and returns a `_Plan` of what to load, without changing the
model. `adapter_files.load_adapter` executes the plan.
"""

import dataclasses
import warnings

import numpy as np

from keras_lora import _version, surgery
from keras_lora.adapter_paths import (
    SiteIndex,
    anchored,
    base_kind,
    expected_shapes,
    kernel_shape_of,
)
from keras_lora.apply import _records, lora_class_for
from keras_lora.config import BIAS_MODES, LoraConfig
from keras_lora.lora_layer import LoraLayer

FORMAT = "keras_lora.adapter"
FORMAT_VERSION = 1


def check_meta(meta, config_path):
    def fail(what):
        raise ValueError(
            f"load_adapter: '{config_path}' is not a keras_lora adapter "
            f"config: {what}."
        )

    if not isinstance(meta, dict):
        fail("expected a JSON object")
    if meta.get("format") != FORMAT:
        fail(f"'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        fail(
            f"'format_version' {version!r} is not supported by keras_lora "
            f"{_version.__version__} (it reads versions up to "
            f"{FORMAT_VERSION}); upgrade keras_lora"
        )
    for field, kind in (
        ("adapter_name", str),
        ("layers", dict),
        ("weights", dict),
        ("base_model", dict),
        ("modules_to_save", list),
    ):
        if not isinstance(meta.get(field), kind):
            fail(f"'{field}' is missing or not a {kind.__name__}")
    if not meta["layers"]:
        fail("'layers' is empty")
    for path, spec in meta["layers"].items():
        if not isinstance(spec, dict):
            fail(f"layer '{path}' is not an object")
        rank = spec.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            fail(f"layer '{path}' has an invalid rank {rank!r}")
        for field in ("alpha", "dropout"):
            if not isinstance(spec.get(field), (int, float)):
                fail(f"layer '{path}' has an invalid {field!r}")
        for field in ("kernel_shape", "lora_a_shape", "lora_b_shape"):
            if not isinstance(spec.get(field), list):
                fail(f"layer '{path}' has no {field!r}")
    for key, entry in meta["weights"].items():
        if not isinstance(entry, dict) or not {"layer", "variable"} <= set(
            entry
        ):
            fail(f"weights entry {key!r} is malformed")
    config = meta.get("config")
    if config is not None and not isinstance(config, dict):
        fail("'config' is not an object")
    if (config or {}).get("bias", "none") not in BIAS_MODES:
        fail(f"'config.bias' is {config['bias']!r}")


def check_tensors(meta, tensors, weights_path, config_path):
    expected = set(meta["weights"])
    for path in meta["layers"]:
        expected.update((f"{path}.lora_a", f"{path}.lora_b"))
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(
            f"load_adapter: '{weights_path}' does not match '{config_path}':"
            f" missing tensors {missing[:5]}, unexpected tensors "
            f"{extra[:5]}. The files are corrupt or from different saves."
        )
    for path, spec in meta["layers"].items():
        for part in ("a", "b"):
            value = tensors[f"{path}.lora_{part}"]
            recorded = tuple(spec[f"lora_{part}_shape"])
            if tuple(value.shape) != recorded or value.dtype != np.float32:
                raise ValueError(
                    f"load_adapter: '{weights_path}' is inconsistent with "
                    f"'{config_path}': '{path}.lora_{part}' is "
                    f"{value.dtype} {tuple(value.shape)}, the config says "
                    f"float32 {recorded}."
                )
        if spec["lora_a_shape"][-1] != spec["rank"]:
            raise ValueError(
                f"load_adapter: '{config_path}': layer '{path}' has rank "
                f"{spec['rank']} but A of shape {spec['lora_a_shape']}."
            )


@dataclasses.dataclass
class _Plan:
    config: LoraConfig
    layers: list  # (path, spec dict, A, B)
    extras: list  # (key, variable, value)
    module_paths: list


def plan_load(model, meta, tensors, name, directory):
    """Checks that the adapter fits `model`; returns what to load."""
    where = f"load_adapter('{directory}')"
    base = meta["base_model"]
    saved_class = base.get("class")
    if saved_class is not None and saved_class != type(model).__name__:
        raise ValueError(
            f"{where}: the adapter was saved from a {saved_class} "
            f"('{base.get('name')}'), but model '{model.name}' is a "
            f"{type(model).__name__}. Load it into the same base model."
        )
    existing = set(_records(model))
    sites = list(surgery.walk(model))
    for site in sites:
        if isinstance(site.layer, LoraLayer):
            existing.update(site.layer.adapters)
    if name in existing:
        raise ValueError(
            f"{where}: model '{model.name}' already has an adapter named "
            f"{name!r}. Pass another name, e.g. "
            f"load_adapter(model, directory, adapter_name='{name}_2'), or "
            "delete the existing one first (keras_lora.delete_adapter)."
        )
    index = SiteIndex(sites)
    saved_paths = list(meta["layers"]) + list(meta["modules_to_save"])
    saved_paths += [e["layer"] for e in meta["weights"].values()]
    mapping = index.map_paths(dict.fromkeys(saved_paths), where)
    renamed = {k: v for k, v in mapping.items() if k != v}
    layers = []
    for saved_path, spec in meta["layers"].items():
        path = mapping[saved_path]
        site = index.site(path, where)
        layer = site.layer
        target = layer.base_layer if isinstance(layer, LoraLayer) else layer
        if not isinstance(layer, LoraLayer) and lora_class_for(layer) is None:
            raise ValueError(
                f"{where}: layer '{path}' is a {type(layer).__name__}, which "
                "keras_lora cannot adapt (the adapter was saved for a "
                f"{spec.get('base_class')}). Is this the right base model?"
            )
        kind = base_kind(target)
        if spec.get("base_class") not in (None, kind):
            raise ValueError(
                f"{where}: layer '{path}' is a {kind}, but the adapter was "
                f"saved for a {spec['base_class']}."
            )
        saved_equation = spec.get("equation")
        equation = getattr(target, "equation", None)
        if saved_equation is not None and saved_equation != equation:
            raise ValueError(
                f"{where}: layer '{path}' computes '{equation}', but the "
                f"adapter was saved for '{saved_equation}'."
            )
        kernel_shape = kernel_shape_of(target)
        if kernel_shape is None:
            raise ValueError(
                f"{where}: layer '{path}' is not built yet, so its kernel "
                "shape is unknown. Build the model first (call it on data "
                "or `model.build(input_shape)`)."
            )
        a_shape, b_shape = expected_shapes(layer, spec["rank"])
        a = tensors[f"{saved_path}.lora_a"]
        b = tensors[f"{saved_path}.lora_b"]
        for part, value, want in (("A", a, a_shape), ("B", b, b_shape)):
            if tuple(value.shape) != tuple(want):
                raise ValueError(
                    f"{where}: shape mismatch at layer '{path}': the saved "
                    f"{part} ('{saved_path}.lora_{part.lower()}') has shape "
                    f"{tuple(value.shape)}, but this model expects "
                    f"{tuple(want)} (rank {spec['rank']}, base kernel "
                    f"{kernel_shape}; the adapter was saved for a base kernel"
                    f" {tuple(spec['kernel_shape'])}). The adapter belongs "
                    "to a different base model."
                )
        saved_kernel = tuple(spec["kernel_shape"])
        if saved_kernel and saved_kernel != kernel_shape:
            raise ValueError(
                f"{where}: layer '{path}' has a base kernel of shape "
                f"{kernel_shape}, but the adapter was saved for "
                f"{saved_kernel}. The adapter belongs to a different base "
                "model."
            )
        layers.append((path, spec, a, b))

    module_paths = [mapping[p] for p in meta["modules_to_save"]]
    wanted = {}
    for path in module_paths:
        site = index.site(path, where)
        wanted.update(index.module_variables(site))
    extras = []
    provided = set()
    for key, entry in meta["weights"].items():
        path = mapping[entry["layer"]]
        provided.add(f"{path}/{entry['variable']}")
        site = index.site(path, where)
        owned = index.own_variables(site)
        variable = owned.get(entry["variable"])
        if variable is None:
            raise ValueError(
                f"{where}: layer '{path}' has no variable named "
                f"{entry['variable']!r} (saved as {key!r}); its variables "
                f"are {sorted(owned)}."
            )
        value = tensors[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{where}: shape mismatch for {key!r}: saved "
                f"{tuple(value.shape)}, but variable '{variable.path}' of "
                f"this model has shape {tuple(variable.shape)}."
            )
        extras.append((key, variable, value))
    unsaved = sorted(set(wanted) - provided)
    if unsaved:
        raise ValueError(
            f"{where}: the adapter saves modules {module_paths}, but in this "
            f"model they also hold {unsaved}, which the file lacks. The "
            "adapter belongs to a different base model."
        )
    if renamed:
        warnings.warn(
            f"load_adapter: the model's layer names differ from the saved "
            f"ones by Keras's automatic numbering only; matched {renamed}. "
            "Give layers explicit names to make paths match exactly.",
            stacklevel=3,
        )
    config = _load_config(meta, layers, module_paths)
    return _Plan(config, layers, extras, module_paths)


def _load_config(meta, layers, module_paths):
    """A `LoraConfig` that targets exactly the saved layers and ranks."""
    saved = meta.get("config") or {}
    first = layers[0][1]
    rank, alpha = first["rank"], first["alpha"]
    return LoraConfig(
        rank=rank,
        alpha=alpha,
        dropout=first["dropout"],
        use_rslora=bool(first.get("use_rslora", False)),
        target_modules=[anchored(p) for p, *_ in layers],
        rank_pattern={
            anchored(p): s["rank"] for p, s, *_ in layers if s["rank"] != rank
        },
        alpha_pattern={
            anchored(p): s["alpha"]
            for p, s, *_ in layers
            if s["alpha"] != alpha
        },
        bias=saved.get("bias", "none"),
        modules_to_save=[anchored(p) for p in module_paths] or None,
    )
