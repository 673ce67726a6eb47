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
