"""LoRA layers: the shared adapter mechanism and one class per layer type.

`LoraLayer` (base.py) holds what every LoRA layer shares: named adapters,
scale, dropout, freezing, merge/unmerge, serialization. Each subclass wraps
one kind of Keras layer and answers everything specific to it (adapter
tensor shapes, reading the base kernel, the kernel-shaped delta, routing
equations, its description in adapter files). `registry.py` maps Keras
layer types to those classes; nothing outside this package names a layer
type.
"""

from keras_lora.layers import quantization
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.conv import LoraConv
from keras_lora.layers.dense import LoraDense
from keras_lora.layers.dora import DoraVariant
from keras_lora.layers.einsum_dense import LoraEinsumDense
from keras_lora.layers.embedding import LoraEmbedding
from keras_lora.layers.equation import Factorization, factor_equation
from keras_lora.layers.projection import matmul_trailing
from keras_lora.layers.registry import (
    lora_class_for,
    refusal_for,
    register_lora_layer,
    supported_layer_types,
    unregister_lora_layer,
)
from keras_lora.layers.spec import AdapterSpec

__all__ = [
    "AdapterSpec",
    "DoraVariant",
    "Factorization",
    "LoraConv",
    "LoraDense",
    "LoraEinsumDense",
    "LoraEmbedding",
    "LoraLayer",
    "factor_equation",
    "lora_class_for",
    "matmul_trailing",
    "quantization",
    "refusal_for",
    "register_lora_layer",
    "supported_layer_types",
    "unregister_lora_layer",
]
