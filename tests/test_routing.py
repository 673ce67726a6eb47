"""Per-example routing: a routed mixed batch equals each adapter alone."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.serving import routing
from tests.conftest import BACKEND, to_numpy

RNG = np.random.default_rng(0)
# (rank, alpha) of the adapters routed side by side; padded to MAX_RANK.
ADAPTERS = {"a": (2, 4.0), "b": (4, 2.0), "c": (3, 3.0)}
MAX_RANK = 5

LAYERS = {
    "dense": (lambda: keras.layers.Dense(6, name="d"), (5, 4)),
    "dense_3d": (lambda: keras.layers.Dense(6, name="d"), (5, 3, 4)),
    "einsum_query": (
        lambda: keras.layers.EinsumDense(
            "abc,cde->abde", (None, 2, 3), bias_axes="de", name="q"
        ),
        (5, 3, 4),
    ),
    "einsum_output": (
        lambda: keras.layers.EinsumDense(
            "abcd,cde->abe", (None, 4), bias_axes="e", name="o"
        ),
        (5, 3, 2, 3),
    ),
    "einsum_transposed": (  # output units not trailing: not flat
        lambda: keras.layers.EinsumDense(
            "abc,cd->adb", (6, 3), bias_axes="d", name="t"
        ),
        (5, 3, 4),
    ),
    "einsum_ellipsis": (
        lambda: keras.layers.EinsumDense("...b,bc->...c", 6, name="e"),
        (5, 3, 4),
    ),
}


def _random(shape):
    return RNG.normal(0.0, 0.5, shape).astype("float32")


def _reference(make, x_shape, dora=()):
    """A LoRA layer holding ADAPTERS as named adapters, with random A, B
    (and random magnitudes for the DoRA adapters named in `dora`)."""
    base = make()
    base.build(x_shape)
    for w in base.weights:
        w.assign(_random(w.shape))
    layer = kl.layers.lora_class_for(base).from_layer(
        base,
        rank=ADAPTERS["a"][0],
        alpha=ADAPTERS["a"][1],
        adapter_name="a",
        use_dora="a" in dora,
    )
    for name, (rank, alpha) in ADAPTERS.items():
        if name != "a":
            layer.add_adapter(
                name, rank=rank, alpha=alpha, use_dora=name in dora
            )
    for name in ADAPTERS:
        for tensor, variable in layer.adapter_variables(name).items():
            value = _random(variable.shape)
            if tensor == "lora_magnitude":  # around the kernel's norms
                value = to_numpy(variable) * (1.0 + value)
            variable.assign(value)
    return layer


def _per_adapter(layer, x):
    """`{name or None: output of the whole batch with that adapter}`."""
    outputs = {}
    for name in ADAPTERS:
        layer.set_adapter(name)
        outputs[name] = to_numpy(layer(x))
    layer.set_adapter([])
    outputs[None] = to_numpy(layer(x))
    return outputs


def _routed_copy(reference, make, x_shape, slots=4):
    """A routed layer on a copy of `reference`'s base, adapters in slots
    (a DoRA adapter with its factor computed as the bank does)."""
    base = make()
    base.build(x_shape)
    base.set_weights(reference.base_layer.get_weights())
    layer = routing.routable_layer(base)
    router = routing.Router(max_batch=8)
    weights = routing.attach(layer, router, slots, MAX_RANK)
    for slot, name in enumerate(ADAPTERS):
        adapter = reference.adapter(name)
        values = {t: to_numpy(v) for t, v in adapter.variables.items()}
        scale = adapter.spec.scale
        factor = adapter.variant.routed_factor(layer, values, scale)
        if factor is not None:
            weights.enable_rescaling()
        a, b = values["lora_a"], values["lora_b"]
        weights.write(slot, a, b, scale, factor)
    return layer, router


def _compiled(layer):
    """The backend's compiled call of `layer`, and a trace counter."""
    traces = []
    if BACKEND == "jax":
        import jax

        @jax.jit
        def run(trainable, non_trainable, x):
            traces.append(1)
            return layer.stateless_call(trainable, non_trainable, x)[0]

        def call(x):
            return run(
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables],
                x,
            )

        return call, traces
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def call(x):
            traces.append(1)
            return layer(x)

        return call, traces
    import torch

    def call(x):
        traces.append(1)
        with torch.no_grad():
            return layer(x)

    return call, traces


@pytest.mark.parametrize("dora", [(), ("b", "c")], ids=["lora", "dora"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_mixed_batch_equals_each_adapter_alone(case, dora):
    """Base, LoRA and (with `dora`) DoRA rows in one batch, eager and
    compiled, each row equal to its adapter alone."""
    make, x_shape = LAYERS[case]
    x = _random(x_shape)
    reference = _reference(make, x_shape, dora)
    expected = _per_adapter(reference, x)
    layer, router = _routed_copy(reference, make, x_shape)
    rows = ["a", None, "b", "c", "a"]
    slot_of = {name: i for i, name in enumerate(ADAPTERS)}
    compiled, traces = _compiled(layer)
    for order in (rows, rows[::-1]):
        router.set([-1 if n is None else slot_of[n] for n in order])
        for y in (to_numpy(layer(x)), to_numpy(compiled(x))):
            for i, name in enumerate(order):
                np.testing.assert_allclose(
                    y[i], expected[name][i], atol=1e-5, rtol=1e-5
                )
    if BACKEND != "torch":
        # New routing ids are new variable values, not a new trace.
        assert len(traces) == 1


def test_base_rows_equal_base_and_rows_past_ids_are_base():
    make, x_shape = LAYERS["dense"]
    x = _random(x_shape)
    reference = _reference(make, x_shape)
    layer, router = _routed_copy(reference, make, x_shape)
    base = to_numpy(reference.base_layer(x))
    router.set([0, 1])  # rows 2.. are not given: base model
    y = to_numpy(layer(x))
    np.testing.assert_allclose(y[2:], base[2:], atol=1e-6)
    assert np.abs(y[:2] - base[:2]).max() > 1e-3
    router.clear()
    np.testing.assert_allclose(to_numpy(layer(x)), base, atol=1e-6)


def test_routed_branch_adds_to_active_named_adapter():
    make, x_shape = LAYERS["dense"]
    x = _random(x_shape)
    reference = _reference(make, x_shape)
    expected = _per_adapter(reference, x)
    layer, router = _routed_copy(reference, make, x_shape)
    # Route "b" on top of a layer whose own active adapter is a copy of "a".
    layer.add_adapter("own", rank=2, alpha=4.0)
    layer.set_adapter("own")
    for own, ref in zip(
        layer.lora_weights("own"), reference.lora_weights("a"), strict=True
    ):
        own.assign(ref)
    router.set([1])
    y = to_numpy(layer(x))
    base = expected[None][0]
    both = expected["a"][0] + expected["b"][0] - base
    np.testing.assert_allclose(y[0], both, atol=1e-5)
    with kl.disable_adapters(keras.Sequential([layer])):
        np.testing.assert_allclose(to_numpy(layer(x))[0], base, atol=1e-6)


def test_slots_not_saved_and_detach_restores_variables(tmp_path):
    make, x_shape = LAYERS["dense"]
    base = make()
    base.build(x_shape)
    layer = kl.LoraDense.from_layer(base, rank=2)
    before = [v.path for v in layer.weights]
    router = routing.Router(4)
    routing.attach(layer, router, 2, 4)
    paths = [v.path for v in layer.weights]
    assert "d/lora_a_slots" in paths and "routing_ids" in paths
    store = {}
    layer.save_own_variables(store)
    assert sorted(store) == ["default.lora_a", "default.lora_b"]
    routing.detach(layer)
    assert [v.path for v in layer.weights] == before


def test_cost_does_not_depend_on_adapters_written():
    """The routed pass reads one gathered A/B per row: only slot contents
    change when other adapters are written, never shapes."""
    make, x_shape = LAYERS["dense"]
    reference = _reference(make, x_shape)
    layer, _ = _routed_copy(reference, make, x_shape, slots=3)
    shapes = [tuple(v.shape) for v in layer.routed_slots.variables]
    assert shapes == [(4, 4, MAX_RANK), (4, MAX_RANK, 6), (4,), (4, 6)]


def test_batched_equation():
    assert routing.batched_equation("abc,cr->abr") == "abc,acr->abr"
    ellipsis = routing.batched_equation("...i,ir->...r")
    assert ellipsis == "a...i,air->a...r"
    with pytest.raises(ValueError, match="batch"):
        routing.batched_equation("abc,ar->bcr", "weird")


def test_errors():
    make, x_shape = LAYERS["dense"]
    reference = _reference(make, x_shape)
    layer, router = _routed_copy(reference, make, x_shape, slots=3)
    with pytest.raises(ValueError, match="max_batch>=9"):
        router.set([0] * 9)
    with pytest.raises(ValueError, match="invalid slot id -2"):
        router.set([-2])
    with pytest.raises(ValueError, match="already has routed slots"):
        routing.attach(layer, router, 2, 4)
    weights = layer.routed_slots
    with pytest.raises(ValueError, match="max_rank>=6"):
        weights.write(0, np.zeros((4, 6)), np.zeros((6, 6)), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        weights.write(0, np.zeros((3, 2)), np.zeros((2, 6)), 1.0)
    with pytest.raises(IndexError, match="slot 3 out of range"):
        weights.write(3, np.zeros((4, 2)), np.zeros((2, 6)), 1.0)
    with pytest.raises(TypeError, match="not a keras_lora LoRA layer"):
        routing.attach(keras.layers.Dense(2), router, 2, 4)
    with pytest.raises(ValueError, match="positive integer"):
        routing.Router(0)
