"""Files: adapter directories, whole-model `.keras` files, atomic writes.

`adapter_files` saves and reads one named adapter (PEFT-style
`adapter_config.json` + `adapter_model.safetensors`, keyed by layer path);
`loading` checks a read adapter, plans its load into a model and carries
it out as one transaction; `paths` finds saved layers in a model;
`model_files` saves whole models with their LoRA layers; `atomic` writes
files and directories so that an interrupted write loses nothing.
"""

from keras_lora.lazy import lazy_module

_EXPORTS = {
    "collect_adapter": "keras_lora.files.adapter_files",
    "load_adapter": "keras_lora.files.adapter_files",
    "read_adapter": "keras_lora.files.adapter_files",
    "save_adapter": "keras_lora.files.adapter_files",
    "execute_load_plan": "keras_lora.files.loading",
    "plan_load": "keras_lora.files.loading",
    "load_model": "keras_lora.files.model_files",
    "save_merged_model": "keras_lora.files.model_files",
    "save_model": "keras_lora.files.model_files",
}
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
