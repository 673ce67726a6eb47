"""A tiny GPT-2 causal LM with a tiny byte-pair tokenizer, built offline."""

import keras
import numpy as np

from keras_lora.serving import demo

# Single characters ("Ġ" marks a leading space in GPT-2's byte-level BPE)
# and a few merges: every prompt made of these letters tokenizes.
_CHARS = ["Ġ", "a", "b", "c", "d", "e", "h", "l", "o", "r", "t", "w"]
_MERGES = ["Ġ a", "Ġ t", "h e", "t he", "Ġ the"]
# GPT2Tokenizer pads with id 0, so id 0 must not be the end token.
VOCABULARY = {"!": 0}
for _token in _CHARS + [m.replace(" ", "") for m in _MERGES]:
    VOCABULARY.setdefault(_token, len(VOCABULARY))
VOCABULARY["<|endoftext|>"] = len(VOCABULARY)
PROMPTS = ["the cat", "a bed", "the red dot", "tea", "hello world", "at"]


def gpt2_causal_lm(seed=0, sequence_length=32, num_layers=2):
    """A randomly initialised `GPT2CausalLM`; same `seed`, same weights."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=dict(VOCABULARY), merges=list(_MERGES)
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = demo.tiny_gpt2_backbone(
        len(VOCABULARY), sequence_length, num_layers=num_layers
    )
    # keras-hub's initial weights (std 0.02) make every logit about equal
    # and greedy decoding emit the end token at once; larger random weights
    # give varied text.
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if len(variable.shape) >= 2:
            variable.assign(rng.normal(0.0, 0.5, variable.shape))
    return keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )
