import json
import os
import subprocess
import sys

import keras

import keras_lora as kl
from keras_lora import cli
from tests.conftest import BACKEND


def test_version_flag():
    result = subprocess.run(
        [sys.executable, "-m", "keras_lora.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == f"keras-lora {kl.__version__}"


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == keras.backend.backend()
    assert info["keras"] == keras.__version__
    assert info["keras_lora"] == kl.__version__
    assert info["devices"]


def test_info_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"backend     {keras.backend.backend()}" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: keras-lora" in capsys.readouterr().out


def _run_cli(*args):
    """`keras-lora ARGS` in a fresh process: (stdout, stderr, modules).

    `modules` says which heavy libraries the process had imported when it
    finished (tensorflow, keras_hub).
    """
    probe = (
        "import sys\n"
        "from keras_lora import cli\n"
        "try:\n"
        f"    cli.main({list(args)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES', sorted(m for m in ('tensorflow', 'keras_hub') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    out, _, modules = result.stdout.rpartition("MODULES ")
    return out, result.stderr, modules.strip()


def _quiet(stderr):
    # Nothing from TensorFlow's or XLA's C++ logging, no CUDA probing.
    for noise in ("cuda", "CUDA", "oneDNN", "absl", "tensorflow"):
        assert noise not in stderr, stderr


def test_help_is_quiet_and_imports_no_backend_extras():
    out, err, modules = _run_cli("--help")
    assert "compare" in out and "serve" in out and "info" in out
    assert "keras_hub" not in modules
    if BACKEND != "tensorflow":
        assert "tensorflow" not in modules
        _quiet(err)


def test_info_is_quiet_outside_tensorflow():
    out, err, modules = _run_cli("info")
    assert f"backend     {BACKEND}" in out
    assert "keras_hub" not in modules
    if BACKEND != "tensorflow":
        assert "tensorflow" not in modules
        _quiet(err)
        # Versions of libraries that are not imported still show.
        assert "tensorflow  " in out


def test_serve_help_shows_defaults(capsys):
    try:
        cli.main(["serve", "--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "(default: 127.0.0.1",
        "(default: 8000)",
        "default: 32)",
        "(default: 64)",
        "(default: 8)",
        "(default: 5.0)",
        "(default: info)",
    ):
        assert text in out, text


def test_compare_help_shows_defaults(capsys):
    try:
        cli.main(["compare", "--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--targets", "--sweep", "--lr-sweep", "--overwrite"):
        assert text in out
    assert "LoRA rank (default: 4)" in out


def test_help_imports_no_keras():
    # The `keras-lora` entry point imports keras_lora lazily: `--help`
    # starts no backend (and prints no TensorFlow/CUDA log lines).
    code = (
        "import sys, keras_lora_cli\n"
        "try:\n"
        "    keras_lora_cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('KERAS-IMPORTED', 'keras' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert "usage: keras-lora" in result.stdout
    assert "KERAS-IMPORTED False" in result.stdout
    assert "oneDNN" not in result.stderr and "cuda" not in result.stderr
