"""LoRA on sharded keras-hub models (keras_lora.distributed: cluster, job).

Training under DataParallel and ModelParallel gives the single-device
losses; adapter files, `.keras` files, `merge_and_unload` and the adapter
bank work on sharded models. Runs on 8 simulated JAX devices (a child
process, see tests/devices.py); skipped on other backends.
"""

import functools
import types

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.distributed import cluster, command, job
from keras_lora.layers.layouts import variable_axes
from keras_lora.serving import AdapterBank
from keras_lora.serving.generation import generate
from tests.conftest import to_numpy
from tests.devices import jax_only, needs_devices, run_in_device_process

pytestmark = [
    jax_only,
    pytest.mark.filterwarnings("ignore:.*automatic numbering"),
]
# LoRA on column- and row-parallel layers and on the token embedding.
TARGETS = {
    "tiny-gpt2": (
        "query",
        "value",
        "attention_output",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
        "token_embedding",
    ),
    "tiny-llama": (
        "query",
        "value",
        "attention_output",
        "feedforward_gate_dense",
        "feedforward_output_dense",
        "token_embedding",
    ),
}

# Adapter tensors the "model" axis splits: GPT-2 under the Megatron-style
# cluster.TRANSFORMER_LAYOUT, Llama under keras-hub's get_layout_map.
SPLIT_OVER_MODEL = {
    "tiny-gpt2": ("query/lora_b", "attention_output/lora_a"),
    "tiny-llama": ("query/lora_a", "feedforward_gate_dense/lora_b"),
}


def test_in_8_device_process():
    run_in_device_process(__file__)


def _quiet(line):
    del line


def job_config(model, parallel="none", **kwargs):
    return job.JobConfig(
        model=model,
        parallel=parallel,
        model_axis=4 if parallel == "model" else None,
        target_modules=TARGETS[model],
        **kwargs,
    )


@functools.cache
def one_device_run(model):
    return job.run(job_config(model), log=_quiet)


# -- training -----------------------------------------------------------------


@needs_devices
@pytest.mark.parametrize("parallel", ["data", "model"])
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_training_matches_one_device(model, parallel):
    expected = one_device_run(model)
    got = job.run(job_config(model, parallel), log=_quiet)
    assert got["device_count"] == 8 and got["process_count"] == 1
    assert got["mesh"] == (
        {"batch": 8} if parallel == "data" else {"batch": 2, "model": 4}
    )
    # The loss of each of the 5 steps and of a held-out batch afterwards.
    assert len(set(expected["losses"])) == 5  # training changes things
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
    np.testing.assert_allclose(
        got["eval_loss"], expected["eval_loss"], rtol=1e-5
    )
    sharded = [
        p for p, axes in got["adapter_layouts"].items() if "model" in axes
    ]
    if parallel == "model":
        # e.g. B of a column-parallel and A of a row-parallel projection.
        for name in SPLIT_OVER_MODEL[model]:
            assert any(p.endswith(f"{name}_default") for p in sharded), name
    else:
        assert sharded == []


@needs_devices
def test_job_trains_a_local_preset_on_a_text_file(tmp_path):
    from tests.tiny_lm import PROMPTS, gpt2_causal_lm

    preset = tmp_path / "preset"
    gpt2_causal_lm(seed=0).save_to_preset(str(preset))
    text = tmp_path / "train.txt"
    text.write_text(" ".join(PROMPTS * 20))
    config = job.JobConfig(
        model=str(preset),
        parallel="model",
        model_axis=2,  # the tiny LM has 2 heads
        steps=2,
        data=str(text),
        save_adapter=str(tmp_path / "adapter"),
    )
    got = job.run(config, log=_quiet)
    assert got["mesh"] == {"batch": 4, "model": 2}
    assert np.all(np.isfinite(got["losses"]))
    # The GPT-2 preset got the transformer layout: query's B is split.
    query_b = [p for p in got["adapter_layouts"] if "query/lora_b" in p]
    assert query_b and all(
        got["adapter_layouts"][p] == [None, "model", None] for p in query_b
    )
    _, tensors = kl.read_adapter(got["adapter_dir"])
    assert len(tensors) == 8  # A and B of query and value in 2 blocks


def test_saving_from_a_model_axis_across_processes_is_refused(monkeypatch):
    monkeypatch.setattr(cluster, "local_device_count", lambda: 2)
    config = job.JobConfig(parallel="model", model_axis=4, save_adapter="x")
    with pytest.raises(ValueError, match="spans processes"):
        job.run(config, log=_quiet)


# -- files, merging and serving on sharded models -----------------------------


def llama_distribution():
    import keras_hub

    return cluster.make_distribution("model", 4, keras_hub.models.LlamaBackbone)


def lora_llama(seed=0):
    """The tiny Llama with random adapters (same seed, same numbers)."""
    causal_lm = job.build_causal_lm(job_config("tiny-llama"))
    config = kl.LoraConfig(rank=4, target_modules=list(TARGETS["tiny-llama"]))
    kl.apply_lora(causal_lm.backbone, config)
    rng = np.random.default_rng(seed)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0.0, 0.2, variable.shape))
    return causal_lm


def token_inputs(rows=4, seed=5):
    tokens = np.random.default_rng(seed).integers(1, 64, (rows, 8))
    return {
        "token_ids": tokens.astype("int32"),
        "padding_mask": np.ones((rows, 8), "bool"),
    }


def layouts(model):
    return job.adapter_layouts(model)


@needs_devices
def test_adapter_files_move_between_sharded_and_unsharded_models(tmp_path):
    x = token_inputs()
    with llama_distribution().scope():
        sharded = lora_llama()
        expected = to_numpy(sharded(x))
        saved = kl.save_adapter(sharded.backbone, tmp_path / "adapter")
        sharded_layouts = layouts(sharded.backbone)
    assert any("model" in axes for axes in sharded_layouts.values())
    # Into a model on one device: same outputs.
    plain = job.build_causal_lm(job_config("tiny-llama"))
    kl.load_adapter(plain.backbone, saved)
    assert layouts(plain.backbone) == {}  # nothing laid out on a mesh
    np.testing.assert_allclose(to_numpy(plain(x)), expected, atol=1e-5)
    # Into another sharded model: the adapters take the derived layouts.
    with llama_distribution().scope():
        other = job.build_causal_lm(job_config("tiny-llama"))
        kl.load_adapter(other.backbone, saved)
        assert layouts(other.backbone) == sharded_layouts
        np.testing.assert_allclose(to_numpy(other(x)), expected, atol=1e-5)


@needs_devices
def test_save_model_and_merge_and_unload_on_a_sharded_model(tmp_path):
    x = token_inputs()
    with llama_distribution().scope():
        causal_lm = lora_llama()
        expected = to_numpy(causal_lm(x))
        path = kl.save_model(causal_lm, tmp_path / "model.keras")
        loaded = kl.load_model(path)
        assert layouts(loaded.backbone) == layouts(causal_lm.backbone)
        np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-5)
        base_layouts = {
            v.path: variable_axes(v)
            for v in causal_lm.weights
            if "lora" not in v.path
        }
        merged = kl.merge_and_unload(causal_lm)
        assert kl.lora_layers(merged) == []
        # The merged kernels keep their shards.
        assert {v.path: variable_axes(v) for v in merged.weights} == (
            base_layouts
        )
        np.testing.assert_allclose(to_numpy(merged(x)), expected, atol=1e-4)


def gpt2_distribution(model_axis=4):
    import keras_hub

    return cluster.make_distribution(
        "model", model_axis, keras_hub.models.GPT2Backbone
    )


@needs_devices
def test_adapter_bank_routes_rows_under_model_parallel(tmp_path):
    configs = {
        "q": kl.LoraConfig(rank=2, alpha=4, target_modules=["query", "value"]),
        "ffn": kl.LoraConfig(
            rank=4,
            target_modules=["attention_output", "feedforward_output_dense"],
        ),
    }
    x = token_inputs()
    gpt2 = job_config("tiny-gpt2")
    expected, paths = {}, {}
    for seed, (name, config) in enumerate(configs.items()):
        source = job.build_causal_lm(gpt2)
        kl.apply_lora(source.backbone, config)
        rng = np.random.default_rng(seed)
        for variable in source.backbone.trainable_weights:
            variable.assign(rng.normal(0.0, 0.2, variable.shape))
        expected[name] = to_numpy(source(x))
        paths[name] = kl.save_adapter(source.backbone, tmp_path / name)
    expected[None] = to_numpy(job.build_causal_lm(gpt2)(x))
    with gpt2_distribution().scope():
        served = job.build_causal_lm(gpt2)
        bank = AdapterBank(served.backbone, slots=2, max_rank=4, max_batch=4)
        for name, path in paths.items():
            bank.register(name, path)
        rows = ["q", None, "ffn", "q"]
        with bank.routing(rows):
            y = to_numpy(served(x))
    for i, name in enumerate(rows):
        np.testing.assert_allclose(y[i], expected[name][i], atol=1e-5)
    for layer in kl.lora_layers(served.backbone):
        slots = layer.routed_slots
        a_axes, b_axes = variable_axes(slots.a), variable_axes(slots.b)
        assert a_axes[0] is None and b_axes[0] is None  # the slot axis
        if layer.name == "query":
            assert b_axes == (None, None, "model", None)
        if layer.name == "attention_output":
            assert a_axes == (None, "model", None, None)


@needs_devices
def test_generate_with_routed_adapters_under_model_parallel(tmp_path):
    from tests.tiny_lm import PROMPTS, gpt2_causal_lm

    source = gpt2_causal_lm(seed=0)
    kl.apply_lora(source.backbone, kl.LoraConfig(rank=2))
    rng = np.random.default_rng(0)
    for variable in source.backbone.trainable_weights:
        variable.assign(rng.normal(0.0, 0.5, variable.shape))
    path = kl.save_adapter(source.backbone, tmp_path / "a")
    # Under a distribution the batch must split over the "batch" axis.
    prompts, adapters = PROMPTS[:4], ["a", None, "a", None]

    def served_text():
        causal_lm = gpt2_causal_lm(seed=0)
        AdapterBank(causal_lm, slots=1, max_batch=4).register("a", path)
        return generate(
            causal_lm, prompts, adapters, max_length=12, sampler="greedy"
        )

    expected = served_text()
    with gpt2_distribution(model_axis=2).scope():  # the tiny LM has 2 heads
        got = served_text()
    assert got == expected
    assert len(set(expected)) > 1  # the adapter changes the text


# -- the pieces ---------------------------------------------------------------


@pytest.mark.parametrize(
    "processes, replicas, shard, expected",
    [
        (1, 8, 0, slice(0, 8)),  # one process feeds everything
        (2, 2, 1, slice(4, 8)),  # batch axis across processes
        (2, 8, 0, slice(0, 4)),  # data parallel over 2 x 4 devices
        (2, 1, 0, slice(0, 8)),  # model axis across processes: same rows
        (4, 2, 1, slice(4, 8)),  # two processes per replica
    ],
)
def test_process_rows(processes, replicas, shard, expected):
    distribution = types.SimpleNamespace(
        num_processes=processes,
        num_model_replicas=replicas,
        data_shard_id=shard,
    )
    assert cluster.process_rows(distribution, 8) == expected


def test_bad_distribution_arguments_raise():
    with pytest.raises(ValueError, match="must be one of"):
        cluster.make_distribution("tensor")
    devices = len(keras.distribution.list_devices())
    with pytest.raises(ValueError, match="must divide the number of devices"):
        cluster.make_distribution("model", model_axis=devices + 1)
    uneven = types.SimpleNamespace(
        num_processes=2, num_model_replicas=2, data_shard_id=0
    )
    with pytest.raises(ValueError, match="divisible"):
        cluster.process_rows(uneven, 7)


def test_layout_map_for_uses_keras_hub_maps_else_the_transformer_rules():
    import keras_hub

    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    llama = cluster.layout_map_for(keras_hub.models.LlamaBackbone, mesh)
    assert "token_embedding/embeddings" in list(llama)
    generic = cluster.layout_map_for(keras_hub.models.GPT2Backbone, mesh)
    assert list(generic) == list(cluster.TRANSFORMER_LAYOUT)


def test_command_line_round_trips_the_job_config():
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            "tiny-llama",
            "--parallel",
            "data",
            "--steps",
            "3",
            "--target-modules",
            "query,value",
            "--local-processes",
            "2",
        ]
    )
    config = command.job_config(args)
    assert config.model == "tiny-llama" and config.parallel == "data"
    assert config.steps == 3 and config.target_modules == ("query", "value")
    again = command.job_config(parser.parse_args(command.child_argv(args)))
    assert again == config
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "0"])


def test_one_device_jobs_refuse_several_processes(capsys):
    status = command.main(["--parallel", "none", "--local-processes", "2"])
    assert status == 2
    assert "--parallel none trains on one device" in capsys.readouterr().err
