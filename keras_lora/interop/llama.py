"""Llama: keras-hub `LlamaBackbone`/`LlamaCausalLM` and HF `LlamaModel`.

Covers the subclasses too (`Llama3Backbone`, which keras-hub builds from
HF checkpoints with `model_type: "llama"`). Every HF projection is its own
`nn.Linear`; keras-hub's query/key/value kernels are per head
(`bqm,muh->bquh`, `(hidden, heads, head_dim)`; key and value use the
key-value heads) and the output projection reads `(heads, head_dim)`.
"""

from keras_lora.interop.architecture import Architecture, HfModule

ARCHITECTURE = Architecture(
    name="Llama",
    backbone_class="LlamaBackbone",
    causal_lm_class="LlamaCausalLM",
    hf_backbone=("LlamaModel", "transformers.models.llama.modeling_llama"),
    hf_causal_lm=(
        "LlamaForCausalLM",
        "transformers.models.llama.modeling_llama",
    ),
    hf_causal_lm_prefix="model.",
    keras_block="transformer_layer_{}",
    hf_block="layers.{}",
    layers_pattern="layers",
    fan_in_fan_out=False,
    modules=(
        HfModule("self_attn.q_proj", ("self_attention/query",)),
        HfModule("self_attn.k_proj", ("self_attention/key",)),
        HfModule("self_attn.v_proj", ("self_attention/value",)),
        HfModule("self_attn.o_proj", ("self_attention/attention_output",)),
        HfModule("mlp.gate_proj", ("feedforward_gate_dense",)),
        HfModule("mlp.up_proj", ("feedforward_intermediate_dense",)),
        HfModule("mlp.down_proj", ("feedforward_output_dense",)),
    ),
    embeddings=(
        HfModule("embed_tokens", ("token_embedding",), kind="embedding"),
    ),
)
