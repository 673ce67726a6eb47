"""GPT-2 LoRA versus full fine-tuning: one implementation, two front ends.

The `keras-lora compare` command (`command.py`) and the notebook
`examples/gpt2_lora_vs_full_finetune.ipynb` both call `run_comparison`.

    from keras_lora.comparison import ComparisonConfig, run_comparison
    results = run_comparison(ComparisonConfig.tiny(), "out")
    print(format_table(results))
"""

from keras_lora.lazy import lazy_module

_EXPORTS = {
    "ComparisonConfig": "keras_lora.comparison.config",
    "PRESET_RECIPE": "keras_lora.comparison.config",
    "format_table": "keras_lora.comparison.report",
    "write_report": "keras_lora.comparison.report",
    "run_comparison": "keras_lora.comparison.runner",
}
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
