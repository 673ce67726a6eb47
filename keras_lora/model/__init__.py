"""Model-level LoRA: configs, applying them, model surgery and operations.

`apply_lora` finds the layers a `LoraConfig` targets (`surgery.walk` gives
every layer's path) and swaps in the registered LoRA class for each;
`operations` merges, unloads, switches and deletes adapters across a
model; `weighted` combines adapters; `records` keeps the configs applied
to a model.
"""

from keras_lora.model.apply import apply_lora, find_targets, lora_layers
from keras_lora.model.config import LoraConfig
from keras_lora.model.matching import matches, path_matches
from keras_lora.model.operations import (
    RequantizationWarning,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
    unmerge_adapters,
)
from keras_lora.model.records import applied_configs
from keras_lora.model.surgery import Site, replace_sublayer, walk
from keras_lora.model.weighted import add_weighted_adapter

__all__ = [
    "LoraConfig",
    "RequantizationWarning",
    "Site",
    "add_adapter",
    "add_weighted_adapter",
    "applied_configs",
    "apply_lora",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "list_adapters",
    "lora_layers",
    "matches",
    "merge_adapters",
    "merge_and_unload",
    "path_matches",
    "print_trainable_parameters",
    "replace_sublayer",
    "set_adapter",
    "unload",
    "unmerge_adapters",
    "walk",
]
