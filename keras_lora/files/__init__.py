"""Files: adapter directories, whole-model `.keras` files, atomic writes.

`adapter_files` saves and reads one named adapter (PEFT-style
`adapter_config.json` + `adapter_model.safetensors`, keyed by layer path);
`loading` checks a read adapter, plans its load into a model and carries
it out as one transaction; `paths` finds saved layers in a model;
`model_files` saves whole models with their LoRA layers; `atomic` writes
files and directories so that an interrupted write loses nothing.
"""

from keras_lora.files.adapter_files import (
    collect_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
)
from keras_lora.files.loading import execute_load_plan, plan_load
from keras_lora.files.model_files import (
    load_model,
    save_merged_model,
    save_model,
)

__all__ = [
    "collect_adapter",
    "execute_load_plan",
    "load_adapter",
    "load_model",
    "plan_load",
    "read_adapter",
    "save_adapter",
    "save_merged_model",
    "save_model",
]
