import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import to_numpy


def _reference(x, kernel, bias, a, b, scale, activation=lambda v: v):
    return activation(x @ kernel + bias + scale * (x @ a) @ b)


def test_drop_in_shapes_and_trainable_weights():
    layer = kl.LoraDense(6, rank=3, alpha=6)
    out = layer(np.ones((2, 5, 4), "float32"))
    assert tuple(out.shape) == (2, 5, 6)
    shapes = [tuple(w.shape) for w in layer.trainable_weights]
    assert shapes == [(4, 3), (3, 6)]
    assert [w.name for w in layer.trainable_weights] == [
        "lora_a_default",
        "lora_b_default",
    ]
    assert layer.units == 6


def test_fresh_adapter_changes_nothing():
    dense = keras.layers.Dense(5)
    x = np.random.rand(3, 4).astype("float32")
    before = to_numpy(dense(x))
    lora = kl.LoraDense.from_layer(dense, rank=2)
    np.testing.assert_allclose(to_numpy(lora(x)), before, rtol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_hand_written_reference(use_rslora):
    dense = keras.layers.Dense(5, activation="tanh")
    x = np.random.rand(3, 4).astype("float32")
    dense(x)
    lora = kl.LoraDense.from_layer(
        dense, rank=4, alpha=8, use_rslora=use_rslora
    )
    a, b = lora.lora_weights()
    b.assign(np.random.rand(4, 5).astype("float32"))
    scale = 8 / 2 if use_rslora else 8 / 4
    expected = _reference(
        x,
        to_numpy(dense.kernel),
        to_numpy(dense.bias),
        to_numpy(a),
        to_numpy(b),
        scale,
        np.tanh,
    )
    np.testing.assert_allclose(to_numpy(lora(x)), expected, rtol=1e-5)


def test_a_initializer_is_loralib_kaiming_uniform():
    layer = kl.LoraDense(64, rank=16)
    layer.build((None, 400))
    a, b = layer.lora_weights()
    a = to_numpy(a)
    bound = 1 / np.sqrt(400)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.9 * bound
    assert not to_numpy(b).any()


def test_from_layer_shares_variables_and_freezes():
    dense = keras.layers.Dense(3, activation="relu")
    dense.build((None, 4))
    lora = kl.LoraDense.from_layer(dense, rank=2)
    assert lora.base_layer is dense
    assert lora.name == dense.name
    kernel_ids = {id(w) for w in lora.weights}
    assert id(dense.kernel) in kernel_ids and id(dense.bias) in kernel_ids
    assert not dense.trainable
    # The activation moves to the wrapper: the branch joins before it.
    assert dense.activation is keras.activations.linear
    assert lora.activation is keras.activations.relu
    # Sharing, not copying: a write through one is seen by the other.
    dense.kernel.assign(np.zeros((4, 3), "float32"))
    assert not to_numpy(lora.base_layer.kernel).any()


def test_parent_trainable_true_keeps_base_frozen():
    model = keras.Sequential([keras.Input((4,)), kl.LoraDense(3, rank=2)])
    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True
    assert [w.name for w in model.trainable_weights] == [
        "lora_a_default",
        "lora_b_default",
    ]


def test_bias_trainable_keeps_kernel_frozen():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    lora = kl.LoraDense.from_layer(dense, rank=2, bias_trainable=True)
    names = sorted(w.name for w in lora.trainable_weights)
    assert names == ["bias", "lora_a_default", "lora_b_default"]


def test_dropout_only_in_training():
    layer = kl.LoraDense(8, rank=4, dropout=0.5, b_initializer="ones")
    x = np.ones((16, 8), "float32")
    inference = to_numpy(layer(x, training=False))
    np.testing.assert_allclose(to_numpy(layer(x)), inference)
    trained = to_numpy(layer(x, training=True))
    assert not np.allclose(trained, inference)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "`rank` must be a positive integer, got 0"),
        ({"rank": 2.5}, "`rank` must be a positive integer, got 2.5"),
        ({"rank": True}, "`rank` must be a positive integer"),
        ({"alpha": 0}, "`alpha` must be > 0, got 0"),
        ({"alpha": -1.0}, "`alpha` must be > 0"),
        ({"alpha": "big"}, "`alpha` must be a positive number"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"`dropout` must be in \[0, 1\)"),
        ({"adapter_name": "a/b"}, "invalid adapter name"),
    ],
)
def test_bad_arguments_name_the_layer(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        kl.LoraDense(4, name="proj", **kwargs)
    assert "'proj'" in str(info.value)


def test_bad_from_layer_inputs():
    with pytest.raises(ValueError, match="'late' is not built yet"):
        kl.LoraDense.from_layer(keras.layers.Dense(3, name="late"))
    conv = keras.layers.Conv1D(2, 3, name="conv")
    with pytest.raises(TypeError, match="'conv' is a Conv1D"):
        kl.LoraDense.from_layer(conv)
    dense = keras.layers.Dense(3, name="d")
    dense.build((None, 4))
    dense.enable_lora(2)
    with pytest.raises(ValueError, match="'d' has Keras's built-in LoRA"):
        kl.LoraDense.from_layer(dense)
    wrapped = kl.LoraDense(3, name="w")
    wrapped.build((None, 4))
    with pytest.raises(TypeError, match="'w' is already a LoRA layer"):
        kl.LoraDense.from_layer(wrapped)
    with pytest.raises(ValueError, match="`rank=`/`alpha=`"):
        kl.LoraDense(3, lora_rank=2)
    with pytest.raises(ValueError, match="needs `units`"):
        kl.LoraDense()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_adapters_float32(policy):
    keras.config.set_dtype_policy(policy)
    layer = kl.LoraDense(4, rank=2, b_initializer="ones")
    out = layer(np.ones((2, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    for w in layer.trainable_weights:
        assert w.dtype == "float32"
    # A model in full precision and one in mixed agree to low precision.
    keras.config.set_dtype_policy("float32")
    ref = kl.LoraDense(4, rank=2)
    ref.build((None, 3))
    ref.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        to_numpy(out).astype("float32"),
        to_numpy(ref(np.ones((2, 3), "float32"))),
        rtol=2e-2,
        atol=2e-2,
    )
