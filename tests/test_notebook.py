"""The example notebook runs headless (nbclient) on the tiny configuration.

The kernel inherits this process's environment, so it runs under the same
`KERAS_BACKEND`; `KERAS_LORA_COMPARE_TINY=1` makes its first code cell pick
the tiny configuration. This covers the offline default path: tokenizer
training, base pre-training (into a temporary cache), the standard
library corpus, both fine-tunes, the report and loading the adapter back.
"""

import json
import pathlib

import keras
import nbclient
import nbformat

NOTEBOOK = (
    pathlib.Path(__file__).resolve().parents[1]
    / "examples"
    / "gpt2_lora_vs_full_finetune.ipynb"
)


def _text(cell):
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output and "text/plain" in output["data"]:
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def test_notebook_runs_tiny(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("KERAS_LORA_COMPARE_TINY", "1")
    monkeypatch.setenv("KERAS_LORA_COMPARE_OUTPUT", str(out))
    monkeypatch.setenv("KERAS_LORA_COMPARE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_LORA_COMPARE_ISOLATION", "in-process")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError if a cell fails

    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert f"backend: {keras.backend.backend()}, tiny: True" in _text(code[0])
    table = [_text(c) for c in code if "trainable params" in _text(c)]
    assert table and "LoRA / full" in table[0]
    assert "val loss: base -> tuned" in table[0]
    images = [
        o
        for c in code
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 3
    assert "trainable params:" in _text(code[-1])  # adapter loaded back

    results = json.loads((out / "comparison.json").read_text())
    assert results["backend"] == keras.backend.backend()
    assert results["base_info"]["source"] == "pretrained"
    assert results["base"]["data_source"].startswith("requests for functions")
    assert list((tmp_path / "cache").iterdir())  # the base model is cached
