"""Model-level adapter operations: merge, unload, switch, disable, count."""

import contextlib
import warnings

from keras_lora.layers import LoraLayer
from keras_lora.model import surgery
from keras_lora.model.apply import apply_lora, lora_layers
from keras_lora.model.records import forget_config, replace_configs
from keras_lora.model.transaction import transaction


def _require_lora(model, what):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"{what}: model '{model.name}' has no LoRA layers. Call "
            "keras_lora.apply_lora(model, config) first."
        )
    return layers


def merge_adapters(model, adapter_names=None, requantize=False):
    """Folds the active (or the named) adapters into the base kernels.

    A kernel quantized by `model.quantize("int8" | "int4")` is refused
    (the sum would be rounded back to the quantized type) unless
    `requantize=True`: it is then dequantized, added to and requantized
    by Keras's own code, and a `RequantizationWarning` reports the
    measured drift of every such layer (also in `layer.merge_drift`).
    `unmerge_adapters` restores the quantized kernels exactly.
    """
    layers = _require_lora(model, "merge_adapters")
    plan = []
    for layer in layers:
        names = adapter_names
        if names is not None:
            names = [n for n in _as_list(names) if n in layer.adapters]
        if layer.merged:
            raise ValueError(
                f"merge_adapters: layer '{layer.name}' is already merged "
                f"(adapters {layer.merged_adapters}). Call "
                "keras_lora.unmerge_adapters(model) first."
            )
        if names is None:
            names = layer.active_adapters
        if names:
            layer.check_mergeable(requantize)
        plan.append((layer, names))
    with transaction(model) as txn:
        txn.protect(_kernels(layers))
        for layer, names in plan:
            layer.merge(names, requantize=requantize)
        surgery.reset_compiled_functions(model)
    _report_drift(layers, "merge_adapters")
    return model


def unmerge_adapters(model):
    """Takes merged adapters back out of the base kernels."""
    layers = _require_lora(model, "unmerge_adapters")
    with transaction(model) as txn:
        txn.protect(_kernels(layers))
        for layer in layers:
            layer.unmerge()
        surgery.reset_compiled_functions(model)
    return model


def _kernels(layers):
    variables = []
    for layer in layers:
        variables += layer.kernel_variables(layer.base_layer)
    return variables


class RequantizationWarning(UserWarning):
    """A merge into quantized kernels rounded the model (`requantize=True`);
    the message gives the measured drift per layer."""


def _report_drift(layers, where):
    drifts = [layer.merge_drift for layer in layers if layer.merge_drift]
    if not drifts:
        return
    worst = max(drifts, key=lambda d: d.adapter_drift)
    lines = "\n".join(f"  {d.describe()}" for d in drifts)
    warnings.warn(
        f"{where}: merged into {len(drifts)} quantized kernels by "
        "dequantizing, adding and requantizing; rounding changed the "
        f"outputs (worst: {worst.describe()}):\n{lines}",
        RequantizationWarning,
        stacklevel=3,
    )


def merge_and_unload(model, requantize=False):
    """Merges the active adapters and puts plain Keras layers back.

    Returns `model` (changed in place) with no keras_lora layer in it: it
    saves and loads with plain Keras, and its outputs equal the adapted
    model's. Quantized kernels are refused unless `requantize=True`, as in
    `merge_adapters` (the outputs then differ by the reported drift).
    """
    layers = _require_lora(model, "merge_and_unload")
    for layer in layers:
        if not layer.merged and layer.active_adapters:
            layer.check_mergeable(requantize)
    with transaction(model) as txn:
        txn.protect(_kernels(layers))
        for layer in layers:
            if not layer.merged:
                layer.merge(requantize=requantize)
        _unwrap_all(txn, model)
    _report_drift(layers, "merge_and_unload")
    return model


def unload(model):
    """Puts the original layers back and drops every adapter.

    Merged adapters are taken out first, so outputs equal the base model's.
    """
    layers = _require_lora(model, "unload")
    with transaction(model) as txn:
        txn.protect(_kernels(layers))
        for layer in layers:
            layer.unmerge()
        _unwrap_all(txn, model)
    return model


def _unwrap_all(txn, model):
    for site in list(surgery.walk(model)):
        layer = site.layer
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.release_base_layer()
        txn.replace(site, base)
    replace_configs(model, {})
    surgery.reset_compiled_functions(model)


@contextlib.contextmanager
def disable_adapters(model):
    """Context manager: the base model's outputs inside, adapted after.

    >>> with keras_lora.disable_adapters(model):
    ...     base_logits = model(x)
    """
    layers = _require_lora(model, "disable_adapters")
    merged = [layer.name for layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"disable_adapters: layers {merged} are merged; call "
            "unmerge_adapters(model) first."
        )
    previous = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    surgery.reset_compiled_functions(model)
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapters_enabled = enabled
        surgery.reset_compiled_functions(model)


def add_adapter(model, adapter_name, config):
    """Adds a new named adapter per `config` (not activated)."""
    previous = {
        id(layer): layer.active_adapters for layer in lora_layers(model)
    }
    with transaction(model):
        apply_lora(model, config, adapter_name=adapter_name)
        for layer in lora_layers(model):
            if id(layer) in previous:
                layer.set_adapter(previous[id(layer)])
    return model


def set_adapter(model, adapter_names):
    """Activates one adapter, or a list of adapters whose outputs add up.

    Layers that lack a named adapter run the others (or none).
    """
    names = _as_list(adapter_names)
    layers = _require_lora(model, "set_adapter")
    known = {n for layer in layers for n in layer.adapters}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(
            f"set_adapter: no layer of model '{model.name}' has adapter "
            f"{missing[0]!r}. Adapters: {sorted(known)}."
        )
    merged = [
        layer.name
        for layer in layers
        if layer.merged
        and {n for n in names if n in layer.adapters}
        != set(layer.active_adapters)
    ]
    if merged:
        raise ValueError(
            f"set_adapter: layers {merged} are merged; call "
            "keras_lora.unmerge_adapters(model) before switching adapters."
        )
    with transaction(model):
        for layer in layers:
            layer.set_adapter([n for n in names if n in layer.adapters])
        surgery.reset_compiled_functions(model)
    return model


def delete_adapter(model, adapter_name):
    """Deletes adapter `adapter_name` from every layer that has it."""
    layers = [
        layer
        for layer in _require_lora(model, "delete_adapter")
        if adapter_name in layer.adapters
    ]
    if not layers:
        raise ValueError(
            f"delete_adapter: model '{model.name}' has no adapter "
            f"{adapter_name!r}."
        )
    merged = [
        layer.name for layer in layers if adapter_name in layer.merged_adapters
    ]
    if merged:
        raise ValueError(
            f"delete_adapter: adapter {adapter_name!r} is merged in layers "
            f"{merged}; call keras_lora.unmerge_adapters(model) first."
        )
    with transaction(model):
        for layer in layers:
            layer.delete_adapter(adapter_name)
        forget_config(model, adapter_name)
        surgery.reset_compiled_functions(model)
    return model


def list_adapters(model):
    """Adapter names present in `model`, in first-seen order."""
    names = {}
    for layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def count_parameters(model):
    """`(trainable, total)` parameter counts, each variable counted once."""
    trainable = sum(_size(w) for w in model.trainable_weights)
    total = sum(_size(w) for w in model.weights)
    return trainable, total


def print_trainable_parameters(model):
    """Prints and returns `(trainable, total, percent)`."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {percent:.4f}"
    )
    return trainable, total, percent


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def _as_list(names):
    return [names] if isinstance(names, str) else list(names)
