"""PEFT interop: keras-hub GPT-2 and Llama adapters against PEFT itself.

Tiny random Hugging Face models are saved once per module and loaded into
keras-hub from the same directory (its HF converters); PEFT runs on the
torch side in this process, whatever the Keras backend.
"""

import dataclasses
import json
import os
import re
import shutil

import keras
import keras_hub
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import keras_lora as kl
from keras_lora.interop import export_peft, import_peft
from keras_lora.model import surgery
from tests import models
from tests.conftest import BACKEND, weight_snapshot

TOKENS = np.random.RandomState(0).randint(0, 100, (2, 8))
TOL = 1e-4
# An adapter that changes logits by less than this would make the
# comparisons meaningless.
MIN_EFFECT = 1e-2

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for arch, make_config in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make_config())
        model.save_pretrained(root / arch)
        dirs[arch] = str(root / arch)
    return dirs


def hf_model(path, causal_lm=True):
    if causal_lm:
        cls = transformers.AutoModelForCausalLM
    else:
        cls = transformers.AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def keras_model(path, causal_lm=True):
    backbone = keras_hub.models.Backbone.from_preset(path)
    if not causal_lm:
        return backbone
    if isinstance(backbone, keras_hub.models.GPT2Backbone):
        cls = keras_hub.models.GPT2CausalLM
    else:
        cls = keras_hub.models.Llama3CausalLM
    return cls(backbone=backbone, preprocessor=None)


def keras_out(model):
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
    return keras.ops.convert_to_numpy(model(inputs))


def hf_out(model):
    with torch.no_grad():
        out = model(torch.tensor(TOKENS))
    return (out.logits if hasattr(out, "logits") else out[0]).numpy()


def randomise_peft(model, seed=0):
    """Random non-zero A and B; DoRA magnitudes moved off their start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=generator)
                if "magnitude" in name:
                    param.mul_(1.0 + noise * 0.3)
                else:
                    param.copy_(noise * 0.3)


def randomise_keras(model, adapter_name="default", seed=0):
    rng = np.random.RandomState(seed)
    for layer in kl.lora_layers(model):
        variables = layer.adapter_variables(adapter_name)
        for tensor, variable in variables.items():
            noise = rng.normal(0, 0.3, variable.shape)
            if tensor == "lora_magnitude":
                noise = keras.ops.convert_to_numpy(variable) * (1.0 + noise)
            variable.assign(noise)


def read_peft(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = safetensors.numpy.load_file(
        os.path.join(directory, "adapter_model.safetensors")
    )
    return config, tensors


# PEFT adapters to import: per-module ranks and alphas, rsLoRA, the fused
# GPT-2 c_attn and every Llama projection (GQA key/value included).
PEFT_CONFIGS = {
    "gpt2": dict(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={r"h\.1\.attn\.c_attn": 2},
        alpha_pattern={r"h\.0\.mlp\.c_proj": 3},
    ),
    "llama": dict(
        r=2,
        lora_alpha=5,
        target_modules="all-linear",
        use_rslora=True,
        rank_pattern={r"layers\.0\.self_attn\.k_proj": 3},
    ),
}


def _peft_adapters(hf_dirs, root, **extra):
    """`{arch: (directory, PEFT logits, base logits)}`, randomised A and B
    (and DoRA magnitudes)."""
    result = {}
    for arch, kwargs in PEFT_CONFIGS.items():
        base = hf_model(hf_dirs[arch])
        base_logits = hf_out(base)
        config = peft.LoraConfig(task_type="CAUSAL_LM", **kwargs, **extra)
        tuned = peft.get_peft_model(base, config)
        randomise_peft(tuned)
        tuned.save_pretrained(root / arch)
        result[arch] = (str(root / arch), hf_out(tuned.eval()), base_logits)
    return result


@pytest.fixture(scope="module")
def peft_adapters(hf_dirs, tmp_path_factory):
    return _peft_adapters(hf_dirs, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def peft_dora_adapters(hf_dirs, tmp_path_factory):
    """PEFT DoRA adapters (`use_dora=True`) of the same configs."""
    root = tmp_path_factory.mktemp("peft_dora")
    return _peft_adapters(hf_dirs, root, use_dora=True)


@pytest.fixture(scope="module")
def plain_gpt2(hf_dirs):
    """A GPT-2 causal LM that failed imports must leave untouched."""
    return keras_model(hf_dirs["gpt2"])


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_matches_peft_and_exports_back(
    arch, variant, hf_dirs, request, tmp_path
):
    fixture = "peft_dora_adapters" if variant == "dora" else "peft_adapters"
    adapters = request.getfixturevalue(fixture)
    directory, peft_logits, base_logits = adapters[arch]
    assert np.abs(peft_logits - base_logits).max() > MIN_EFFECT
    model = keras_model(hf_dirs[arch])
    np.testing.assert_allclose(keras_out(model), base_logits, atol=TOL)

    import_peft(model, directory)

    np.testing.assert_allclose(keras_out(model), peft_logits, atol=TOL)
    # Exporting the imported adapter gives PEFT's files back: fused
    # modules share one A again, ranks and alphas are unchanged.
    export_peft(model, tmp_path / "back")
    config, tensors = read_peft(tmp_path / "back")
    original_config, original = read_peft(directory)
    assert sorted(tensors) == sorted(original)
    for key, value in original.items():
        np.testing.assert_allclose(tensors[key], value, rtol=1e-6, atol=0)
    fields = ("r", "lora_alpha", "use_rslora", "use_dora", "peft_type")
    for field in fields + ("task_type",):
        assert config[field] == original_config[field]
    assert config["use_dora"] is (variant == "dora")
    if variant == "dora":
        # The keras layers hold DoRA adapters, and PEFT reads the files
        # written back with the same logits.
        layer = kl.lora_layers(model)[0]
        assert layer.adapter_spec().variant == "dora"
        tuned = peft.PeftModel.from_pretrained(
            hf_model(hf_dirs[arch]), str(tmp_path / "back")
        )
        np.testing.assert_allclose(hf_out(tuned), peft_logits, atol=TOL)
    for field in ("rank_pattern", "alpha_pattern"):
        assert config[field] == original_config[field], field


def test_import_fused_gpt2_gives_query_key_value_one_adapter_each(
    hf_dirs, peft_adapters
):
    model = keras_model(hf_dirs["gpt2"])
    import_peft(model, peft_adapters["gpt2"][0], adapter_name="hf")
    paths = {  # without the backbone's own name
        s.path.split("/", 1)[1]: s.layer
        for s in surgery.walk(model)
        if isinstance(s.layer, kl.layers.LoraLayer)
    }
    attention = "transformer_layer_1/self_attention/"
    for name in ("query", "key", "value"):
        layer = paths[attention + name]
        a, b = layer.lora_weights("hf")
        assert tuple(a.shape) == (16, 2)  # rank_pattern: c_attn rank 2
        assert tuple(b.shape) == (2, 2, 8)
    query_a = paths[attention + "query"].lora_weights("hf")[0]
    key_a = paths[attention + "key"].lora_weights("hf")[0]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(query_a), keras.ops.convert_to_numpy(key_a)
    )
    assert len(paths) == 2 * 6  # q, k, v, attention_output, fc, proj


# keras_lora adapters to export: a partial fused c_attn (query and value
# only, different ranks and scales, so B absorbs the scale ratio), and
# rsLoRA on one Llama block with a per-layer rank.
KERAS_CONFIGS = {
    "gpt2": dict(
        rank=4,
        alpha=8,
        target_modules=[
            "query",
            "value",
            "attention_output",
            "feedforward_output_dense",
        ],
        rank_pattern={"transformer_layer_1/self_attention/value": 2},
        alpha_pattern={"transformer_layer_1/self_attention/query": 2},
    ),
    "llama": dict(
        rank=3,
        alpha=6,
        target_modules="all-linear",
        use_rslora=True,
        layers_to_transform=[1],
        rank_pattern={"feedforward_gate_dense": 2},
    ),
}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_loads_in_peft_with_same_logits(
    arch, use_dora, hf_dirs, tmp_path
):
    model = keras_model(hf_dirs[arch])
    base_logits = keras_out(model)
    config = kl.LoraConfig(**KERAS_CONFIGS[arch], use_dora=use_dora)
    kl.apply_lora(model, config)
    randomise_keras(model)
    logits = keras_out(model)
    assert np.abs(logits - base_logits).max() > MIN_EFFECT

    export_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny")

    tuned = peft.PeftModel.from_pretrained(
        hf_model(hf_dirs[arch]), str(tmp_path / "adapter")
    )
    np.testing.assert_allclose(hf_out(tuned), logits, atol=TOL)
    config, tensors = read_peft(tmp_path / "adapter")
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["use_dora"] is use_dora
    magnitudes = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == (len(tensors) // 3 if use_dora else 0)
    tensors = {k: v for k, v in tensors.items() if k not in magnitudes}
    assert config["base_model_name_or_path"] == "tiny"
    if arch == "gpt2":
        assert config["fan_in_fan_out"] is True
        assert config["target_modules"] == [
            "attn.c_attn",
            "attn.c_proj",
            "mlp.c_proj",
        ]
        # Block 1's c_attn: query (rank 4) and value (rank 2) stacked.
        key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
        assert tensors[key].shape == (48, 6)
        assert not tensors[key][16:32].any()  # no adapter on the key
        assert config["rank_pattern"] == {
            r"h\.0\.attn\.c_attn": 8,
            r"h\.1\.attn\.c_attn": 6,
        }
    else:
        assert config["use_rslora"] is True
        assert config["layers_to_transform"] == [1]
        assert config["layers_pattern"] == "layers"
        assert len(tensors) == 2 * 7
        assert config["rank_pattern"] == {r"layers\.1\.mlp\.gate_proj": 2}


def test_export_from_backbone_loads_on_bare_hf_model(hf_dirs, tmp_path):
    backbone = keras_model(hf_dirs["gpt2"], causal_lm=False)
    kl.apply_lora(backbone, kl.LoraConfig(rank=2, target_modules="all-linear"))
    randomise_keras(backbone)
    expected = keras_out(backbone)

    export_peft(backbone, tmp_path / "adapter")

    config, tensors = read_peft(tmp_path / "adapter")
    assert config["task_type"] is None
    assert config["auto_mapping"]["base_model_class"] == "GPT2Model"
    assert "base_model.model.h.0.mlp.c_fc.lora_A.weight" in tensors
    bare = hf_model(hf_dirs["gpt2"], causal_lm=False)
    tuned = peft.PeftModel.from_pretrained(bare, str(tmp_path / "adapter"))
    np.testing.assert_allclose(hf_out(tuned), expected, atol=TOL)


# -- errors: clear messages, nothing half-loaded -------------------------


def _mutate_config(**changes):
    def mutate(directory):
        path = os.path.join(directory, "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(changes)
        with open(path, "w") as f:
            json.dump(config, f)

    return mutate


def _mutate_tensors(change):
    def mutate(directory):
        path = os.path.join(directory, "adapter_model.safetensors")
        tensors = safetensors.numpy.load_file(path)
        change(tensors)
        safetensors.numpy.save_file(tensors, path)

    return mutate


_C_ATTN = "base_model.model.transformer.h.0.attn.c_attn"


def _add_lm_head(tensors):
    tensors["base_model.model.lm_head.lora_A.weight"] = np.ones((4, 16), "f")
    tensors["base_model.model.lm_head.lora_B.weight"] = np.ones((100, 4), "f")


def _add_magnitude(tensors):
    tensors[f"{_C_ATTN}.lora_magnitude_vector"] = np.ones((48,), "f")


def _drop_b(tensors):
    del tensors[f"{_C_ATTN}.lora_B.weight"]


def _shrink_b(tensors):
    key = f"{_C_ATTN}.lora_B.weight"
    tensors[key] = tensors[key][:32]


def _pickle_only(directory):
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    open(os.path.join(directory, "adapter_model.bin"), "wb").close()


IMPORT_ERRORS = {
    "dora": (
        _mutate_config(use_dora=True),
        "but not ['lora_magnitude_vector']",
    ),
    "loha": (_mutate_config(peft_type="LOHA"), "'LOHA' adapter"),
    "bias": (_mutate_config(bias="all"), "bias='all'"),
    "modules_to_save": (
        _mutate_config(modules_to_save=["lm_head"]),
        "modules_to_save",
    ),
    "pissa": (
        _mutate_config(init_lora_weights="pissa"),
        "init_lora_weights='pissa'",
    ),
    "lora_bias": (_mutate_config(lora_bias=True), "lora_bias=True"),
    "rank_mismatch": (_mutate_config(r=3), "rank 4 in the weights"),
    "no_counterpart": (_mutate_tensors(_add_lm_head), "'lm_head'"),
    "dora_tensor": (
        _mutate_tensors(_add_magnitude),
        "does not set use_dora=True",
    ),
    "missing_b": (_mutate_tensors(_drop_b), "but not ['lora_B']"),
    "other_sizes": (_mutate_tensors(_shrink_b), "different base model"),
    "pickle": (_pickle_only, "pickle"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_errors_leave_model_unchanged(
    case, plain_gpt2, peft_adapters, tmp_path
):
    mutate, message = IMPORT_ERRORS[case]
    directory = tmp_path / "adapter"
    shutil.copytree(peft_adapters["gpt2"][0], directory)
    mutate(str(directory))
    before = weight_snapshot(plain_gpt2)

    with pytest.raises(ValueError, match=re.escape(message)):
        import_peft(plain_gpt2, directory)

    assert kl.lora_layers(plain_gpt2) == []
    after = weight_snapshot(plain_gpt2)
    assert sorted(after) == sorted(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)


def test_import_missing_directory_raises(plain_gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        import_peft(plain_gpt2, tmp_path / "nothing")


def test_import_name_clash_keeps_first_adapter(hf_dirs, peft_adapters):
    directory, peft_logits, _ = peft_adapters["gpt2"]
    model = keras_model(hf_dirs["gpt2"])
    import_peft(model, directory)
    before = weight_snapshot(model)

    with pytest.raises(ValueError, match="already has an adapter named"):
        import_peft(model, directory)

    assert weight_snapshot(model).keys() == before.keys()
    np.testing.assert_allclose(keras_out(model), peft_logits, atol=TOL)


def test_unsupported_architecture_is_named(peft_adapters, tmp_path):
    model, _, targets = models.mlp()
    with pytest.raises(ValueError, match="Sequential, which has no PEFT"):
        import_peft(model, peft_adapters["gpt2"][0])
    assert kl.lora_layers(model) == []
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules=targets))
    with pytest.raises(ValueError, match="GPT2Backbone/GPT2CausalLM"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


EXPORT_ERRORS = {
    "no_adapter": (None, "no adapter named 'default'"),
    "bias": (kl.LoraConfig(rank=2, bias="lora_only"), "trains biases"),
    "modules_to_save": (
        kl.LoraConfig(rank=2, modules_to_save=["token_embedding"]),
        "modules_to_save",
    ),
    "pissa": (kl.LoraConfig(rank=2, init="pissa"), "PiSSA"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_ERRORS))
def test_export_errors_write_nothing(case, hf_dirs, tmp_path):
    config, message = EXPORT_ERRORS[case]
    model = keras_model(hf_dirs["gpt2"], causal_lm=False)
    if config is not None:
        kl.apply_lora(model, config)
    with pytest.raises(ValueError, match=re.escape(message)):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_layer_without_hf_counterpart_is_named(
    monkeypatch, hf_dirs, tmp_path
):
    # An architecture table without GPT-2's c_fc: the adapted
    # feedforward_intermediate_dense then has no HF module to go to.
    from keras_lora.interop import gpt2, layout, llama

    short = dataclasses.replace(
        gpt2.ARCHITECTURE,
        modules=tuple(
            m for m in gpt2.ARCHITECTURE.modules if m.name != "mlp.c_fc"
        ),
    )
    monkeypatch.setattr(
        layout, "supported", lambda: (short, llama.ARCHITECTURE)
    )
    model = keras_model(hf_dirs["gpt2"], causal_lm=False)
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules="all-linear"))
    message = (
        "layer 'transformer_layer_0/feedforward_intermediate_dense' holds "
        "adapter 'default' but has no counterpart in Hugging Face GPT-2"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="slow (one import per step) and backend-independent bookkeeping; "
    "the same transaction is checked on every backend in "
    "test_transactions.py, so this runs once, on torch",
)
def test_import_is_all_or_nothing(hf_dirs, peft_adapters):
    """Each step of import_peft made to fail in turn leaves the model as it
    was (tests/faults.py); GPT-2 has the fused c_attn, the hardest case."""
    from tests.faults import run_with_faults

    directory, peft_logits, _ = peft_adapters["gpt2"]
    model = keras_model(hf_dirs["gpt2"])
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
    steps = run_with_faults(
        lambda: import_peft(model, directory), model, inputs
    )
    assert steps > 0
    np.testing.assert_allclose(keras_out(model), peft_logits, atol=TOL)
