"""LoRA on bases quantized by Keras (int8, int4): QLoRA in Keras terms."""

import warnings

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.serving import AdapterBank
from tests.conftest import gradients, to_numpy
from tests.faults import run_with_faults

MODES = ("int8", "int4")
RNG = np.random.default_rng(0)
VOCAB = 12
X2 = RNG.normal(size=(3, 8)).astype("float32")
X3 = RNG.normal(size=(3, 4, 8)).astype("float32")
IDS = RNG.integers(0, VOCAB, (3, 4)).astype("int32")

# name: (base layer factory, input)
LAYERS = {
    "dense": (lambda: keras.layers.Dense(6, name="layer"), X2),
    "einsum": (
        lambda: keras.layers.EinsumDense(
            "abc,cde->abde", (None, 2, 3), bias_axes="de", name="layer"
        ),
        X3,
    ),
    "embedding": (lambda: keras.layers.Embedding(VOCAB, 8, name="layer"), IDS),
    "reversible": (
        lambda: keras.layers.ReversibleEmbedding(VOCAB, 8, name="layer"),
        IDS,
    ),
}


def _randomize(layer, seed=1):
    rng = np.random.default_rng(seed)
    for name in layer.adapters:
        for variable in layer.adapter_variables(name).values():
            variable.assign(rng.normal(0, 0.3, variable.shape))


def _branch(layer, x, reverse=False):
    """`s * (x @ A) @ B` in numpy, for the layer types of LAYERS."""
    a, b = (to_numpy(v) for v in layer.lora_weights())
    s = layer.adapter_spec().scale
    if isinstance(layer, kl.LoraEmbedding):
        if reverse:
            return s * (x @ b.T) @ a.T
        return s * a[x] @ b
    a = a.reshape(-1, a.shape[-1])
    out = s * (x @ a) @ b.reshape(b.shape[0], -1)
    return out.reshape(x.shape[:-1] + b.shape[1:])


def _built(case):
    make, x = LAYERS[case]
    base = make()
    base(x)
    return base, x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_output_is_the_quantized_base_plus_the_branch(case, mode):
    """Quantized before wrapping or after: the wrapper runs the base's own
    quantized call and adds the float32 branch."""
    for quantize_first in (True, False):
        base, x = _built(case)
        float_shape = tuple(
            kl.layers.lora_class_for(base).kernel_shape_of(base)
        )
        if quantize_first:
            base.quantize(mode)
        layer = kl.layers.lora_class_for(base).from_layer(base, rank=2)
        if not quantize_first:
            base.quantize(mode)
        _randomize(layer)
        assert base.quantization_mode == mode
        assert layer.dtype_policy.name == "float32"
        assert layer.kernel_shape_of(base) == float_shape
        assert {w.dtype for w in layer.trainable_weights} == {"float32"}
        expected = to_numpy(base(x)) + _branch(layer, x)
        np.testing.assert_allclose(
            to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5
        )
        if case == "reversible":
            h = RNG.normal(size=(3, 4, 8)).astype("float32")
            expected = to_numpy(base(h, reverse=True)) + _branch(
                layer, h, reverse=True
            )
            np.testing.assert_allclose(
                to_numpy(layer(h, reverse=True)), expected, rtol=1e-5, atol=1e-5
            )


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 8, name="embed")(ids)
    h = keras.layers.EinsumDense("abc,cd->abd", (None, 8), name="mix")(h)
    h = keras.layers.Dense(8, activation="relu", name="ff")(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(ids, keras.layers.Dense(1, name="head")(h))


CONFIG = kl.LoraConfig(rank=2, target_modules=["all-linear", "all-embedding"])


def _snapshot(model):
    return {w.path: to_numpy(w).copy() for w in model.weights}


@pytest.mark.parametrize("mode", MODES)
def test_fit_trains_only_the_adapters(mode):
    model = _model()
    model.quantize(mode)  # leaves the model's tracker locked (Keras)
    kl.apply_lora(model, CONFIG)
    assert sorted(x.name for x in kl.lora_layers(model)) == [
        "embed",
        "ff",
        "mix",
    ]
    trainable = {w.path for w in model.trainable_weights}
    assert all("lora_" in path for path in trainable) and len(trainable) == 6
    x = RNG.integers(0, VOCAB, (32, 4)).astype("int32")
    y = RNG.normal(size=(32, 1)).astype("float32")
    before = _snapshot(model)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    after = _snapshot(model)
    for path, value in before.items():
        changed = not np.array_equal(after[path], value)
        assert changed == (path in trainable), path


def _adapted(mode, seed=0):
    model = _model(seed)
    if mode is not None:
        model.quantize(mode)
    kl.apply_lora(model, CONFIG)
    for i, layer in enumerate(kl.lora_layers(model)):
        _randomize(layer, seed=10 + i)
    return model


@pytest.mark.parametrize("mode", MODES)
def test_merge_is_refused_unless_requantizing(mode):
    model = _adapted(mode)
    x = RNG.integers(0, VOCAB, (5, 4)).astype("int32")
    unmerged = to_numpy(model(x))
    weights = _snapshot(model)
    for operation in (kl.merge_adapters, kl.merge_and_unload):
        with pytest.raises(ValueError, match=f"its {mode}-quantized base"):
            operation(model)
        assert all(
            np.array_equal(v, _snapshot(model)[p]) for p, v in weights.items()
        )
    with pytest.warns(kl.RequantizationWarning, match="output drift"):
        kl.merge_adapters(model, requantize=True)
    drifts = {x.name: x.merge_drift for x in kl.lora_layers(model)}
    for name, drift in drifts.items():
        assert drift.mode == mode and drift.layer == name
        # Rounding costs a little of each adapter's change, not all of it.
        assert 0 < drift.adapter_drift < (0.1 if mode == "int8" else 0.5)
    merged = to_numpy(model(x))
    relative = np.abs(merged - unmerged).max() / np.abs(unmerged).max()
    assert 0 < relative < (0.05 if mode == "int8" else 0.3)
    # The quantized kernels come back exactly.
    kl.unmerge_adapters(model)
    for path, value in weights.items():
        np.testing.assert_array_equal(_snapshot(model)[path], value)
    np.testing.assert_array_equal(to_numpy(model(x)), unmerged)

    with pytest.warns(kl.RequantizationWarning):
        kl.merge_and_unload(model, requantize=True)
    assert not kl.model.lora_layers(model)
    assert model.get_layer("ff").quantization_mode == mode
    np.testing.assert_allclose(to_numpy(model(x)), merged, rtol=1e-6)


def test_requantized_layer_merge_reports_drift():
    base, x = _built("dense")
    base.quantize("int8")
    layer = kl.LoraDense.from_layer(base, rank=2)
    _randomize(layer)
    with pytest.raises(ValueError, match="requantize=True"):
        layer.merge()
    exact = to_numpy(layer(x))
    layer.merge(requantize=True)
    drift = layer.merge_drift
    assert drift.output_drift < 0.02 and drift.max_abs_error > 0
    assert "output drift" in drift.describe()
    np.testing.assert_allclose(to_numpy(layer(x)), exact, atol=0.05)


@pytest.mark.parametrize("mode", MODES)
def test_adapters_move_between_quantized_and_float_bases(tmp_path, mode):
    x = RNG.integers(0, VOCAB, (5, 4)).astype("int32")
    # Trained on the quantized base, loaded onto the float base ...
    quantized = _adapted(mode, seed=0)
    kl.save_adapter(quantized, tmp_path / "from_quantized")
    floating = _model(seed=0)
    kl.load_adapter(floating, tmp_path / "from_quantized")
    for layer in kl.lora_layers(floating):
        source = quantized.get_layer(layer.name)
        for got, want in zip(
            layer.lora_weights(), source.lora_weights(), strict=True
        ):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    reference = _adapted(None, seed=0)  # the same float base, same adapter
    np.testing.assert_allclose(
        to_numpy(floating(x)), to_numpy(reference(x)), rtol=1e-5, atol=1e-6
    )
    # ... and the other way round: the quantized base plus the branch.
    kl.save_adapter(reference, tmp_path / "from_float")
    target = _model(seed=0)
    target.quantize(mode)
    kl.load_adapter(target, tmp_path / "from_float")
    np.testing.assert_allclose(
        to_numpy(target(x)), to_numpy(quantized(x)), rtol=1e-5, atol=1e-6
    )
    with open(tmp_path / "from_quantized" / "adapter_config.json") as f:
        saved_q = f.read()
    with open(tmp_path / "from_float" / "adapter_config.json") as f:
        saved_f = f.read()
    assert '"kernel_shape"' in saved_q
    for name in ("embed", "mix", "ff"):
        shape = kl.layers.lora_class_for(floating.get_layer(name).base_layer)
        assert shape is not None
    assert _kernel_shapes(saved_q) == _kernel_shapes(saved_f)


def _kernel_shapes(text):
    import json

    return json.loads(text)["base_model"]["kernel_shapes"]


def test_keras_file_round_trip_of_a_quantized_lora_model(tmp_path):
    model = _adapted("int8")
    x = RNG.integers(0, VOCAB, (5, 4)).astype("int32")
    path = str(tmp_path / "q.keras")
    kl.save_model(model, path)
    loaded = kl.load_model(path)
    assert loaded.get_layer("ff").base_layer.quantization_mode == "int8"
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)))


@pytest.mark.parametrize("mode", ["int4"])
def test_adapter_bank_routes_over_a_quantized_base(tmp_path, mode):
    x = RNG.integers(0, VOCAB, (4, 4)).astype("int32")
    paths, alone = {}, {}
    for seed, name in ((1, "one"), (2, "two")):
        source = _adapted(mode, seed=0)
        for i, layer in enumerate(kl.lora_layers(source)):
            _randomize(layer, seed=100 * seed + i)
        paths[name] = kl.save_adapter(source, tmp_path / name)
        alone[name] = to_numpy(source(x))
    served = _model(seed=0)
    served.quantize(mode)
    alone[None] = to_numpy(served(x))
    bank = AdapterBank(served, slots=2, max_rank=2, max_batch=4)
    for name, path in paths.items():
        bank.register(name, path)
    rows = ["two", None, "one", "two"]
    with bank.routing(rows):
        y = to_numpy(served(x))
    for i, name in enumerate(rows):
        np.testing.assert_allclose(y[i], alone[name][i], rtol=1e-5, atol=1e-6)


def test_modes_lora_cannot_use_are_refused():
    dense = keras.layers.Dense(4, name="f8")
    dense.build((None, 8))
    dense.quantize("float8")
    with pytest.raises(ValueError, match="mode 'float8'.*int8"):
        kl.LoraDense.from_layer(dense)
    for policy, mode in (
        ("awq/4/128_from_float32", "awq"),
        ("gptq/4/128_from_float32", "gptq"),
    ):
        layer = keras.layers.Dense(4, dtype=policy, name=mode)
        layer.build((None, 8))
        with pytest.raises(ValueError, match=f"mode '{mode}'"):
            kl.LoraDense.from_layer(layer)
    # Quantized to float8 after LoRA was applied: the call says so.
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="d")]
    )
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules=["d"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: InputLayer has no quantize
        model.quantize("float8")
    with pytest.raises(ValueError, match="mode 'float8'"):
        model(X2)


def test_sequential_quantized_before_apply():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(6, name="d1"),
            keras.layers.Dense(3),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize("int4")
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules=["d1"]))
    assert isinstance(model.get_layer("d1"), kl.LoraDense)
    assert tuple(model(X2).shape) == (3, 3)


@pytest.mark.parametrize("mode", ["int4"])
def test_operations_on_quantized_models_are_all_or_nothing(mode):
    x = RNG.integers(0, VOCAB, (3, 4)).astype("int32")
    model = _model()
    model.quantize(mode)
    assert run_with_faults(lambda: kl.apply_lora(model, CONFIG), model, x) > 0
    for i, layer in enumerate(kl.lora_layers(model)):
        _randomize(layer, seed=i)

    def merge():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kl.RequantizationWarning)
            kl.merge_adapters(model, requantize=True)

    assert run_with_faults(merge, model, x) > 0
    assert all(x.merged for x in kl.lora_layers(model))
    assert run_with_faults(lambda: kl.unmerge_adapters(model), model, x) > 0


# Keras's embedding layouts: (mode, config factory, width).
TABLE_LAYOUTS = {
    "int8": ("int8", lambda: None, 8),
    "int4-groups": ("int4", lambda: None, 8),
    "int4-groups-odd": (
        "int4",
        lambda: keras.quantizers.Int4QuantizationConfig(block_size=4),
        13,
    ),
    "int4-per-channel-odd": (
        "int4",
        lambda: keras.quantizers.Int4QuantizationConfig(block_size=-1),
        15,
    ),
    "int4-activations": (
        "int4",
        lambda: keras.quantizers.Int4QuantizationConfig(
            activation_quantizer=keras.quantizers.AbsMaxQuantizer(axis=-1),
            block_size=-1,  # Keras allows custom quantizers per channel only
        ),
        8,
    ),
}


def _quantized_table(layout):
    mode, config, width = TABLE_LAYOUTS[layout]
    table = keras.layers.ReversibleEmbedding(VOCAB, width, name="tok")
    table.build()
    table.embeddings.assign(RNG.normal(size=(VOCAB, width)))
    table.quantize(mode, config=config())
    return table


def _tied_head(layout, like=None):
    """Dense -> the reverse projection of a tied embedding, LoRA on both,
    the embedding quantized as `TABLE_LAYOUTS[layout]`; for `layout=None`
    float32, holding the table that `_tied_head(like)` dequantizes."""
    keras.utils.set_random_seed(0)
    width = TABLE_LAYOUTS[layout or like][2]
    inputs = keras.Input((4, 8))
    h = keras.layers.Dense(width, name="pre")(inputs)
    embedding = keras.layers.ReversibleEmbedding(VOCAB, width, name="tok")
    embedding.build()
    model = keras.Model(inputs, embedding(h, reverse=True))
    if layout is not None:
        mode, config, _ = TABLE_LAYOUTS[layout]
        embedding.quantize(mode, config=config())  # "pre" stays exact
    else:
        quantized = _tied_head(like).get_layer("tok").base_layer
        embedding.embeddings.assign(to_numpy(quantized(np.arange(VOCAB))))
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules=["pre", "tok"]))
    for i, layer in enumerate(kl.lora_layers(model)):
        _randomize(layer, seed=i)
    return model


@pytest.mark.parametrize("layout", sorted(TABLE_LAYOUTS))
@pytest.mark.parametrize("rows", [None, 5])
def test_quantized_tied_logits_pass_the_dequantized_tables_gradient(
    layout, rows, monkeypatch
):
    """The input gradient of a quantized tied reverse projection is that
    of `h @ E^T`, `E` the dequantized table, read in blocks of rows
    (`rows=5`: 12 ids = two blocks and a remainder). Keras's int8 reverse
    projection rounds its input without a gradient for it; its int4 one
    would keep the whole dequantized table alive until the backward
    pass."""
    from keras_lora.layers import embedding

    width = TABLE_LAYOUTS[layout][2]
    if rows is not None:
        monkeypatch.setattr(embedding, "_BLOCK_FLOATS", rows * width)
    x = RNG.normal(size=(2, 4, 8)).astype("float32")
    want = gradients(_tied_head(None, like=layout), x)
    got = gradients(_tied_head(layout), x)
    # Equal up to the forward's activation rounding (int8 inputs) where
    # the layout quantizes activations, else to float32 rounding.
    rounds_inputs = layout in ("int8", "int4-activations")
    tolerance = 0.005 if rounds_inputs else 1e-5
    for g, w in zip(got, want, strict=True):
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(
            g, w, rtol=tolerance, atol=tolerance * np.abs(w).max()
        )


@pytest.mark.parametrize("layout", sorted(TABLE_LAYOUTS))
def test_dequantized_rows_are_keras_own_lookup(layout):
    """keras_lora's one use of Keras's dequantization formulas (a block of
    rows, without unpacking the whole int4 table) equals Keras's lookup."""
    from keras_lora.layers.quantization import dequantized_rows

    table = _quantized_table(layout)
    for start, rows in ((0, VOCAB), (3, 5), (VOCAB - 1, 1)):
        np.testing.assert_allclose(
            to_numpy(dequantized_rows(table, start, rows)),
            to_numpy(table(np.arange(start, start + rows))),
            rtol=1e-6,
            atol=1e-7,
        )


def test_dequantized_rows_refuses_a_float_table():
    from keras_lora.layers.quantization import dequantized_rows

    table = keras.layers.Embedding(VOCAB, 4, name="floaty")
    table.build()
    with pytest.raises(ValueError, match="'floaty' is not quantized"):
        dequantized_rows(table, 0, 2)


@pytest.mark.parametrize("layout", sorted(TABLE_LAYOUTS))
def test_quantized_tied_logits_in_blocks_are_keras_reverse_call(
    layout, monkeypatch
):
    """Blocks of 5 rows over 12 ids (two blocks and a remainder): int4
    logits computed block by block (int8, and int4 with activation
    quantization, run Keras's call) equal Keras's own reverse projection
    plus the branch."""
    from keras_lora.layers import embedding

    base = _quantized_table(layout)
    width = base.output_dim
    monkeypatch.setattr(embedding, "_BLOCK_FLOATS", 5 * width)
    rounds_inputs = layout in ("int8", "int4-activations")
    assert (base.inputs_quantizer is not None) == rounds_inputs
    layer = kl.LoraEmbedding.from_layer(base, rank=2)
    _randomize(layer)
    h = RNG.normal(size=(2, 3, width)).astype("float32")
    expected = to_numpy(base(h, reverse=True)) + _branch(layer, h, True)
    np.testing.assert_allclose(
        to_numpy(layer(h, reverse=True)), expected, rtol=1e-5, atol=1e-5
    )


def test_apply_lora_warns_about_an_unadapted_int8_tied_embedding():
    model = _tied_head("int8")
    other = _tied_head("int8")
    kl.unload(other)
    with pytest.warns(UserWarning, match="int8 ReversibleEmbedding tied"):
        kl.apply_lora(other, kl.LoraConfig(rank=2, target_modules=["pre"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kl.apply_lora(model, kl.LoraConfig(target_modules=["tok"]), "second")
