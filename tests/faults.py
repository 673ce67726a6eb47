"""Fault injection: make each step of an operation fail in turn.

`run_with_faults(operation, model, probe)` runs `operation()` over and
over; run k makes the k-th *step* raise `InjectedFault` (a step is a call
of one of `STEPS`: layer swaps, adapter bookkeeping, merges, variable
assignments, freezing, records), and after each failed run checks that
`snapshot(model, probe)` is exactly what it was. It stops at the first run
that completes without reaching its fault, so every step of the operation
has been made to fail once.
"""

import contextlib

import keras
import numpy as np

from keras_lora.layers import LoraLayer
from keras_lora.layers.dora import DoraVariant
from keras_lora.layers.variants import LoraVariant
from keras_lora.model import apply, surgery
from keras_lora.model.records import applied_configs
from tests.conftest import to_numpy


class InjectedFault(RuntimeError):
    pass


# (owner, attribute): the steps model operations are made of.
STEPS = [
    (surgery, "replace"),
    (surgery, "reset_compiled_functions"),
    (apply, "record_config"),
    (apply, "freeze_non_lora"),
    (LoraLayer, "build"),
    (LoraLayer, "add_adapter"),
    (LoraLayer, "delete_adapter"),
    (LoraLayer, "set_adapter"),
    (LoraLayer, "merge"),
    (LoraLayer, "unmerge"),
    (LoraLayer, "pissa_init"),
    (LoraLayer, "release_base_layer"),
    (LoraLayer, "apply_freeze"),
    (LoraVariant, "merge"),
    (LoraVariant, "unmerge"),
    (DoraVariant, "initialize"),
    (DoraVariant, "merge"),
    (DoraVariant, "unmerge"),
    (keras.Variable, "assign"),
]


class _Injector:
    def __init__(self):
        self.count = 0
        self.fail_at = None
        self.fired = False

    def wrap(self, function):
        injector = self

        def step(*args, **kwargs):
            injector.count += 1
            if not injector.fired and injector.count == injector.fail_at:
                injector.fired = True
                raise InjectedFault(f"fault at step {injector.count}")
            return function(*args, **kwargs)

        return step


@contextlib.contextmanager
def _patched(injector):
    saved = []
    for owner, name in STEPS:
        saved.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, injector.wrap(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, owned, original in saved:
            if owned:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def snapshot(model, probe):
    """Outputs, variables (values and flags), structure, adapters, records."""
    layers = {}
    for site in surgery.walk(model):
        layer = site.layer
        entry = {
            "class": type(layer).__name__,
            "trainable": layer.trainable,
            "activation": getattr(
                getattr(layer, "activation", None), "__name__", None
            ),
        }
        if isinstance(layer, LoraLayer):
            base = layer.base_layer
            entry.update(
                adapters=[
                    layer.adapter_spec(n).get_config() for n in layer.adapters
                ],
                active=layer.active_adapters,
                merged=layer.merged_adapters,
                enabled=layer.adapters_enabled,
                base_name=base.name,
                base_trainable=base.trainable,
                base_activation=getattr(
                    getattr(base, "activation", None), "__name__", None
                ),
            )
        layers[site.path] = entry
    variables = {}
    for variable in model.weights:
        variables[variable.path] = (
            to_numpy(variable).copy(),
            variable.trainable,
        )
    return {
        "outputs": to_numpy(model(probe)),
        "layers": layers,
        "variables": variables,
        "weights_order": [w.path for w in model.weights],
        "records": {n: c.to_dict() for n, c in applied_configs(model).items()},
    }


def assert_same(before, after, where):
    assert after["layers"] == before["layers"], where
    assert after["records"] == before["records"], where
    assert after["weights_order"] == before["weights_order"], where
    for path, (value, trainable) in before["variables"].items():
        now, now_trainable = after["variables"][path]
        assert now_trainable == trainable, f"{where}: {path} trainable"
        np.testing.assert_array_equal(now, value, err_msg=f"{where}: {path}")
    np.testing.assert_array_equal(after["outputs"], before["outputs"], where)


def run_with_faults(operation, model, probe, max_steps=500):
    """Fails each step of `operation()` in turn; returns the step count.

    After every injected failure the model must equal its snapshot from
    before; the last run (no fault reached) must succeed.
    """
    before = snapshot(model, probe)
    for k in range(1, max_steps + 1):
        injector = _Injector()
        injector.fail_at = k
        try:
            with _patched(injector):
                operation()
        except InjectedFault:
            assert_same(before, snapshot(model, probe), f"fault at step {k}")
            continue
        assert not injector.fired
        return k - 1
    raise AssertionError(f"operation still failing after {max_steps} steps")
