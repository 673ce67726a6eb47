"""Adapter layouts under keras.distribution (keras_lora.layers.layouts).

Runs on 8 simulated JAX devices (a child process, see tests/devices.py);
skipped on other backends. Mesh: 2 (batch) x 4 (model).
"""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.layers import lora_class_for
from keras_lora.layers.layouts import variable_axes
from keras_lora.serving import routing
from tests.devices import jax_only, needs_devices, run_in_device_process

pytestmark = jax_only
M, D, N = "model", "batch", None
LLAMA_TARGETS = [
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_intermediate_dense",
    "feedforward_gate_dense",
    "feedforward_output_dense",
]


def test_in_8_device_process():
    run_in_device_process(__file__)


@pytest.fixture
def mesh():
    return keras.distribution.DeviceMesh(
        (2, 4), (D, M), keras.distribution.list_devices()
    )


def model_parallel(layout_map):
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=D
    )


def adapter_axes(model):
    """`{(layer name, tensor): axes}` of every adapter variable."""
    found = {}
    for layer in kl.lora_layers(model):
        for tensor, variable in layer.adapter_variables().items():
            found[(layer.name, tensor)] = variable_axes(variable)
    return found


def one_layer_model(layer, input_shape):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


# -- one layer: the rules -----------------------------------------------------

# kernel layout -> (A layout, B layout); Dense kernel (8, 16).
DENSE_CASES = [
    ((None, M), (None, None), (None, M)),  # output axis: B, A replicated
    ((M, None), (M, None), (None, None)),  # input axis: A, B replicated
    ((D, M), (D, None), (None, M)),  # both
    ((None, None), (None, None), (None, None)),
]


@needs_devices
@pytest.mark.parametrize("kernel, a, b", DENSE_CASES)
def test_dense_adapters_follow_the_kernel(mesh, kernel, a, b):
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*fc/kernel"] = kernel
    with model_parallel(layout_map).scope():
        model = one_layer_model(keras.layers.Dense(16, name="fc"), (8,))
        kl.apply_lora(model, kl.LoraConfig(rank=4, target_modules=["fc"]))
    assert variable_axes(model.get_layer("fc").base_layer.kernel) == kernel
    assert adapter_axes(model) == {("fc", "lora_a"): a, ("fc", "lora_b"): b}


# equation, kernel shape, kernel layout -> (A layout, B layout). The
# per-head axes of attention projections are kernel output axes (query) or
# contracted axes (attention output); "abc,dc->abd" lists the kernel's
# output axis first.
EINSUM_CASES = [
    ("abc,cde->abde", (16, 4, 8), (N, M, N), (N, N), (N, M, N)),
    ("abc,cde->abde", (16, 4, 8), (M, N, N), (M, N), (N, N, N)),
    ("abc,cde->abde", (16, 4, 8), (M, D, N), (M, N), (N, D, N)),
    ("abcd,cde->abe", (4, 8, 16), (M, N, N), (M, N, N), (N, N)),
    ("abcd,cde->abe", (4, 8, 16), (N, N, M), (N, N, N), (N, M)),
    ("abcd,cde->abe", (4, 8, 16), (M, N, D), (M, N, N), (N, D)),
    ("abc,dc->abd", (16, 8), (M, N), (N, N), (N, M)),
    ("abc,dc->abd", (16, 8), (N, M), (M, N), (N, N)),
]  # fmt: skip


@needs_devices
@pytest.mark.parametrize("equation, shape, kernel, a, b", EINSUM_CASES)
def test_einsum_dense_adapters_follow_the_kernel(
    mesh, equation, shape, kernel, a, b
):
    output_axes = equation.split("->")[1][2:]
    letters = equation.split(",")[1].split("->")[0]
    sizes = dict(zip(letters, shape, strict=True))
    layer = keras.layers.EinsumDense(
        equation, (None,) + tuple(sizes[c] for c in output_axes), name="proj"
    )
    input_letters = equation.split(",")[0][2:]
    input_shape = (5,) + tuple(sizes[c] for c in input_letters)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*proj/kernel"] = kernel
    with model_parallel(layout_map).scope():
        model = one_layer_model(layer, input_shape)
        kl.apply_lora(model, kl.LoraConfig(rank=4, target_modules=["proj"]))
    assert variable_axes(layer.kernel) == kernel
    found = adapter_axes(model)
    assert found == {("proj", "lora_a"): a, ("proj", "lora_b"): b}


def _registered(layer):
    if lora_class_for(layer) is None:
        pytest.skip(
            f"no LoRA class for {type(layer).__name__} is registered yet"
        )


# embeddings layout -> (A, B); embeddings (32, 16): A (32, r), B (r, 16).
EMBEDDING_CASES = [
    ((M, None), (M, None), (None, None)),
    ((None, M), (None, None), (None, M)),
    ((M, D), (M, None), (None, D)),
]


@needs_devices
@pytest.mark.parametrize("kernel, a, b", EMBEDDING_CASES)
def test_embedding_adapters_follow_the_table(mesh, kernel, a, b):
    layer = keras.layers.Embedding(32, 16, name="embed")
    _registered(layer)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*embed/embeddings"] = kernel
    with model_parallel(layout_map).scope():
        model = one_layer_model(layer, (5,))
        kl.apply_lora(model, kl.LoraConfig(rank=4, target_modules=["embed"]))
    found = adapter_axes(model)
    assert found[("embed", "lora_a")] == a
    assert found[("embed", "lora_b")] == b


@needs_devices
@pytest.mark.parametrize("out_axis", [M, None])
def test_conv_adapters_follow_the_kernel(mesh, out_axis):
    layer = keras.layers.Conv2D(16, 3, name="conv")
    _registered(layer)
    kernel = (None, None, D, out_axis)  # (3, 3, 8, 16)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*conv/kernel"] = kernel
    with model_parallel(layout_map).scope():
        model = one_layer_model(layer, (6, 6, 8))
        kl.apply_lora(model, kl.LoraConfig(rank=4, target_modules=["conv"]))
    found = adapter_axes(model)
    a, b = found[("conv", "lora_a")], found[("conv", "lora_b")]
    # A's leading axes are the contracted ones, B ends in the filters.
    assert a[:3] == (None, None, D) and set(a[3:]) == {None}
    assert b[-1] == out_axis and set(b[:-1]) == {None}


@needs_devices
def test_dora_magnitude_follows_the_output_axes(mesh):
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*proj/kernel"] = (None, M, None)  # (16, 4, 8): heads split
    layer = keras.layers.EinsumDense("abc,cde->abde", (None, 4, 8), name="proj")
    with model_parallel(layout_map).scope():
        model = one_layer_model(layer, (5, 16))
        config = kl.LoraConfig(rank=4, target_modules=["proj"], use_dora=True)
        kl.apply_lora(model, config)
    assert adapter_axes(model) == {
        ("proj", "lora_a"): (None, None),
        ("proj", "lora_b"): (None, M, None),
        ("proj", "lora_magnitude"): (M, None),
    }


@needs_devices
def test_data_parallel_replicates_adapters():
    with keras.distribution.DataParallel().scope():
        model = one_layer_model(keras.layers.Dense(16, name="fc"), (8,))
        kl.apply_lora(model, kl.LoraConfig(rank=4, target_modules=["fc"]))
    assert adapter_axes(model) == {
        ("fc", "lora_a"): (None, None),
        ("fc", "lora_b"): (None, None),
    }


# -- keras-hub backbones under their own / users' layout maps ----------------


def tiny_llama():
    import keras_hub

    return keras_hub.models.LlamaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=8,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
    )


def tiny_gpt2():
    import keras_hub

    return keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=8,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )


# Under LlamaBackbone.get_layout_map (model: 4, batch: 2), by layer name:
# (kernel layout, A layout, B layout).
LLAMA_EXPECTED = {
    "query": ((M, D, None), (M, None), (None, D, None)),
    "key": ((M, D, None), (M, None), (None, D, None)),
    "value": ((M, D, None), (M, None), (None, D, None)),
    "attention_output": ((M, None, D), (M, None, None), (None, D)),
    "feedforward_intermediate_dense": ((D, M), (D, None), (None, M)),
    "feedforward_gate_dense": ((D, M), (D, None), (None, M)),
    "feedforward_output_dense": ((M, D), (M, None), (None, D)),
    "token_embedding": ((M, D), (M, None), (None, D)),
}


def _targets(backbone, names):
    """`names`, plus the token embedding once Embedding LoRA exists."""
    if lora_class_for(backbone.token_embedding) is not None:
        names = names + ["token_embedding"]
    return names


@needs_devices
def test_llama_adapters_under_keras_hub_layout_map(mesh):
    import keras_hub

    layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
    with model_parallel(layout_map).scope():
        backbone = tiny_llama()
        targets = _targets(backbone, LLAMA_TARGETS)
        kl.apply_lora(backbone, kl.LoraConfig(rank=4, target_modules=targets))
    for layer in kl.lora_layers(backbone):
        kernel, a, b = LLAMA_EXPECTED[layer.name]
        assert variable_axes(layer.kernel_of(layer.base_layer)) == kernel
        a_var, b_var = layer.lora_weights()
        assert variable_axes(a_var) == a, layer.name
        assert variable_axes(b_var) == b, layer.name
    blocks = [t for t in targets if t != "token_embedding"]
    expected = 2 * len(blocks) + (len(targets) - len(blocks))
    assert len(kl.lora_layers(backbone)) == expected


# A user's Megatron-style map for GPT-2 (keras-hub has none): base weights
# only, by layer name: (kernel layout, A layout, B layout).
GPT2_USER_MAP = {
    "token_embedding/embeddings": (None, M),
    "transformer_layer.*(query|key|value)/kernel": (None, M, None),
    "transformer_layer.*(query|key|value)/bias": (M, None),
    "transformer_layer.*attention_output/kernel": (M, None, None),
    "transformer_layer.*feedforward_intermediate_dense/kernel": (None, M),
    "transformer_layer.*feedforward_intermediate_dense/bias": (M,),
    "transformer_layer.*feedforward_output_dense/kernel": (M, None),
}
GPT2_EXPECTED = {
    "query": ((None, M, None), (None, None), (None, M, None)),
    "key": ((None, M, None), (None, None), (None, M, None)),
    "value": ((None, M, None), (None, None), (None, M, None)),
    "attention_output": ((M, None, None), (M, None, None), (None, None)),
    "feedforward_intermediate_dense": ((None, M), (None, None), (None, M)),
    "feedforward_output_dense": ((M, None), (M, None), (None, None)),
    "token_embedding": ((None, M), (None, None), (None, M)),
}


def gpt2_layout_map(mesh):
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in GPT2_USER_MAP.items():
        layout_map[key] = axes
    return layout_map


@needs_devices
def test_gpt2_adapters_under_a_user_layout_map(mesh):
    with model_parallel(gpt2_layout_map(mesh)).scope():
        backbone = tiny_gpt2()
        targets = _targets(
            backbone, [n for n in GPT2_EXPECTED if n != "token_embedding"]
        )
        kl.apply_lora(backbone, kl.LoraConfig(rank=4, target_modules=targets))
    layers = kl.lora_layers(backbone)
    assert {layer.name for layer in layers} == set(targets)
    for layer in layers:
        kernel, a, b = GPT2_EXPECTED[layer.name]
        assert variable_axes(layer.kernel_of(layer.base_layer)) == kernel
        a_var, b_var = layer.lora_weights()
        assert (variable_axes(a_var), variable_axes(b_var)) == (a, b)


# -- what the LayoutMap may and may not say about adapters -------------------


def _llama_map(mesh, extra=()):
    import keras_hub

    layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
    for key, axes in extra:
        layout_map[key] = axes
    return layout_map


@needs_devices
def test_a_broad_regex_for_base_weights_never_catches_adapters(mesh):
    # Llama's dense layers have no bias, so a user may well write one
    # regex for "everything in the gate projection". Keras would give
    # the adapters that layout too (A's rank axis on "model": rank 2 is
    # not divisible by 4, and creating A would fail).
    layout_map = _llama_map(mesh)
    del layout_map["transformer_layer.*feedforward_gate_dense.kernel"]
    layout_map["transformer_layer.*feedforward_gate_dense/.*"] = (D, M)
    path = "transformer_layer_0/feedforward_gate_dense/lora_a_default"
    assert tuple(layout_map[path].axes) == (D, M)  # Keras's own lookup
    with model_parallel(layout_map).scope():
        backbone = tiny_llama()
        kl.apply_lora(
            backbone,
            kl.LoraConfig(rank=2, target_modules=["feedforward_gate_dense"]),
        )
    for layer in kl.lora_layers(backbone):
        a_var, b_var = layer.lora_weights()
        assert variable_axes(a_var) == (D, None)
        assert variable_axes(b_var) == (None, M)


@needs_devices
def test_explicit_adapter_layouts_win(mesh):
    exact = "transformer_layer_0/self_attention/query/lora_a_default"
    layout_map = _llama_map(
        mesh,
        [(exact, (None, None)), (".*value/lora_b.*", (None, None, M))],
    )
    with model_parallel(layout_map).scope():
        backbone = tiny_llama()
        kl.apply_lora(
            backbone, kl.LoraConfig(rank=4, target_modules=["query", "value"])
        )
    axes = {
        v.path: variable_axes(v)
        for layer in kl.lora_layers(backbone)
        for v in layer.lora_weights()
    }
    assert axes[exact] == (None, None)  # exact key
    assert axes[exact.replace("layer_0", "layer_1")] == (M, None)  # derived
    for block in (0, 1):
        value_b = (
            f"transformer_layer_{block}/self_attention/value/lora_b_default"
        )
        assert axes[value_b] == (None, None, M)  # regex naming lora


@needs_devices
@pytest.mark.parametrize(
    "extra, message",
    [
        (
            [(".*query/lora.*", (M, None)), (".*lora_a.*", (None, None))],
            "matches several LayoutMap keys",
        ),
        ([(".*query/lora_a.*", (M, None, None))], "has 3 axes instead of 2"),
    ],
)
def test_bad_adapter_layouts_raise_and_leave_the_model(mesh, extra, message):
    with model_parallel(_llama_map(mesh, extra)).scope():
        backbone = tiny_llama()
        before = [w.path for w in backbone.weights]
        config = kl.LoraConfig(rank=4, target_modules=["query", "value"])
        with pytest.raises(ValueError, match=message):
            kl.apply_lora(backbone, config)
    assert kl.lora_layers(backbone) == []
    assert [w.path for w in backbone.weights] == before


# -- routed slots -------------------------------------------------------------


@needs_devices
def test_routed_slots_follow_the_kernel(mesh):
    layout_map = gpt2_layout_map(mesh)
    layout_map[".*ids"] = (M,)  # must not catch the routing ids
    with model_parallel(layout_map).scope():
        backbone = tiny_gpt2()
        kl.apply_lora(
            backbone,
            kl.LoraConfig(
                rank=2,
                target_modules=[
                    "query",
                    "attention_output",
                    "feedforward_output_dense",
                ],
            ),
        )
        router = routing.Router(max_batch=4)
        for layer in kl.lora_layers(backbone):
            routing.attach(layer, router, slots=3, max_rank=4)
    assert variable_axes(router.ids) == (None,)
    for layer in kl.lora_layers(backbone):
        _, a, b = GPT2_EXPECTED[layer.name]
        slots = layer.routed_slots
        assert variable_axes(slots.a) == (None,) + a
        assert variable_axes(slots.b) == (None,) + b
        assert variable_axes(slots.scales) == (None,)
        # Slot contents are written by assignment, keeping the layout.
        rng = np.random.default_rng(0)
        slots.write(
            1,
            rng.normal(size=slots.a_shape[:-1] + (2,)),
            rng.normal(size=(2,) + slots.b_shape[1:]),
            0.5,
        )
        assert variable_axes(slots.b) == (None,) + b
