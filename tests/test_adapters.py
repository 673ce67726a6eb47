"""Named adapters at the layer level."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import to_numpy


def _layer():
    base = keras.layers.Dense(4)
    base.build((None, 3))
    return kl.LoraDense.from_layer(base, rank=2)


def test_default_adapter_first_and_active():
    layer = _layer()
    assert layer.adapters == ["default"]
    assert layer.active_adapters == ["default"]
    a, b = layer.lora_weights("default")
    assert "lora_a" in a.path and "default" in a.path
    assert "lora_b" in b.path and "default" in b.path


def test_add_set_and_delete_adapter_on_built_layer():
    layer = _layer()
    x = np.random.rand(2, 3).astype("float32")
    base_out = to_numpy(layer.base_layer(x))
    layer.add_adapter("french", rank=3, alpha=6, b_initializer="ones")
    assert layer.adapters == ["default", "french"]
    assert layer.active_adapters == ["default"]  # adding does not activate
    np.testing.assert_allclose(to_numpy(layer(x)), base_out, rtol=1e-6)
    layer.set_adapter("french")
    a, b = layer.lora_weights("french")
    expected = base_out + 2.0 * (x @ to_numpy(a)) @ to_numpy(b)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5)
    assert len(layer.trainable_weights) == 4
    layer.delete_adapter("french")
    assert layer.adapters == ["default"]
    assert layer.active_adapters == []
    assert len(layer.trainable_weights) == 2


def test_list_of_active_adapters_adds_up():
    layer = _layer()
    x = np.random.rand(2, 3).astype("float32")
    layer.add_adapter("b1", rank=2, b_initializer="ones")
    layer.add_adapter("b2", rank=1, b_initializer="ones")
    outs = {}
    for names in (["b1"], ["b2"], ["b1", "b2"]):
        layer.set_adapter(names)
        outs[tuple(names)] = to_numpy(layer(x))
    base_out = to_numpy(layer.base_layer(x))
    expected = outs[("b1",)] + outs[("b2",)] - base_out
    np.testing.assert_allclose(outs[("b1", "b2")], expected, rtol=1e-5)


def test_unknown_and_duplicate_names_are_clear_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="has no adapter named 'nope'"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="already has an adapter named"):
        layer.add_adapter("default")
