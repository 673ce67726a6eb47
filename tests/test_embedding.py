"""LoraEmbedding: plain and tied reversible embeddings, against numpy."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.serving import routing
from tests.conftest import gradients, to_numpy
from tests.test_peft_interop import hf_dirs  # noqa: F401 - a fixture

VOCAB, DIM, RANK = 12, 6, 3
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, VOCAB, (4, 5)).astype("int32")
HIDDEN = RNG.normal(size=(4, 5, DIM)).astype("float32")


def _randomize(layer, names=None, seed=1):
    rng = np.random.default_rng(seed)
    for name in names or layer.adapters:
        for variable in layer.adapter_variables(name).values():
            variable.assign(rng.normal(0, 0.5, variable.shape))


def _wrapped(reversible=True, tie_weights=True, alpha=6.0, **kwargs):
    if reversible:
        base = keras.layers.ReversibleEmbedding(
            VOCAB, DIM, tie_weights=tie_weights, name="tok"
        )
    else:
        base = keras.layers.Embedding(VOCAB, DIM, name="tok")
    base.build()
    layer = kl.LoraEmbedding.from_layer(base, rank=RANK, alpha=alpha, **kwargs)
    _randomize(layer)
    return layer


def _effective_table(layer, name="default"):
    a, b = (to_numpy(v) for v in layer.lora_weights(name))
    table = to_numpy(layer.base_layer.embeddings)
    return table + layer.adapter_spec(name).scale * a @ b


def test_drop_in_shapes_and_trainable_weights():
    layer = kl.LoraEmbedding(VOCAB, DIM, rank=RANK)
    assert tuple(layer(IDS).shape) == (4, 5, DIM)
    assert [tuple(w.shape) for w in layer.trainable_weights] == [
        (VOCAB, RANK),
        (RANK, DIM),
    ]
    assert (layer.input_dim, layer.output_dim) == (VOCAB, DIM)
    assert kl.layers.lora_class_for(keras.layers.Embedding(3, 2)) is (
        kl.LoraEmbedding
    )


@pytest.mark.parametrize("reversible", [False, True])
def test_forward_matches_numpy(reversible):
    layer = _wrapped(reversible)
    expected = _effective_table(layer)[IDS]
    np.testing.assert_allclose(
        to_numpy(layer(IDS)), expected, rtol=1e-5, atol=1e-6
    )


def test_tied_reverse_uses_the_same_effective_table():
    layer = _wrapped()
    expected = HIDDEN @ _effective_table(layer).T
    logits = to_numpy(layer(HIDDEN, reverse=True))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_untied_reverse_is_the_base_reverse_projection():
    layer = _wrapped(tie_weights=False)
    base = to_numpy(layer.base_layer(HIDDEN, reverse=True))
    np.testing.assert_allclose(to_numpy(layer(HIDDEN, reverse=True)), base)


def test_reverse_needs_a_reversible_base():
    layer = _wrapped(reversible=False)
    with pytest.raises(ValueError, match="needs a ReversibleEmbedding"):
        layer(HIDDEN, reverse=True)


def test_soft_capped_tied_logits_are_refused_unless_merged():
    base = keras.layers.ReversibleEmbedding(VOCAB, DIM, logit_soft_cap=5.0)
    base.build()
    layer = kl.LoraEmbedding.from_layer(base, rank=RANK)
    _randomize(layer)
    with pytest.raises(ValueError, match="soft-caps its logits"):
        layer(HIDDEN, reverse=True)
    expected = 5.0 * np.tanh(HIDDEN @ _effective_table(layer).T / 5.0)
    layer.merge()
    logits = to_numpy(layer(HIDDEN, reverse=True))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_a_and_b():
    layer = _wrapped(reversible=False)
    assert [w.name for w in layer.trainable_weights] == [
        "lora_a_default",
        "lora_b_default",
    ]
    grad_a, grad_b = gradients(layer, IDS)
    # Reference: loss = mean(y^2), y = E[ids] + s A[ids] B.
    a, b = (to_numpy(v) for v in layer.lora_weights())
    s = layer.adapter_spec().scale
    y = _effective_table(layer)[IDS]
    dy = 2 * y / y.size
    hidden = a[IDS]  # (4, 5, r)
    expected_b = s * np.einsum("ntr,ntd->rd", hidden, dy)
    expected_a = np.zeros_like(a)
    np.add.at(expected_a, IDS, s * dy @ b.T)
    np.testing.assert_allclose(grad_b, expected_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_a, expected_a, rtol=1e-4, atol=1e-6)


def test_dropout_never_touches_token_ids():
    layer = _wrapped(reversible=True, dropout=0.5)
    eval_out = to_numpy(layer(IDS, training=False))
    np.testing.assert_allclose(to_numpy(layer(IDS, training=True)), eval_out)
    # The reverse branch reads hidden states, which do get dropout.
    eval_logits = to_numpy(layer(HIDDEN, reverse=True, training=False))
    train_logits = to_numpy(layer(HIDDEN, reverse=True, training=True))
    assert np.abs(train_logits - eval_logits).max() > 1e-4


@pytest.mark.parametrize("reversible", [False, True])
def test_merge_and_unmerge(reversible):
    layer = _wrapped(reversible)
    table = to_numpy(layer.base_layer.embeddings).copy()
    out = to_numpy(layer(IDS))
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(to_numpy(layer(IDS)), out, rtol=1e-5)
    if reversible:
        logits = HIDDEN @ to_numpy(layer.base_layer.embeddings).T
        merged_logits = to_numpy(layer(HIDDEN, reverse=True))
        np.testing.assert_allclose(merged_logits, logits, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(
        to_numpy(layer.base_layer.embeddings), table, rtol=1e-5, atol=1e-6
    )


def test_mask_zero_is_kept():
    base = keras.layers.Embedding(VOCAB, DIM, mask_zero=True)
    base.build()
    layer = kl.LoraEmbedding.from_layer(base, rank=RANK)
    mask = to_numpy(layer.compute_mask(IDS))
    np.testing.assert_array_equal(mask, IDS != 0)


# -- whole models -------------------------------------------------------------


def _tied_lm(seed=0):
    """ids -> tied embedding -> Dense -> the same embedding, reversed."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((5,), dtype="int32")
    embedding = keras.layers.ReversibleEmbedding(VOCAB, DIM, name="tok")
    h = keras.layers.Dense(DIM, activation="tanh", name="mix")(embedding(ids))
    return keras.Model(ids, embedding(h, reverse=True), name="tied_lm")


def _reference_logits(model):
    layer = model.get_layer("tok")
    table = _effective_table(layer)
    mix = model.get_layer("mix")
    h = np.tanh(table[IDS] @ to_numpy(mix.kernel) + to_numpy(mix.bias))
    return h @ table.T


def test_apply_lora_on_a_tied_model_and_merge(tmp_path):
    model = _tied_lm()
    kl.apply_lora(
        model, kl.LoraConfig(rank=RANK, target_modules="all-embedding")
    )
    layer = model.get_layer("tok")
    assert isinstance(layer, kl.LoraEmbedding)
    assert [x.name for x in kl.lora_layers(model)] == ["tok"]
    _randomize(layer)
    expected = _reference_logits(model)
    np.testing.assert_allclose(
        to_numpy(model(IDS)), expected, rtol=1e-5, atol=1e-6
    )
    kl.merge_adapters(model)
    np.testing.assert_allclose(
        to_numpy(model(IDS)), expected, rtol=1e-5, atol=1e-6
    )
    kl.unmerge_adapters(model)

    path = str(tmp_path / "tied.keras")
    kl.save_model(model, path)
    loaded = kl.load_model(path)
    assert isinstance(loaded.get_layer("tok"), kl.LoraEmbedding)
    np.testing.assert_allclose(
        to_numpy(loaded(IDS)), expected, rtol=1e-5, atol=1e-6
    )

    kl.save_adapter(model, tmp_path / "adapter")
    fresh = _tied_lm()
    kl.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(
        to_numpy(fresh(IDS)), expected, rtol=1e-5, atol=1e-6
    )


def test_presets_select_by_category():
    model = _tied_lm()
    kl.apply_lora(
        model,
        kl.LoraConfig(rank=2, target_modules=["all-embedding", "all-linear"]),
    )
    names = {x.name: type(x).__name__ for x in kl.lora_layers(model)}
    assert names == {"tok": "LoraEmbedding", "mix": "LoraDense"}
    with pytest.raises(ValueError, match="unknown preset 'all-embeddings'"):
        kl.LoraConfig(target_modules="all-embeddings")


def test_gpt2_token_embedding_is_adapted_in_both_graphs():
    """keras-hub's GPT2CausalLM calls the backbone's token embedding again
    (reversed) for its logits: both calls see the adapter."""
    keras_hub = pytest.importorskip("keras_hub")
    from tests.models import gpt2_backbone

    backbone = gpt2_backbone()
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    x = {
        "token_ids": RNG.integers(0, 20, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    kl.apply_lora(lm, kl.LoraConfig(rank=2, target_modules="all-embedding"))
    layer = lm.backbone.token_embedding
    assert isinstance(layer, kl.LoraEmbedding)
    assert [x for x in lm.layers if x.name == "token_embedding"] == [layer]
    _randomize(layer)
    unmerged = to_numpy(lm(x))
    with kl.disable_adapters(lm):
        base = to_numpy(lm(x))
    kl.merge_adapters(lm)
    merged = to_numpy(lm(x))
    kl.unmerge_adapters(lm)
    assert np.abs(unmerged - base).max() > 1e-3
    np.testing.assert_allclose(unmerged, merged, rtol=1e-5, atol=1e-5)


# -- routing ------------------------------------------------------------------

ADAPTERS = {"a": (2, 4.0), "b": (3, 2.0)}


def test_routed_rows_equal_each_adapter_alone():
    reference = _wrapped(alpha=ADAPTERS["a"][1], adapter_name="a")
    reference.add_adapter("b", rank=ADAPTERS["b"][0], alpha=ADAPTERS["b"][1])
    _randomize(reference, ["a", "b"], seed=3)
    expected = {}
    for name in ("a", "b", None):
        reference.set_adapter([] if name is None else name)
        expected[name] = (
            to_numpy(reference(IDS)),
            to_numpy(reference(HIDDEN, reverse=True)),
        )
    base = keras.layers.ReversibleEmbedding(VOCAB, DIM, name="tok")
    base.build()
    base.set_weights(reference.base_layer.get_weights())
    layer = routing.routable_layer(base)
    router = routing.Router(max_batch=4)
    slots = routing.attach(layer, router, slots=2, max_rank=3)
    for slot, name in enumerate(("a", "b")):
        a, b = (to_numpy(v) for v in reference.lora_weights(name))
        slots.write(slot, a, b, reference.adapter_spec(name).scale)
    rows = ["a", None, "b", "a"]
    router.set([{"a": 0, "b": 1, None: -1}[n] for n in rows])
    outputs = to_numpy(layer(IDS)), to_numpy(layer(HIDDEN, reverse=True))
    for i, name in enumerate(rows):
        for got, want in zip(outputs, expected[name], strict=True):
            np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5)


# -- PEFT interop (lora_embedding_A/B on GPT-2's wte, Llama's embed_tokens) --


def _peft_embedding_adapter(dirs, arch, root):
    """A PEFT adapter on the token embedding and one projection, random."""
    import peft

    from tests.test_peft_interop import hf_model, randomise_peft

    targets = {"gpt2": ["wte", "c_attn"], "llama": ["embed_tokens", "q_proj"]}
    kwargs = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    tuned = peft.get_peft_model(
        hf_model(dirs[arch]),
        peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=2,
            lora_alpha=4,
            target_modules=targets[arch],
            **kwargs,
        ),
    )
    randomise_peft(tuned, seed=3)
    tuned.save_pretrained(root)
    return tuned.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_embedding_adapters_import_and_export(arch, request, tmp_path):
    """GPT-2's tied wte: keras_lora's logits are PEFT's merged model's
    (PEFT's unmerged forward leaves its tied LM head unadapted); Llama's
    untied embed_tokens: PEFT's unmerged logits too."""
    from tests.test_peft_interop import (
        TOL,
        hf_model,
        hf_out,
        keras_model,
        keras_out,
        read_peft,
    )

    dirs = request.getfixturevalue("hf_dirs")
    tuned = _peft_embedding_adapter(dirs, arch, tmp_path / "peft")
    unmerged = hf_out(tuned)
    merged = hf_out(tuned.merge_and_unload())
    tied = arch == "gpt2"
    assert bool(np.abs(unmerged - merged).max() > 1e-2) is tied

    model = keras_model(dirs[arch])
    with warnings_if(tied, "tied to the logits"):
        kl.import_peft(model, tmp_path / "peft")
    layer = model.backbone.token_embedding
    assert isinstance(layer, kl.LoraEmbedding)
    a, b = layer.lora_weights()
    assert (tuple(a.shape), tuple(b.shape)) == ((100, 2), (2, 16))
    np.testing.assert_allclose(keras_out(model), merged, atol=TOL)

    with warnings_if(tied, "also changes the tied logits"):
        kl.export_peft(model, tmp_path / "back")
    config, tensors = read_peft(tmp_path / "back")
    _, original = read_peft(tmp_path / "peft")
    # PEFT may also save the whole embedding weight (save_embedding_layers);
    # keras_lora checks it against the model and writes adapters only.
    original = {k: v for k, v in original.items() if ".base_layer." not in k}
    assert sorted(tensors) == sorted(original)
    for key, value in original.items():
        np.testing.assert_allclose(tensors[key], value, rtol=1e-6)
    module = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}[arch]
    key = f"base_model.model.{module}.lora_embedding_A"
    assert tensors[key].shape == (2, 100)  # PEFT's layout: (r, vocabulary)
    import peft

    reloaded = peft.PeftModel.from_pretrained(
        hf_model(dirs[arch]), str(tmp_path / "back")
    )
    np.testing.assert_allclose(
        hf_out(reloaded.merge_and_unload()), merged, atol=TOL
    )


def test_keras_embedding_adapter_exports_to_peft(request, tmp_path):
    from tests.test_peft_interop import hf_model, hf_out, keras_model, keras_out

    dirs = request.getfixturevalue("hf_dirs")
    model = keras_model(dirs["llama"])
    kl.apply_lora(
        model,
        kl.LoraConfig(rank=2, target_modules=["token_embedding", "query"]),
    )
    for layer in kl.lora_layers(model):
        _randomize(layer)
    kl.export_peft(model, tmp_path / "out")
    import peft

    tuned = peft.PeftModel.from_pretrained(
        hf_model(dirs["llama"]), str(tmp_path / "out")
    )
    np.testing.assert_allclose(hf_out(tuned), keras_out(model), atol=1e-4)


def warnings_if(expected, match):
    """`pytest.warns(UserWarning, match=match)` if `expected`, else a
    check that no such warning is raised."""
    import contextlib
    import warnings

    if expected:
        return pytest.warns(UserWarning, match=match)

    @contextlib.contextmanager
    def none():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        assert not [w for w in caught if match in str(w.message)]

    return none()


def test_import_refuses_a_changed_saved_embedding(request, tmp_path):
    import safetensors.numpy

    from tests.test_peft_interop import keras_model

    dirs = request.getfixturevalue("hf_dirs")
    _peft_embedding_adapter(dirs, "llama", tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors  # PEFT saved the embedding (save_embedding_layers)
    tensors[key] = tensors[key] + 1.0  # a resized or trained vocabulary
    safetensors.numpy.save_file(tensors, path)
    model = keras_model(dirs["llama"])
    with pytest.raises(ValueError, match="vocabulary was resized or trained"):
        kl.import_peft(model, tmp_path)
    assert not kl.lora_layers(model)
