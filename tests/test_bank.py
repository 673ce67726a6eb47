"""AdapterBank: registered adapters, LRU slots, mixed batches, errors."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.serving import AdapterBank, UnknownAdapterError
from tests.conftest import to_numpy
from tests.models import gpt2_backbone, mha_model

# name: (config, seed of the random A/B values)
CONFIGS = {
    "q2": kl.LoraConfig(rank=2, alpha=4, target_modules=["query", "value"]),
    "all4": kl.LoraConfig(
        rank=4,
        alpha=2,
        target_modules=["query", "key", "value", "feedforward_output_dense"],
    ),
    "rs3": kl.LoraConfig(
        rank=3, target_modules=["value"], use_rslora=True, alpha=6
    ),
}


# Models built in one process get numbered names (`gpt2_backbone_3`);
# loading matches them and warns, which is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*automatic numbering")


def _copy(model, make):
    other = make()
    other.set_weights(model.get_weights())
    return other


def _save_adapters(model, make, directory, configs=CONFIGS):
    """Saves each config as an adapter with random A/B; returns dirs."""
    rng = np.random.default_rng(1)
    paths = {}
    for name, config in configs.items():
        source = _copy(model, make)
        kl.apply_lora(source, config)
        for variable in source.trainable_weights:
            variable.assign(rng.normal(0.0, 0.3, variable.shape))
        paths[name] = kl.save_adapter(source, os.path.join(directory, name))
    return paths


def _alone(model, make, path, x):
    """Output of `x` through a plain copy of `model` with one adapter."""
    copy = _copy(model, make)
    if path is not None:
        kl.load_adapter(copy, path)
    return _sequence(copy, x)


def _gpt2_inputs(rows):
    rng = np.random.default_rng(2)
    return {
        "token_ids": rng.integers(0, 20, (rows, 8)),
        "padding_mask": np.ones((rows, 8), "int32"),
    }


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = gpt2_backbone()
    paths = _save_adapters(model, gpt2_backbone, tmp_path_factory.mktemp("a"))
    x = _gpt2_inputs(5)
    expected = {
        name: _alone(model, gpt2_backbone, p, x) for name, p in paths.items()
    }
    expected[None] = _alone(model, gpt2_backbone, None, x)
    return model, paths, x, expected


def _sequence(model, x):
    out = model(x)
    return to_numpy(out["sequence_output"] if isinstance(out, dict) else out)


def test_mixed_batch_matches_each_adapter_alone(gpt2_setup):
    model, paths, x, expected = gpt2_setup
    served = _copy(model, gpt2_backbone)
    bank = AdapterBank(served, slots=4, max_rank=4, max_batch=8)
    for name, path in paths.items():
        info = bank.register(name, path)
        assert info["source"] == path and not info["resident"]
    assert bank.info("all4")["rank"] == 4 and bank.info("all4")["alpha"] == 2
    rows = ["q2", None, "all4", "rs3", "q2"]
    with bank.routing(rows):
        y = _sequence(served, x)
    for i, name in enumerate(rows):
        np.testing.assert_allclose(y[i], expected[name][i], atol=1e-5)
    # After the block every row is the base model again.
    np.testing.assert_allclose(_sequence(served, x), expected[None], atol=1e-5)


def test_lru_eviction_and_refill_give_identical_results(gpt2_setup):
    model, paths, x, expected = gpt2_setup
    served = _copy(model, gpt2_backbone)
    bank = AdapterBank(served, slots=2, max_rank=4, max_batch=8)
    for name, path in paths.items():
        bank.register(name, path)
    with bank.routing(["q2", "all4", None, None, "q2"]):
        first = _sequence(served, x)
    assert bank.resident == ["q2", "all4"] and bank.slot_writes == 2
    bank.route(["rs3"] * 5)  # evicts q2, the least recently used
    assert bank.resident == ["all4", "rs3"]
    np.testing.assert_allclose(_sequence(served, x), expected["rs3"], atol=1e-5)
    bank.route(["all4"] * 5)  # resident: no write
    assert bank.slot_writes == 3
    with bank.routing(["q2", "all4", None, None, "q2"]):  # q2 evicts rs3
        again = _sequence(served, x)
    assert bank.resident == ["q2", "all4"] and bank.slot_writes == 4
    np.testing.assert_array_equal(again, first)
    with pytest.raises(ValueError, match="3 different adapters.*2 slots"):
        bank.route(["q2", "all4", "rs3"])


def test_register_in_memory_and_unregister(gpt2_setup):
    model, paths, x, expected = gpt2_setup
    served = _copy(model, gpt2_backbone)
    bank = AdapterBank(served, slots=2, max_rank=4, max_batch=8)
    source = _copy(model, gpt2_backbone)
    kl.load_adapter(source, paths["all4"], adapter_name="mine")
    info = bank.register("mem", source, adapter_name="mine")
    assert info["source"] == "memory"
    bank.register("from_files", kl.read_adapter(paths["q2"]))
    with bank.routing(["mem", "from_files", None, "mem", None]):
        y = _sequence(served, x)
    for i, name in enumerate(["all4", "q2", None, "all4", None]):
        np.testing.assert_allclose(y[i], expected[name][i], atol=1e-5)
    bank.unregister("mem")
    assert bank.names == ["from_files"] and bank.resident == ["from_files"]
    with pytest.raises(UnknownAdapterError, match="'mem'"):
        bank.route(["mem"])
    with pytest.raises(UnknownAdapterError):
        bank.unregister("mem")
    bank.register("mem", paths["rs3"])  # the name is free again
    with bank.routing(["mem"] * 5):
        np.testing.assert_allclose(
            _sequence(served, x), expected["rs3"], atol=1e-5
        )


def test_dora_and_lora_rows_in_one_batch(gpt2_setup, tmp_path):
    """DoRA adapters route next to LoRA adapters and base rows: each row
    equals its adapter alone, called directly and through `predict`."""
    model, paths, x, expected = gpt2_setup
    source = _copy(model, gpt2_backbone)
    config = kl.LoraConfig(
        rank=3,
        target_modules=["query", "value", "feedforward_output_dense"],
        use_dora=True,
    )
    kl.apply_lora(source, config)
    rng = np.random.default_rng(6)
    for variable in source.trainable_weights:
        noise = rng.normal(0.0, 0.3, variable.shape)
        if "magnitude" in variable.path:
            noise = to_numpy(variable) * (1.0 + noise)
        variable.assign(noise)
    dora = kl.save_adapter(source, tmp_path / "dora")
    expected = dict(expected, dora=_alone(model, gpt2_backbone, dora, x))
    served = _copy(model, gpt2_backbone)
    bank = AdapterBank(served, slots=3, max_rank=4, max_batch=8)
    bank.register("q2", paths["q2"])  # query/value routed, LoRA only
    version = bank.structure_version
    bank.register("dora", dora)  # their DoRA rescaling switched on
    assert bank.structure_version > version
    rows = ["dora", None, "q2", "dora", "q2"]
    with bank.routing(rows):
        direct = _sequence(served, x)
        compiled = served.predict(x, verbose=0)
    for y in (direct, compiled):
        for i, name in enumerate(rows):
            np.testing.assert_allclose(y[i], expected[name][i], atol=1e-5)
    assert np.abs(expected["dora"] - expected[None]).max() > 1e-2


def test_mha_model_mixed_batch(tmp_path):
    keras.utils.set_random_seed(4)
    model = mha_model()
    config = kl.LoraConfig(rank=2, alpha=4)
    paths = _save_adapters(
        model,
        mha_model,
        tmp_path,
        {"x": config, "y": kl.LoraConfig(rank=3, target_modules=["out"])},
    )
    inputs = np.random.default_rng(5).normal(size=(3, 4, 8)).astype("float32")
    served = _copy(model, mha_model)
    bank = AdapterBank(served, slots=2, max_rank=3, max_batch=4)
    for name, path in paths.items():
        bank.register(name, path)
    rows = ["y", None, "x"]
    with bank.routing(rows):
        y = to_numpy(served(inputs))
    for i, name in enumerate(rows):
        alone = _alone(model, mha_model, paths.get(name), inputs)
        np.testing.assert_allclose(y[i], alone[i], atol=1e-5)


def test_register_errors(gpt2_setup, tmp_path):
    model, paths, _, _ = gpt2_setup
    served = _copy(model, gpt2_backbone)
    bank = AdapterBank(served, slots=2, max_rank=3, max_batch=4)
    with pytest.raises(ValueError, match="max_rank>=4"):
        bank.register("big", paths["all4"])
    assert bank.names == []
    bank.register("ok", paths["q2"])
    with pytest.raises(ValueError, match="already registered"):
        bank.register("ok", paths["q2"])
    with pytest.raises(ValueError, match="invalid adapter name"):
        bank.register("no spaces", paths["q2"])
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        bank.register("gone", tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(paths["q2"], name), "rb") as f:
            data = f.read()
        with open(corrupt / name, "wb") as f:
            f.write(data[: len(data) // 2] if "safetensors" in name else data)
    with pytest.raises(ValueError, match="corrupt"):
        bank.register("corrupt", corrupt)
    # Whole-layer weights cannot be routed per row.
    source = _copy(model, gpt2_backbone)
    kl.apply_lora(source, kl.LoraConfig(rank=2, bias="lora_only"))
    path = kl.save_adapter(source, tmp_path / "bias")
    with pytest.raises(ValueError, match="cannot be routed per example"):
        bank.register("bias", path)
    with pytest.raises(ValueError, match="already has an AdapterBank"):
        AdapterBank(served)
    with pytest.raises(ValueError, match="`slots` must be >= 1"):
        AdapterBank(_copy(model, gpt2_backbone), slots=0)
    with open(os.path.join(paths["q2"], "adapter_config.json")) as f:
        assert json.load(f)["layers"]  # the source files are untouched
