"""Serving many LoRA adapters on one base model.

- `AdapterBank`: adapters registered by name, held on the host, filled into
  a fixed number of device slots on demand and routed per batch row.
- `generate`: keras-hub `CausalLM` generation with one adapter per prompt.
- `Engine`: the batched completion engine behind `keras-lora serve`.

Per-example routing itself lives in `keras_lora.serving.routing`.
"""

from keras_lora.lazy import lazy_module

_EXPORTS = {
    "AdapterBank": "keras_lora.serving.bank",
    "Completion": "keras_lora.serving.engine",
    "CompletionRequest": "keras_lora.serving.engine",
    "Engine": "keras_lora.serving.engine",
    "AdapterLoadError": "keras_lora.serving.errors",
    "RequestError": "keras_lora.serving.errors",
    "ServingError": "keras_lora.serving.errors",
    "UnknownAdapterError": "keras_lora.serving.errors",
    "generate": "keras_lora.serving.generation",
}
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
