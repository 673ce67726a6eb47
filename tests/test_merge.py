import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import to_numpy


def _dense():
    base = keras.layers.Dense(6)
    base.build((None, 5))
    return base, (4, 5)


def _einsum():
    base = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 2, 3), bias_axes="de"
    )
    base.build((None, None, 5))
    return base, (2, 4, 5)


LAYERS = {
    "dense": (_dense, kl.LoraDense),
    "einsum": (_einsum, kl.LoraEinsumDense),
}


def _adapted(kind, **kwargs):
    make, cls = LAYERS[kind]
    base, x_shape = make()
    lora = cls.from_layer(base, rank=3, alpha=5, **kwargs)
    _, b = lora.lora_weights()
    b.assign(np.random.normal(size=b.shape).astype("float32"))
    x = np.random.normal(size=x_shape).astype("float32")
    return lora, x


def _max_rel_err(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("kind", LAYERS)
def test_merge_is_exact_and_unmerge_restores(kind):
    lora, x = _adapted(kind)
    kernel = to_numpy(lora.base_layer.kernel).copy()
    unmerged = to_numpy(lora(x))
    lora.merge()
    assert lora.merged and lora.merged_adapters == ["default"]
    assert _max_rel_err(to_numpy(lora(x)), unmerged) <= 1e-5
    expected_kernel = kernel + to_numpy(lora.delta_weight())
    np.testing.assert_allclose(
        to_numpy(lora.base_layer.kernel), expected_kernel, rtol=1e-6
    )
    lora.unmerge()
    assert not lora.merged
    np.testing.assert_allclose(
        to_numpy(lora.base_layer.kernel), kernel, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(to_numpy(lora(x)), unmerged, rtol=1e-5)
    lora.unmerge()  # idempotent: nothing merged, nothing changes
    np.testing.assert_allclose(
        to_numpy(lora.base_layer.kernel), kernel, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("kind", LAYERS)
def test_second_merge_is_refused(kind):
    lora, _ = _adapted(kind)
    lora.merge()
    kernel = to_numpy(lora.base_layer.kernel).copy()
    with pytest.raises(ValueError, match="is already merged"):
        lora.merge()
    np.testing.assert_array_equal(to_numpy(lora.base_layer.kernel), kernel)


@pytest.mark.parametrize("kind", LAYERS)
def test_training_while_merged_is_refused(kind):
    lora, x = _adapted(kind)
    lora.merge()
    with pytest.raises(RuntimeError, match="is merged .* cannot be trained"):
        lora(x, training=True)
    lora.unmerge()
    lora(x, training=True)


def test_merge_with_dropout_matches_inference_output():
    lora, x = _adapted("dense", dropout=0.3)
    inference = to_numpy(lora(x))
    lora.merge()
    assert _max_rel_err(to_numpy(lora(x)), inference) <= 1e-5
