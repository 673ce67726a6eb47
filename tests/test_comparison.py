"""`keras-lora compare`: GPT-2 LoRA versus full fine-tuning, on tiny sizes.

One end-to-end run (module fixture) goes through the command with a tiny
GPT-2 saved by `save_to_preset` in a temporary directory (the offline
preset path) and a directory of the user's text (`--data`); the notebook
test covers the default path (tokenizer training, pre-training, standard
library data).
"""

import contextlib
import io
import json
import math
import os

import keras
import numpy as np
import pytest

from keras_lora import cli
from keras_lora.comparison import ComparisonConfig, data, report, runner
from keras_lora.comparison.base_model import load_causal_lm, resolve_preset
from keras_lora.comparison.tokenizer import encode, train_tokenizer

SEQUENCE_LENGTH = 16


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A tiny GPT-2 with a locally trained tokenizer, saved as a preset."""
    import keras_hub

    root = tmp_path_factory.mktemp("tiny_preset")
    tokenizer = train_tokenizer(
        data.pretraining_documents(20_000), 300, os.fspath(root / "bpe")
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQUENCE_LENGTH,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    causal_lm = keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )
    directory = root / "preset"
    causal_lm.save_to_preset(os.fspath(directory))
    return directory


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A directory of the user's text: two .txt files and a skipped .bin."""
    root = tmp_path_factory.mktemp("user_data")
    documents = data.pretraining_documents(40_000)
    half = len(documents) // 2
    (root / "a.txt").write_text("\n".join(documents[:half]))
    (root / "nested").mkdir()
    (root / "nested" / "b.txt").write_text("\n".join(documents[half:]))
    (root / "blob.bin").write_bytes(b"\x00\xff" * 100)
    return root


@pytest.fixture(scope="module")
def preset_run(tiny_preset, user_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(
            [
                "compare",
                "--tiny",
                "--preset",
                os.fspath(tiny_preset),
                "--data",
                os.fspath(user_data),
                "--full-lr",
                "1e-2",
                "--lora-lr",
                "1e-2",
                "--in-process",
                "--output-dir",
                os.fspath(out),
            ]
        )
    with open(out / report.JSON_NAME) as f:
        results = json.load(f)
    return status, out, stdout.getvalue(), results


def test_compare_writes_table_json_and_plots(preset_run):
    status, out, stdout, results = preset_run
    assert status == 0
    table = (out / report.TABLE_NAME).read_text()
    for row in (
        "trainable params",
        "saved file size",
        "median step time",
        "tokens / s",
        "training memory overhead",
        "val loss: base -> tuned",
        "Greedy samples",
    ):
        assert row in table
        assert row in stdout
    assert f"backend {keras.backend.backend()}" in table
    for name in report.PLOT_NAMES:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    adapter = out / "lora_adapter"
    assert sorted(os.listdir(adapter)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # Nothing else is left behind: no work directory, no full checkpoint.
    assert sorted(os.listdir(out)) == sorted(
        [report.JSON_NAME, report.TABLE_NAME, "lora_adapter"]
        + list(report.PLOT_NAMES)
    )
    assert "fine-tuning: lora" in stdout  # progress bars


def test_compare_numbers_are_consistent(preset_run):
    _, _, _, results = preset_run
    assert results["backend"] == keras.backend.backend()
    assert results["isolation"] == "in-process"
    assert results["base_info"] == {"source": "preset"}
    config = results["config"]
    base, full, lora = results["base"], results["full"], results["lora"]
    assert (base["num_layers"], base["hidden_dim"]) == (2, 16)
    # Full fine-tuning trains everything; LoRA trains A and B only: per
    # block, query and value each get A (16 x 4) and B (4 x 2 x 8).
    assert full["trainable_params"] == full["total_params"]
    assert full["total_params"] == base["total_params"]
    expected = 2 * 2 * (16 * 4 + 4 * 16)
    assert results["expected_lora_params"] == expected
    assert lora["trainable_params"] == expected
    assert lora["total_params"] == base["total_params"] + expected
    assert lora["trainable_params"] < lora["total_params"]
    assert lora["saved_bytes"] < full["saved_bytes"]

    for phase in (full, lora):
        curve = phase["loss_curve"]
        assert len(curve) == config["steps"]
        assert all(math.isfinite(v) for v in curve)
        timer = phase["timer"]
        assert timer["timed_steps"] == config["steps"] - 2
        assert timer["tokens_per_second"] == pytest.approx(
            config["batch_size"]
            * config["sequence_length"]
            / timer["median_step_time_s"]
        )
        memory = phase["memory"]
        assert memory["records"][0]["event"] == "train_begin"
        assert memory["records"][-1]["event"] == "epoch"
        assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
        after = phase["validation_after"]
        assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
        assert len(phase["samples"]) == len(config["prompts"])
    # Greedy decoding produced text (padding, id 0, is not the end token).
    completions = [
        s["completion"] for p in (base, full, lora) for s in p["samples"]
    ]
    assert any(completions)
    # Training moved both models away from the base model.
    before = base["validation_before"]["loss"]
    assert full["validation_after"]["loss"] != pytest.approx(before, abs=1e-6)
    assert lora["validation_after"]["loss"] != pytest.approx(before, abs=1e-6)

    summary = results["summary"]
    assert summary["lora"]["trainable_percent"] == pytest.approx(
        100 * expected / lora["total_params"]
    )
    assert summary["checks"]["lora_params_match_formula"] is True
    assert set(summary["checks"]) >= {
        "lora_trains_under_1_percent",
        "lora_improves_on_base",
        "lora_memory_overhead_below_full",
        "lora_step_faster_than_full",
    }
    assert base["data_source"] == config["data"]
    assert base["validation_windows"] <= config["max_validation_windows"]


def test_saved_adapter_loads_onto_the_preset(preset_run, tiny_preset):
    import keras_lora as kl

    _, out, _, results = preset_run
    model = load_causal_lm(os.fspath(tiny_preset), SEQUENCE_LENGTH)
    kl.load_adapter(model, os.fspath(out / "lora_adapter"))
    trainable, _ = kl.count_parameters(model)
    assert trainable == results["lora"]["trainable_params"]


def test_user_documents_file_and_directory(user_data):
    documents = data.user_documents(user_data)
    assert len(documents) == 2  # a.txt, nested/b.txt; blob.bin skipped
    single = data.user_documents(user_data / "a.txt")
    assert single == [(user_data / "a.txt").read_text()]
    limited = data.user_documents(user_data, max_bytes=1000)
    assert sum(len(d.encode()) for d in limited) == 1000


def test_stdlib_is_the_default_corpus():
    documents = data.finetuning_documents(None, max_bytes=5000)
    assert sum(len(d.encode()) for d in documents) == 5000
    assert "import" in "".join(documents)


def test_windows_and_split():
    ids = np.arange(100)
    windows = data.windows(ids, 9)
    assert windows.shape == (10, 10)
    train, val = data.split_windows(windows, 0.2, 1)
    assert train.shape == (8, 10) and val.shape == (1, 10)
    np.testing.assert_array_equal(val[0], np.arange(80, 90))
    batch = data.training_windows(train, steps=3, batch_size=4, seed=0)
    assert batch.shape == (12, 10)
    x, y = data.as_inputs(batch)
    np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])


def test_tokenizer_round_trips(tiny_preset):
    model = load_causal_lm(os.fspath(tiny_preset), SEQUENCE_LENGTH)
    tokenizer = model.preprocessor.tokenizer
    text = "def f(x):\n    return x + 1\n"
    ids = encode(tokenizer, text)
    assert ids.dtype == np.int32 and len(ids) > 3
    assert tokenizer.detokenize(ids) == text


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["compare", "--tiny", "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "does not exist" in err and str(missing) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"\x00")
    assert cli.main(["compare", "--tiny", "--data", str(empty)]) == 2
    assert "holds no text files" in capsys.readouterr().err


def test_preset_not_found_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_preset"
    assert cli.main(["compare", "--preset", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "save_to_preset" in err
    assert "gpt2_base_en" in err  # the known names are listed
    not_a_preset = tmp_path / "dir"
    not_a_preset.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_preset(not_a_preset)
    assert resolve_preset("gpt2_base_en") == "gpt2_base_en"


def test_bad_sizes_are_clear_errors(capsys):
    assert cli.main(["compare", "--tiny", "--steps", "0"]) == 2
    assert "`steps` must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="hidden_dim"):
        ComparisonConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="isolation"):
        runner.run_comparison(ComparisonConfig.tiny(), ".", isolation="x")


def test_preset_recipe_follows_keras_io():
    config = ComparisonConfig.for_preset("gpt2_base_en")
    assert (config.sequence_length, config.batch_size) == (128, 32)
    assert (config.rank, config.alpha) == (4, 32.0)
    assert config.full_learning_rate == config.lora_learning_rate == 5e-5


def test_base_key_tracks_base_settings_only():
    config = ComparisonConfig()
    assert config.base_key() == ComparisonConfig(steps=7).base_key()
    assert config.base_key() != ComparisonConfig(hidden_dim=64).base_key()


def test_worker_failure_is_reported(tmp_path):
    # A real worker process, given a bad spec: its error comes back.
    spec = {"mode": "neither", "config": {}, "output_dir": str(tmp_path)}
    with pytest.raises(RuntimeError, match="mode must be one of"):
        runner._run_worker(spec, str(tmp_path), progress=False)
