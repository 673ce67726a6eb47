"""Tiny toy models shared by the model-level tests (a table, PEFT-style)."""

import keras
import numpy as np

from keras_lora.serving import demo


def mlp():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="fc1"),
            keras.layers.Dense(16, activation="relu", name="fc2"),
            keras.layers.Dense(3, name="head"),
        ],
        name="mlp",
    )
    x = np.random.rand(6, 8).astype("float32")
    return model, x, ["fc1", "fc2"]


def transformer_block():
    inputs = keras.Input((5, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
    h = keras.layers.LayerNormalization(name="ln")(
        inputs + attention(inputs, inputs)
    )
    h = keras.layers.Dense(16, activation="gelu", name="ff_in")(h)
    outputs = keras.layers.Dense(8, name="ff_out")(h)
    model = keras.Model(inputs, outputs, name="block")
    x = np.random.rand(4, 5, 8).astype("float32")
    return model, x, None


def gpt2_backbone():
    return demo.tiny_gpt2_backbone()


def bert_backbone():
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=20, max_sequence_length=8, **demo.TINY_GPT2
    )


def mha_model():
    """A functional model around a MultiHeadAttention named `mha`."""
    inputs = keras.Input((4, 8))
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    h = mha(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))


def gpt2():
    model = gpt2_backbone()
    x = {
        "token_ids": np.random.randint(0, 20, (2, 8)),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    return model, x, None


def bert():
    model = bert_backbone()
    x = {
        "token_ids": np.random.randint(0, 20, (2, 8)),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    return model, x, None


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(12, activation="relu", name="enc")
        self.blocks = [
            keras.layers.Dense(12, name=f"block_{i}") for i in range(2)
        ]
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x):
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def subclassed():
    model = _Subclassed(name="sub")
    x = np.random.rand(4, 6).astype("float32")
    model(x)
    return model, x, ["enc", "block_0", "block_1"]


MODELS = {
    "mlp": mlp,
    "transformer_block": transformer_block,
    "subclassed": subclassed,
    "gpt2": gpt2,
    "bert": bert,
}


def outputs(model, x):
    """Model outputs as numpy (the first output for dict outputs)."""
    out = model(x)
    if isinstance(out, dict):
        out = out["sequence_output"]
    return keras.ops.convert_to_numpy(out)
