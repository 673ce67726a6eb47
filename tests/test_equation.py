import pytest

from keras_lora.layers.equation import factor_equation


@pytest.mark.parametrize(
    "equation, kernel_shape, a_shape, b_shape",
    [
        # MultiHeadAttention query/key/value and keras-hub GPT-2 q/k/v.
        ("abc,cde->abde", (768, 12, 64), (768, 4), (4, 12, 64)),
        # MultiHeadAttention (and GPT-2) attention output.
        ("abcd,cde->abe", (12, 64, 768), (12, 64, 4), (4, 768)),
        ("ab,bc->ac", (8, 6), (8, 4), (4, 6)),
        ("...b,bc->...c", (8, 6), (8, 4), (4, 6)),
        ("ab...,bc->ac...", (8, 6), (8, 4), (4, 6)),
        # Kernel axes in a different order than the input.
        ("abc,dce->abde", (3, 8, 5), (8, 4), (4, 3, 5)),
    ],
)
def test_adapter_shapes(equation, kernel_shape, a_shape, b_shape):
    f = factor_equation(equation)
    assert f.adapter_shapes(kernel_shape, 4) == (a_shape, b_shape)


def test_strings_for_query_projection():
    f = factor_equation("abc,cde->abde")
    r = f.rank_letter
    assert f.down == f"abc,c{r}->ab{r}"
    assert f.up == f"ab{r},{r}de->abde"
    assert f.delta == f"c{r},{r}de->cde"


@pytest.mark.parametrize(
    "equation, flat",
    [
        ("abc,cde->abde", True),  # MultiHeadAttention query/key/value
        ("abcd,cde->abe", True),  # MultiHeadAttention output
        ("...b,bc->...c", True),
        ("abc,dce->abde", True),
        ("ab...,bc->ac...", False),  # contracted axis not last
        ("abcd,dce->abe", False),  # contracted in another order
        ("abc,ce->aeb", False),  # output axes not last
    ],
)
def test_flat_equations(equation, flat):
    assert factor_equation(equation).flat is flat


def test_rank_letter_avoids_equation_letters():
    f = factor_equation("abf,fg->abg")
    assert f.rank_letter not in "abfg"


@pytest.mark.parametrize(
    "equation, message",
    [
        ("abc,bcd->abd", "kernel axis 'b' appears in the input, the kernel"),
        ("ab,bz->a", "kernel axis 'z' is summed away"),
        ("ab,c->abc", "no kernel axis is contracted"),
        ("ab->ac", "cannot parse einsum equation"),
        ("a.b,bc->ac", "malformed ellipsis"),
    ],
)
def test_unfactorable_equations(equation, message):
    with pytest.raises(ValueError, match="my_layer") as info:
        factor_equation(equation, "my_layer")
    assert message in str(info.value)
