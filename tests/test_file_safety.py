"""Hostile and corrupt files change nothing; files carry what a user needs
to load them safely (issues 14 and 16)."""

import hashlib
import json
import os
import warnings

import keras
import numpy as np
import pytest
import safetensors.numpy

import keras_lora as kl
from keras_lora.files.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import to_numpy
from tests.tiny_lm import gpt2_causal_lm

X = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(3, name="head"),
        ],
        name="mlp",
    )


@pytest.fixture
def saved(tmp_path):
    model = _mlp()
    kl.apply_lora(model, kl.LoraConfig(rank=2, target_modules=["fc1"]))
    for variable in kl.lora_layers(model)[0].adapter_variables().values():
        variable.assign(np.full(variable.shape, 0.1, "float32"))
    directory = str(kl.save_adapter(model, tmp_path / "adapter"))
    return directory, to_numpy(model(X))


def _rewrite(directory, edit_meta=None, edit_tensors=None):
    """Edits the files and fixes the checksum, as an attacker would."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    with open(config_path) as f:
        meta = json.load(f)
    tensors = safetensors.numpy.load_file(weights_path)
    if edit_tensors:
        edit_tensors(tensors, meta)
    safetensors.numpy.save_file(tensors, weights_path)
    with open(weights_path, "rb") as f:
        meta["safetensors_sha256"] = hashlib.sha256(f.read()).hexdigest()
    if edit_meta:
        edit_meta(meta)
    with open(config_path, "w") as f:
        json.dump(meta, f)


def _snapshot(model):
    return [to_numpy(w).copy() for w in model.weights], to_numpy(model(X))


def _unchanged(model, before):
    weights, out = before
    assert len(model.weights) == len(weights)
    for value, weight in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), value)
    np.testing.assert_array_equal(to_numpy(model(X)), out)
    assert kl.lora_layers(model) == []


def _overwrite_kernel(tensors, meta):
    # Issue 14 item 3: an undeclared whole-variable entry that would
    # overwrite a base kernel (no modules_to_save, bias="none").
    tensors["head/kernel"] = np.zeros((8, 3), "float32")
    meta["weights"]["head/kernel"] = {
        "layer": "head",
        "variable": "kernel",
        "shape": [8, 3],
        "dtype": "float32",
    }


def _nan_b(tensors, meta):
    tensors["fc1.lora_b"] = np.full_like(tensors["fc1.lora_b"], np.nan)


def _inf_a(tensors, meta):
    tensors["fc1.lora_a"][0, 0] = np.inf


HOSTILE = {
    "undeclared_weight": (None, _overwrite_kernel, "does not declare"),
    "nan_tensor": (None, _nan_b, "NaN or infinite"),
    "inf_tensor": (None, _inf_a, "NaN or infinite"),
    "inf_alpha": (
        lambda m: m["layers"]["fc1"].update(alpha=float("inf")),
        None,
        "'alpha' must be > 0, got inf",
    ),
    "huge_alpha": (
        lambda m: m["layers"]["fc1"].update(alpha=1e308),
        None,
        "'alpha' must be > 0",
    ),
    "nan_alpha": (
        lambda m: m["layers"]["fc1"].update(alpha=float("nan")),
        None,
        "'alpha' must be > 0, got nan",
    ),
    "bad_dropout": (
        lambda m: m["layers"]["fc1"].update(dropout=2.0),
        None,
        "'dropout' must be in",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused_and_change_nothing(saved, case):
    directory, _ = saved
    edit_meta, edit_tensors, message = HOSTILE[case]
    _rewrite(directory, edit_meta, edit_tensors)
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message) as info:
        kl.load_adapter(model, directory)
    assert directory in str(info.value) or "load_adapter" in str(info.value)
    _unchanged(model, before)


def test_deeply_nested_config_names_the_file(saved):
    directory, _ = saved
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=f"'{directory}.*nested too deeply"):
        kl.read_adapter(directory)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_truncated_keras_file_is_not_reported_missing(tmp_path, content):
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a .keras archive"):
        kl.load_model(path)


def test_other_base_weights_warn(saved):
    directory, expected = saved
    same = _mlp(seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*differ from those")
        kl.load_adapter(same, directory)
    np.testing.assert_allclose(to_numpy(same(X)), expected, atol=1e-6)
    other = _mlp(seed=1)  # same architecture, other random base
    with pytest.warns(UserWarning, match=r"layers \['fc1'\] differ from"):
        kl.load_adapter(other, directory)


def test_adapter_moves_between_backbone_and_causal_lm(tmp_path):
    """Issue 16 item 4: saved from the backbone, loaded into the CausalLM
    holding it, and the other way round, with the same logits."""
    lm = gpt2_causal_lm(seed=0)
    tokens = {
        "token_ids": np.array([[1, 2, 3, 4]], "int32"),
        "padding_mask": np.ones((1, 4), "bool"),
    }
    kl.apply_lora(lm.backbone, kl.LoraConfig(rank=2))
    for layer in kl.lora_layers(lm.backbone):
        for variable in layer.adapter_variables().values():
            variable.assign(np.full(variable.shape, 0.05, "float32"))
    expected = to_numpy(lm(tokens))
    kl.save_adapter(lm.backbone, tmp_path / "from_backbone")

    fresh = gpt2_causal_lm(seed=0)
    kl.load_adapter(fresh, tmp_path / "from_backbone")
    np.testing.assert_allclose(to_numpy(fresh(tokens)), expected, atol=1e-5)

    kl.save_adapter(fresh, tmp_path / "from_causal_lm")
    other = gpt2_causal_lm(seed=0)
    kl.load_adapter(other.backbone, tmp_path / "from_causal_lm")
    np.testing.assert_allclose(to_numpy(other(tokens)), expected, atol=1e-5)


def test_keras_hub_task_keeps_its_optimizer_and_loss(tmp_path):
    """Issue 14 item 6: kl.save_model/load_model of a keras-hub CausalLM
    restores the compiled optimizer (learning rate, iterations, state) and
    loss instead of keras-hub's defaults."""
    lm = gpt2_causal_lm(seed=0)
    kl.apply_lora(lm, kl.LoraConfig(rank=2))
    lm.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.0123),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    lm.fit(["the cat", "a bed"], epochs=1, verbose=0)
    kl.save_model(lm, tmp_path / "lm.keras")
    loaded = kl.load_model(tmp_path / "lm.keras")
    assert float(to_numpy(loaded.optimizer.learning_rate)) == pytest.approx(
        0.0123
    )
    assert int(to_numpy(loaded.optimizer.iterations)) == 1
    saved_state = [to_numpy(v) for v in lm.optimizer.variables]
    loaded_state = [to_numpy(v) for v in loaded.optimizer.variables]
    assert len(saved_state) == len(loaded_state)
    for a, b in zip(saved_state, loaded_state, strict=True):
        np.testing.assert_allclose(a, b)
    assert loaded.get_compile_config()["loss"]["config"]["from_logits"]


def test_saved_files_get_ordinary_permissions(saved, tmp_path):
    # Temporaries are created private (0600/0700); what is saved must be
    # readable like any file the user writes (mode less the umask).
    directory, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    model = _mlp()
    kl.save_model(model, tmp_path / "m.keras")
    for path, mode in (
        (directory, 0o777),
        (os.path.join(directory, CONFIG_NAME), 0o666),
        (os.path.join(directory, WEIGHTS_NAME), 0o666),
        (tmp_path / "m.keras", 0o666),
    ):
        assert os.stat(path).st_mode & 0o777 == mode & ~umask, path
