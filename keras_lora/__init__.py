"""keras_lora: LoRA for any Keras 3 model, on JAX, TensorFlow and PyTorch.

The workflow lives here (`kl.apply_lora`, `kl.save_adapter`, ...); the
building blocks live in subpackages: `kl.layers` (LoRA layer classes, the
layer registry, adapter variants), `kl.model` (configs, model surgery,
model-level operations), `kl.files` (adapter and model files), `kl.serving`
(routing many adapters through one model), `kl.interop` (PEFT adapters),
`kl.optimizers` (LoRA+).

`import keras_lora` imports everything (so its layers are registered with
Keras's serialization, and `keras.saving.load_model` reads files holding
them). Only the `keras-lora` command imports lazily
(`KERAS_LORA_LAZY_IMPORT=1`, set by its entry point `keras_lora_cli`), so
`keras-lora --help` starts without importing Keras; any attribute used
later loads what it needs.
"""

import os

from keras_lora.lazy import lazy_module
from keras_lora.version import VERSION

__version__ = VERSION

# Public name -> module that defines it (subpackages map to themselves).
_EXPORTS = {
    "LoraConfig": "keras_lora.model",
    "RequantizationWarning": "keras_lora.model",
    "add_adapter": "keras_lora.model",
    "add_weighted_adapter": "keras_lora.model",
    "applied_configs": "keras_lora.model",
    "apply_lora": "keras_lora.model",
    "count_parameters": "keras_lora.model",
    "delete_adapter": "keras_lora.model",
    "disable_adapters": "keras_lora.model",
    "list_adapters": "keras_lora.model",
    "lora_layers": "keras_lora.model",
    "merge_adapters": "keras_lora.model",
    "merge_and_unload": "keras_lora.model",
    "print_trainable_parameters": "keras_lora.model",
    "set_adapter": "keras_lora.model",
    "unload": "keras_lora.model",
    "unmerge_adapters": "keras_lora.model",
    "LoraConv": "keras_lora.layers",
    "LoraDense": "keras_lora.layers",
    "LoraEinsumDense": "keras_lora.layers",
    "LoraEmbedding": "keras_lora.layers",
    "load_adapter": "keras_lora.files",
    "load_model": "keras_lora.files",
    "read_adapter": "keras_lora.files",
    "save_adapter": "keras_lora.files",
    "save_merged_model": "keras_lora.files",
    "save_model": "keras_lora.files",
    "export_peft": "keras_lora.interop",
    "import_peft": "keras_lora.interop",
    **{
        name: f"keras_lora.{name}"
        for name in (
            "callbacks",
            "files",
            "interop",
            "layers",
            "losses",
            "model",
            "optimizers",
        )
    },
}
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
__all__ = sorted([*_EXPORTS, "__version__"])

if os.environ.get("KERAS_LORA_LAZY_IMPORT") != "1":
    for _name in _EXPORTS:
        __getattr__(_name)
