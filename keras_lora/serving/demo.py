"""A tiny, randomly initialised GPT-2 preset and adapters, built offline.

For trying `keras-lora serve` without downloading anything, and for tests
and benchmarks: the model is keras-hub's `GPT2CausalLM` at a toy size with
a byte-level tokenizer (every byte is a token, no merges), so any text
round-trips; the adapters hold random, non-zero A and B so each one
changes the output. The generated text is gibberish by design.

Example:

```python
from keras_lora.serving import demo

preset, adapters = demo.build_demo("/tmp/kl-demo", num_adapters=2)
# keras-lora serve --preset /tmp/kl-demo/preset \
#     --adapter a0=/tmp/kl-demo/adapters/a0 --adapter a1=...
```
"""

import os

import numpy as np

END_OF_TEXT = "<|endoftext|>"
# keras-hub's own test size for GPT-2 (its tests use vocabulary 20,
# 2 layers, hidden 16): the one tiny configuration keras_lora's tests,
# examples and benchmarks build on.
TINY_GPT2 = dict(num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32)
# The serving demo's model: the same structure, twice as wide.
TINY = dict(
    TINY_GPT2, hidden_dim=32, intermediate_dim=64, max_sequence_length=64
)


def tiny_gpt2_backbone(
    vocabulary_size=20, max_sequence_length=8, models=None, **overrides
):
    """A randomly initialised keras-hub `GPT2Backbone` at `TINY_GPT2` size.

    Args:
        vocabulary_size: the token count (20: keras-hub's test size).
        max_sequence_length: the longest input.
        models: the namespace holding `GPT2Backbone` (default
            `keras_hub.models`; `keras_nlp.models` works too).
        **overrides: other `GPT2Backbone` arguments (`num_layers`, ...).
    """
    if models is None:
        import keras_hub

        models = keras_hub.models
    config = {**TINY_GPT2, **overrides}
    return models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        max_sequence_length=max_sequence_length,
        **config,
    )


def byte_vocabulary():
    """GPT-2's byte-to-character table as a vocabulary, plus end-of-text.

    GPT-2 maps every byte to a printable character (printable bytes map to
    themselves, the rest to characters from U+0100 on); with no merges
    each byte is then one token (plus the one merge in `MERGES`).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    vocabulary = {chars[b]: b for b in range(256)}
    vocabulary[END_OF_TEXT] = 256
    # keras-hub's tokenizer needs at least one merge: " t" (as "Ġt").
    vocabulary[chars[ord(" ")] + "t"] = 257
    return vocabulary


MERGES = ["\u0120 t"]


def tiny_causal_lm(seed=0, sequence_length=64, **overrides):
    """A randomly initialised keras-hub `GPT2CausalLM` with a byte tokenizer.

    `overrides` replace entries of `TINY` (the backbone's config).
    """
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    config = {**TINY, **overrides}
    vocabulary = byte_vocabulary()
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=MERGES
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = tiny_gpt2_backbone(len(vocabulary), **config)
    return keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )


def random_adapter(causal_lm, directory, rank=4, seed=0, scale=0.5):
    """Saves an adapter with random, non-zero A and B for `causal_lm`.

    LoRA is applied to the query and value projections (the default
    config) under a temporary adapter name, saved with
    `keras_lora.save_adapter`, then dropped again, so `causal_lm` is left
    as it was.
    """
    import keras_lora as kl

    backbone = causal_lm.backbone
    rng = np.random.default_rng(seed)
    name = "demo_random"
    had_lora = bool(kl.lora_layers(backbone))
    if had_lora:
        kl.add_adapter(backbone, name, kl.LoraConfig(rank=rank))
    else:
        kl.apply_lora(backbone, kl.LoraConfig(rank=rank), adapter_name=name)
    for variable in backbone.weights:
        if name in variable.path and (
            "lora_a" in variable.path or "lora_b" in variable.path
        ):
            shape = tuple(variable.shape)
            variable.assign(
                rng.normal(0.0, scale, shape).astype(variable.dtype)
            )
    kl.save_adapter(backbone, directory, adapter_name=name)
    if had_lora:
        kl.delete_adapter(backbone, name)
    else:
        kl.unload(backbone)
    return directory


def build_demo(directory, num_adapters=2, rank=4, seed=0, **overrides):
    """Writes a tiny preset and `num_adapters` random adapters.

    Returns `(preset_dir, {adapter_name: adapter_dir})` with the preset in
    `<directory>/preset` and adapter `a<i>` in `<directory>/adapters/a<i>`.
    `overrides` change the backbone's config (see `TINY`).
    """
    causal_lm = tiny_causal_lm(seed=seed, **overrides)
    preset = os.path.join(directory, "preset")
    causal_lm.save_to_preset(preset)
    adapters = {}
    for i in range(num_adapters):
        name = f"a{i}"
        path = os.path.join(directory, "adapters", name)
        adapters[name] = random_adapter(
            causal_lm, path, rank=rank, seed=seed + 1 + i
        )
    return preset, adapters
