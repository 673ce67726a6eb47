"""The record of applied LoRA configs that a model carries.

`apply_lora` records the `LoraConfig` of each adapter it adds on the model
object itself (off Keras's tracker, so it is neither a layer nor saved as a
weight). Adapter files and whole-model files read it to describe an
adapter; model operations keep it in step with the layers.
"""

_ATTRIBUTE = "_keras_lora_configs"
# Initialisations that change the base kernel (see `check_portable`).
BASE_CHANGING_INITS = {"pissa": "PiSSA", "loftq": "LoftQ"}


def _store(model):
    store = getattr(model, _ATTRIBUTE, None)
    if store is None:
        store = {}
        # object.__setattr__: Keras would otherwise try to track the dict.
        object.__setattr__(model, _ATTRIBUTE, store)
    return store


def applied_configs(model):
    """`{adapter_name: LoraConfig}` applied to `model` by `apply_lora`."""
    return dict(_store(model))


def applied_config(model, adapter_name):
    """The `LoraConfig` recorded for `adapter_name`, or None."""
    return _store(model).get(adapter_name)


def record_config(model, adapter_name, config):
    """Records `config` as the one adapter `adapter_name` was applied with."""
    _store(model)[adapter_name] = config


def forget_config(model, adapter_name):
    """Drops the record of `adapter_name` (no error if there is none)."""
    _store(model).pop(adapter_name, None)


def replace_configs(model, configs):
    """Replaces the whole record with `{adapter_name: LoraConfig}`."""
    store = _store(model)
    store.clear()
    store.update(configs)


def check_portable(model, adapter_name, where, fix):
    """Raises if adapter `adapter_name` cannot leave the model on its own.

    An initialisation that rewrites the base kernel (PiSSA) makes the
    adapter meaningless without that rewritten base, so files of the
    adapter alone would not reproduce the model. `fix` says what to do.
    """
    config = applied_config(model, adapter_name)
    if config is not None and config.init in BASE_CHANGING_INITS:
        raise ValueError(
            f"{where}: adapter {adapter_name!r} was initialised with "
            f"{BASE_CHANGING_INITS[config.init]} (init={config.init!r}), "
            "which moves the adapter's share of the "
            "weights out of the base kernel, so the adapter alone cannot "
            f"restore the model on a fresh base. Fix: {fix}."
        )
