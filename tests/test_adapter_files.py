import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import safetensors.numpy

import keras_lora as kl
from keras_lora.files import adapter_files
from keras_lora.files.adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter,
    save_adapter,
)
from keras_lora.model import surgery
from tests.conftest import BACKEND, to_numpy
from tests.models import bert_backbone, gpt2_backbone, mha_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- models ---------------------------------------------------------------


def _mlp(hidden=8, first="fc1", head_bias=True, name="mlp"):
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(hidden, activation="relu", name=first),
            keras.layers.Dense(8, name="fc2"),
            keras.layers.Dense(3, use_bias=head_bias, name="head"),
        ],
        name=name,
    )


def _mlp_with_dropout():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dropout(0.1, name="fc1"),
            keras.layers.Dense(8, name="fc2"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _functional_mlp():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    h = keras.layers.Dense(8, name="fc2")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def _token_inputs(segments=False):
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 20, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    if segments:
        x["segment_ids"] = np.zeros((2, 8), "int32")
    return x


def _pair(make):
    """Two identical base models (same architecture, same weights)."""
    first, second = make(), make()
    second.set_weights(first.get_weights())
    return first, second


def _train(model, seed=0):
    """Stands in for training: random values for every trainable weight."""
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(0.3 * rng.normal(size=w.shape).astype("float32"))


def _outputs(model, x):
    return [to_numpy(t) for t in keras.tree.flatten(model(x))]


def _assert_same(a, b, atol=1e-6):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, atol=atol, rtol=1e-6)


def _state(model):
    """Everything a failed load must leave alone."""
    return {
        "weights": {w.path: to_numpy(w).copy() for w in model.weights},
        "types": {s.path: type(s.layer).__name__ for s in surgery.walk(model)},
        "trainable": [w.path for w in model.trainable_weights],
        "configs": sorted(kl.applied_configs(model)),
        "adapters": kl.list_adapters(model),
    }


def _assert_state(model, before):
    after = _state(model)
    assert after["types"] == before["types"]
    assert after["trainable"] == before["trainable"]
    assert after["configs"] == before["configs"]
    assert after["adapters"] == before["adapters"]
    assert after["weights"].keys() == before["weights"].keys()
    for path, value in before["weights"].items():
        np.testing.assert_array_equal(after["weights"][path], value)


MLP_CONFIG = dict(
    rank=2,
    target_modules=["fc1", "fc2"],
    rank_pattern={"fc2": 3},
    alpha_pattern={"fc1": 4},
    modules_to_save=["head"],
    dropout=0.1,
    use_rslora=True,
)


@pytest.fixture
def saved_mlp(tmp_path):
    """(directory, expected outputs, x, a fresh base copy)."""
    model, fresh = _pair(_mlp)
    kl.apply_lora(model, kl.LoraConfig(**MLP_CONFIG))
    _train(model)
    x = np.random.default_rng(1).random((4, 6)).astype("float32")
    directory = str(tmp_path / "adapter")
    save_adapter(model, directory)
    return directory, _outputs(model, x), x, fresh


# -- round trips ------------------------------------------------------------


def test_mlp_round_trip_into_fresh_model(saved_mlp):
    directory, expected, x, fresh = saved_mlp
    assert load_adapter(fresh, directory) is fresh
    _assert_same(_outputs(fresh, x), expected)
    assert [type(layer).__name__ for layer in fresh.layers] == [
        "LoraDense",
        "LoraDense",
        "Dense",
    ]
    fc1 = fresh.get_layer("fc1").adapter_spec()
    assert (fc1.rank, fc1.alpha, fc1.dropout, fc1.use_rslora) == (
        2,
        4,
        0.1,
        True,
    )
    assert fresh.get_layer("fc2").adapter_spec().rank == 3
    names = sorted(w.path.split("/", 1)[1] for w in fresh.trainable_weights)
    assert names == [
        "fc1/lora_a_default",
        "fc1/lora_b_default",
        "fc2/lora_a_default",
        "fc2/lora_b_default",
        "head/bias",
        "head/kernel",
    ]
    assert list(kl.applied_configs(fresh)) == ["default"]


def test_file_layout(saved_mlp):
    directory = saved_mlp[0]
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        meta = json.load(f)
    assert meta["format_version"] == 2
    assert meta["layers"]["fc1"]["variant"] == "lora"
    assert meta["layers"]["fc1"]["tensors"] == {
        "lora_a": [6, 2],
        "lora_b": [2, 8],
    }
    assert meta["keras_lora_version"] == kl.__version__
    assert meta["adapter_name"] == "default"
    assert meta["config"]["rank_pattern"] == {"fc2": 3}
    assert meta["config"]["modules_to_save"] == ["head"]
    assert meta["layers"]["fc2"]["rank"] == 3
    assert meta["layers"]["fc1"]["kernel_shape"] == [6, 8]
    assert meta["base_model"]["class"] == "Sequential"
    assert meta["base_model"]["kernel_shapes"] == {
        "fc1": [6, 8],
        "fc2": [8, 8],
    }
    assert len(meta["safetensors_sha256"]) == 64
    with safetensors.safe_open(
        os.path.join(directory, WEIGHTS_NAME), framework="numpy"
    ) as f:
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert shapes == {
        "fc1.lora_a": (6, 2),
        "fc1.lora_b": (2, 8),
        "fc2.lora_a": (8, 3),
        "fc2.lora_b": (3, 8),
        "head/kernel": (8, 3),
        "head/bias": (3,),
    }
    assert dtypes == {np.dtype("float32")}


def test_mha_round_trip_and_keys(tmp_path):
    model, fresh = _pair(mha_model)
    kl.apply_lora(model, kl.LoraConfig(rank=2, alpha=4))
    _train(model)
    x = np.random.default_rng(1).random((2, 4, 8)).astype("float32")
    save_adapter(model, tmp_path / "a")
    _, tensors = read_adapter(tmp_path / "a")
    assert {k: v.shape for k, v in tensors.items()} == {
        "mha/query.lora_a": (8, 2),
        "mha/query.lora_b": (2, 2, 4),
        "mha/value.lora_a": (8, 2),
        "mha/value.lora_b": (2, 2, 4),
    }
    load_adapter(fresh, tmp_path / "a")
    _assert_same(_outputs(fresh, x), _outputs(model, x))
    mha = fresh.get_layer("mha")
    assert isinstance(mha.query_dense, kl.LoraEinsumDense)
    assert isinstance(mha.value_dense, kl.LoraEinsumDense)


@pytest.mark.parametrize("backbone", ["gpt2", "bert"])
def test_keras_hub_backbone_round_trip(tmp_path, backbone):
    make = gpt2_backbone if backbone == "gpt2" else bert_backbone
    model, fresh = _pair(make)
    kl.apply_lora(model, kl.LoraConfig(rank=2))
    _train(model)
    x = _token_inputs(segments=backbone == "bert")
    save_adapter(model, tmp_path / "a")
    _, tensors = read_adapter(tmp_path / "a")
    attention = (
        "self_attention" if backbone == "gpt2" else "self_attention_layer"
    )
    key = f"transformer_layer_1/{attention}/query.lora_a"
    assert tensors[key].shape == (16, 2)
    assert len(tensors) == 8  # 2 blocks x (query, value) x (A, B)
    load_adapter(fresh, tmp_path / "a")
    _assert_same(_outputs(fresh, x), _outputs(model, x), atol=1e-5)


def test_paths_match_up_to_keras_numbering(tmp_path):
    def unnamed_mha():  # Keras numbers the MHA: its name differs per copy
        inputs = keras.Input((4, 8))
        mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        return keras.Model(inputs, mha(inputs, inputs))

    model, fresh = _pair(unnamed_mha)
    kl.apply_lora(model, kl.LoraConfig(rank=2))
    _train(model)
    save_adapter(model, tmp_path / "a")
    x = np.random.default_rng(1).random((2, 4, 8)).astype("float32")
    with pytest.warns(UserWarning, match="automatic numbering"):
        load_adapter(fresh, tmp_path / "a")
    _assert_same(_outputs(fresh, x), _outputs(model, x))


def test_ambiguous_numbering_is_refused(tmp_path):
    def unnamed_mlp():
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(4)]
        )

    model, fresh = _pair(unnamed_mlp)
    names = [layer.name for layer in model.layers]
    kl.apply_lora(model, kl.LoraConfig(rank=1, target_modules=names))
    save_adapter(model, tmp_path / "a")
    before = _state(fresh)
    with pytest.raises(ValueError, match=f"no layer at path '{names[0]}'"):
        load_adapter(fresh, tmp_path / "a")
    _assert_state(fresh, before)


def test_adapter_of_drop_in_layers_without_recorded_config(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            kl.LoraDense(8, rank=2, alpha=3, activation="relu", name="fc1"),
            kl.LoraDense(8, rank=4, name="fc2"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    _train(model)
    fresh = _mlp()
    for name in ("fc1", "fc2"):
        base = model.get_layer(name).base_layer
        fresh.get_layer(name).set_weights(base.get_weights())
    fresh.get_layer("head").set_weights(model.get_layer("head").get_weights())
    save_adapter(model, tmp_path / "a")
    meta, _ = read_adapter(tmp_path / "a")
    assert meta["config_source"] == "reconstructed"
    assert meta["config"]["target_modules"] == ["fc1", "fc2"]
    assert meta["config"]["rank_pattern"] == {"fc2": 4}
    assert meta["config"]["alpha_pattern"] == {"fc2": 4}
    load_adapter(fresh, tmp_path / "a")
    x = np.random.default_rng(1).random((3, 6)).astype("float32")
    _assert_same(_outputs(fresh, x), _outputs(model, x))


def test_bias_lora_only_round_trip(tmp_path):
    model, fresh = _pair(_mlp)
    config = kl.LoraConfig(rank=2, target_modules=["fc1"], bias="lora_only")
    kl.apply_lora(model, config)
    _train(model)  # trains fc1's bias too
    x = np.random.default_rng(1).random((3, 6)).astype("float32")
    save_adapter(model, tmp_path / "a")
    _, tensors = read_adapter(tmp_path / "a")
    assert sorted(tensors) == ["fc1.lora_a", "fc1.lora_b", "fc1/bias"]
    load_adapter(fresh, tmp_path / "a")
    _assert_same(_outputs(fresh, x), _outputs(model, x))
    assert "fc1/bias" in [w.path.split("/", 1)[1] for w in fresh.weights]


def test_load_under_another_name_keeps_active_and_trainable(saved_mlp):
    directory, expected, x, model = saved_mlp
    load_adapter(model, directory)
    trainable = [w.path for w in model.trainable_weights]
    with pytest.warns(UserWarning, match="shared by every adapter"):
        load_adapter(model, directory, adapter_name="copy")
    for layer in kl.lora_layers(model):
        assert layer.adapters == ["default", "copy"]
        assert layer.active_adapters == ["default"]
    assert set(kl.applied_configs(model)) == {"default", "copy"}
    _assert_same(_outputs(model, x), expected)
    # What trained before still trains; the new adapter trains too.
    now = [w.path for w in model.trainable_weights]
    assert set(trainable) < set(now)
    added = sorted(p.split("/")[-1] for p in now if p not in trainable)
    assert added == ["lora_a_copy"] * 2 + ["lora_b_copy"] * 2
    kl.set_adapter(model, "copy")
    _assert_same(_outputs(model, x), expected)


def test_second_adapter_does_not_freeze_first_modules(saved_mlp, tmp_path):
    directory, _, x, model = saved_mlp
    load_adapter(model, directory)  # default: fc1, fc2, head trains
    other, _ = _pair(_mlp)
    kl.apply_lora(other, kl.LoraConfig(rank=1, target_modules=["fc2"]))
    save_adapter(other, tmp_path / "other")
    load_adapter(model, tmp_path / "other", adapter_name="other")
    paths = {w.path.split("/", 1)[1] for w in model.trainable_weights}
    assert {"head/kernel", "head/bias", "fc2/lora_a_other"} <= paths


def test_load_frozen(saved_mlp):
    directory, expected, x, fresh = saved_mlp
    load_adapter(fresh, directory, is_trainable=False)
    assert fresh.trainable_weights == []
    _assert_same(_outputs(fresh, x), expected)


def test_loaded_adapter_is_active_only_in_unadapted_model(tmp_path):
    source, model = _pair(_mlp)
    kl.apply_lora(source, kl.LoraConfig(rank=2, target_modules=["fc1", "fc2"]))
    _train(source)
    save_adapter(source, tmp_path / "a")
    x = np.random.default_rng(1).random((3, 6)).astype("float32")
    kl.apply_lora(model, kl.LoraConfig(rank=1, target_modules=["fc1"]))
    before = _outputs(model, x)
    load_adapter(model, tmp_path / "a", adapter_name="new")
    # fc2 was wrapped by the load: it holds only "new", inactive.
    assert model.get_layer("fc2").adapters == ["new"]
    assert model.get_layer("fc2").active_adapters == []
    assert model.get_layer("fc1").active_adapters == ["default"]
    _assert_same(_outputs(model, x), before)
    kl.set_adapter(model, "new")
    _assert_same(_outputs(model, x), _outputs(source, x))


# -- errors leave the model unchanged ----------------------------------------


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _edit_meta(directory, edit):
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def _rewrite_weights(directory):
    path = os.path.join(directory, WEIGHTS_NAME)
    tensors = safetensors.numpy.load_file(path)
    tensors["fc1.lora_b"] = tensors["fc1.lora_b"] + 1.0
    safetensors.numpy.save_file(tensors, path)


def _truncate_and_fix_checksum(directory):
    path = os.path.join(directory, WEIGHTS_NAME)
    _truncate(path)

    def fix(meta):
        meta["safetensors_sha256"] = adapter_files._sha256(path)

    _edit_meta(directory, fix)


ERROR_CASES = {
    "missing_dir": (
        lambda d: os.rename(d, d + "_moved"),
        None,
        FileNotFoundError,
        "no adapter directory",
    ),
    "missing_weights": (
        lambda d: os.remove(os.path.join(d, WEIGHTS_NAME)),
        None,
        FileNotFoundError,
        WEIGHTS_NAME,
    ),
    "missing_config": (
        lambda d: os.remove(os.path.join(d, CONFIG_NAME)),
        None,
        FileNotFoundError,
        CONFIG_NAME,
    ),
    "corrupt_json": (
        lambda d: _truncate(os.path.join(d, CONFIG_NAME)),
        None,
        ValueError,
        f"{CONFIG_NAME}' is not valid JSON",
    ),
    "truncated_weights": (
        lambda d: _truncate(os.path.join(d, WEIGHTS_NAME)),
        None,
        ValueError,
        f"{WEIGHTS_NAME}' is corrupt",
    ),
    "checksum": (_rewrite_weights, None, ValueError, "sha256"),
    "unreadable_weights": (
        _truncate_and_fix_checksum,
        None,
        ValueError,
        "not a readable safetensors",
    ),
    "inconsistent_rank": (
        lambda d: _edit_meta(
            d, lambda m: m["layers"]["fc2"]["tensors"].update(lora_a=[8, 4])
        ),
        None,
        ValueError,
        "inconsistent",
    ),
    "unknown_path": (
        None,
        lambda: _mlp(first="first"),
        ValueError,
        "no layer at path 'fc1'",
    ),
    "shape": (
        None,
        lambda: _mlp(hidden=5),
        ValueError,
        r"'fc1'.*\(2, 8\).*\(2, 5\)",
    ),
    "model_class": (None, _functional_mlp, ValueError, "Sequential"),
    "not_adaptable": (None, _mlp_with_dropout, ValueError, "Dropout"),
    "module_variables": (
        None,
        lambda: _mlp(head_bias=False),
        ValueError,
        "'head' has no variable named 'bias'",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_leave_model_unchanged(saved_mlp, case):
    directory, _, _, fresh = saved_mlp
    corrupt, make, error, match = ERROR_CASES[case]
    if corrupt is not None:
        corrupt(directory)
    model = fresh if make is None else make()
    before = _state(model)
    with pytest.raises(error, match=match):
        load_adapter(model, directory)
    _assert_state(model, before)


def test_name_taken_and_bad_name_leave_model_unchanged(saved_mlp):
    directory, _, _, model = saved_mlp
    load_adapter(model, directory)
    before = _state(model)
    with pytest.raises(ValueError, match="already has an adapter named"):
        load_adapter(model, directory)
    with pytest.raises(ValueError, match="invalid adapter name"):
        load_adapter(model, directory, adapter_name="a b")
    _assert_state(model, before)


@pytest.mark.parametrize("adapted", [False, True])
def test_failure_midway_is_rolled_back(saved_mlp, monkeypatch, adapted):
    directory, _, _, model = saved_mlp
    if adapted:
        kl.apply_lora(model, kl.LoraConfig(rank=1, target_modules=["fc1"]))
    before = _state(model)

    def boom(self, name="default"):
        raise RuntimeError("boom")

    monkeypatch.setattr(kl.layers.LoraLayer, "adapter", boom)
    with pytest.raises(RuntimeError, match="boom"):
        load_adapter(model, directory, adapter_name="new")
    monkeypatch.undo()
    _assert_state(model, before)


# -- save errors --------------------------------------------------------------


def test_save_unknown_adapter(tmp_path):
    model = _mlp()
    kl.apply_lora(model, kl.LoraConfig(rank=1, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        save_adapter(model, tmp_path / "a", adapter_name="other")
    assert not os.listdir(tmp_path)


def test_save_pissa_refused(tmp_path):
    model = _mlp()
    config = kl.LoraConfig(rank=1, target_modules=["fc1"], init="pissa")
    kl.apply_lora(model, config)
    with pytest.raises(ValueError, match="PiSSA.*whole model"):
        save_adapter(model, tmp_path / "a")


class _Twin(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = keras.layers.Dense(4, name="same")
        self.b = keras.layers.Dense(4, name="same")

    def call(self, x):
        return self.b(self.a(x))


def test_save_duplicate_paths_refused(tmp_path):
    model = _Twin()
    model(np.ones((1, 4), "float32"))
    kl.apply_lora(model, kl.LoraConfig(rank=1, target_modules=["same"]))
    with pytest.raises(ValueError, match="share the path 'same'"):
        save_adapter(model, tmp_path / "a")


# -- atomic saves -------------------------------------------------------------


def test_interrupted_save_keeps_previous_adapter(saved_mlp, monkeypatch):
    directory, expected, x, fresh = saved_mlp
    model, _ = _pair(_mlp)
    kl.apply_lora(model, kl.LoraConfig(**MLP_CONFIG))
    _train(model, seed=5)  # other values than the saved adapter

    def broken_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory)
    monkeypatch.undo()
    assert os.listdir(os.path.dirname(directory)) == ["adapter"]
    load_adapter(fresh, directory)
    _assert_same(_outputs(fresh, x), expected)


def test_failed_swap_restores_previous_adapter(saved_mlp, monkeypatch):
    directory, expected, x, fresh = saved_mlp
    model, _ = _pair(_mlp)
    kl.apply_lora(model, kl.LoraConfig(**MLP_CONFIG))
    _train(model, seed=5)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # moving the new directory into place
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(model, directory)
    monkeypatch.undo()
    assert len(calls) == 3  # backup, (failed) swap, restore
    assert os.listdir(os.path.dirname(directory)) == ["adapter"]
    load_adapter(fresh, directory)
    _assert_same(_outputs(fresh, x), expected)


def test_resave_replaces_adapter_and_keeps_other_files(saved_mlp):
    directory, expected, x, fresh = saved_mlp
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write("notes")
    model = _mlp()
    model.set_weights(fresh.get_weights())
    kl.apply_lora(model, kl.LoraConfig(**MLP_CONFIG))
    _train(model, seed=5)
    save_adapter(model, directory)
    assert sorted(os.listdir(directory)) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
    )
    assert os.listdir(os.path.dirname(directory)) == ["adapter"]
    load_adapter(fresh, directory)
    new = _outputs(fresh, x)
    assert not np.allclose(new[0], expected[0])
    _assert_same(new, _outputs(model, x))


# -- across backends ------------------------------------------------------

_OTHER_BACKEND = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import keras
    from keras_lora.files.adapter_files import load_adapter
    from tests.models import mha_model
    data = np.load(sys.argv[2] + "/base.npz")
    model = mha_model()
    model.set_weights([data[f"w{i}"] for i in range(len(data.files) - 1)])
    load_adapter(model, sys.argv[2] + "/adapter")
    out = keras.ops.convert_to_numpy(model(data["x"]))
    np.savez(sys.argv[2] + "/out.npz", out=out, backend=keras.backend.backend())
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec(
        {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[
            _OTHER_BACKEND[BACKEND]
        ]
    )
    is None,
    reason="the other backend is not installed (e.g. the GPU machine, which "
    "has no TensorFlow)",
)
def test_adapter_loads_under_another_backend(tmp_path):
    model = mha_model()
    base = model.get_weights()
    kl.apply_lora(
        model, kl.LoraConfig(rank=2, alpha=3, target_modules="all-linear")
    )
    _train(model)
    x = np.random.default_rng(1).random((2, 4, 8)).astype("float32")
    np.savez(
        tmp_path / "base.npz", x=x, **{f"w{i}": w for i, w in enumerate(base)}
    )
    save_adapter(model, tmp_path / "adapter")
    other = _OTHER_BACKEND[BACKEND]
    env = {**os.environ, "KERAS_BACKEND": other, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, REPO, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = np.load(tmp_path / "out.npz")
    assert str(child["backend"]) == other
    np.testing.assert_allclose(
        child["out"], to_numpy(model(x)), atol=1e-5, rtol=1e-5
    )
