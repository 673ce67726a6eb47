"""`add_weighted_adapter`: cat / linear / svd mixes of named adapters."""

import math

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.weighted import add_weighted_adapter
from tests.conftest import to_numpy, weight_snapshot

MHA_TARGETS = ["query", "value", "attention_output"]


def _randomize_b(model, seed=0):
    """B starts at zero; give every adapter a non-zero delta."""
    rng = np.random.default_rng(seed)
    for layer in kl.lora_layers(model):
        for name in layer.adapters:
            _, b = layer.lora_weights(name)
            b.assign(rng.normal(size=tuple(b.shape)).astype("float32"))


def _mlp():
    """fc1 (6->5), fc2 (5->4); a: r2 s1, b: r1 s2, c: r2 rsLoRA s=4/sqrt2."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="relu", name="fc1"),
            keras.layers.Dense(4, name="fc2"),
        ]
    )
    targets = ["fc1", "fc2"]
    kl.apply_lora(
        model, kl.LoraConfig(rank=2, target_modules=targets), adapter_name="a"
    )
    kl.add_adapter(
        model, "b", kl.LoraConfig(rank=1, alpha=2, target_modules=targets)
    )
    kl.add_adapter(
        model,
        "c",
        kl.LoraConfig(rank=2, alpha=4, use_rslora=True, target_modules=targets),
    )
    _randomize_b(model)
    return model, np.random.rand(3, 6).astype("float32")


def _mha():
    """query/value (8 -> 2x3) and attention_output (2x3 -> 8)."""
    inputs = keras.Input((4, 8))
    outputs = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=3, name="mha"
    )(inputs, inputs)
    model = keras.Model(inputs, outputs)
    kl.apply_lora(
        model,
        kl.LoraConfig(rank=2, target_modules=MHA_TARGETS),
        adapter_name="a",
    )
    kl.add_adapter(
        model, "b", kl.LoraConfig(rank=3, alpha=1.5, target_modules=MHA_TARGETS)
    )
    kl.add_adapter(
        model, "c", kl.LoraConfig(rank=2, alpha=3, target_modules=MHA_TARGETS)
    )
    _randomize_b(model)
    return model, np.random.rand(2, 4, 8).astype("float32")


BUILDERS = {"mlp": _mlp, "mha": _mha}


def _build(kind):
    model, x = BUILDERS[kind]()
    layers = kl.lora_layers(model)
    assert len(layers) == (2 if kind == "mlp" else 3)
    if kind == "mha":
        out = [ly for ly in layers if ly.equation == "abcd,cde->abe"]
        assert len(out) == 1
        assert tuple(out[0].lora_weights("a")[0].shape) == (2, 3, 2)
    return model, x, layers


def _np_product(layer, a, b):
    """`A @ B` as a kernel-shaped float64 numpy array."""
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    if isinstance(layer, kl.LoraEinsumDense):
        return np.einsum(layer.factorization.delta, a, b)
    return a @ b


def _np_delta(layer, name):
    """`s * A @ B` of adapter `name`, computed independently with numpy."""
    a, b = (to_numpy(v) for v in layer.lora_weights(name))
    return layer.adapter_spec(name).scale * _np_product(layer, a, b)


def _weighted_delta(layer, adapters, weights):
    return sum(
        w * _np_delta(layer, n) for n, w in zip(adapters, weights, strict=True)
    )


def _close(actual, expected, rel=1e-5):
    """Max abs error within `rel` of the largest expected entry."""
    assert actual.shape == expected.shape
    bound = rel * max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_array_less(np.max(np.abs(actual - expected)), bound)


def _merged_output(model, x, deltas):
    """Outputs with `deltas` added to the base kernels, adapters disabled."""
    saved = []
    try:
        for layer in kl.lora_layers(model):
            kernel = layer.base_layer.kernel
            value = to_numpy(kernel).copy()
            saved.append((kernel, value))
            kernel.assign(value + deltas[id(layer)])
        with kl.disable_adapters(model):
            return to_numpy(model(x))
    finally:
        for kernel, value in saved:
            kernel.assign(value)


def _check_outputs(model, x, name, deltas):
    expected = _merged_output(model, x, deltas)
    previous = kl.lora_layers(model)[0].active_adapters
    kl.set_adapter(model, name)
    try:
        actual = to_numpy(model(x))
    finally:
        kl.set_adapter(model, previous)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _check_new_spec(layer, name, rank):
    spec = layer.adapter_spec(name)
    assert spec.rank == rank
    assert spec.alpha == rank
    assert spec.scale == 1.0
    assert layer.active_adapters == ["a"]  # not activated
    a, b = layer.lora_weights(name)
    assert tuple(a.shape)[-1] == rank and tuple(b.shape)[0] == rank
    assert tuple(a.shape)[:-1] == tuple(layer.lora_weights("a")[0].shape)[:-1]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_cat_is_exact(kind):
    model, x, layers = _build(kind)
    adapters, weights = ["a", "b", "c"], [0.7, -0.4, 1.3]
    add_weighted_adapter(model, adapters, weights, "mix")
    deltas = {}
    for layer in layers:
        ranks = sum(layer.adapter_spec(n).rank for n in adapters)
        _check_new_spec(layer, "mix", ranks)
        # The numpy reference agrees with the layer's own delta.
        _close(to_numpy(layer.delta_weight("a")), _np_delta(layer, "a"))
        expected = _weighted_delta(layer, adapters, weights)
        _close(to_numpy(layer.delta_weight("mix")), expected)
        deltas[id(layer)] = expected
    _check_outputs(model, x, "mix", deltas)
    assert "mix" in kl.list_adapters(model)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_linear_follows_its_formula(kind):
    model, x, layers = _build(kind)
    adapters, weights = ["a", "c"], [0.8, -0.5]
    add_weighted_adapter(model, adapters, weights, "lin", "linear")
    deltas = {}
    for layer in layers:
        _check_new_spec(layer, "lin", 2)
        a_new, b_new = 0.0, 0.0
        for name, w in zip(adapters, weights, strict=True):
            a, b = (to_numpy(v) for v in layer.lora_weights(name))
            root = math.sqrt(abs(w) * layer.adapter_spec(name).scale)
            a_new = a_new + np.sign(w) * root * a
            b_new = b_new + root * b
        a_var, b_var = layer.lora_weights("lin")
        _close(to_numpy(a_var), a_new)
        _close(to_numpy(b_var), b_new)
        expected = _np_product(layer, a_new, b_new)
        _close(to_numpy(layer.delta_weight("lin")), expected)
        deltas[id(layer)] = expected
    _check_outputs(model, x, "lin", deltas)


def test_linear_exact_for_one_adapter_and_disjoint_rank_slots():
    model, x, layers = _build("mha")
    add_weighted_adapter(model, ["b"], [-0.6], "one", "linear")
    for layer in layers:
        expected = -0.6 * _np_delta(layer, "b")
        _close(to_numpy(layer.delta_weight("one")), expected)
    # Adapters using disjoint rank slots have no cross terms A_i @ B_j.
    for layer in layers:
        for name, slot in (("a", 0), ("c", 1)):
            for var in layer.lora_weights(name):
                value = to_numpy(var).copy()
                mask = np.zeros(2)
                mask[slot] = 1.0
                shape = [1] * value.ndim
                axis = -1 if var is layer.lora_weights(name)[0] else 0
                shape[axis] = 2
                var.assign(value * mask.reshape(shape))
    weights = [1.5, -0.3]
    add_weighted_adapter(model, ["a", "c"], weights, "lin", "linear")
    deltas = {}
    for layer in layers:
        expected = _weighted_delta(layer, ["a", "c"], weights)
        _close(to_numpy(layer.delta_weight("lin")), expected)
        deltas[id(layer)] = expected
    _check_outputs(model, x, "lin", deltas)


def test_linear_is_an_approximation_in_general():
    model, _, layers = _build("mlp")
    for layer in layers:  # even with a shared A, cross terms remain
        layer.lora_weights("c")[0].assign(layer.lora_weights("a")[0])
    add_weighted_adapter(model, ["a", "c"], [0.5, 0.5], "lin", "linear")
    layer = layers[0]
    exact = _weighted_delta(layer, ["a", "c"], [0.5, 0.5])
    actual = to_numpy(layer.delta_weight("lin"))
    assert np.max(np.abs(actual - exact)) > 1e-2 * np.max(np.abs(exact))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_svd_is_exact_when_rank_covers_the_sum(kind):
    model, x, layers = _build(kind)
    adapters, weights = ["a", "b"], [1.2, -0.7]
    total = 3 if kind == "mlp" else 5
    add_weighted_adapter(model, adapters, weights, "svd", "svd", rank=total)
    deltas = {}
    for layer in layers:
        _check_new_spec(layer, "svd", total)
        expected = _weighted_delta(layer, adapters, weights)
        _close(to_numpy(layer.delta_weight("svd")), expected)
        deltas[id(layer)] = expected
    _check_outputs(model, x, "svd", deltas)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_svd_truncates_to_the_best_low_rank_approximation(kind):
    model, _, layers = _build(kind)
    adapters, weights = ["a", "b"], [1.2, -0.7]
    add_weighted_adapter(model, adapters, weights, "svd", "svd")
    add_weighted_adapter(model, adapters, weights, "svd1", "svd", rank=1)
    default_rank = 2 if kind == "mlp" else 3  # max of the ranks
    for layer in layers:
        _check_new_spec(layer, "svd", default_rank)
        _check_new_spec(layer, "svd1", 1)
        matrix = layer.kernel_matrix(
            _weighted_delta(layer, adapters, weights).astype("float64")
        )
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        for name, k in (("svd", default_rank), ("svd1", 1)):
            best = (u[:, :k] * s[:k]) @ vt[:k]
            actual = layer.kernel_matrix(to_numpy(layer.delta_weight(name)))
            _close(actual, best)
            assert np.linalg.matrix_rank(actual, tol=1e-4 * s[0]) == k


def test_new_adapter_config_is_recorded_and_functions_reset():
    model, x, layers = _build("mlp")
    model.predict(x, verbose=0)
    assert model.predict_function is not None
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix")
    assert model.predict_function is None
    config = kl.applied_configs(model)["mix"]
    for path, layer in (("fc1", layers[0]), ("fc2", layers[1])):
        assert config.rank_for(path) == layer.adapter_spec("mix").rank == 3
        assert config.alpha_for(path) == 3
    assert not config.use_rslora
    targets = kl.model.find_targets(model, config)
    assert [s.layer for s in targets] == layers
    kl.set_adapter(model, "mix")
    deltas = {
        id(ly): _weighted_delta(ly, ["a", "b"], [1.0, 1.0]) for ly in layers
    }
    expected = _merged_output(model, x, deltas)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5
    )
    kl.delete_adapter(model, "mix")
    assert "mix" not in kl.applied_configs(model)


def _state(model):
    return (
        weight_snapshot(model),
        [(ly.adapters, ly.active_adapters) for ly in kl.lora_layers(model)],
        sorted(kl.applied_configs(model)),
    )


def _assert_unchanged(model, before):
    weights, adapters, configs = _state(model)
    assert adapters == before[1]
    assert configs == before[2]
    assert sorted(weights) == sorted(before[0])
    for path, value in weights.items():
        np.testing.assert_array_equal(value, before[0][path])


ERRORS = [
    ((["a", "zzz"], [1, 1], "new"), {}, "has no adapter 'zzz'"),
    ((["a", "b"], [1.0], "new"), {}, "1 weights for 2 adapters"),
    ((["a", "b"], [1, 1], "new", "linear"), {}, "equal rank.*'fc1'"),
    ((["a", "b"], [1, 1], "new", "svd"), {"rank": 5}, "too large.*'fc2'"),
    ((["a", "b"], [1, 1], "b"), {}, "already has an adapter named 'b'"),
    ((["a", "b"], [1, 1], "new", "ties"), {}, "unknown combination"),
    ((["a", "b"], [1, "x"], "new"), {}, r"weights\[1\].*finite real"),
    ((["a", "b"], [True, 1], "new"), {}, r"weights\[0\]"),
    ((["a", "b"], [1, float("nan")], "new"), {}, r"weights\[1\]"),
    ((["a", "b"], [1, 1], "new"), {"rank": 2}, "svd' only"),
    ((["a", "b"], [1, 1], "new", "svd"), {"rank": 0}, "positive integer"),
    ((["a", "b"], [1, 1], "bad name"), {}, "invalid adapter_name"),
    (("a", [1], "new"), {}, "list of adapter names"),
    (([], [], "new"), {}, "is empty"),
]


@pytest.mark.parametrize("args, kwargs, match", ERRORS)
def test_errors_leave_the_model_unchanged(args, kwargs, match):
    model, _, _ = _build("mlp")
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, *args, **kwargs)
    _assert_unchanged(model, before)


def test_adapters_on_different_layers_are_refused():
    model, _, _ = _build("mlp")
    kl.add_adapter(model, "p", kl.LoraConfig(rank=2, target_modules=["fc1"]))
    kl.add_adapter(model, "q", kl.LoraConfig(rank=2, target_modules=["fc2"]))
    before = _state(model)
    with pytest.raises(ValueError, match="'fc2' lacks \\['p'\\]"):
        add_weighted_adapter(model, ["a", "p"], [1, 1], "new")
    with pytest.raises(ValueError, match="no LoRA layer .* holds all"):
        add_weighted_adapter(model, ["p", "q"], [1, 1], "new")
    _assert_unchanged(model, before)
    # Only the layers holding the adapters get the new one.
    add_weighted_adapter(model, ["p"], [2.0], "p2")
    fc1, fc2 = kl.lora_layers(model)
    assert "p2" in fc1.adapters and "p2" not in fc2.adapters


def test_model_without_lora_layers_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no LoRA layers"):
        add_weighted_adapter(model, ["a"], [1.0], "new")
