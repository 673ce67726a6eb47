"""The layer-type seam: one class and its registration make a new type
work with apply, merge, adapter files, whole-model files and routing."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_lora as kl
from keras_lora.layers import (
    LoraLayer,
    lora_class_for,
    register_lora_layer,
    unregister_lora_layer,
)
from keras_lora.serving import AdapterBank
from tests.conftest import to_numpy


@keras.saving.register_keras_serializable(package="tests")
class TransposedDense(keras.layers.Dense):
    """A Dense subclass that keeps its weight as `weight_t`, shaped
    `(units, input_dim)` like a torch Linear."""

    def build(self, input_shape):
        self.weight_t = self.add_weight(
            name="weight_t", shape=(self.units, input_shape[-1])
        )
        self.bias = self.add_weight(
            name="bias", shape=(self.units,), initializer="zeros"
        )
        self.built = True

    # Dense's own saving reads `kernel`; this layer saves what it has.
    def save_own_variables(self, store):
        store["0"], store["1"] = self.weight_t, self.bias

    def load_own_variables(self, store):
        self.weight_t.assign(store["0"])
        self.bias.assign(store["1"])

    def call(self, inputs):
        y = ops.matmul(inputs, ops.transpose(self.weight_t)) + self.bias
        return self.activation(y)


@keras.saving.register_keras_serializable(package="tests")
class LoraTransposedDense(LoraLayer):
    """The only code the new type needs: its shapes and projections."""

    wraps = (TransposedDense,)

    @classmethod
    def kernel_of(cls, base_layer):
        return base_layer.weight_t

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        units, input_dim = cls.kernel_shape_of(base_layer)
        return (input_dim, rank), (rank, units)

    def project_down(self, x, a):
        return ops.matmul(x, a)

    def project_up(self, hidden, b):
        return ops.matmul(hidden, b)

    def kernel_delta(self, a, b):
        return ops.transpose(ops.matmul(a, b))  # kernel layout (units, in)

    def kernel_matrix(self, kernel):
        return np.transpose(kernel)  # (in, units)


@pytest.fixture(autouse=True)
def registered():
    register_lora_layer(LoraTransposedDense)
    yield
    unregister_lora_layer(LoraTransposedDense)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            TransposedDense(5, activation="relu", name="t1"),
            keras.layers.Dense(3, name="head"),
        ],
        name="toy",
    )


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for layer in kl.lora_layers(model):
        for name in layer.adapters:
            for variable in layer.adapter_variables(name).values():
                variable.assign(rng.normal(0, 0.3, variable.shape))


X = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")


def test_dispatch_prefers_the_most_specific_class():
    layer = TransposedDense(2)
    assert lora_class_for(layer) is LoraTransposedDense
    assert lora_class_for(keras.layers.Dense(2)) is kl.LoraDense
    unregister_lora_layer(LoraTransposedDense)
    assert lora_class_for(layer) is kl.LoraDense  # a Dense subclass
    assert "TransposedDense" not in kl.layers.supported_layer_types()


def test_apply_merge_files_and_routing(tmp_path):
    model = _model()
    base_out = to_numpy(model(X))
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules=["t1"]))
    layer = model.get_layer("t1")
    assert isinstance(layer, LoraTransposedDense)
    assert [tuple(w.shape) for w in model.trainable_weights] == [
        (6, 2),
        (2, 5),
    ]
    _randomize(model, 1)
    adapted = to_numpy(model(X))
    assert not np.allclose(adapted, base_out, atol=1e-3)

    # Reference: the base kernel plus s * (A @ B)^T in its own layout.
    a, b = (to_numpy(v) for v in layer.lora_weights())
    kernel = to_numpy(layer.base_layer.weight_t) + (a @ b).T
    bias = to_numpy(layer.base_layer.bias)
    hidden = np.maximum(X @ kernel.T + bias, 0)
    head = model.get_layer("head")
    expected = hidden @ to_numpy(head.kernel) + to_numpy(head.bias)
    np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)

    kl.merge_adapters(model)
    np.testing.assert_allclose(to_numpy(model(X)), adapted, atol=1e-5)
    kl.unmerge_adapters(model)

    kl.save_adapter(model, tmp_path / "adapter")
    fresh = _model()
    kl.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(to_numpy(fresh(X)), adapted, atol=1e-5)

    kl.save_model(model, tmp_path / "model.keras")
    loaded = kl.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.get_layer("t1"), LoraTransposedDense)
    np.testing.assert_allclose(to_numpy(loaded(X)), adapted, atol=1e-5)

    served = _model()
    bank = AdapterBank(served, slots=1, max_rank=2, max_batch=4)
    bank.register("toy", tmp_path / "adapter")
    with bank.routing(["toy", None, "toy", None]):
        routed = to_numpy(served(X))
    np.testing.assert_allclose(routed[0::2], adapted[0::2], atol=1e-5)
    np.testing.assert_allclose(routed[1::2], base_out[1::2], atol=1e-5)

    plain = kl.merge_and_unload(model)
    assert type(plain.get_layer("t1")) is TransposedDense
    np.testing.assert_allclose(to_numpy(plain(X)), adapted, atol=1e-5)
