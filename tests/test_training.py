"""`fit` changes only the adapters (and chosen biases)."""

import keras
import numpy as np

import keras_lora as kl
from tests.conftest import to_numpy, weight_snapshot


def _changed(before, after):
    return {p for p in before if not np.array_equal(before[p], after[p])}


def test_fit_updates_only_adapters_and_chosen_bias():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            kl.LoraDense(8, rank=2, activation="relu", name="hidden"),
            kl.LoraDense(3, rank=2, bias_trainable=True, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x = np.random.rand(32, 6).astype("float32")
    y = np.random.rand(32, 3).astype("float32")
    before = weight_snapshot(model)
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    after = weight_snapshot(model)
    prefix = model.name + "/"
    assert _changed(before, after) == {
        prefix + "hidden/lora_a_default",
        prefix + "hidden/lora_b_default",
        prefix + "out/lora_a_default",
        prefix + "out/lora_b_default",
        prefix + "out/out_base/bias",
    }
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_multi_head_attention_query_value_adapters():
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, mha(inputs, inputs))
    x = np.random.rand(16, 5, 8).astype("float32")
    y = np.random.rand(16, 5, 8).astype("float32")
    base_out = to_numpy(model(x))
    kl.model.replace_sublayer(
        mha, "_query_dense", kl.LoraEinsumDense.from_layer(mha._query_dense)
    )
    kl.model.replace_sublayer(
        mha, "_value_dense", kl.LoraEinsumDense.from_layer(mha._value_dense)
    )
    np.testing.assert_allclose(to_numpy(model(x)), base_out, atol=1e-6)
    # Freeze what is not LoRA (apply_lora does this for whole models).
    mha._key_dense.trainable = False
    mha._output_dense.trainable = False
    trainable = sorted(w.path.split("/")[-1] for w in model.trainable_weights)
    assert trainable == ["lora_a_default"] * 2 + ["lora_b_default"] * 2
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == (
        2 * (8 * 8 + 8 * 2 * 4)
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = weight_snapshot(model)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = weight_snapshot(model)
    assert _changed(before, after) == {w.path for w in model.trainable_weights}
    tuned = to_numpy(model(x))
    assert not np.allclose(tuned, base_out, atol=1e-4)
    # Outputs changed only through the adapters: with B back at zero the
    # model is the base model again.
    for sub in (mha._query_dense, mha._value_dense):
        _, b = sub.lora_weights()
        b.assign(np.zeros(b.shape, "float32"))
    np.testing.assert_allclose(to_numpy(model(x)), base_out, atol=1e-6)
