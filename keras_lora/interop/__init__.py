"""Interop with other LoRA tools: PEFT adapters for keras-hub models.

`export_peft` writes a keras_lora adapter as a PEFT adapter directory and
`import_peft` loads one, for the architectures in `gpt2.py` and `llama.py`
(`architecture.py` holds the mapping mechanics, `peft_format.py` PEFT's
files, `peft_export.py` and `peft_import.py` the two directions).
"""

from keras_lora.interop.peft_export import export_peft
from keras_lora.interop.peft_import import import_peft

__all__ = ["export_peft", "import_peft"]
