import json
import subprocess
import sys

import keras

import keras_lora as kl
from keras_lora import cli


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
