"""DoRA adapters: PEFT's formula (outputs and gradients), merges, files."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.layers import dora
from tests import faults
from tests.conftest import gradients, skip_unless_channels_first_runs, to_numpy

RNG = np.random.default_rng(0)

# name: (Keras layer, input shape, einsum equation of the base layer).
# The transposed EinsumDense has its output units in the middle of the
# output, so it exercises the non-trailing scaling path.
LAYERS = {
    "dense": (lambda: keras.layers.Dense(5, name="d"), (4, 6), "ab,bc->ac"),
    "dense_no_bias": (
        lambda: keras.layers.Dense(5, use_bias=False, name="d"),
        (4, 6),
        "ab,bc->ac",
    ),
    "einsum_query": (
        lambda: keras.layers.EinsumDense(
            "abc,cde->abde", (None, 2, 3), bias_axes="de", name="q"
        ),
        (2, 3, 4),
        "abc,cde->abde",
    ),
    "einsum_transposed": (
        lambda: keras.layers.EinsumDense(
            "abc,cd->adb", (5, 3), bias_axes="d", name="t"
        ),
        (2, 3, 4),
        "abc,cd->adb",
    ),
}
RANK, ALPHA = 3, 6.0


def _random(shape, scale=0.5):
    return RNG.normal(0.0, scale, shape).astype("float32")


def _dora_layer(case, dropout=0.0):
    """A built DoRA layer with random base weights, A, B and magnitude."""
    make, x_shape, _ = LAYERS[case]
    base = make()
    base.build(x_shape)
    for w in base.weights:
        w.assign(_random(w.shape))
    layer = kl.layers.lora_class_for(base).from_layer(
        base, rank=RANK, alpha=ALPHA, dropout=dropout, use_dora=True
    )
    variables = layer.adapter_variables()
    variables["lora_a"].assign(_random(variables["lora_a"].shape))
    variables["lora_b"].assign(_random(variables["lora_b"].shape))
    magnitude = variables["lora_magnitude"]
    magnitude.assign(to_numpy(magnitude) * (1 + _random(magnitude.shape)))
    return layer, _random(x_shape)


class PeftReference:
    """PEFT's DoRA formula in numpy, for a layer given by its einsum.

    y = base(x) + (f - 1) * (base(x) - bias) + f * s * x (A B), with
    f = m / ||W + s A B|| per output unit, the norm a constant for the
    gradients (PEFT's `DoraLinearLayer`).
    """

    def __init__(self, layer, equation):
        f = layer.factorization if hasattr(layer, "factorization") else None
        inp, rest = equation.split(",")
        self.kernel, self.out = rest.split("->")
        self.inp = inp
        if f is None:  # Dense
            self.units, self.delta = "c", "br,rc->bc"
        else:
            self.units, self.delta = f.outputs, f.delta
        variables = {
            k: to_numpy(v) for k, v in layer.adapter_variables().items()
        }
        self.a, self.b = variables["lora_a"], variables["lora_b"]
        self.m = variables["lora_magnitude"]
        self.w = to_numpy(layer.base_layer.kernel)
        bias = layer.base_layer.bias
        self.bias = 0.0 if bias is None else to_numpy(bias)
        self.s = ALPHA / RANK
        lora_kernel = self.w + self.s * np.einsum(self.delta, self.a, self.b)
        outputs = [self.kernel.index(c) for c in self.units]
        axes = tuple(i for i in range(self.w.ndim) if i not in outputs)
        self.norm = np.sqrt(np.sum(lora_kernel.astype("float64") ** 2, axes))
        self.f = self.m / self.norm

    def _units(self, y, values):
        return np.einsum(f"{self.out},{self.units}->{self.out}", y, values)

    def forward(self, x):
        base = np.einsum(f"{self.inp},{self.kernel}->{self.out}", x, self.w)
        lora = np.einsum(
            f"{self.inp},{self.kernel}->{self.out}",
            x,
            np.einsum(self.delta, self.a, self.b),
        )
        self.parts = base, lora
        return (
            base
            + self.bias
            + self._units(base, self.f - 1)
            + self._units(lora, self.f) * self.s
        )

    def gradients(self, x):
        """Gradients of mean(y**2) w.r.t. A, B and m."""
        y = self.forward(x)
        base, lora = self.parts
        g = 2 * y / y.size
        df = np.einsum(
            f"{self.out},{self.out}->{self.units}", g, base + self.s * lora
        )
        # d/d(A B) of f * s * x (A B): a kernel-shaped gradient.
        dk = self.s * np.einsum(
            f"{self.out},{self.inp}->{self.kernel}", self._units(g, self.f), x
        )
        ab, rest = self.delta.split(",")[0], self.delta.split(",")[1]
        rb, k = rest.split("->")
        da = np.einsum(f"{k},{rb}->{ab}", dk, self.b)
        db = np.einsum(f"{ab},{k}->{rb}", self.a, dk)
        return da, db, df / self.norm


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_outputs_and_gradients_match_peft_formula(case):
    layer, x = _dora_layer(case)
    reference = PeftReference(layer, LAYERS[case][2])
    expected = reference.forward(x)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)
    # The magnitude matters: plain LoRA would give other outputs.
    assert np.abs(reference.f - 1).max() > 0.05
    names = [w.name for w in layer.trainable_weights]
    assert names == [
        "lora_a_default",
        "lora_b_default",
        "lora_magnitude_default",
    ]
    grads = gradients(layer, x)
    for got, want, name in zip(
        grads, reference.gradients(x), names, strict=True
    ):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_matches_peft_linear_outputs_and_gradients():
    import peft
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["0"], use_dora=True
    )
    tuned = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_" in name:
                param.mul_(0.0).add_(torch.randn(param.shape) * 0.5 + 1.0)
    x = _random((4, 6))
    out = tuned(torch.tensor(x))
    (out**2).mean().backward()
    peft_layer = tuned.base_model.model[0]

    def param(module):
        return module.weight.detach().numpy()

    dense = keras.layers.Dense(5)
    dense.build((None, 6))
    dense.kernel.assign(param(peft_layer.base_layer).T)
    dense.bias.assign(peft_layer.base_layer.bias.detach().numpy())
    layer = kl.LoraDense.from_layer(
        dense, rank=RANK, alpha=ALPHA, use_dora=True
    )
    parts = {
        "lora_a": peft_layer.lora_A["default"],
        "lora_b": peft_layer.lora_B["default"],
        "lora_magnitude": peft_layer.lora_magnitude_vector["default"],
    }
    for tensor, module in parts.items():
        value = param(module)
        layer.adapter_variables()[tensor].assign(value.T)
    np.testing.assert_allclose(
        to_numpy(layer(x)), out.detach().numpy(), atol=1e-5
    )
    for got, module in zip(gradients(layer, x), parts.values(), strict=True):
        want = module.weight.grad.numpy().T
        np.testing.assert_allclose(got, want, atol=1e-6)


def _peft_dora(module, seed):
    """A PEFT DoRA adapter (r=2, alpha=4) on torch `module`, randomised."""
    import peft
    import torch

    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["0"], use_dora=True
    )
    tuned = peft.get_peft_model(torch.nn.Sequential(module), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.5
                if "magnitude" in name:
                    param.mul_(1.0 + noise)
                else:
                    param.copy_(noise)
    return tuned, tuned.base_model.model[0]


def _embedding_case():
    import torch

    torch.manual_seed(0)
    tuned, peft_layer = _peft_dora(torch.nn.Embedding(10, 4), 0)
    base = keras.layers.Embedding(10, 4)
    base.build((None,))
    base.embeddings.assign(peft_layer.base_layer.weight.detach().numpy())
    layer = kl.layers.LoraEmbedding.from_layer(
        base, rank=2, alpha=4.0, use_dora=True
    )
    tensors = {
        "lora_a": peft_layer.lora_embedding_A["default"],
        "lora_b": peft_layer.lora_embedding_B["default"],
        "lora_magnitude": peft_layer.lora_magnitude_vector["default"].weight,
    }
    ids = np.array([[1, 2, 3], [9, 0, 3]])
    return tuned, layer, tensors, ids, ids, lambda y: y


def _conv_case(data_format):
    import torch

    torch.manual_seed(0)
    tuned, peft_layer = _peft_dora(torch.nn.Conv2d(3, 5, 3, padding=1), 1)
    channels_last = data_format == "channels_last"
    base = keras.layers.Conv2D(5, 3, padding="same", data_format=data_format)
    base.build((None, 6, 6, 3) if channels_last else (None, 3, 6, 6))
    weight = peft_layer.base_layer.weight.detach().numpy()
    base.kernel.assign(weight.transpose(2, 3, 1, 0))
    base.bias.assign(peft_layer.base_layer.bias.detach().numpy())
    layer = kl.layers.LoraConv.from_layer(
        base, rank=2, alpha=4.0, use_dora=True
    )
    tensors = {
        "lora_a": peft_layer.lora_A["default"].weight,
        "lora_b": peft_layer.lora_B["default"].weight,
        "lora_magnitude": peft_layer.lora_magnitude_vector["default"].weight,
    }
    x = _random((2, 3, 6, 6))
    if channels_last:
        return tuned, layer, tensors, x, x.transpose(0, 2, 3, 1), _to_nchw
    return tuned, layer, tensors, x, x, lambda y: y


def _to_nchw(y):
    return y.transpose(0, 3, 1, 2)


# PEFT's tensor layouts in keras_lora's: embedding A/B are transposed;
# conv A (r, in, kh, kw) -> (kh, kw, in, r), B (out, r, 1, 1) -> (r, out),
# magnitude (1, out, 1, 1) -> (out,).
_TO_KERAS = {
    "embedding": {
        "lora_a": lambda v: v.T,
        "lora_b": lambda v: v.T,
        "lora_magnitude": lambda v: v,
    },
    "conv": {
        "lora_a": lambda v: v.transpose(2, 3, 1, 0),
        "lora_b": lambda v: v[:, :, 0, 0].T,
        "lora_magnitude": lambda v: v.reshape(-1),
    },
}


@pytest.mark.parametrize(
    "case", ["embedding", "conv_channels_last", "conv_channels_first"]
)
def test_embedding_and_conv_match_peft(case):
    """PEFT's DoraEmbeddingLayer and DoraConv2dLayer: outputs, gradients
    of A, B and the magnitude, and exact merges."""
    import torch

    if case == "conv_channels_first":
        skip_unless_channels_first_runs()
    if case == "embedding":
        tuned, layer, tensors, x_torch, x, to_torch = _embedding_case()
        layout = _TO_KERAS["embedding"]
    else:
        tuned, layer, tensors, x_torch, x, to_torch = _conv_case(case[5:])
        layout = _TO_KERAS["conv"]
    for tensor, param in tensors.items():
        value = param.detach().numpy()
        layer.adapter_variables()[tensor].assign(layout[tensor](value))
    out = tuned(torch.tensor(x_torch))
    (out**2).mean().backward()
    expected = out.detach().numpy()
    np.testing.assert_allclose(
        to_torch(to_numpy(layer(x))), expected, atol=1e-5
    )
    grads = gradients(layer, x)
    for got, (tensor, param) in zip(grads, tensors.items(), strict=True):
        want = layout[tensor](param.grad.numpy())
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=tensor)
    layer.merge()
    np.testing.assert_allclose(
        to_torch(to_numpy(layer(x))), expected, atol=1e-5
    )


def test_tied_embedding_logits_use_the_dora_table():
    """A tied ReversibleEmbedding's logits are `h @ (f * (E + s A B))^T`,
    merged or not."""
    base = keras.layers.ReversibleEmbedding(12, 4, tie_weights=True)
    base.build((None,))
    layer = kl.layers.LoraEmbedding.from_layer(
        base, rank=2, alpha=4.0, use_dora=True
    )
    variables = layer.adapter_variables()
    for tensor, variable in variables.items():
        value = _random(variable.shape)
        if tensor == "lora_magnitude":
            value = to_numpy(variable) * (1.0 + value)
        variable.assign(value)
    table = to_numpy(base.embeddings)
    a, b, m = (
        to_numpy(variables[t]) for t in ("lora_a", "lora_b", "lora_magnitude")
    )
    direction = table + 2.0 * a @ b
    effective = direction * m / np.linalg.norm(direction, axis=0)
    h = _random((3, 4))
    expected = h @ effective.T
    np.testing.assert_allclose(
        to_numpy(layer(h, reverse=True)), expected, atol=1e-5
    )
    ids = np.array([0, 5, 11])
    np.testing.assert_allclose(to_numpy(layer(ids)), effective[ids], atol=1e-5)
    layer.merge()
    np.testing.assert_allclose(
        to_numpy(layer(h, reverse=True)), expected, atol=1e-5
    )


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_fresh_adapter_changes_nothing(case):
    make, x_shape, _ = LAYERS[case]
    base = make()
    base.build(x_shape)
    x = _random(x_shape)
    before = to_numpy(base(x))
    layer = kl.layers.lora_class_for(base).from_layer(base, use_dora=True)
    magnitude = to_numpy(layer.adapter_variables()["lora_magnitude"])
    kernel = to_numpy(base.kernel)
    outputs = layer.kernel_output_axes(base)
    axes = tuple(i for i in range(kernel.ndim) if i not in outputs)
    np.testing.assert_allclose(
        magnitude, np.sqrt((kernel**2).sum(axes)), rtol=1e-6
    )
    np.testing.assert_allclose(to_numpy(layer(x)), before, atol=1e-6)


def test_dropout_path_uses_base_output_of_dropped_input(monkeypatch):
    layer, x = _dora_layer("dense", dropout=0.5)
    mask = (RNG.random(x.shape) > 0.5).astype("float32") * 2.0

    def fixed_dropout(inputs, rate, training):
        return inputs * mask if training else inputs

    monkeypatch.setattr(layer, "branch_inputs", fixed_dropout)
    reference = PeftReference(layer, "ab,bc->ac")
    dropped = reference.forward(x * mask) - reference.bias
    base = reference.parts[0]
    full = np.einsum("ab,bc->ac", x, reference.w) + reference.bias
    # PEFT: result + (f - 1) * (dropout(x) W) + f * s * dropout(x) A B.
    expected = full + (dropped - base)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), expected, atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference.forward(x), atol=1e-5
    )


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_merge_and_unmerge_are_exact(case):
    layer, x = _dora_layer(case)
    kernel = to_numpy(layer.base_layer.kernel).copy()
    expected = to_numpy(layer(x))
    delta = to_numpy(layer.delta_weight())
    layer.merge()
    merged = to_numpy(layer.base_layer.kernel)
    np.testing.assert_allclose(merged, kernel + delta, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(
        to_numpy(layer.base_layer.kernel), kernel, atol=1e-6
    )
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)


def test_merging_lora_then_dora_keeps_outputs():
    """The DoRA norm is that of the kernel without merged adapters, so a
    merge of several adapters gives the unmerged outputs (as in PEFT)."""
    layer, x = _dora_layer("dense")
    layer.add_adapter("plain", rank=2)
    for variable in layer.lora_weights("plain"):
        variable.assign(_random(variable.shape))
    kernel = to_numpy(layer.base_layer.kernel).copy()
    layer.set_adapter(["plain", "default"])
    expected = to_numpy(layer(x))
    layer.merge()
    assert layer.merged_adapters == ["plain", "default"]
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(
        to_numpy(layer.base_layer.kernel), kernel, atol=1e-6
    )
    # Merged one at a time: the unmerged DoRA adapter still sees the
    # kernel without the merged one.
    layer.merge(["plain"])
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(8, name="fc2"),
            keras.layers.Dense(3, name="head"),
        ],
        name="mlp",
    )


def _adapted(dropout=0.0):
    model = _model()
    config = kl.LoraConfig(
        rank=2, target_modules=["fc1", "fc2"], use_dora=True, dropout=dropout
    )
    kl.apply_lora(model, config)
    rng = np.random.default_rng(1)
    for layer in kl.lora_layers(model):
        for tensor, variable in layer.adapter_variables().items():
            noise = rng.normal(0, 0.3, variable.shape)
            if tensor == "lora_magnitude":
                noise = to_numpy(variable) * (1 + noise)
            variable.assign(noise)
    return model


X = RNG.normal(size=(4, 6)).astype("float32")


def test_config_use_dora_and_json():
    config = kl.LoraConfig(rank=2, use_dora=True)
    assert config.variant == "dora"
    assert kl.LoraConfig.from_json(config.to_json()).use_dora is True
    with pytest.raises(ValueError, match="LoraConfig.use_dora must be True"):
        kl.LoraConfig(use_dora="yes")
    with pytest.raises(ValueError, match="init='pissa'"):
        kl.LoraConfig(use_dora=True, init="pissa")
    with pytest.raises(ValueError, match="use_dora` must be True or False"):
        kl.LoraDense(3, use_dora=1)
    model = _adapted()
    for layer in kl.lora_layers(model):
        assert layer.adapter_spec().variant == "dora"
        assert "lora_magnitude" in layer.adapter_variables()


def test_adapter_file_round_trip(tmp_path):
    model = _adapted()
    expected = to_numpy(model(X))
    kl.save_adapter(model, tmp_path / "adapter")
    config, tensors = kl.read_adapter(tmp_path / "adapter")
    assert sorted(tensors) == sorted(
        f"{layer}.{t}"
        for layer in ("fc1", "fc2")
        for t in ("lora_a", "lora_b", "lora_magnitude")
    )
    assert config["layers"]["fc1"]["variant"] == "dora"
    assert config["config"]["use_dora"] is True
    fresh = _model()
    kl.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(to_numpy(fresh(X)), expected, atol=1e-6)
    assert kl.lora_layers(fresh)[0].adapter_spec().variant == "dora"


@pytest.mark.parametrize("merged", [False, True])
def test_keras_file_round_trip(tmp_path, merged):
    model = _adapted()
    kernels = {
        layer.name: to_numpy(layer.base_layer.kernel).copy()
        for layer in kl.lora_layers(model)
    }
    expected = to_numpy(model(X))
    if merged:
        kl.merge_adapters(model)
    path = str(tmp_path / "model.keras")
    kl.save_model(model, path)
    loaded = kl.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(X)), expected, atol=1e-5)
    if merged:
        # The norms of the merge came back with the file: exact unmerge.
        kl.unmerge_adapters(loaded)
        np.testing.assert_allclose(to_numpy(loaded(X)), expected, atol=1e-5)
    for layer in kl.lora_layers(loaded):
        np.testing.assert_allclose(
            to_numpy(layer.base_layer.kernel), kernels[layer.name], atol=1e-6
        )


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_combinations_are_exact(combination):
    """A weighted mix of a DoRA and a LoRA adapter changes each kernel by
    `sum_i w_i delta_i` ("svd" at full rank is exact too)."""
    model = _adapted()
    config = kl.LoraConfig(rank=3, target_modules=["fc1", "fc2"])
    kl.add_adapter(model, "plain", config)
    rng = np.random.default_rng(4)
    for layer in kl.lora_layers(model):
        for variable in layer.lora_weights("plain"):
            variable.assign(rng.normal(0, 0.3, variable.shape))
    names, weights = ["default", "plain"], [0.7, -0.4]
    kl.add_weighted_adapter(
        model,
        names,
        weights,
        "mix",
        combination=combination,
        rank=5 if combination == "svd" else None,
    )
    for layer in kl.lora_layers(model):
        expected = sum(
            w * to_numpy(layer.delta_weight(n))
            for w, n in zip(weights, names, strict=True)
        )
        assert np.abs(expected).max() > 0.1
        np.testing.assert_allclose(
            to_numpy(layer.delta_weight("mix")), expected, atol=1e-5
        )
        assert layer.adapter_spec("mix").variant == "dora"
    assert kl.applied_configs(model)["mix"].use_dora is True
    with pytest.raises(ValueError, match="combination='linear'"):
        kl.add_weighted_adapter(
            model, ["default"], [1.0], "mix2", combination="linear"
        )


def test_quantized_base_refused_without_changes():
    model = _model()
    model.quantize("int8")
    before = {w.path: to_numpy(w).copy() for w in model.weights}
    config = kl.LoraConfig(rank=2, target_modules=["fc1"], use_dora=True)
    message = "'fc1' .*, but the layer is int8-quantized"
    with pytest.raises(ValueError, match=message):
        kl.apply_lora(model, config)
    assert kl.lora_layers(model) == []
    after = {w.path: to_numpy(w) for w in model.weights}
    assert sorted(after) == sorted(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    # Quantized after DoRA was applied: refused at the next call.
    model = _adapted()
    kl.lora_layers(model)[0].base_layer.quantize("int8")
    with pytest.raises(ValueError, match="Use plain LoRA on quantized"):
        model(X)


DORA_OPERATIONS = {
    "apply_lora": (
        _model,
        lambda m: kl.apply_lora(
            m,
            kl.LoraConfig(rank=2, target_modules=["fc1", "fc2"], use_dora=True),
        ),
    ),
    "merge_adapters": (_adapted, kl.merge_adapters),
    "unmerge_adapters": (
        lambda: kl.merge_adapters(_adapted()),
        kl.unmerge_adapters,
    ),
    "merge_and_unload": (_adapted, kl.merge_and_unload),
    "add_weighted_adapter": (
        _adapted,
        lambda m: kl.add_weighted_adapter(m, ["default"], [0.5], "mix"),
    ),
}


@pytest.mark.parametrize("name", sorted(DORA_OPERATIONS))
def test_every_step_failing_leaves_the_model_unchanged(name):
    make, operation = DORA_OPERATIONS[name]
    model = make()
    steps = faults.run_with_faults(lambda: operation(model), model, X)
    assert steps > 0


def test_unit_norm_helpers_follow_kernel_output_axes():
    layer, _ = _dora_layer("einsum_transposed")
    assert layer.kernel_output_axes(layer.base_layer) == (1,)
    assert dora.output_units_shape(type(layer), layer.base_layer) == (5,)
