import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import gradients, to_numpy


def _model():
    inputs = keras.Input((5, 8))
    h = kl.LoraEinsumDense(
        "abc,cde->abde", (None, 2, 4), rank=2, bias_axes="de", name="proj"
    )(inputs)
    h = keras.layers.Reshape((5, 8))(h)
    h = kl.LoraDense(6, rank=3, alpha=6, activation="gelu", name="mlp")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inputs, outputs)


def _randomise_b(model):
    for layer in model.layers:
        if isinstance(layer, kl.layers.LoraLayer):
            _, b = layer.lora_weights()
            b.assign(np.random.normal(size=b.shape).astype("float32"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: kl.LoraDense(4, rank=2, alpha=3, dropout=0.1, name="d"),
        lambda: kl.LoraEinsumDense(
            "ab,bc->ac", (4,), rank=2, use_rslora=True, bias_axes="c"
        ),
    ],
)
def test_config_round_trip(make):
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    assert config["adapters"][0]["rank"] == 2


def test_keras_file_round_trip_keeps_adapters_trainable(tmp_keras_path):
    model = _model()
    _randomise_b(model)
    x = np.random.rand(3, 5, 8).astype("float32")
    expected = to_numpy(model(x))
    model.save(tmp_keras_path)
    loaded = keras.saving.load_model(tmp_keras_path)
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-6)
    names = [w.path for w in loaded.trainable_weights]
    assert [n.split("/")[-1] for n in names] == [
        "lora_a_default",
        "lora_b_default",
        "lora_a_default",
        "lora_b_default",
        "kernel",
        "bias",
    ]
    # A and B are separate, non-zero and still trainable (Keras's built-in
    # LoRA merges them into the kernel and zeroes them on load).
    for layer_name in ("proj", "mlp"):
        a, b = loaded.get_layer(layer_name).lora_weights()
        assert np.abs(to_numpy(b)).sum() > 0
        assert a.trainable and b.trainable
    grads = gradients(loaded, x)
    for w, g in zip(loaded.trainable_weights, grads, strict=True):
        assert np.abs(g).sum() > 0, w.path


def test_training_continues_after_reload(tmp_keras_path):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x = np.random.rand(8, 5, 8).astype("float32")
    y = np.random.rand(8, 5, 2).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_keras_path)
    loaded = keras.saving.load_model(tmp_keras_path)
    before = {w.path: to_numpy(w).copy() for w in loaded.weights}
    loaded.fit(x, y, epochs=1, verbose=0)
    after = {w.path: to_numpy(w) for w in loaded.weights}
    changed = {p for p in before if not np.allclose(before[p], after[p])}
    assert changed == {w.path for w in loaded.trainable_weights}


def test_merged_state_survives_save_and_load(tmp_keras_path):
    model = _model()
    _randomise_b(model)
    x = np.random.rand(2, 5, 8).astype("float32")
    expected = to_numpy(model(x))
    model.get_layer("mlp").merge()
    model.save(tmp_keras_path)
    loaded = keras.saving.load_model(tmp_keras_path)
    assert loaded.get_layer("mlp").merged
    assert not loaded.get_layer("proj").merged
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-5)
    loaded.get_layer("mlp").unmerge()
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-5)


def test_extra_adapters_survive_save_and_load(tmp_keras_path):
    model = _model()
    mlp = model.get_layer("mlp")
    mlp.add_adapter("second", rank=1, b_initializer="ones")
    mlp.set_adapter(["default", "second"])
    x = np.random.rand(2, 5, 8).astype("float32")
    expected = to_numpy(model(x))
    model.save(tmp_keras_path)
    loaded_model = keras.saving.load_model(tmp_keras_path)
    np.testing.assert_allclose(to_numpy(loaded_model(x)), expected, atol=1e-6)
    loaded = loaded_model.get_layer("mlp")
    assert loaded.adapters == ["default", "second"]
    assert loaded.active_adapters == ["default", "second"]
    np.testing.assert_allclose(
        to_numpy(loaded.lora_weights("second")[1]), np.ones((1, 6))
    )
