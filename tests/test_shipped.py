"""The base model shipped with the package, and the command that builds it.

The shipped preset is loaded (it is small) and checked for what the
comparison relies on: it has learned Python (a low loss on code it never
read), it loads as float32 from float16 weights, and its files are package
data. The builder runs at tiny size.
"""

import fnmatch
import json
import math
import os
import pathlib

import h5py
import pytest

from keras_lora.comparison import (
    ComparisonConfig,
    base_model,
    data,
    shipped,
    training,
)
from keras_lora.comparison import tokenizer as bpe

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_default_comparison_uses_the_shipped_preset(capsys):
    preset, info = base_model.prepare_base(ComparisonConfig())
    assert preset == base_model.SHIPPED_PRESET
    assert "shipped with the package" in capsys.readouterr().out
    assert info["source"] == "shipped" and info["name"] == "gpt2_stdlib_1m"
    assert info["finetune_packages_excluded"] == list(data.FINETUNE_PACKAGES)
    assert info["recipe"] == shipped.RECIPE
    assert info["steps"] == shipped.RECIPE["pretrain_steps"]
    assert info["command"].startswith("python -m keras_lora.comparison.shipped")
    curve = info["held_out_curve"]
    assert [step for step, _ in curve] == list(
        range(shipped.EVAL_EVERY, info["steps"] + 1, shipped.EVAL_EVERY)
    )
    # Storing float16 weights cost nothing measurable.
    assert info["weights_dtype"] == "float16"
    assert info["held_out_loss"] == pytest.approx(
        info["held_out_loss_float32"], abs=2e-3
    )


def test_the_shipped_base_knows_python_it_never_read():
    model = base_model.load_causal_lm(base_model.SHIPPED_PRESET, 128)
    assert {w.dtype for w in model.weights} == {"float32"}
    assert model.backbone.vocabulary_size == 2048
    ids = bpe.encode_documents(
        model.preprocessor.tokenizer, data.finetune_package_documents(60_000)
    )
    windows = data.windows(ids, 128)[:16]
    evaluator = training.compile_for_evaluation(training.training_model(model))
    loss = training.evaluate_loss(evaluator, windows, 8)["loss"]
    # Uniform guessing is log(2048) = 7.6 nats per token.
    assert loss < 0.5 * math.log(2048)
    text = "def f(self, x):\n    return x\n"
    assert (
        model.preprocessor.tokenizer.detokenize(
            bpe.encode(model.preprocessor.tokenizer, text)
        )
        == text
    )


def test_the_shipped_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = settings["tool"]["setuptools"]["package-data"][
        "keras_lora.comparison"
    ]
    package = pathlib.Path(base_model.SHIPPED_PRESET).parents[1]
    files = [
        p.relative_to(package).as_posix()
        for p in pathlib.Path(base_model.SHIPPED_PRESET).rglob("*")
        if p.is_file()
    ]
    assert "presets/gpt2_stdlib_1m/model.weights.h5" in files
    for name in files:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    size = sum(os.path.getsize(package / name) for name in files)
    assert size < 4 * 1024**2


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shipped") / "preset"
    status = shipped.main(["--tiny", "--output", str(directory), "--quiet"])
    return status, directory


def test_tiny_build_writes_a_preset_and_its_record(tiny_build):
    status, directory = tiny_build
    assert status == 0
    info = json.loads((directory / base_model.BASE_INFO_FILE).read_text())
    tiny = ComparisonConfig.tiny()
    assert info["steps"] == tiny.pretrain_steps
    assert info["command"].endswith(f"--tiny --output {directory} --quiet")
    # The held-out loss is measured every few steps, and at the end on
    # the model as saved (float16 weights, loaded back as float32).
    every = shipped.TINY_EVAL_EVERY
    assert [s for s, _ in info["held_out_curve"]] == list(
        range(every, tiny.pretrain_steps + 1, every)
    )
    assert info["held_out_loss"] == pytest.approx(
        info["held_out_loss_float32"], abs=1e-2
    )
    assert info["corpus_characters"] <= shipped.TINY_BYTES
    assert len(info["loss_curve_means"]["values"]) == 1  # 8 steps, by 50
    with h5py.File(directory / "model.weights.h5") as f:
        dtypes = set()
        f.visititems(
            lambda _, obj: (
                dtypes.add(str(obj.dtype))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    assert dtypes == {"float16"}
    model = base_model.load_causal_lm(str(directory), 16)
    assert {w.dtype for w in model.weights} == {"float32"}
    assert model.backbone.num_layers == tiny.num_layers


def test_build_refuses_to_replace_a_preset(tiny_build, capsys):
    _, directory = tiny_build
    before = (directory / "model.weights.h5").read_bytes()
    assert shipped.main(["--tiny", "--output", str(directory)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (directory / "model.weights.h5").read_bytes() == before
    with pytest.raises(SystemExit):
        shipped.main(["--steps", "0"])
