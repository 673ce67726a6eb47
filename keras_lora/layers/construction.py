"""Helpers for building LoRA layers around base layers.

Splitting a drop-in constructor's arguments between the wrapper and the
base layer it creates, the name scopes that give adapter variables paths
like the base kernel's, and the `trainable` flags a failed wrap restores.
"""

import contextlib

import keras

# Arguments that configure the LoRA wrapper itself; a drop-in constructor
# passes every other keyword to the base layer it creates.
_WRAPPER_KWARGS = (
    "rank",
    "alpha",
    "dropout",
    "use_rslora",
    "a_initializer",
    "b_initializer",
    "adapter_name",
    "use_dora",
    "adapters",
    "active_adapters",
    "merged_adapters",
    "activation",
    "bias_trainable",
    "name",
    "trainable",
    "autocast",
)


def split_kwargs(kwargs):
    """Splits drop-in constructor kwargs into (wrapper, base layer) parts."""
    wrapper = {k: v for k, v in kwargs.items() if k in _WRAPPER_KWARGS}
    base = {k: v for k, v in kwargs.items() if k not in _WRAPPER_KWARGS}
    if "lora_rank" in base or "lora_alpha" in base:
        raise ValueError(
            "Pass `rank=`/`alpha=` to keras_lora layers, not Keras's built-in "
            "`lora_rank`/`lora_alpha`."
        )
    return wrapper, base


def variable_scopes_of(layer):
    """Name scopes under which new variables get paths like `layer`'s own.

    Adapter variables created inside them read like the kernel's path
    (`model/block/query/lora_a_default`) and stay unique across a model.
    """
    stack = contextlib.ExitStack()
    weights = layer.weights
    if weights:
        for scope in weights[0].path.split("/")[:-2]:
            stack.enter_context(keras.name_scope(scope))
    return stack


def layer_trainable_state(layer):
    """The `trainable` flags of `layer` and its variables, to restore."""
    return (layer, layer.trainable, [(v, v.trainable) for v in layer.weights])


def restore_trainable_state(state):
    layer, flag, variables = state
    if layer.trainable != flag:
        layer.trainable = flag
    for variable, value in variables:
        variable.trainable = value
