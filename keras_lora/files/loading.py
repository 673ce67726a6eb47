"""Checking a read adapter, planning its load, and loading it.

`check_meta` and `check_tensors` validate the two files of an adapter
directory; `plan_load` checks that the adapter fits a model (paths, layer
kinds, shapes, what the file may write) and returns a `LoadPlan`, without
changing the model; `execute_load_plan` carries it out inside a model
transaction, so a failure leaves the model as it was. Shared by
`load_adapter`, `import_peft` and the serving bank.

Format versions: 1 recorded `lora_a_shape`/`lora_b_shape` per layer; 2
records every tensor of the adapter's variant under `tensors` (and the
variant's name), so adapters other than `(A, B)` fit the same file.
"""

import dataclasses
import warnings

import keras
import numpy as np

from keras_lora.files.fingerprint import kernel_fingerprint
from keras_lora.files.fingerprint import matches as fingerprint_matches
from keras_lora.files.paths import (
    SiteIndex,
    base_of,
    lora_class_of,
    nested_models,
)
from keras_lora.layers import AdapterSpec, LoraLayer
from keras_lora.layers.spec import (
    check_alpha,
    check_dropout,
    check_rank,
    is_int,
)
from keras_lora.layers.variants import get_variant
from keras_lora.model import surgery
from keras_lora.model.apply import apply_lora
from keras_lora.model.config import BIAS_MODES, LoraConfig
from keras_lora.model.matching import anchored
from keras_lora.model.records import applied_configs
from keras_lora.model.transaction import transaction
from keras_lora.version import VERSION

FORMAT = "keras_lora.adapter"
FORMAT_VERSION = 2


def check_meta(meta, config_path):
    """Validates a parsed `adapter_config.json`; upgrades version 1."""

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
    if not is_int(version) or version > FORMAT_VERSION:
        fail(
            f"'format_version' {version!r} is not supported by keras_lora "
            f"{VERSION} (it reads versions up to {FORMAT_VERSION}); upgrade "
            "keras_lora"
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
        if version == 1:
            _upgrade_layer(spec, fail, path)
        label = f"'{config_path}': layer '{path}'"
        try:
            check_rank(spec.get("rank"), f"{label}: 'rank'")
            check_alpha(spec.get("alpha"), f"{label}: 'alpha'")
            check_dropout(spec.get("dropout"), f"{label}: 'dropout'")
            get_variant(spec.get("variant", "lora"), label)
        except ValueError as error:
            raise ValueError(f"load_adapter: {error}") from None
        if not isinstance(spec.get("kernel_shape"), list):
            fail(f"layer '{path}' has no 'kernel_shape'")
        tensors = spec.get("tensors")
        if not isinstance(tensors, dict) or not all(
            isinstance(shape, list) for shape in tensors.values()
        ):
            fail(f"layer '{path}' has no 'tensors' shapes")
    for key, entry in meta["weights"].items():
        if not isinstance(entry, dict) or not {"layer", "variable"} <= set(
            entry
        ):
            fail(f"weights entry {key!r} is malformed")
    if not all(isinstance(p, str) for p in meta["modules_to_save"]):
        fail("'modules_to_save' must list layer paths")
    config = meta.get("config")
    if config is not None and not isinstance(config, dict):
        fail("'config' is not an object")
    if (config or {}).get("bias", "none") not in BIAS_MODES:
        fail(f"'config.bias' is {config['bias']!r}")


def _upgrade_layer(spec, fail, path):
    """Format 1 layer entries: `lora_a_shape`/`lora_b_shape`, plain LoRA."""
    shapes = {}
    for tensor in ("lora_a", "lora_b"):
        shape = spec.get(f"{tensor}_shape")
        if not isinstance(shape, list):
            fail(f"layer '{path}' has no '{tensor}_shape'")
        shapes[tensor] = shape
    spec.setdefault("tensors", shapes)
    spec.setdefault("variant", "lora")


def check_tensors(meta, tensors, weights_path, config_path):
    """Checks the tensors against the config: keys, dtypes, shapes, and
    that every value is finite."""
    expected = set(meta["weights"])
    for path, spec in meta["layers"].items():
        expected.update(f"{path}.{t}" for t in spec["tensors"])
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(
            f"load_adapter: '{weights_path}' does not match '{config_path}':"
            f" missing tensors {missing[:5]}, unexpected tensors "
            f"{extra[:5]}. The files are corrupt or from different saves."
        )
    for path, spec in meta["layers"].items():
        for tensor, recorded in spec["tensors"].items():
            key = f"{path}.{tensor}"
            value = tensors[key]
            if tuple(value.shape) != tuple(recorded) or (
                value.dtype != np.float32
            ):
                raise ValueError(
                    f"load_adapter: '{weights_path}' is inconsistent with "
                    f"'{config_path}': '{key}' is {value.dtype} "
                    f"{tuple(value.shape)}, the config says float32 "
                    f"{tuple(recorded)}."
                )
    for key, value in tensors.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise ValueError(
                f"load_adapter: '{weights_path}': tensor '{key}' holds "
                f"{int((~np.isfinite(value)).sum())} NaN or infinite values; "
                "the adapter diverged in training or the file is corrupt."
            )
    for path, spec in meta["layers"].items():
        _check_update_range(path, spec, tensors, config_path)


# float32's largest value: an adapter update past it is inf for any input.
_FLOAT32_MAX = float(np.finfo("float32").max)


def _check_update_range(path, spec, tensors, config_path):
    """Refuses finite values whose update still overflows float32.

    `scale * max|A| * max|B|` (times the other tensors' maxima, e.g. DoRA's
    magnitude) is one term of the update for an input of ones; past
    float32's range every output of the layer would be inf or NaN.
    """
    scale = AdapterSpec(
        rank=spec["rank"],
        alpha=spec["alpha"],
        use_rslora=bool(spec.get("use_rslora", False)),
    ).scale
    bound = scale
    for tensor in spec["tensors"]:
        value = tensors[f"{path}.{tensor}"]
        if value.size:
            bound *= float(np.max(np.abs(value.astype("float64"))))
    if not bound <= _FLOAT32_MAX:
        raise ValueError(
            f"load_adapter: '{config_path}': layer '{path}': alpha "
            f"{spec['alpha']!r} with these tensors scales the update past "
            f"float32's range ({bound:.3g}); every output would be inf or "
            "NaN. The file is corrupt or hostile."
        )


@dataclasses.dataclass
class LoadPlan:
    """What `execute_load_plan` will do; built and checked by `plan_load`."""

    config: LoraConfig
    layers: list  # (model path, saved spec dict, {tensor name: array})
    extras: list  # (key, variable, value)
    module_paths: list


def adapter_names_in(model):
    """Every adapter name a model holds or has a record of."""
    names = dict.fromkeys(applied_configs(model))
    for site in surgery.walk(model):
        if isinstance(site.layer, LoraLayer):
            names.update(dict.fromkeys(site.layer.adapters))
    return list(names)


def plan_load(model, meta, tensors, name, directory):
    """Checks that the adapter fits `model`; returns a `LoadPlan`."""
    where = f"load_adapter('{directory}')"
    index = SiteIndex(list(surgery.walk(model)))
    move = _model_prefixes(model, index, meta["base_model"], where)
    if name in adapter_names_in(model):
        raise ValueError(
            f"{where}: model '{model.name}' already has an adapter named "
            f"{name!r}. Pass another name, e.g. "
            f"load_adapter(model, directory, adapter_name='{name}_2'), or "
            "delete the existing one first (keras_lora.delete_adapter)."
        )
    saved_paths = list(meta["layers"]) + list(meta["modules_to_save"])
    saved_paths += [e["layer"] for e in meta["weights"].values()]
    moved = {p: move(p) for p in dict.fromkeys(saved_paths)}
    found = index.map_paths(dict.fromkeys(moved.values()), where)
    mapping = {p: found[moved[p]] for p in moved}
    renamed = {moved[k]: v for k, v in mapping.items() if moved[k] != v}
    layers = [
        _plan_layer(index, mapping[saved], saved, spec, tensors, where)
        for saved, spec in meta["layers"].items()
    ]
    module_paths = [mapping[p] for p in meta["modules_to_save"]]
    extras = _plan_extras(index, meta, mapping, module_paths, layers, tensors)
    if renamed:
        warnings.warn(
            f"load_adapter: the model's layer names differ from the saved "
            f"ones by Keras's automatic numbering only; matched {renamed}. "
            "Give layers explicit names to make paths match exactly.",
            stacklevel=3,
        )
    _warn_if_other_base(index, meta, mapping)
    config = _load_config(meta, layers, module_paths)
    return LoadPlan(config, layers, extras, module_paths)


def _model_prefixes(model, index, base, where):
    """A function mapping saved layer paths to this model's paths.

    The identity when the adapter was saved from a model of this class;
    otherwise the saved model and this one must share a nested model class
    (an adapter saved from a keras-hub backbone loads into the `CausalLM`
    holding that backbone, and the other way round), and paths move from
    under one to under the other.
    """
    saved_class = base.get("class")
    if saved_class in (None, type(model).__name__):
        return lambda path: path
    saved_models = base.get("models")
    if not isinstance(saved_models, dict):
        saved_models = {"": saved_class}
    here = nested_models(model, index.sites)
    pairs = [
        (saved, mine)
        for saved, cls in sorted(saved_models.items(), key=lambda i: len(i[0]))
        for mine, other in sorted(here.items(), key=lambda i: len(i[0]))
        if isinstance(saved, str) and cls == other
    ]
    if not pairs:
        raise ValueError(
            f"{where}: the adapter was saved from a {saved_class} "
            f"('{base.get('name')}'), but model '{model.name}' is a "
            f"{type(model).__name__} and holds no {saved_class}. Load it "
            "into the same base model."
        )
    saved, mine = pairs[0]

    def move(path):
        if saved:
            if path != saved and not path.startswith(saved + "/"):
                raise ValueError(
                    f"{where}: the adapter adapts '{path}', outside the "
                    f"{saved_models[saved]} at '{saved}' that model "
                    f"'{model.name}' holds, so it cannot load into it."
                )
            path = path[len(saved) + 1 :]
        return f"{mine}/{path}" if mine else path

    return move


def _warn_if_other_base(index, meta, mapping):
    """Warns if the model's base kernels differ from the recorded ones."""
    recorded = meta["base_model"].get("fingerprints")
    if not isinstance(recorded, dict):
        return
    differ = []
    for saved_path, saved in recorded.items():
        path = mapping.get(saved_path)
        if path is None:
            continue
        layer = index.site(path, "load_adapter").layer
        cls = lora_class_of(layer)
        if cls is None:
            continue
        if not fingerprint_matches(
            saved, kernel_fingerprint(cls, base_of(layer))
        ):
            differ.append(path)
    if differ:
        warnings.warn(
            f"load_adapter: the base weights of layers {differ[:5]} differ "
            "from those the adapter was trained on (recorded fingerprint: "
            "kernel norm and sampled values). The adapter will not give its "
            "fine-tuned outputs on this base: load it into the base model "
            "it was trained on.",
            stacklevel=4,
        )


def _plan_layer(index, path, saved_path, spec, tensors, where):
    site = index.site(path, where)
    layer = site.layer
    cls = lora_class_of(layer)
    if cls is None:
        raise ValueError(
            f"{where}: layer '{path}' is a {type(layer).__name__}, which "
            "keras_lora cannot adapt (the adapter was saved for a "
            f"{spec.get('base_class')}). Is this the right base model?"
        )
    base = base_of(layer)
    cls.check_description(base, spec, where, path)
    kernel_shape = cls.kernel_shape_of(base)
    if kernel_shape is None:
        raise ValueError(
            f"{where}: layer '{path}' is not built yet, so its kernel "
            "shape is unknown. Build the model first (call it on data "
            "or `model.build(input_shape)`)."
        )
    variant = get_variant(spec.get("variant", "lora"), where)
    want = variant.tensor_shapes(cls, base, AdapterSpec(rank=spec["rank"]))
    if set(want) != set(spec["tensors"]):
        raise ValueError(
            f"{where}: layer '{path}': the file holds tensors "
            f"{sorted(spec['tensors'])}, but a {variant.name!r} adapter has "
            f"{sorted(want)}."
        )
    values = {}
    for tensor, shape in want.items():
        value = tensors[f"{saved_path}.{tensor}"]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{where}: shape mismatch at layer '{path}': the saved "
                f"'{saved_path}.{tensor}' has shape {tuple(value.shape)}, "
                f"but this model expects {tuple(shape)} (rank "
                f"{spec['rank']}, base kernel {kernel_shape}; the adapter "
                f"was saved for a base kernel {tuple(spec['kernel_shape'])})."
                " The adapter belongs to a different base model."
            )
        values[tensor] = value
    saved_kernel = tuple(spec["kernel_shape"])
    if saved_kernel and saved_kernel != kernel_shape:
        raise ValueError(
            f"{where}: layer '{path}' has a base kernel of shape "
            f"{kernel_shape}, but the adapter was saved for "
            f"{saved_kernel}. The adapter belongs to a different base "
            "model."
        )
    return path, spec, values


def _plan_extras(index, meta, mapping, module_paths, layers, tensors):
    """The whole variables the file writes: only those its config
    declares (the variables of its `modules_to_save`, and biases per its
    `bias` setting)."""
    where = "load_adapter"
    bias = (meta.get("config") or {}).get("bias", "none")
    allowed = {}
    for path in module_paths:
        for key, (_, variable) in index.module_variables(
            index.site(path, where)
        ).items():
            allowed[key] = variable
    adapted = {path for path, _, _ in layers}
    extras = []
    provided = set()
    for key, entry in meta["weights"].items():
        path = mapping[entry["layer"]]
        target = f"{path}/{entry['variable']}"
        provided.add(target)
        site = index.site(path, where)
        owned = index.own_variables(site)
        variable = owned.get(entry["variable"])
        if variable is None:
            raise ValueError(
                f"{where}: layer '{path}' has no variable named "
                f"{entry['variable']!r} (saved as {key!r}); its variables "
                f"are {sorted(owned)}."
            )
        declared = allowed.get(target) is variable or _is_declared_bias(
            bias, site, path in adapted, variable
        )
        if not declared:
            raise ValueError(
                f"{where}: the file writes {key!r} (variable "
                f"'{variable.path}'), which its config does not declare: "
                f"it is neither in modules_to_save {module_paths} nor a "
                f"bias that bias={bias!r} trains. An adapter file may only "
                "change what it declares; the file was edited or is "
                "hostile."
            )
        value = tensors[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{where}: shape mismatch for {key!r}: saved "
                f"{tuple(value.shape)}, but variable '{variable.path}' of "
                f"this model has shape {tuple(variable.shape)}."
            )
        extras.append((key, variable, value))
    unsaved = sorted(set(allowed) - provided)
    if unsaved:
        raise ValueError(
            f"{where}: the adapter saves modules {module_paths}, but in this "
            f"model they also hold {unsaved}, which the file lacks. The "
            "adapter belongs to a different base model."
        )
    return extras


def _is_declared_bias(bias, site, adapted, variable):
    if bias == "none" or (bias == "lora_only" and not adapted):
        return False
    target = base_of(site.layer)
    return getattr(target, "bias", None) is variable


def _load_config(meta, layers, module_paths):
    """A `LoraConfig` that targets exactly the saved layers and ranks."""
    saved = meta.get("config") or {}
    first = layers[0][1]
    rank, alpha = first["rank"], first["alpha"]
    variants = sorted({s.get("variant", "lora") for _, s, *_ in layers})
    if len(variants) > 1:
        raise ValueError(
            f"load_adapter: the adapter mixes variants {variants} across "
            "its layers; keras_lora loads adapters of one variant. Save "
            "each variant as its own adapter."
        )
    return LoraConfig(
        rank=rank,
        alpha=alpha,
        dropout=first["dropout"],
        use_rslora=bool(first.get("use_rslora", False)),
        use_dora=variants == ["dora"],
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


def execute_load_plan(model, plan, name, is_trainable):
    """Carries out a plan checked by `plan_load`, all or nothing.

    As in PEFT, the active adapter does not change if the model already
    had adapters; in a model without adapters the loaded one becomes
    active.
    """
    lora_before = {
        id(s.layer)
        for s in surgery.walk(model)
        if isinstance(s.layer, LoraLayer)
    }
    had_adapters = bool(adapter_names_in(model))
    with transaction(model) as txn:
        txn.protect(v for _, v, _ in plan.extras)
        trainable = [(v, v.trainable) for v in model.weights]
        layer_flags = [
            (s.layer, s.layer.trainable) for s in surgery.walk(model)
        ]
        apply_lora(model, plan.config, adapter_name=name)
        index = SiteIndex(list(surgery.walk(model)))
        loaded, fresh = [], []
        for path, spec, values in plan.layers:
            layer = index.site(path, "load_adapter").layer
            adapter = layer.adapter(name)
            adapter.spec.alpha = spec["alpha"]
            adapter.spec.dropout = spec["dropout"]
            adapter.spec.use_rslora = bool(spec.get("use_rslora", False))
            adapter.spec.variant = spec.get("variant", "lora")
            for tensor, value in values.items():
                adapter.variables[tensor].assign(value)
                loaded.append(adapter.variables[tensor])
            if id(layer) not in lora_before:
                fresh.append(layer)
        for _, variable, value in plan.extras:
            variable.assign(keras.ops.cast(value, variable.dtype))
        if had_adapters:
            # Loading an adapter changes neither what runs nor what trains
            # of what was there (apply_lora re-freezes other adapters'
            # modules_to_save); only the new adapter's state is set below.
            frozen_bases = {
                id(w) for layer in fresh for w in layer.base_layer.weights
            }
            present = {id(s.layer) for s in surgery.walk(model)}
            for layer, flag in layer_flags:
                if id(layer) in present and layer.trainable != flag:
                    layer.trainable = flag
            for variable, flag in trainable:
                if id(variable) not in frozen_bases:
                    variable.trainable = flag
            for layer in fresh:
                layer.set_adapter([])
            if plan.module_paths:
                warnings.warn(
                    f"load_adapter: adapter {name!r} saves whole layers "
                    f"(modules_to_save {plan.module_paths}); they are shared "
                    "by every adapter of the model and now hold this "
                    "adapter's values.",
                    stacklevel=3,
                )
        for path in plan.module_paths:
            index.site(path, "load_adapter").layer.trainable = is_trainable
        for variable in loaded + [v for _, v, _ in plan.extras]:
            variable.trainable = bool(is_trainable)
        surgery.reset_compiled_functions(model)
