import json
import os
import zipfile

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.files.model_files import (
    RECORD_NAME,
    load_model,
    save_merged_model,
    save_model,
)
from tests.conftest import to_numpy
from tests.models import gpt2_backbone, mha_model


def _randomise_b(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in kl.lora_layers(model):
        for name in layer.adapters:
            _, b = layer.lora_weights(name)
            b.assign(0.3 * rng.normal(size=b.shape).astype("float32"))


def _outputs(model, x):
    return [to_numpy(t) for t in keras.tree.flatten(model(x))]


def _assert_same(a, b, atol=1e-6):
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, atol=atol, rtol=1e-6)


def _weights(model):
    return {w.path: to_numpy(w).copy() for w in model.weights}


@pytest.mark.filterwarnings("ignore:Skipping variable loading")
def test_mha_model_round_trip_and_training_resumes(tmp_path):
    model = mha_model()
    kl.apply_lora(model, kl.LoraConfig(rank=2, alpha=4))
    _randomise_b(model)
    rng = np.random.default_rng(1)
    x = rng.random((6, 4, 8)).astype("float32")
    y = rng.random((6, 4, 3)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=1, batch_size=3, shuffle=False, verbose=0)

    # Plain Keras cannot load LoRA layers that live inside the MHA.
    model.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="could not be loaded"):
        keras.saving.load_model(tmp_path / "plain.keras")

    path = str(tmp_path / "lora.keras")
    assert save_model(model, path) == path
    assert sorted(os.listdir(tmp_path)) == ["lora.keras", "plain.keras"]
    loaded = load_model(path)
    _assert_same(_outputs(loaded, x), _outputs(model, x))
    mha = loaded.get_layer("mha")
    assert isinstance(mha.query_dense, kl.LoraEinsumDense)
    assert isinstance(mha.value_dense, kl.LoraEinsumDense)
    assert [w.path for w in loaded.trainable_weights] == [
        w.path for w in model.trainable_weights
    ]
    assert len(loaded.trainable_weights) == 4  # A, B of query and value
    assert kl.applied_configs(loaded) == kl.applied_configs(model)
    # The optimizer state came back: training continues exactly.
    assert int(loaded.optimizer.iterations) == 2
    model.fit(x, y, epochs=1, batch_size=3, shuffle=False, verbose=0)
    before = _weights(loaded)
    loaded.fit(x, y, epochs=1, batch_size=3, shuffle=False, verbose=0)
    after = _weights(loaded)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {w.path for w in loaded.trainable_weights}
    _assert_same(_outputs(loaded, x), _outputs(model, x), atol=1e-5)

    # With keras_lora imported, plain Keras loads the file too.
    again = keras.saving.load_model(path, compile=False)
    assert not again.compiled
    assert isinstance(again.get_layer("mha").query_dense, kl.LoraEinsumDense)


def test_gpt2_round_trip_with_merged_and_extra_adapters(tmp_path):
    model = gpt2_backbone()
    kl.apply_lora(model, kl.LoraConfig(rank=2))
    layers = kl.lora_layers(model)
    layers[1].add_adapter("second", rank=1)
    layers[1].set_adapter(["default", "second"])
    layers[3].adapters_enabled = False
    _randomise_b(model)
    x = {
        "token_ids": np.arange(16, dtype="int32").reshape(2, 8) % 20,
        "padding_mask": np.ones((2, 8), "int32"),
    }
    unmerged = _outputs(model, x)
    layers[0].merge()
    layers[1].merge()
    expected = _outputs(model, x)
    model.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="could not be loaded"):
        keras.saving.load_model(tmp_path / "plain.keras")
    save_model(model, tmp_path / "gpt2.keras")
    with zipfile.ZipFile(tmp_path / "gpt2.keras") as archive:
        record = json.loads(archive.read(RECORD_NAME))
    assert [e["path"] for e in record["layers"]] == [
        "transformer_layer_0/self_attention/query",
        "transformer_layer_0/self_attention/value",
        "transformer_layer_1/self_attention/query",
        "transformer_layer_1/self_attention/value",
    ]
    assert record["adapters"]["default"]["rank"] == 2

    loaded = load_model(tmp_path / "gpt2.keras")
    _assert_same(_outputs(loaded, x), expected, atol=1e-5)
    got = kl.lora_layers(loaded)
    assert [layer.merged_adapters for layer in got] == [
        ["default"],
        ["default", "second"],
        [],
        [],
    ]
    assert got[1].adapters == ["default", "second"]
    assert got[1].active_adapters == ["default", "second"]
    assert [layer.adapters_enabled for layer in got] == [
        True,
        True,
        True,
        False,
    ]
    kl.unmerge_adapters(loaded)
    _assert_same(_outputs(loaded, x), unmerged, atol=1e-5)
    # Exactly the adapters train, as before saving. (That training resumes
    # is checked on the MHA model above; a GPT-2 train step compiles for
    # long on JAX.)
    names = [w.path for w in loaded.trainable_weights]
    assert names == [w.path for w in model.trainable_weights]
    assert len(names) == 10  # 4 layers x (A, B) + A, B of "second"
    assert all("lora_" in name for name in names)


def test_model_without_lora(tmp_path):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="d")]
    )
    x = np.ones((1, 3), "float32")
    save_model(model, tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    _assert_same(_outputs(loaded, x), _outputs(model, x))
    model.save(tmp_path / "plain.keras")  # a file without a record
    _assert_same(
        _outputs(load_model(tmp_path / "plain.keras"), x), _outputs(model, x)
    )


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    model = mha_model()
    kl.apply_lora(model, kl.LoraConfig(rank=2))
    x = np.ones((1, 4, 8), "float32")
    expected = _outputs(model, x)
    path = tmp_path / "m.keras"
    save_model(model, path)
    _randomise_b(model)

    def broken_save(filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path)
    assert os.listdir(tmp_path) == ["m.keras"]
    _assert_same(_outputs(load_model(path), x), expected)


def test_bad_path(tmp_path):
    with pytest.raises(ValueError, match=".keras"):
        save_model(mha_model(), tmp_path / "m.h5")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_model(tmp_path / "missing.keras")


@keras.saving.register_keras_serializable(package="test_model_files")
class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mha = keras.layers.MultiHeadAttention(
            num_heads=2, key_dim=4, name="mha"
        )
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.mha(x, x))


def test_subclassed_model_with_modules_to_save(tmp_path):
    model = _Subclassed()
    x = np.random.default_rng(0).random((2, 4, 8)).astype("float32")
    model(x)
    kl.apply_lora(model, kl.LoraConfig(rank=2, modules_to_save=["head"]))
    _randomise_b(model)
    save_model(model, tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    assert isinstance(loaded, _Subclassed)
    _assert_same(_outputs(loaded, x), _outputs(model, x))

    def tails(m):  # variable paths carry the build-time name scope
        return ["/".join(w.path.split("/")[-2:]) for w in m.trainable_weights]

    assert tails(loaded) == tails(model)
    assert tails(loaded)[-2:] == ["head/kernel", "head/bias"]


def test_mixed_model_with_lora_layers_in_graph(tmp_path):
    inputs = keras.Input((4, 8))
    h = kl.LoraDense(8, rank=2, name="pre")(inputs)
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    model = keras.Model(inputs, mha(h, h))
    kl.apply_lora(model, kl.LoraConfig(rank=2))
    pre = model.get_layer("pre")
    pre.add_adapter("two", rank=1, b_initializer="ones")
    pre.set_adapter(["default", "two"])
    pre.merge()
    _randomise_b(model)
    x = np.random.default_rng(0).random((2, 4, 8)).astype("float32")
    save_model(model, tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    _assert_same(_outputs(loaded, x), _outputs(model, x))
    assert loaded.get_layer("pre").merged_adapters == ["default", "two"]
    assert list(kl.applied_configs(loaded)) == ["default"]


def test_save_merged_model_is_plain_keras(tmp_path):
    model = mha_model()
    kl.apply_lora(model, kl.LoraConfig(rank=2))
    _randomise_b(model)
    x = np.random.default_rng(0).random((2, 4, 8)).astype("float32")
    expected = _outputs(model, x)
    save_merged_model(model, tmp_path / "merged.keras")
    assert sorted(os.listdir(tmp_path)) == ["merged.keras"]
    with zipfile.ZipFile(tmp_path / "merged.keras") as archive:
        config = archive.read("config.json").decode()
        assert RECORD_NAME not in archive.namelist()
    assert "keras_lora" not in config and "Lora" not in config
    plain = keras.saving.load_model(tmp_path / "merged.keras")
    assert type(plain.get_layer("mha").query_dense) is keras.layers.EinsumDense
    _assert_same(_outputs(plain, x), expected, atol=1e-5)
    # The model itself is untouched.
    assert len(kl.lora_layers(model)) == 2
    assert not any(layer.merged for layer in kl.lora_layers(model))


def test_paths_must_end_in_keras(tmp_path):
    model = mha_model()
    for save in (kl.save_model, kl.save_merged_model):
        with pytest.raises(ValueError, match="the path must end in '.keras'"):
            save(model, tmp_path / "model.h5")
    assert not list(tmp_path.iterdir())
