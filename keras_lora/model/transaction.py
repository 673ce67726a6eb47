"""All-or-nothing model operations.

Every public operation that changes a model runs inside `transaction(model)`:
it validates first, then changes the model through the transaction, and if
anything raises before it is done, the model is put back exactly as it was:

- structure: layers swapped in (`Transaction.replace`) are swapped back;
- LoRA layers' bookkeeping: adapters, active/merged adapters, enabled flag,
  activation (`LoraLayer.snapshot_state`);
- every layer's `trainable` flag, activation and name, every variable's
  `trainable` flag;
- variable values the operation declared it may change
  (`Transaction.protect`, e.g. the kernels a merge or PiSSA rewrites);
- the record of applied configs, and compiled functions (reset).

Transactions nest: an operation that calls another (`load_adapter` calls
`apply_lora`) joins the outer transaction, so the outermost one undoes
everything.
"""

import contextlib

import numpy as np
from keras import ops

from keras_lora.layers import LoraLayer
from keras_lora.model import surgery
from keras_lora.model.records import applied_configs, replace_configs

_ACTIVE = {}  # id(model) -> the model's open Transaction


class Transaction:
    """What an operation may change in `model`, saved to put back."""

    def __init__(self, model):
        self.model = model
        self.records = applied_configs(model)
        self.replaced = []  # (site, old layer, new layer), in order
        self.values = {}  # id(variable) -> (variable, saved numpy value)
        self.layers = []
        self.lora = []
        for layer in _all_layers(model):
            self.layers.append(
                (
                    layer,
                    layer.trainable,
                    getattr(layer, "activation", None),
                    layer.name,
                )
            )
            if isinstance(layer, LoraLayer):
                self.lora.append((layer, layer.snapshot_state()))
        self.variables = [(v, v.trainable) for v in _all_variables(model)]

    def protect(self, variables):
        """Saves the values of `variables`, which the operation may change."""
        for variable in variables:
            if id(variable) not in self.values:
                value = np.array(ops.convert_to_numpy(variable), copy=True)
                self.values[id(variable)] = (variable, value)

    def replace(self, site, new_layer):
        """`surgery.replace`, remembered so that rollback can undo it."""
        old = site.layer
        surgery.replace(site, new_layer)
        self.replaced.append((site, old, new_layer))

    def rollback(self):
        for site, old, _ in reversed(self.replaced):
            surgery.replace(site, old)
        for layer, state in self.lora:
            layer.restore_state(state)
        for layer, _, activation, name in self.layers:
            if activation is not None and layer.activation is not activation:
                layer.activation = activation
            if layer.name != name:
                layer.name = name
        for layer, trainable, _, _ in self.layers:
            if layer.trainable != trainable:
                layer.trainable = trainable
        for layer, _ in self.lora:
            layer.apply_freeze()
        for variable, trainable in self.variables:
            variable.trainable = trainable
        for variable, value in self.values.values():
            variable.assign(value)
        replace_configs(self.model, self.records)
        surgery.reset_compiled_functions(self.model)


@contextlib.contextmanager
def transaction(model):
    """Context manager: a `Transaction` on `model`, rolled back on error.

    Inside an open transaction on the same model, yields that one (the
    outermost transaction rolls back).
    """
    key = id(model)
    outer = _ACTIVE.get(key)
    if outer is not None and outer.model is model:
        yield outer
        return
    txn = Transaction(model)
    _ACTIVE[key] = txn
    try:
        yield txn
    except BaseException as error:
        try:
            txn.rollback()
        except Exception as rollback_error:  # noqa: BLE001 - keep `error`
            note = (
                "keras_lora could not fully restore the model after this "
                f"error: {type(rollback_error).__name__}: {rollback_error}"
            )
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(note)
        raise
    finally:
        _ACTIVE.pop(key, None)


def _all_layers(model):
    """Every layer under `model`, the base layers of LoRA layers too."""
    layers = []
    for site in surgery.walk(model):
        layers.append(site.layer)
        if isinstance(site.layer, LoraLayer):
            layers.append(site.layer.base_layer)
    return layers


def _all_variables(model):
    seen = {}
    for variable in model.weights:
        seen[id(variable)] = variable
    for layer in _all_layers(model):
        for variable in layer.weights:
            seen.setdefault(id(variable), variable)
    return list(seen.values())
