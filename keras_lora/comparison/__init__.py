"""GPT-2 LoRA versus full fine-tuning: one implementation, two front ends.

The `keras-lora compare` command (`command.py`) and the notebook
`examples/gpt2_lora_vs_full_finetune.ipynb` both call `run_comparison`.

    from keras_lora.comparison import ComparisonConfig, run_comparison
    results = run_comparison(ComparisonConfig.tiny(), "out")
    print(format_table(results))
"""

from keras_lora.comparison.config import PRESET_RECIPE, ComparisonConfig
from keras_lora.comparison.report import format_table, write_report
from keras_lora.comparison.runner import run_comparison

__all__ = [
    "ComparisonConfig",
    "PRESET_RECIPE",
    "format_table",
    "run_comparison",
    "write_report",
]
