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
from keras_lora.comparison import (
    ComparisonConfig,
    command,
    data,
    report,
    runner,
    training,
)
from keras_lora.comparison.base_model import load_causal_lm, resolve_preset
from keras_lora.comparison.tokenizer import encode, train_tokenizer
from keras_lora.serving.demo import tiny_gpt2_backbone

SEQUENCE_LENGTH = 16


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A tiny GPT-2 with a locally trained tokenizer, saved as a preset.

    Built with the `keras_nlp` names of the keras.io tutorial (keras-nlp
    is an alias of keras-hub), which the comparison then loads with
    keras-hub's.
    """
    import keras_nlp

    root = tmp_path_factory.mktemp("tiny_preset")
    tokenizer = train_tokenizer(
        data.pretraining_documents(20_000), 300, os.fspath(root / "bpe")
    )
    backbone = tiny_gpt2_backbone(
        tokenizer.vocabulary_size(), SEQUENCE_LENGTH, models=keras_nlp.models
    )
    preprocessor = keras_nlp.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    causal_lm = keras_nlp.models.GPT2CausalLM(
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
        "val loss gain (base - tuned)",
        "top-10 sampling, seed 1",
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
    # A smoke test's checks are labelled, not judged (no "NO" at this size).
    assert "not meaningful at this size" in table
    assert " NO " not in table and "checks: ok lora_params_match" in table


def test_compare_refuses_to_overwrite_an_earlier_run(preset_run, capsys):
    _, out, _, results = preset_run
    before = (out / report.JSON_NAME).read_bytes()
    status = cli.main(["compare", "--tiny", "--output-dir", os.fspath(out)])
    assert status == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run" in err and "--overwrite" in err
    assert (out / report.JSON_NAME).read_bytes() == before  # untouched
    with pytest.raises(FileExistsError, match="--overwrite"):
        runner.run_comparison(ComparisonConfig.tiny(), out)
    a_file = out / report.TABLE_NAME
    with pytest.raises(FileExistsError, match="is a file"):
        runner.check_output_dir(a_file, report.OUTPUT_NAMES)
    # An empty or unrelated directory is fine; --overwrite allows the rest.
    assert runner.check_output_dir(out, ("other.json",)) == os.fspath(out)
    assert runner.check_output_dir(out, report.OUTPUT_NAMES, True)


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
        "lora_gain_at_least_0.6x_full",
        "full_samples_not_degenerate",
    }
    assert summary["checks_meaningful"] is False  # --tiny
    assert report.failed_checks(summary) == []
    gain = summary["val_loss_gain"]
    assert gain["lora"] == pytest.approx(
        before - lora["validation_after"]["loss"]
    )
    assert summary["lora_gain_ratio"] == pytest.approx(
        gain["lora"] / gain["full"]
    )
    assert config["sample_top_k"] == 10 and config["targets"] == "query_value"
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


def test_function_requests_are_the_default_corpus():
    documents = data.finetuning_documents(None, max_bytes=60_000)
    assert documents == data.function_documents(60_000)
    assert sum(len(d.encode()) for d in documents) == 60_000
    low, high = data.FUNCTION_CHARACTERS
    names = []
    for document in documents[:-1]:  # the last one is cut at 60 KB
        request, source = document.split("\n", 1)
        name = request.removeprefix("### Source of `").removesuffix("`")
        assert request == data.FUNCTION_REQUEST.format(name=name).strip()
        # The source follows as in its file: `def` + the function's name.
        assert source.lstrip().startswith(
            ("def " + name.rsplit(".", 1)[1], "async def ")
        )
        assert low <= len(source.rstrip()) <= high
        names.append(name)
    assert len(set(names)) == len(names) > 20
    # Only modules the shipped base read; never the unseen packages.
    modules = {name.split(".")[0] for name in names}
    assert not modules & set(data.FINETUNE_PACKAGES)
    assert len(modules) > 3  # shuffled over many modules
    # Methods are named by their class; a package's __init__ by the package.
    assert any(name.count(".") >= 2 for name in names)
    assert data._module_name(os.path.join("json", "__init__.py")) == "json"
    # The same text on every call (the seed), another with another seed.
    assert data.function_documents(20_000) == data.function_documents(20_000)
    assert data.function_documents(20_000, seed=1) != documents[:1]
    # The other built-in corpus: the unseen packages as plain code.
    plain = data.finetuning_documents(None, 5000, corpus="unseen-packages")
    assert sum(len(d.encode()) for d in plain) == 5000
    assert "### Source of" not in "".join(plain)
    with pytest.raises(ValueError, match="corpus"):
        data.finetuning_documents(None, 5000, corpus="poems")


def test_corpus_chooses_text_and_prompts(capsys):
    assert ComparisonConfig().corpus == "functions"
    assert ComparisonConfig().prompts[0] == "### Source of `textwrap.dedent`\n"
    code = ComparisonConfig(corpus="unseen-packages")
    assert code.prompts == ComparisonConfig(data="x.txt").prompts
    assert code.prompts[0] == "def "
    assert ComparisonConfig(prompts=["x"]).prompts == ("x",)
    with pytest.raises(ValueError, match="--corpus"):
        ComparisonConfig(corpus="poems")
    assert cli.main(["compare", "--corpus", "functions", "--data", "x"]) == 2
    assert "--data replaces the built-in --corpus" in capsys.readouterr().err
    assert "functions" in data.corpus_description()
    assert "email" in data.corpus_description(corpus="unseen-packages")


def test_finetune_packages_are_never_pretraining_text():
    root = data.stdlib_directory()

    def package(path):
        return os.path.relpath(path, root).split(os.sep)[0]

    tuned = data.stdlib_code_files(data.FINETUNE_PACKAGES, modules=False)
    seen = data.stdlib_code_files()
    assert {package(p) for p in tuned} == set(data.FINETUNE_PACKAGES)
    assert not set(tuned) & set(seen)
    assert not {package(p) for p in seen} & set(data.FINETUNE_PACKAGES)
    assert "argparse.py" in {package(p) for p in seen}  # top-level modules
    assert "asyncio" in {package(p) for p in seen}  # other packages
    assert not any(
        f"{os.sep}test{os.sep}" in p or f"{os.sep}tests{os.sep}" in p
        for p in seen + tuned
    )
    # The shipped base's text starts with the documentation, and its code
    # is none of the fine-tuning text.
    broad = data.broad_documents(200_000)
    assert sum(len(d.encode()) for d in broad) == 200_000
    assert broad[0] == data.topics_documents()[0]
    tuned_text = set(data.finetune_package_documents(None))
    non_empty = [p for p in tuned if open(p, encoding="utf-8").read().strip()]
    assert len(tuned_text) == len(non_empty)
    # (Several packages' __init__.py hold only this one line.)
    shared = tuned_text & set(data.broad_documents())
    assert shared <= {"# This directory is a Python package.\n"}


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


def test_base_choice_errors_name_the_flags(capsys):
    assert cli.main(["compare", "--base", "scratch", "--preset", "x"]) == 2
    assert "--base" in capsys.readouterr().err
    assert cli.main(["compare", "--pretrain-steps", "5"]) == 2
    assert "--base scratch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="base"):
        ComparisonConfig(base="elsewhere")
    args = cli.build_parser().parse_args(
        ["compare", "--base", "scratch", "--pretrain-steps", "5"]
    )
    config = command.config_from_args(args)
    assert (config.base, config.pretrain_steps) == ("scratch", 5)
    assert ComparisonConfig().base == "shipped"
    assert ComparisonConfig.tiny().base == "scratch"


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


def test_all_linear_targets_match_the_formula(tiny_preset):
    import keras_lora as kl
    from keras_lora.comparison import training

    config = ComparisonConfig.tiny(targets="all-linear", rank=2)
    model = load_causal_lm(os.fspath(tiny_preset), SEQUENCE_LENGTH)
    training.apply_lora(model, config)
    trainable, _ = kl.count_parameters(model)
    # Per block: query, key, value, attention output (16 -> 16) and the
    # feed-forward layers (16 -> 32 -> 16), each A (n x 2) + B (2 x m).
    per_block = 4 * (16 * 2 + 2 * 16) + (16 * 2 + 2 * 32) * 2
    assert trainable == 2 * per_block
    assert config.lora_parameter_count(2, 16, 32) == 2 * per_block
    names = {layer.path.split("/")[-1] for layer in kl.lora_layers(model)}
    assert {"query", "key", "value"} <= names
    assert ComparisonConfig.tiny().lora_parameter_count(2, 16, 32) == 512
    with pytest.raises(ValueError, match="targets"):
        ComparisonConfig(targets="everything")


def test_degenerate_samples():
    assert report.degenerate("   \n  ")
    assert report.degenerate(" the the the the the")
    assert report.degenerate('" " " " " "x')
    assert not report.degenerate("    def f(self, x):\n        return x\n")
    assert not report.degenerate("x = 1")  # short but not blank


def test_checks_are_judged_at_real_sizes(preset_run):
    _, _, _, results = preset_run
    summary = dict(results["summary"], checks_meaningful=True)
    failed = report.failed_checks(summary)
    assert failed == [k for k, v in summary["checks"].items() if not v]
    results = dict(results, summary=summary)
    assert "not meaningful" not in report.format_table(results)


@pytest.fixture(scope="module")
def sweeps(tiny_preset, user_data, tmp_path_factory):
    from keras_lora.comparison import sweep

    out = tmp_path_factory.mktemp("sweeps")
    config = ComparisonConfig.for_preset(
        os.fspath(tiny_preset), **_tiny_sizes(), data=os.fspath(user_data)
    )
    lr = sweep.lr_sweep(
        config,
        out,
        learning_rates={"full": (1e-2,), "lora": (1e-2, 5e-2)},
        progress=False,
    )
    ranks = sweep.rank_sweep(config, out, ranks=(1, 2), progress=False)
    return out, lr, ranks


def _tiny_sizes():
    tiny = ComparisonConfig.tiny()
    return {
        name: getattr(tiny, name)
        for name in (
            "steps",
            "batch_size",
            "sequence_length",
            "data_bytes",
            "max_validation_windows",
        )
    }


def test_lr_sweep_records_each_rate(sweeps):
    from keras_lora.comparison import sweep

    out, lr, _ = sweeps
    rates = [(r["mode"], r["learning_rate"]) for r in lr["runs"]]
    assert rates == [("full", 1e-2), ("lora", 1e-2), ("lora", 5e-2)]
    for mode in ("full", "lora"):
        runs = [r for r in lr["runs"] if r["mode"] == mode]
        best = min(runs, key=lambda r: r["val_loss"])
        assert lr["best_learning_rate"][mode] == best["learning_rate"]
    assert all(math.isfinite(r["val_loss"]) for r in lr["runs"])
    for name in sweep.output_names(sweep.LR_SWEEP_NAME):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "lr_sweep.json").read_text())["runs"]
    table = (out / "lr_sweep.txt").read_text()
    assert "Learning-rate sweep" in table and "best learning rate" in table


def test_rank_sweep_covers_ranks_and_targets(sweeps):
    out, _, ranks = sweeps
    lora = [r for r in ranks["runs"] if r["mode"] == "lora"]
    assert [(r["targets"], r["rank"]) for r in lora] == [
        ("query_value", 1),
        ("query_value", 2),
        ("all-linear", 1),
        ("all-linear", 2),
    ]
    config = ComparisonConfig.tiny()
    for r in lora:
        # Alpha is fixed across ranks (the LoRA paper's practice).
        assert r["alpha"] == ranks["config"]["alpha"]
        expected = config.replace(
            rank=r["rank"], targets=r["targets"]
        ).lora_parameter_count(2, 16, 32)
        assert r["trainable_params"] == expected
    full = [r for r in ranks["runs"] if r["mode"] == "full"]
    assert (
        len(full) == 1
        and full[0]["trainable_params"] > lora[-1]["trainable_params"]
    )
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Each sweep refuses to overwrite its own earlier results.
    from keras_lora.comparison import sweep

    with pytest.raises(FileExistsError, match="sweep.json"):
        sweep.rank_sweep(ComparisonConfig.tiny(), out, progress=False)


def test_bad_targets_and_ranks_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--targets", "everything"])
    assert "--targets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--sweep", "--ranks", "4,x"])
    assert "--ranks" in capsys.readouterr().err


def test_samples_never_start_with_end_of_text():
    # End-of-text (id 3) is the likeliest token everywhere, then id 4.
    sampler = training._sampler(top_k=1, seed=1, end_token_id=3)

    def next_logits(prompt, cache, index):
        ids = keras.ops.arange(8)
        logits = keras.ops.where(
            ids == 3, 10.0, keras.ops.where(ids == 4, 5.0, 0.0)
        )
        return keras.ops.tile(logits[None, :], (2, 1)), None, cache

    prompt = np.array([[5, 6, 0, 0], [5, 0, 0, 0]], "int32")
    out = sampler(next_logits, prompt, index=1, mask=prompt != 0)
    # Each row's first new token is not end-of-text; later ones may be.
    assert keras.ops.convert_to_numpy(out).tolist() == [
        [5, 6, 4, 3],
        [5, 4, 3, 3],
    ]


def test_no_readable_function_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data, "stdlib_code_files", lambda: [])
    with pytest.raises(ValueError, match="--data FILE_OR_DIR or --corpus"):
        data.function_documents(1000)
