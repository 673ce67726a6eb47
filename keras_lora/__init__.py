"""keras_lora: LoRA for any Keras 3 model, on JAX, TensorFlow and PyTorch.

The workflow lives here (`kl.apply_lora`, `kl.save_adapter`, ...); the
building blocks live in subpackages: `kl.layers` (LoRA layer classes, the
layer registry, adapter variants), `kl.model` (configs, model surgery,
model-level operations), `kl.files` (adapter and model files), `kl.serving`
(routing many adapters through one model), `kl.interop` (PEFT adapters),
`kl.optimizers` (LoRA+).
"""

from keras_lora import (
    callbacks,
    files,
    interop,
    layers,
    losses,
    model,
    optimizers,
)
from keras_lora.files import (
    load_adapter,
    load_model,
    read_adapter,
    save_adapter,
    save_merged_model,
    save_model,
)
from keras_lora.interop import export_peft, import_peft
from keras_lora.layers import (
    LoraConv,
    LoraDense,
    LoraEinsumDense,
    LoraEmbedding,
)
from keras_lora.model import (
    LoraConfig,
    RequantizationWarning,
    add_adapter,
    add_weighted_adapter,
    applied_configs,
    apply_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    lora_layers,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
    unmerge_adapters,
)
from keras_lora.version import VERSION as __version__

__all__ = [
    "LoraConfig",
    "LoraConv",
    "LoraDense",
    "LoraEinsumDense",
    "LoraEmbedding",
    "RequantizationWarning",
    "__version__",
    "add_adapter",
    "add_weighted_adapter",
    "applied_configs",
    "apply_lora",
    "callbacks",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "export_peft",
    "files",
    "import_peft",
    "interop",
    "layers",
    "list_adapters",
    "load_adapter",
    "load_model",
    "lora_layers",
    "losses",
    "merge_adapters",
    "merge_and_unload",
    "model",
    "optimizers",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "save_merged_model",
    "save_model",
    "set_adapter",
    "unload",
    "unmerge_adapters",
]
