"""apply_lora across a table of toy models."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import weight_snapshot
from tests.models import MODELS, gpt2, mlp, outputs, transformer_block


def _config(targets, **kwargs):
    kwargs.setdefault("rank", 2)
    return kl.LoraConfig(target_modules=targets, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_apply_keeps_outputs_and_freezes_the_rest(name):
    model, x, targets = MODELS[name]()
    before = outputs(model, x)
    result = kl.apply_lora(model, _config(targets))
    assert result is model
    np.testing.assert_allclose(outputs(model, x), before, atol=1e-6)
    trainable = model.trainable_weights
    assert trainable, name
    for w in trainable:
        leaf = w.path.split("/")[-1]
        assert leaf in ("lora_a_default", "lora_b_default"), w.path
    assert len(trainable) == 2 * len(kl.lora_layers(model))


def test_gpt2_default_config_counts_query_value_parameters():
    model, _, _ = gpt2()
    kl.apply_lora(model, kl.LoraConfig(rank=4))
    layers, hidden, r = 2, 16, 4
    trainable, total, percent = kl.print_trainable_parameters(model)
    assert trainable == layers * 2 * (hidden * r + r * hidden)
    paths = [s.path for s in kl.model.find_targets(model, kl.LoraConfig())]
    assert paths == [
        "transformer_layer_0/self_attention/query",
        "transformer_layer_0/self_attention/value",
        "transformer_layer_1/self_attention/query",
        "transformer_layer_1/self_attention/value",
    ]
    assert percent == pytest.approx(100 * trainable / total)


@pytest.mark.parametrize("name", ["mlp", "transformer_block", "gpt2"])
def test_fit_changes_only_adapters(name):
    model, x, targets = MODELS[name]()
    kl.apply_lora(model, _config(targets))
    y = np.random.rand(*outputs(model, x).shape).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = weight_snapshot(model)
    model.fit(x, y, epochs=2, verbose=0)
    after = weight_snapshot(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {w.path for w in model.trainable_weights}


def test_patterns_layers_to_transform_and_exclude():
    model, _, _ = gpt2()
    config = kl.LoraConfig(
        rank=4,
        target_modules=["query", "value", "key"],
        exclude_modules=["key"],
        rank_pattern={"value": 2},
        alpha_pattern={"query": 8},
        layers_to_transform=[1],
    )
    kl.apply_lora(model, config)
    specs = {
        layer.name: layer.adapter_spec() for layer in kl.lora_layers(model)
    }
    assert sorted(specs) == ["query", "value"]
    assert (specs["query"].rank, specs["query"].alpha) == (4, 8)
    assert (specs["value"].rank, specs["value"].alpha) == (2, 4)
    attention = model.get_layer("transformer_layer_1")._self_attention_layer
    assert isinstance(attention._query_dense, kl.LoraEinsumDense)
    attention = model.get_layer("transformer_layer_0")._self_attention_layer
    assert not isinstance(attention._query_dense, kl.layers.LoraLayer)


def test_regex_targets_and_all_linear():
    model, x, _ = transformer_block()
    kl.apply_lora(model, _config(r"attention/(query|key)"))
    assert sorted(layer.name for layer in kl.lora_layers(model)) == [
        "key",
        "query",
    ]
    model, x, _ = mlp()
    kl.apply_lora(model, _config("all-linear"))
    assert [layer.name for layer in kl.lora_layers(model)] == ["fc1", "fc2"]


def test_bias_modes_and_modules_to_save():
    model, _, _ = mlp()
    kl.apply_lora(
        model, _config(["fc1"], bias="lora_only", modules_to_save=["head"])
    )
    names = sorted(w.path for w in model.trainable_weights)
    assert names == [
        "mlp/fc1/bias",
        "mlp/fc1/lora_a_default",
        "mlp/fc1/lora_b_default",
        "mlp/head/bias",
        "mlp/head/kernel",
    ]
    model, _, _ = mlp()
    kl.apply_lora(model, _config(["fc1"], bias="all"))
    names = sorted(w.path for w in model.trainable_weights)
    assert names == [
        "mlp/fc1/bias",
        "mlp/fc1/lora_a_default",
        "mlp/fc1/lora_b_default",
        "mlp/fc2/bias",
        "mlp/head/bias",
    ]


@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_init_modes_keep_outputs(init):
    model, x, _ = transformer_block()
    before = outputs(model, x)
    kl.apply_lora(model, kl.LoraConfig(rank=2, init=init))
    np.testing.assert_allclose(outputs(model, x), before, atol=1e-5)
    layer = kl.lora_layers(model)[0]
    a, b = layer.lora_weights()
    a = keras.ops.convert_to_numpy(a)
    b = keras.ops.convert_to_numpy(b)
    if init == "gaussian":
        assert abs(a.std() - 1 / 2) < 0.2 and not b.any()
    else:
        # PiSSA: A @ B * s is the top-2 SVD part of the original kernel.
        assert np.abs(b).sum() > 0
        kernel = layer.base_layer.kernel
        original = keras.ops.convert_to_numpy(
            kernel
        ) + keras.ops.convert_to_numpy(layer.delta_weight())
        matrix = original.reshape(original.shape[0], -1)
        s = np.linalg.svd(matrix, compute_uv=False)
        residual = keras.ops.convert_to_numpy(kernel).reshape(matrix.shape)
        np.testing.assert_allclose(
            np.linalg.svd(residual, compute_uv=False)[: len(s) - 2],
            s[2:],
            atol=1e-5,
        )


def test_no_match_lists_closest_names():
    model, _, _ = mlp()
    with pytest.raises(ValueError, match=r"matches target_modules=\['fc3'\]"):
        kl.apply_lora(model, _config(["fc3"]))
    with pytest.raises(ValueError, match=r"Closest layer names: \[.*'fc1'"):
        kl.apply_lora(model, _config(["fc"]))
    with pytest.raises(ValueError, match="no built MultiHeadAttention"):
        kl.apply_lora(model, kl.LoraConfig())
    assert not kl.lora_layers(model)


def test_unbuilt_sequential_is_adapted_and_builds_later():
    model = keras.Sequential(
        [keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")]
    )
    kl.apply_lora(model, _config(["a", "b"]))
    out = model(np.ones((3, 5), "float32"))
    assert tuple(out.shape) == (3, 2)
    assert len(model.trainable_weights) == 4


def test_adding_a_second_adapter_name_and_duplicate_is_refused():
    model, _, targets = mlp()
    kl.apply_lora(model, _config(targets))
    kl.add_adapter(model, "other", _config(targets, rank=3))
    assert kl.list_adapters(model) == ["default", "other"]
    assert kl.lora_layers(model)[0].active_adapters == ["default"]
    with pytest.raises(ValueError, match="already has an adapter named"):
        kl.apply_lora(model, _config(targets), adapter_name="other")
