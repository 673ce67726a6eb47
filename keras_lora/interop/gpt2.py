"""GPT-2: keras-hub `GPT2Backbone`/`GPT2CausalLM` and HF `GPT2Model`.

HF GPT-2 computes query, key and value with one fused Conv1D, `c_attn`,
whose output is `[query | key | value]` (each `n_embd` wide, heads
row-major); keras-hub has three EinsumDense layers (`abc,cde->abde`,
kernel `(hidden, heads, head_dim)`). The token embedding `wte` is tied to
the LM head in both.
"""

from keras_lora.interop.architecture import Architecture, HfModule

ARCHITECTURE = Architecture(
    name="GPT-2",
    backbone_class="GPT2Backbone",
    causal_lm_class="GPT2CausalLM",
    hf_backbone=("GPT2Model", "transformers.models.gpt2.modeling_gpt2"),
    hf_causal_lm=(
        "GPT2LMHeadModel",
        "transformers.models.gpt2.modeling_gpt2",
    ),
    hf_causal_lm_prefix="transformer.",
    keras_block="transformer_layer_{}",
    hf_block="h.{}",
    layers_pattern="h",
    fan_in_fan_out=True,
    modules=(
        HfModule(
            "attn.c_attn",
            (
                "self_attention/query",
                "self_attention/key",
                "self_attention/value",
            ),
        ),
        HfModule("attn.c_proj", ("self_attention/attention_output",)),
        HfModule("mlp.c_fc", ("feedforward_intermediate_dense",)),
        HfModule("mlp.c_proj", ("feedforward_output_dense",)),
    ),
    embeddings=(HfModule("wte", ("token_embedding",), kind="embedding"),),
)
