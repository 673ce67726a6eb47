"""Re-runs the example notebook and stores its outputs in the file.

    KERAS_BACKEND=jax python -m keras_lora.comparison.notebook

executes `examples/gpt2_lora_vs_full_finetune.ipynb` headless (nbclient)
with the offline default configuration under the current `KERAS_BACKEND`
and writes it back in place (atomically), outputs included. Environment
variables passed to the kernel choose the configuration (see the
notebook's first code cell): `KERAS_LORA_COMPARE_TINY=1` for the tiny one.
"""

import argparse
import os
import pathlib
import sys

from keras_lora.files.atomic import atomic_write_file

NOTEBOOK = (
    pathlib.Path(__file__).resolve().parents[2]
    / "examples"
    / "gpt2_lora_vs_full_finetune.ipynb"
)


def execute_notebook(path=NOTEBOOK, env=None, timeout=1800, cwd=None):
    """Executes the notebook at `path`; returns the executed notebook.

    `env` entries are set in this process's environment while the kernel
    starts (the kernel inherits them) and restored afterwards.
    """
    import nbclient
    import nbformat

    notebook = nbformat.read(os.fspath(path), as_version=4)
    cwd = pathlib.Path(path).resolve().parent if cwd is None else cwd
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        client = nbclient.NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": os.fspath(cwd)}},
        )
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def collapse_streams(notebook):
    """Merges each cell's consecutive stream outputs, as a browser shows them.

    Progress bars redraw with carriage returns; kept raw, every redraw is a
    separate output. Within a line only the text after the last `\\r` is
    what a notebook displays, so only that is kept.
    """
    for cell in notebook.cells:
        merged = []
        for output in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (
                output.get("output_type") == "stream"
                and last is not None
                and last.get("output_type") == "stream"
                and last["name"] == output["name"]
            ):
                last["text"] += output["text"]
            else:
                merged.append(output)
        for output in merged:
            if output.get("output_type") == "stream":
                output["text"] = _last_redraw(output["text"])
        if "outputs" in cell:
            cell["outputs"] = merged
    return notebook


def _last_redraw(text):
    lines = text.split("\n")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in lines)


def main(argv=None):
    import nbformat

    parser = argparse.ArgumentParser(
        prog="python -m keras_lora.comparison.notebook",
        description="Execute the GPT-2 LoRA-vs-full notebook and store "
        "its outputs in place.",
    )
    parser.add_argument("--path", default=os.fspath(NOTEBOOK))
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny configuration"
    )
    parser.add_argument("--output", help="write here instead of in place")
    args = parser.parse_args(argv)
    env = {"KERAS_LORA_COMPARE_TINY": "1" if args.tiny else "0"}
    notebook = collapse_streams(execute_notebook(args.path, env=env))

    def write(tmp, _scratch):
        nbformat.write(notebook, tmp)

    atomic_write_file(args.output or args.path, write)
    print(f"wrote {args.output or args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
