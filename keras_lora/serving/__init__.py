"""Serving many LoRA adapters on one base model.

- `AdapterBank`: adapters registered by name, held on the host, filled into
  a fixed number of device slots on demand and routed per batch row.
- `generate`: keras-hub `CausalLM` generation with one adapter per prompt.
- `Engine`: the batched completion engine behind `keras-lora serve`.

Per-example routing itself lives in `keras_lora.serving.routing`.
"""

from keras_lora.serving.bank import AdapterBank
from keras_lora.serving.engine import Completion, CompletionRequest, Engine
from keras_lora.serving.errors import (
    AdapterLoadError,
    RequestError,
    ServingError,
    UnknownAdapterError,
)
from keras_lora.serving.generation import generate

__all__ = [
    "AdapterBank",
    "AdapterLoadError",
    "Completion",
    "CompletionRequest",
    "Engine",
    "RequestError",
    "ServingError",
    "UnknownAdapterError",
    "generate",
]
