"""LoftQ: an int4 base plus its adapter is closer to the float kernel, and
fine-tuning starts at a lower loss than from the default init."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.layers import loftq
from tests.conftest import to_numpy
from tests.faults import run_with_faults

RNG = np.random.default_rng(0)


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(32, activation="relu", name="fc2"),
            keras.layers.Dense(4, name="head"),
        ],
        name="mlp",
    )


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _kernels(model, names):
    return {n: to_numpy(model.get_layer(n).kernel).copy() for n in names}


def _errors(model, kernels):
    return {
        layer.name: np.linalg.norm(
            loftq.effective_kernel(layer, "default") - kernels[layer.name]
        )
        for layer in kl.lora_layers(model)
    }


def _quantized_default(model, names, mode="int4", rank=4):
    """The same float model with `names` quantized by Keras and a
    default-initialised adapter (B = 0): what LoftQ competes with."""
    model = _copy(model)
    for name in names:
        model.get_layer(name).quantize(mode)
    kl.apply_lora(model, kl.LoraConfig(rank=rank, target_modules=names))
    return model


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_reduces_kernel_reconstruction_error(mode):
    model = _mlp()
    names = ["fc1", "fc2"]
    kernels = _kernels(model, names)
    plain = _errors(_quantized_default(model, names, mode), kernels)
    errors = {}
    for iterations in (1, 5):
        adapted = _copy(model)
        config = kl.LoraConfig(
            rank=4,
            target_modules=names,
            init="loftq",
            loftq_mode=mode,
            loftq_iterations=iterations,
        )
        kl.apply_lora(adapted, config)
        for layer in kl.lora_layers(adapted):
            assert layer.base_layer.quantization_mode == mode
        errors[iterations] = _errors(adapted, kernels)
    for name in names:
        # Measured on this model (int4, fc1/fc2): plain 0.27/0.36, LoftQ
        # 0.19/0.28 after one step and 0.17/0.25 after five (int8: 0.016/
        # 0.021, then 0.011/0.017 and 0.011/0.015).
        assert errors[1][name] < 0.9 * plain[name], (name, errors, plain)
        assert errors[5][name] < errors[1][name], (name, errors)


def test_einsum_dense_targets():
    inputs = keras.Input((3, 8))
    query = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 2, 6), bias_axes="de", name="q"
    )
    outputs = keras.layers.Flatten()(query(inputs))
    model = keras.Model(inputs, outputs)
    kernel = to_numpy(query.kernel).copy()
    plain = _quantized_default(model, ["q"], rank=3)
    config = kl.LoraConfig(rank=3, target_modules=["q"], init="loftq")
    adapted = _copy(model)
    kl.apply_lora(adapted, config)
    error = _errors(adapted, {"q": kernel})["q"]
    assert error < 0.97 * _errors(plain, {"q": kernel})["q"]
    x = RNG.normal(size=(2, 3, 8)).astype("float32")
    reference = to_numpy(model(x))
    assert (
        np.abs(to_numpy(adapted(x)) - reference).max()
        < np.abs(to_numpy(plain(x)) - reference).max()
    )


def _task():
    """A regression task the float MLP learns; LoftQ starts closer."""
    teacher = _mlp(seed=7)
    x = RNG.normal(size=(512, 16)).astype("float32")
    y = to_numpy(teacher(x))
    model = _mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x[:384], y[:384], epochs=40, batch_size=64, verbose=0)
    return model, (x[:384], y[:384]), (x[384:], y[384:])


def test_finetuning_starts_at_a_lower_loss():
    model, (x, y), (x_val, y_val) = _task()
    names = ["fc1", "fc2", "head"]
    float_loss = float(model.evaluate(x_val, y_val, verbose=0))
    runs = {}
    for init in ("default", "loftq"):
        if init == "default":
            adapted = _quantized_default(model, names)
        else:
            adapted = _copy(model)
            config = kl.LoraConfig(rank=4, target_modules=names, init=init)
            kl.apply_lora(adapted, config)
        adapted.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        start = float(adapted.evaluate(x_val, y_val, verbose=0))
        history = adapted.fit(
            x, y, epochs=3, batch_size=64, shuffle=False, verbose=0
        )
        runs[init] = (start, history.history["loss"])
    start_default, losses_default = runs["default"]
    start_loftq, losses_loftq = runs["loftq"]
    assert float_loss < start_loftq < start_default, runs
    assert losses_loftq[0] < losses_default[0], runs


def test_refusals_leave_the_model_unchanged():
    model = _mlp()
    model.get_layer("fc1").quantize("int4")
    before = {w.path: to_numpy(w).copy() for w in model.weights}
    config = kl.LoraConfig(rank=2, target_modules=["fc1"], init="loftq")
    with pytest.raises(ValueError, match="already int4-quantized"):
        kl.apply_lora(model, config)
    big = kl.LoraConfig(rank=20, target_modules=["head"], init="loftq")
    with pytest.raises(ValueError, match="needs rank <= 4"):
        kl.apply_lora(model, big)
    assert kl.lora_layers(model) == []
    after = {w.path: to_numpy(w) for w in model.weights}
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    inputs = keras.Input((3,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, name="embed")(inputs)
    with pytest.raises(ValueError, match="supports Dense and EinsumDense"):
        kl.apply_lora(
            keras.Model(inputs, embedded),
            kl.LoraConfig(rank=2, target_modules=["embed"], init="loftq"),
        )
    with pytest.raises(ValueError, match="plain LoRA adapters only"):
        kl.LoraConfig(init="loftq", use_dora=True)
    with pytest.raises(ValueError, match="loftq_mode must be one of"):
        kl.LoraConfig(init="loftq", loftq_mode="int2")
    with pytest.raises(ValueError, match="loftq_iterations must be"):
        kl.LoraConfig(init="loftq", loftq_iterations=0)


def test_files_and_fault_injection(tmp_path):
    model = _mlp()
    config = kl.LoraConfig(
        rank=2, target_modules=["fc1", "fc2"], init="loftq", loftq_iterations=1
    )
    x = RNG.normal(size=(4, 16)).astype("float32")
    steps = run_with_faults(lambda: kl.apply_lora(model, config), model, x)
    assert steps > 0
    expected = to_numpy(model(x))
    path = str(tmp_path / "model.keras")
    kl.save_model(model, path)
    loaded = kl.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-6)
    layer = kl.lora_layers(loaded)[0]
    assert layer.base_layer.quantization_mode == "int4"
    # The adapter alone does not restore the model on a fresh base.
    with pytest.raises(ValueError, match="LoftQ"):
        kl.save_adapter(model, tmp_path / "adapter")
