"""Entry point of the `keras-lora` command.

It imports `keras_lora` lazily, so `keras-lora --help` (and `info`,
which imports only the backend in use) start without importing Keras or
every backend; subcommands import what they need. Child processes the
command starts import `keras_lora` as usual.
"""

import os
import sys


def main(argv=None):
    os.environ["KERAS_LORA_LAZY_IMPORT"] = "1"
    try:
        from keras_lora.cli import main as run
    finally:
        del os.environ["KERAS_LORA_LAZY_IMPORT"]
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
