"""The examples run end to end (quick settings) on the current backend."""

import importlib.util
import json
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load_example(name):
    # examples/ is not a package: load the script from its path.
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def test_digits_lora_quick(tmp_path, capsys):
    example = _load_example("digits_lora")
    out_path = tmp_path / "r.json"
    results = example.main(["--quick", "--json", str(out_path)])

    # Adapters switched off give the base model's logits, bit for bit.
    assert results["disabled_max_abs_diff"] == 0.0
    assert results["disabled_exact"] is True
    assert results["accuracy"]["disabled"] == results["accuracy"]["base"]
    # Merging folds the adapters into the kernels without changing outputs.
    assert results["merge_error"] <= 1e-5
    assert results["unmerge_error"] <= 1e-5
    assert results["base_weights_unchanged"] is True
    # Only the adapters train: (64*4 + 4*64) * 2 + (64*4 + 4*10) of 8970.
    params = results["params"]
    assert params["full"] == 8970
    assert params["lora_trainable"] == 1320
    assert params["lora_trainable"] < params["full"]
    target = results["target_digit"]
    assert 0 <= target <= 9
    assert results["target_accuracy"]["base"] == min(
        results["accuracy"]["base"]
    )
    for key in ("base", "lora", "disabled"):
        accuracies = results["accuracy"][key]
        assert len(accuracies) == 10
        assert all(0.0 <= a <= 1.0 for a in accuracies)

    assert out_path.exists()
    assert json.loads(out_path.read_text()) == results
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]
    assert "adapters disabled == base model logits" in capsys.readouterr().out


def _keras_nlp_tiny_preset(directory):
    """A tiny GPT-2 preset built with the tutorial's `keras_nlp` names."""
    import keras_nlp

    from keras_lora.serving import demo

    tokenizer = keras_nlp.models.GPT2Tokenizer(
        vocabulary=demo.byte_vocabulary(), merges=demo.MERGES
    )
    backbone = demo.tiny_gpt2_backbone(
        tokenizer.vocabulary_size(), 32, models=keras_nlp.models
    )
    preprocessor = keras_nlp.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=32
    )
    causal_lm = keras_nlp.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )
    causal_lm.save_to_preset(str(directory))
    return directory


def test_keras_io_gpt2_lora_tiny(tmp_path, capsys):
    import keras_hub
    import keras_nlp

    # keras-nlp is keras-hub under its old name: the same classes.
    assert keras_nlp.models.GPT2CausalLM is keras_hub.models.GPT2CausalLM
    preset = _keras_nlp_tiny_preset(tmp_path / "preset")
    example = _load_example("keras_io_gpt2_lora")
    out_path = tmp_path / "r.json"
    results = example.main(
        [
            "--preset",
            str(preset),
            "--batches",
            "3",
            "--batch-size",
            "2",
            "--sequence-length",
            "16",
            "--max-length",
            "12",
            "--learning-rate",
            "1e-3",
            "--json",
            str(out_path),
        ]
    )
    full, lora = results["full"], results["lora"]
    # Query/value of 2 blocks at rank 4: A (16 x 4) + B (4 x 2 x 8) each.
    assert lora["trainable_params"] == 2 * 2 * (16 * 4 + 4 * 16)
    assert full["trainable_params"] == lora["total_params"] - 512
    for phase in (full, lora):
        memory = phase["memory"]
        assert memory["records"][0]["event"] == "train_begin"
        assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
        assert len(phase["samples"]) == len(example.PROMPTS)
        assert all(isinstance(s["output"], str) for s in phase["samples"])
        assert phase["loss"] > 0
    assert json.loads(out_path.read_text())["preset"] == str(preset)
    out = capsys.readouterr().out
    assert "trainable params: 512" in out  # kl.print_trainable_parameters


def _readme_block(heading):
    """The first ```python block after the README heading `heading`."""
    text = (EXAMPLES.parent / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_quickstart_runs_as_pasted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(_readme_block("## Quickstart"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "trainable params: 1,024" in out
    after = float(out.split("task B accuracy after:")[1].split()[0])
    assert after > 0.8
    assert sorted(p.name for p in (tmp_path / "my_adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_readme_serving_example_runs_as_pasted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(_readme_block("## Serving many adapters on one base model"), {})  # noqa: S102
    texts = eval(capsys.readouterr().out.strip().splitlines()[-1])  # noqa: S307
    assert len(texts) == 3 and all(t.startswith("Hello") for t in texts)
    assert (tmp_path / "kl-demo" / "adapters" / "a1").is_dir()
