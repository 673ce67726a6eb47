"""Shared test helpers. The Keras backend is fixed per process: run the suite
once per backend (see README)."""

import os

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def gradients(layer_or_model, x, y=None):
    """Gradients of `mean((f(x) - y)**2)` w.r.t. the trainable weights.

    Written per backend because computing gradients has no backend-agnostic
    Keras API. Returns numpy arrays in `trainable_variables` order.
    """
    weights = layer_or_model.trainable_variables

    def loss_of(out):
        target = 0.0 if y is None else y
        return keras.ops.mean(keras.ops.square(out - target))

    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_of(layer_or_model(x, training=True))
        grads = tape.gradient(loss, [w.value for w in weights])
        return [to_numpy(g) for g in grads]
    if BACKEND == "jax":
        import jax

        trainable = [w.value for w in weights]
        non_trainable = [
            w.value for w in layer_or_model.non_trainable_variables
        ]

        def f(tv):
            out, _ = layer_or_model.stateless_call(
                tv, non_trainable, x, training=True
            )
            return loss_of(out)

        return [np.asarray(g) for g in jax.grad(f)(trainable)]
    if BACKEND == "torch":
        for w in weights:
            w.value.grad = None
        loss = loss_of(layer_or_model(x, training=True))
        loss.backward()
        return [w.value.grad.detach().cpu().numpy() for w in weights]
    raise NotImplementedError(BACKEND)


def weight_snapshot(model):
    return {w.path: to_numpy(w).copy() for w in model.weights}


@pytest.fixture
def tmp_keras_path(tmp_path):
    return os.path.join(tmp_path, "model.keras")


def skip_unless_channels_first_runs():
    """Skips where Keras's own channels_first Conv2D cannot run: on a CPU,
    TensorFlow's Conv2D takes NCHW only through oneDNN (Intel CPUs)."""
    conv = keras.layers.Conv2D(1, 1, data_format="channels_first")
    try:
        conv(np.zeros((1, 1, 2, 2), "float32"))
    except Exception as error:
        if "NHWC" not in str(error):
            raise
        pytest.skip("this CPU's TensorFlow Conv2D supports NHWC only")
