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
    # Kernel axes in another order than the input's: still two 2-D products.
    ("abc,dce->abde", (None, 3, 5), (2, 5, 8), None),
    # Not `[kept][contracted] -> [kept][outputs]`: the einsum path.
    ("acb,cd->abd", (None, 6), (2, 8, 5), "d"),
    ("abc,ce->aeb", (6, None), (2, 5, 8), None),
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


def test_flat_and_einsum_paths_agree_with_gradients():
    """The 2-D matrix-product path gives the einsum path's outputs and
    adapter gradients (the einsum path is the reference)."""
    base = keras.layers.EinsumDense("abcd,cde->abe", (None, 6))
    x = np.random.rand(2, 5, 3, 4).astype("float32")
    base.build(x.shape)
    lora = kl.LoraEinsumDense.from_layer(base, rank=2)
    a, b = lora.lora_weights()
    b.assign(np.random.rand(*b.shape).astype("float32"))
    assert lora.factorization.flat
    f = lora.factorization
    flat = to_numpy(lora.project_up(lora.project_down(x, a.value), b.value))
    reference = np.einsum(f.up, np.einsum(f.down, x, to_numpy(a)), to_numpy(b))
    np.testing.assert_allclose(flat, reference, rtol=1e-5, atol=1e-6)
    # Gradient of sum(branch * g) with respect to A and B, in closed form.
    g = np.random.rand(*reference.shape).astype("float32")
    hidden = np.einsum(f.down, x, to_numpy(a))
    grad_b = np.einsum("abr,abe->re", hidden, g)
    grad_a = np.einsum(
        "abcd,abr->cdr", x, np.einsum("abe,re->abr", g, to_numpy(b))
    )
    grads = _adapter_gradients(lora, x, g)
    np.testing.assert_allclose(grads[0], grad_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], grad_b, rtol=1e-4, atol=1e-5)


def _adapter_gradients(lora, x, g):
    """d sum(lora(x) * g) / d (A, B), with the backend's autodiff."""
    backend = keras.backend.backend()
    a, b = lora.lora_weights()
    if backend == "jax":
        import jax

        frozen = [v.value for v in lora.non_trainable_variables]

        def loss(a_value, b_value):
            outputs, _ = lora.stateless_call([a_value, b_value], frozen, x)
            return (outputs * g).sum()

        return [np.asarray(v) for v in jax.grad(loss, (0, 1))(a.value, b.value)]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(lora(x) * g)
        return [t.numpy() for t in tape.gradient(loss, [a.value, b.value])]
    import torch

    loss = (lora(x) * torch.as_tensor(g)).sum()
    loss.backward()
    return [to_numpy(a.value.grad), to_numpy(b.value.grad)]


def test_variable_batch_in_a_functional_model():
    """The 2-D path reshapes with the input's batch size, known or not."""
    inputs = keras.Input((5, 8))
    layer = kl.LoraEinsumDense("abc,cde->abde", (None, 3, 4), rank=2)
    model = keras.Model(inputs, layer(inputs))
    assert model.output_shape[0] is None
    _, b = layer.lora_weights()
    b.assign(np.ones(b.shape, "float32"))
    for batch in (1, 3):
        x = np.random.rand(batch, 5, 8).astype("float32")
        expected = to_numpy(layer(x))
        np.testing.assert_allclose(
            model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
        )


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="inspects a JAX program"
)
def test_branch_gradient_is_two_dimensional_matrix_products():
    """Every matrix product of the adapter gradients contracts one axis.

    A 3-D product's weight gradient contracts two axes (batch and
    sequence), which XLA:CPU turns into a transposed copy of the output
    gradient per adapter (a quarter of the W2 step on JAX); see
    `keras_lora.layers.projection.matmul_trailing`.
    """
    import jax

    rank = 3  # no other axis has this size
    for layer in (
        kl.LoraEinsumDense("abc,cde->abde", (None, 6, 4), rank=rank),
        kl.LoraDense(6, rank=rank),
    ):
        x = np.random.rand(2, 5, 8).astype("float32")
        layer.build(x.shape)
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(weights, layer=layer, frozen=frozen, x=x):
            outputs, _ = layer.stateless_call(weights, frozen, x)
            return (outputs**2).sum()

        weights = [v.value for v in layer.trainable_variables]
        jaxpr = jax.make_jaxpr(jax.grad(loss))(weights)
        branch = [
            eqn
            for eqn in jaxpr.eqns
            if eqn.primitive.name == "dot_general"
            and any(rank in v.aval.shape for v in eqn.invars)
        ]
        # x @ A, h @ B; gradients of h, A, B and of x through A.
        assert len(branch) >= 5, jaxpr
        for eqn in branch:
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            shapes = [v.aval.shape for v in eqn.invars]
            assert len(lhs_contracting) == 1, shapes
            assert all(len(s) == 2 for s in shapes), shapes


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
