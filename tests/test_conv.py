"""LoraConv: Conv1D/2D/3D with LoRA, against a numpy convolution."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.serving import routing
from tests.conftest import gradients, skip_unless_channels_first_runs, to_numpy

RNG = np.random.default_rng(0)
RANK = 2
CONVS = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
# (spatial dims, input spatial shape, conv kwargs)
CASES = {
    "1d_same": (1, (9,), dict(padding="same")),
    "1d_causal_dilated": (1, (9,), dict(padding="causal", dilation_rate=2)),
    "2d_valid_strided": (2, (7, 6), dict(padding="valid", strides=2)),
    "2d_same_dilated": (2, (7, 6), dict(padding="same", dilation_rate=2)),
    "3d_same_strided": (3, (5, 4, 5), dict(padding="same", strides=2)),
}
IN_CHANNELS, FILTERS = 3, 4


def np_windows(x, kernel_size, strides, padding, dilation):
    """`(batch, *out_spatial, *kernel_size, channels)` input windows, the
    way Keras pads ("same": as TensorFlow; "causal": the past)."""
    nd = len(kernel_size)
    pads = [(0, 0)]
    for i in range(nd):
        size, k, s, d = x.shape[1 + i], kernel_size[i], strides[i], dilation[i]
        span = (k - 1) * d + 1
        if padding == "same":
            out = -(-size // s)
            total = max((out - 1) * s + span - size, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((span - 1, 0))
        else:
            pads.append((0, 0))
    x = np.pad(x, pads + [(0, 0)])
    spans = [
        (k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)
    ]
    windows = np.lib.stride_tricks.sliding_window_view(
        x, spans, axis=tuple(range(1, nd + 1))
    )  # (batch, *positions, channels, *spans)
    index = (slice(None),)
    index += tuple(slice(None, None, s) for s in strides)
    index += (slice(None),) + tuple(slice(None, None, d) for d in dilation)
    windows = windows[index]
    return np.moveaxis(windows, 1 + nd, -1)  # channels last


def np_conv(x, kernel, conv):
    """`conv`'s convolution of `x` with `kernel`, in numpy."""
    windows = np_windows(
        x,
        conv.kernel_size,
        conv.strides,
        conv.padding,
        conv.dilation_rate,
    )
    nd = len(conv.kernel_size)
    axes = list(range(-nd - 1, 0))
    return np.tensordot(windows, kernel, axes=(axes, list(range(nd + 1))))


def _wrapped(case, **kwargs):
    dims, spatial, conv_kwargs = CASES[case]
    conv = CONVS[dims](FILTERS, 3, name="conv", **conv_kwargs)
    x = RNG.normal(size=(2,) + spatial + (IN_CHANNELS,)).astype("float32")
    conv.build(x.shape)
    conv.bias.assign(RNG.normal(size=(FILTERS,)))
    layer = kl.LoraConv.from_layer(conv, rank=RANK, alpha=4.0, **kwargs)
    for variable in layer.adapter_variables(layer.adapters[0]).values():
        variable.assign(RNG.normal(0, 0.5, variable.shape))
    return layer, x


def _reference(layer, x):
    conv = layer.base_layer
    a, b = (to_numpy(v) for v in layer.lora_weights())
    kernel = to_numpy(conv.kernel)
    return np_conv(x, kernel, conv) + to_numpy(conv.bias), np_conv(x, a, conv)


def test_drop_in_shapes_and_weights():
    layer = kl.LoraConv(8, 3, spatial_dims=2, rank=2, padding="same")
    assert tuple(layer(np.ones((1, 5, 5, 4), "float32")).shape) == (1, 5, 5, 8)
    assert [tuple(w.shape) for w in layer.trainable_weights] == [
        (3, 3, 4, 2),
        (2, 8),
    ]
    for dims, conv in CONVS.items():
        assert kl.layers.lora_class_for(conv(2, 3)) is kl.LoraConv, dims


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_numpy(case):
    layer, x = _wrapped(case)
    base, hidden = _reference(layer, x)
    b = to_numpy(layer.lora_weights()[1])
    expected = base + layer.adapter_spec().scale * hidden @ b
    np.testing.assert_allclose(
        to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("case", ["1d_causal_dilated", "2d_valid_strided"])
def test_gradients_reach_only_a_and_b(case):
    layer, x = _wrapped(case)
    assert [w.name for w in layer.trainable_weights] == [
        "lora_a_default",
        "lora_b_default",
    ]
    grad_a, grad_b = gradients(layer, x)
    conv = layer.base_layer
    a, b = (to_numpy(v) for v in layer.lora_weights())
    s = layer.adapter_spec().scale
    base, hidden = _reference(layer, x)
    y = base + s * hidden @ b
    dy = 2 * y / y.size
    nd = len(conv.kernel_size)
    positions = tuple(range(nd + 1))  # batch and output positions
    expected_b = s * np.tensordot(hidden, dy, axes=(positions, positions))
    windows = np_windows(
        x, conv.kernel_size, conv.strides, conv.padding, conv.dilation_rate
    )
    expected_a = s * np.tensordot(windows, dy @ b.T, (positions, positions))
    np.testing.assert_allclose(grad_b, expected_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_a, expected_a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unmerge(case):
    layer, x = _wrapped(case)
    kernel = to_numpy(layer.base_layer.kernel).copy()
    out = to_numpy(layer(x))
    layer.merge()
    merged = to_numpy(layer(x))
    np.testing.assert_allclose(merged, out, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(
        to_numpy(layer.base_layer.kernel), kernel, rtol=1e-5, atol=1e-6
    )


def test_channels_first():
    conv = keras.layers.Conv2D(FILTERS, 3, data_format="channels_first")
    x = RNG.normal(size=(2, IN_CHANNELS, 6, 5)).astype("float32")
    conv.build(x.shape)
    skip_unless_channels_first_runs()
    layer = kl.LoraConv.from_layer(conv, rank=RANK)
    for variable in layer.adapter_variables().values():
        variable.assign(RNG.normal(0, 0.5, variable.shape))
    a, b = (to_numpy(v) for v in layer.lora_weights())
    x_last = np.moveaxis(x, 1, -1)
    kernel = to_numpy(conv.kernel) + layer.adapter_spec().scale * np.tensordot(
        a, b, 1
    )
    expected = np_conv(x_last, kernel, conv) + to_numpy(conv.bias)
    got = np.moveaxis(to_numpy(layer(x)), 1, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_and_depthwise_convolutions_are_refused():
    grouped = keras.layers.Conv2D(4, 3, groups=2, name="grouped")
    grouped.build((None, 6, 6, 4))
    with pytest.raises(ValueError, match="grouped convolution \\(groups=2\\)"):
        kl.LoraConv.from_layer(grouped)
    depthwise = keras.layers.DepthwiseConv2D(3, name="dw")
    depthwise.build((None, 6, 6, 4))
    with pytest.raises(TypeError, match="is a DepthwiseConv2D"):
        kl.LoraConv.from_layer(depthwise)

    inputs = keras.Input((6, 6, 4))
    h = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    h = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(h)
    outputs = keras.layers.Conv2D(4, 1, name="pointwise")(h)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="'dw' is a DepthwiseConv2D, which"):
        kl.apply_lora(model, kl.LoraConfig(target_modules=["dw"]))
    with pytest.raises(ValueError, match="grouped convolution"):
        kl.apply_lora(model, kl.LoraConfig(target_modules=["grouped"]))
    # The preset takes the convolutions it can adapt and skips the others.
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules="all-conv"))
    assert [x.name for x in kl.lora_layers(model)] == ["pointwise"]


def _conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, IN_CHANNELS))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    h = keras.layers.Conv1D(4, 2, padding="causal", name="c2")(
        keras.layers.Reshape((36, 4))(h)
    )
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def test_model_round_trips_and_adapter_files(tmp_path):
    model = _conv_model()
    x = RNG.normal(size=(2, 8, 8, IN_CHANNELS)).astype("float32")
    kl.apply_lora(model, kl.LoraConfig(rank=RANK, target_modules="all-conv"))
    assert {type(x).__name__ for x in kl.lora_layers(model)} == {"LoraConv"}
    for layer in kl.lora_layers(model):
        for variable in layer.adapter_variables().values():
            variable.assign(RNG.normal(0, 0.3, variable.shape))
    expected = to_numpy(model(x))
    path = str(tmp_path / "conv.keras")
    kl.save_model(model, path)
    loaded = kl.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-6)
    kl.save_adapter(model, tmp_path / "adapter")
    fresh = _conv_model()
    kl.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(to_numpy(fresh(x)), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["1d_causal_dilated", "3d_same_strided"])
def test_routed_rows_equal_each_adapter_alone(case):
    reference, x = _wrapped(case, adapter_name="a")
    reference.add_adapter("b", rank=3, alpha=2.0)
    for variable in reference.adapter_variables("b").values():
        variable.assign(RNG.normal(0, 0.5, variable.shape))
    expected = {}
    for name in ("a", "b", None):
        reference.set_adapter([] if name is None else name)
        expected[name] = to_numpy(reference(x))
    dims, _, conv_kwargs = CASES[case]
    base = CONVS[dims](FILTERS, 3, name="conv", **conv_kwargs)
    base.build(x.shape)
    base.set_weights(reference.base_layer.get_weights())
    layer = routing.routable_layer(base)
    router = routing.Router(max_batch=2)
    slots = routing.attach(layer, router, slots=2, max_rank=3)
    for slot, name in enumerate(("a", "b")):
        a, b = (to_numpy(v) for v in reference.lora_weights(name))
        slots.write(slot, a, b, reference.adapter_spec(name).scale)
    for rows in (["b", "a"], [None, "b"]):
        router.set([{"a": 0, "b": 1, None: -1}[n] for n in rows])
        y = to_numpy(layer(x))
        for i, name in enumerate(rows):
            np.testing.assert_allclose(
                y[i], expected[name][i], rtol=1e-5, atol=1e-5
            )
