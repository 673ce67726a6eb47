"""keras_lora: LoRA for any Keras 3 model, on JAX, TensorFlow and PyTorch."""

from keras_lora import callbacks, losses
from keras_lora._version import __version__
from keras_lora.adapter_files import load_adapter, read_adapter, save_adapter
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
from keras_lora.interop import export_peft, import_peft
from keras_lora.lora_layer import AdapterSpec, LoraLayer
from keras_lora.model_files import load_model, save_merged_model, save_model
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
from keras_lora.weighted import add_weighted_adapter

__all__ = [
    "AdapterSpec",
    "add_adapter",
    "add_weighted_adapter",
    "applied_configs",
    "apply_lora",
    "callbacks",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "export_peft",
    "factor_equation",
    "find_targets",
    "import_peft",
    "list_adapters",
    "load_adapter",
    "load_model",
    "lora_layers",
    "losses",
    "LoraConfig",
    "LoraDense",
    "LoraEinsumDense",
    "LoraLayer",
    "merge_adapters",
    "merge_and_unload",
    "print_trainable_parameters",
    "read_adapter",
    "replace_sublayer",
    "save_adapter",
    "save_merged_model",
    "save_model",
    "set_adapter",
    "unload",
    "unmerge_adapters",
    "__version__",
]
