"""The `keras-lora` command."""

import argparse
import importlib
import json
import platform
import sys

from keras_lora.version import VERSION as __version__


def backend_info():
    """Backend, devices and library versions, as a dict.

    Only the running backend is imported (for its devices); the other
    libraries' versions come from their installed package metadata, so
    `keras-lora info` under JAX never starts TensorFlow (and its CUDA
    probing and log lines).
    """
    import keras

    backend = keras.backend.backend()
    info = {
        "keras_lora": __version__,
        "keras": keras.__version__,
        "backend": backend,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    info["devices"] = _devices(backend)
    for module, distribution in _LIBRARIES:
        version = _installed_version(distribution)
        if version is not None:
            info[module] = version
    return info


# (module name, distribution name) of the libraries `info` reports.
_LIBRARIES = (
    ("jax", "jax"),
    ("tensorflow", "tensorflow"),
    ("torch", "torch"),
    ("keras_hub", "keras-hub"),
)


def _installed_version(distribution):
    """The installed version of `distribution`, without importing it."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _devices(backend):
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices()]
    if backend == "torch":
        import torch

        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [
                f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                for i in range(torch.cuda.device_count())
            ]
        return devices
    return []


def _cmd_info(args):
    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "(none)"
        print(f"{key:<{width}}  {value}")
    return 0


# Modules that add a subcommand: each has `register(subparsers)`, which adds
# its parser and sets `func` (called with the parsed args, returns an exit
# status). Imports inside `register`'s handlers keep `--help` fast.
COMMAND_MODULES = (
    "keras_lora.comparison.command",
    "keras_lora.serving.command",
    "keras_lora.distributed.command",
)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-lora",
        description="LoRA for Keras 3 models (JAX, TensorFlow, PyTorch). "
        "The backend is chosen by the KERAS_BACKEND environment variable.",
    )
    parser.add_argument(
        "--version", action="version", version=f"keras-lora {__version__}"
    )
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="show backend, devices and versions")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
