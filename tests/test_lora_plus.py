"""LoRA+: B's learning rate is `ratio` times A's, on every backend."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.layers.variants import tensor_of
from tests.conftest import to_numpy

RATIO = 16.0
LR = 1e-3
X = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
Y = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")


def _model(use_dora=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="fc1"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    config = kl.LoraConfig(
        rank=2, target_modules=["fc1", "head"], use_dora=use_dora
    )
    kl.apply_lora(model, config)
    rng = np.random.default_rng(2)
    for variable in model.trainable_variables:  # B non-zero: A gets grads
        if tensor_of(variable) == "lora_b":
            variable.assign(rng.normal(0, 0.3, variable.shape))
    return model


def _values(variables):
    return [to_numpy(v).copy() for v in variables]


OPTIMIZERS = {
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adamw": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.1),
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_equals_two_optimizers(name):
    """A LoRA+ step equals one optimizer with `lr` on A (and everything
    else) and one with `ratio * lr` on B, step after step."""
    make = OPTIMIZERS[name]
    model = _model()
    variables = model.trainable_variables
    fast = [v for v in variables if tensor_of(v) == "lora_b"]
    slow = [v for v in variables if tensor_of(v) != "lora_b"]
    assert len(fast) == 2 and len(slow) == 2
    start = _values(variables)
    rng = np.random.default_rng(3)
    grads = [
        [
            keras.ops.convert_to_tensor(rng.normal(size=v.shape), "float32")
            for v in variables
        ]
        for _ in range(3)
    ]
    plus = kl.optimizers.lora_plus(make(LR), ratio=RATIO)
    for step in grads:
        plus.apply(step, variables)
    got = _values(variables)

    for variable, value in zip(variables, start, strict=True):
        variable.assign(value)
    slow_opt, fast_opt = make(LR), make(RATIO * LR)
    index = {id(v): i for i, v in enumerate(variables)}
    for step in grads:
        slow_opt.apply([step[index[id(v)]] for v in slow], slow)
        fast_opt.apply([step[index[id(v)]] for v in fast], fast)
    for variable, value in zip(variables, got, strict=True):
        np.testing.assert_allclose(
            value, to_numpy(variable), rtol=1e-5, atol=1e-7
        )
    # The ratio matters: a plain optimizer moves B less.
    b = index[id(fast[0])]
    assert not np.allclose(got[b], start[b], atol=1e-6)


def test_fit_moves_b_ratio_times_as_far_as_plain_sgd():
    """compile/fit (jit-compiled where the backend does it): with SGD, one
    LoRA+ step moves B exactly `ratio` times as far, A the same."""
    deltas = {}
    for ratio in (None, RATIO):
        model = _model()
        start = _values(model.trainable_variables)
        optimizer = keras.optimizers.SGD(LR)
        if ratio is not None:
            optimizer = kl.optimizers.lora_plus(optimizer, ratio=ratio)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
        now = _values(model.trainable_variables)
        deltas[ratio] = [n - s for n, s in zip(now, start, strict=True)]
    model = _model()
    for variable, plain, plus in zip(
        model.trainable_variables, deltas[None], deltas[RATIO], strict=True
    ):
        factor = RATIO if tensor_of(variable) == "lora_b" else 1.0
        assert np.abs(plain).max() > 0
        # Differences of float32 weights: absolute rounding about 1e-7.
        np.testing.assert_allclose(plus, factor * plain, rtol=1e-3, atol=1e-6)


def test_vectors_and_dora_magnitudes():
    model = _model(use_dora=True)
    magnitudes = [
        v for v in model.trainable_variables if tensor_of(v) == "lora_magnitude"
    ]
    assert len(magnitudes) == 2
    default = kl.optimizers.lora_plus(keras.optimizers.SGD(LR))
    vectors = kl.optimizers.lora_plus(keras.optimizers.SGD(LR), vectors=True)
    for variable in magnitudes:
        assert default.learning_rate_multiplier(variable) == 1.0
        assert vectors.learning_rate_multiplier(variable) == 16.0


def test_saves_and_loads_with_the_model(tmp_path):
    model = _model()
    schedule = keras.optimizers.schedules.ExponentialDecay(LR, 10, 0.5)
    model.compile(
        optimizer=kl.optimizers.lora_plus(
            keras.optimizers.AdamW(schedule, weight_decay=0.01), ratio=4
        ),
        loss="mse",
    )
    model.fit(X, Y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    kl.save_model(model, path)
    loaded = kl.load_model(path)
    optimizer = loaded.optimizer
    assert isinstance(optimizer, kl.optimizers.LoraPlusMixin)
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.ratio == 4.0 and optimizer.weight_decay == 0.01
    config = keras.optimizers.serialize(optimizer)
    again = keras.optimizers.deserialize(config)
    assert type(again) is type(optimizer)
    loaded.fit(X, Y, epochs=1, verbose=0)  # training resumes


@pytest.mark.parametrize(
    "ratio, message",
    [(0, "positive number"), (float("nan"), "positive number"), (True, "")],
)
def test_bad_ratio(ratio, message):
    with pytest.raises(ValueError, match="`ratio` must be a positive"):
        kl.optimizers.lora_plus(keras.optimizers.Adam(), ratio=ratio)


def test_refuses_used_or_wrapped_optimizers():
    used = keras.optimizers.Adam()
    used.build(_model().trainable_variables)
    with pytest.raises(ValueError, match="has been used already"):
        kl.optimizers.lora_plus(used)
    plus = kl.optimizers.lora_plus("adam")
    assert type(plus).__name__ == "LoraPlusAdam"
    with pytest.raises(ValueError, match="already a LoRA\\+ optimizer"):
        kl.optimizers.lora_plus(plus)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="inner optimizer"):
        kl.optimizers.lora_plus(scaled)
