"""Model-level merge, unload, disable and adapter switching."""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.surgery import walk
from tests.models import MODELS, mlp, outputs


def _adapted(name, rank=2, adapter_name="default", seed=0):
    model, x, targets = MODELS[name]()
    base = outputs(model, x)
    kl.apply_lora(
        model,
        kl.LoraConfig(rank=rank, target_modules=targets),
        adapter_name=adapter_name,
    )
    _randomise(model, adapter_name, seed)
    return model, x, base


def _randomise(model, adapter_name, seed):
    rng = np.random.default_rng(seed)
    for layer in kl.lora_layers(model):
        _, b = layer.lora_weights(adapter_name)
        b.assign(rng.normal(size=b.shape).astype("float32"))


def _max_rel_err(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("name", MODELS)
def test_merge_unmerge_disable_and_unload(name):
    model, x, base = _adapted(name)
    adapted = outputs(model, x)
    assert not np.allclose(adapted, base, atol=1e-4)
    kl.merge_adapters(model)
    assert _max_rel_err(outputs(model, x), adapted) <= 1e-5
    kl.unmerge_adapters(model)
    np.testing.assert_allclose(outputs(model, x), adapted, atol=1e-5)
    with kl.disable_adapters(model):
        np.testing.assert_allclose(outputs(model, x), base, atol=1e-5)
    np.testing.assert_allclose(outputs(model, x), adapted, atol=1e-5)
    kl.unload(model)
    assert not kl.lora_layers(model)
    np.testing.assert_allclose(outputs(model, x), base, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unload_gives_a_plain_keras_model(name, tmp_path):
    model, x, _ = _adapted(name)
    adapted = outputs(model, x)
    plain = kl.merge_and_unload(model)
    assert plain is model
    assert not kl.lora_layers(plain)
    assert _max_rel_err(outputs(plain, x), adapted) <= 1e-5
    path = os.path.join(tmp_path, "plain.keras")
    plain.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert '"keras_lora.' not in config and "Lora" not in config
    loaded = keras.saving.load_model(path)
    assert _max_rel_err(outputs(loaded, x), adapted) <= 1e-5


def test_merged_file_loads_without_keras_lora(tmp_path):
    model, x, _ = _adapted("gpt2")
    expected = outputs(kl.merge_and_unload(model), x)
    path = os.path.join(tmp_path, "plain.keras")
    model.save(path)
    np.savez(os.path.join(tmp_path, "io.npz"), expected=expected, **x)
    script = (
        "import sys, numpy as np, keras\n"
        f"data = np.load({os.path.join(tmp_path, 'io.npz')!r})\n"
        f"model = keras.saving.load_model({path!r})\n"
        "x = {k: data[k] for k in ('token_ids', 'padding_mask')}\n"
        "out = keras.ops.convert_to_numpy(model(x))\n"
        "assert 'keras_lora' not in sys.modules\n"
        "print(float(np.abs(out - data['expected']).max()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5


def test_named_adapters_switch_add_up_and_delete():
    model, x, base = _adapted("mlp", adapter_name="a", seed=1)
    kl.add_adapter(
        model, "b", kl.LoraConfig(rank=3, target_modules=["fc1", "fc2"])
    )
    _randomise(model, "b", seed=2)
    assert kl.list_adapters(model) == ["a", "b"]
    out_a = outputs(model, x)
    kl.set_adapter(model, "b")
    out_b = outputs(model, x)
    kl.set_adapter(model, ["a", "b"])
    both = outputs(model, x)
    # fc1 -> relu -> fc2: check the additive property on the first layer.
    fc1 = model.get_layer("fc1")
    h = {}
    for names in (["a"], ["b"], ["a", "b"]):
        fc1.set_adapter(names)
        fc1.activation, act = keras.activations.linear, fc1.activation
        h[tuple(names)] = keras.ops.convert_to_numpy(fc1(x))
        fc1.activation = act
    fc1_base = keras.ops.convert_to_numpy(fc1.base_layer(x))
    np.testing.assert_allclose(
        h[("a", "b")], h[("a",)] + h[("b",)] - fc1_base, atol=1e-5
    )
    assert not np.allclose(out_a, out_b) and not np.allclose(both, out_a)
    kl.set_adapter(model, ["a", "b"])
    kl.delete_adapter(model, "b")
    assert kl.list_adapters(model) == ["a"]
    np.testing.assert_allclose(outputs(model, x), out_a, atol=1e-5)
    with pytest.raises(ValueError, match="has no adapter 'b'"):
        kl.delete_adapter(model, "b")
    with pytest.raises(ValueError, match="no layer of model 'mlp' has adapter"):
        kl.set_adapter(model, "zzz")


def test_predict_after_merge_and_disable_uses_current_state():
    model, x, base = _adapted("mlp")
    adapted = model.predict(x, verbose=0)
    with kl.disable_adapters(model):
        np.testing.assert_allclose(model.predict(x, verbose=0), base, atol=1e-5)
    kl.merge_adapters(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, atol=1e-5)


def test_operations_without_lora_are_clear_errors():
    model, _, _ = mlp()
    for op in (kl.merge_adapters, kl.unload, kl.merge_and_unload):
        with pytest.raises(ValueError, match="has no LoRA layers"):
            op(model)


def test_gpt2_merge_and_unload_has_no_keras_lora_classes():
    model, x, _ = _adapted("gpt2")
    kl.merge_and_unload(model)
    config = json.dumps(keras.saving.serialize_keras_object(model))
    assert "Lora" not in config
    classes = {type(s.layer).__module__ for s in walk(model)}
    assert any(c.startswith("keras_hub") for c in classes)
    assert not any(c.startswith("keras_lora") for c in classes)
