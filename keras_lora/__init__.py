"""keras_lora: LoRA for any Keras 3 model, on JAX, TensorFlow and PyTorch."""

from keras_lora._version import __version__
from keras_lora.apply import (
    applied_configs,
    apply_lora,
    find_targets,
    lora_layers,
)
from keras_lora.config import LoraConfig
from keras_lora.dense import LoraDense
from keras_lora.einsum_dense import LoraEinsumDense
from keras_lora.equation import factor_equation
from keras_lora.lora_layer import AdapterSpec, LoraLayer
from keras_lora.model_ops import (
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
from keras_lora.surgery import replace_sublayer

__all__ = [
    "AdapterSpec",
    "LoraConfig",
    "LoraDense",
    "LoraEinsumDense",
    "LoraLayer",
    "__version__",
    "add_adapter",
    "applied_configs",
    "apply_lora",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "factor_equation",
    "find_targets",
    "list_adapters",
    "lora_layers",
    "merge_adapters",
    "merge_and_unload",
    "print_trainable_parameters",
    "replace_sublayer",
    "set_adapter",
    "unload",
    "unmerge_adapters",
]
