import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import to_numpy

CASES = [
    # equation, output_shape, input shape, bias_axes
    ("abc,cde->abde", (None, 3, 4), (2, 5, 8), "de"),
    ("abcd,cde->abe", (None, 8), (2, 5, 3, 4), "e"),
    ("...b,bc->...c", (6,), (2, 5, 8), "c"),
    ("ab,bc->ac", (6,), (2, 8), None),
]


@pytest.mark.parametrize("equation, output_shape, x_shape, bias_axes", CASES)
def test_matches_numpy_reference(equation, output_shape, x_shape, bias_axes):
    base = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    x = np.random.rand(*x_shape).astype("float32")
    before = to_numpy(base(x))
    lora = kl.LoraEinsumDense.from_layer(base, rank=3, alpha=6)
    np.testing.assert_allclose(to_numpy(lora(x)), before, atol=1e-6)
    a, b = lora.lora_weights()
    b.assign(np.random.rand(*b.shape).astype("float32"))
    f = lora.factorization
    delta = 2.0 * np.einsum(f.delta, to_numpy(a), to_numpy(b))
    kernel = to_numpy(base.kernel) + delta
    expected = np.einsum(equation, x, kernel)
    if bias_axes:
        expected = expected + to_numpy(base.bias)
    np.testing.assert_allclose(
        to_numpy(lora(x)), expected, rtol=1e-5, atol=1e-6
    )


def test_gpt2_base_query_projection_has_6144_trainable_parameters():
    # keras-hub GPT-2 base: hidden 768, 12 heads of 64, query `abc,cde->abde`.
    query = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 12, 64), bias_axes="de"
    )
    query.build((None, None, 768))
    lora = kl.LoraEinsumDense.from_layer(query, rank=4)
    a, b = lora.lora_weights()
    assert tuple(a.shape) == (768, 4)
    assert tuple(b.shape) == (4, 12, 64)
    assert sum(int(np.prod(w.shape)) for w in lora.trainable_weights) == 6144


def test_drop_in_constructor_and_activation():
    layer = kl.LoraEinsumDense(
        "abc,cd->abd", (None, 6), rank=2, activation="relu", bias_axes="d"
    )
    out = layer(-np.ones((2, 3, 4), "float32"))
    assert tuple(out.shape) == (2, 3, 6)
    assert (to_numpy(out) >= 0).all()
    assert layer.equation == "abc,cd->abd"


def test_unfactorable_equation_is_a_clear_error():
    with pytest.raises(ValueError, match="'grouped'.*kernel axis 'b'"):
        kl.LoraEinsumDense("abc,bcd->abd", (None, 4), name="grouped")
    base = keras.layers.EinsumDense("abc,bcd->abd", (3, 4), name="grp")
    base.build((2, 3, 5))
    with pytest.raises(ValueError, match="'grp'"):
        kl.LoraEinsumDense.from_layer(base)
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    with pytest.raises(TypeError, match="expects a keras.layers.EinsumDense"):
        kl.LoraEinsumDense.from_layer(dense)
