"""The `keras-lora serve` subcommand: an HTTP JSON server (uvicorn)."""

import argparse
import ipaddress
import os
import sys


def register(subparsers):
    """Adds `serve` to the `keras-lora` subcommands."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a causal LM with many LoRA adapters over HTTP",
        description="Serve a keras-hub causal LM and any number of LoRA "
        "adapters (kl.save_adapter directories) over an HTTP JSON API: "
        "POST /v1/completions, GET/POST /v1/adapters, DELETE "
        "/v1/adapters/{name}, GET /health. Concurrent requests for "
        "different adapters are batched into one pass.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset",
        help="keras-hub causal LM preset: a local directory (e.g. from "
        "`causal_lm.save_to_preset(dir)`) or a preset name",
    )
    source.add_argument(
        "--demo",
        metavar="DIR",
        help="build a tiny random GPT-2 preset and two random adapters "
        "(a0, a1) in DIR (offline, seconds) and serve them",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_adapter_arg,
        metavar="NAME=DIR",
        help="load an adapter directory at start-up (repeatable; default: "
        "none)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch",
        type=_positive_int,
        default=32,
        help="most requests in one batched pass (1 disables batching; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=_positive_int,
        default=64,
        help="most requests queued or running; more get HTTP 429 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--slots",
        type=_positive_int,
        default=8,
        help="adapters resident on the device at once (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=_non_negative_float,
        default=5.0,
        help="how long to wait for more requests to batch, in "
        "milliseconds (default: %(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=_positive_int,
        help="longest prompt accepted, in tokens (default: "
        "--max-total-tokens minus 2, the start token and one new token)",
    )
    parser.add_argument(
        "--max-total-tokens",
        type=_positive_int,
        help="longest prompt plus completion, in tokens (default: the "
        "model's max_sequence_length)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: %(default)s)",
    )
    parser.set_defaults(func=serve)


def _adapter_arg(value):
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIR, received {value!r}"
        )
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(
            f"adapter {name!r}: {directory!r} is not a directory"
        )
    return name, directory


def _positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, received {value}")
    return number


def _non_negative_float(value):
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, received {value}")
    return number


def is_loopback(host):
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(args):
    """The `uvicorn.Server` for parsed `serve` arguments (not started)."""
    import uvicorn

    from keras_lora.serving.engine import Engine
    from keras_lora.serving.server import create_app

    adapters = dict(args.adapter)
    preset = args.preset
    if args.demo:
        from keras_lora.serving import demo

        print(f"Building the demo preset and adapters in {args.demo} ...")
        preset, built = demo.build_demo(args.demo)
        adapters = {**built, **adapters}
    engine = Engine.from_preset(
        preset,
        slots=args.slots,
        max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens,
        max_total_tokens=args.max_total_tokens,
    )
    app = create_app(
        engine,
        model_name=os.path.basename(os.path.normpath(preset)),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_window=args.batch_window_ms / 1000.0,
        adapters=adapters,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level
    )
    return uvicorn.Server(config)


def serve(args):
    """Builds the engine and runs the server; returns an exit status."""
    if not is_loopback(args.host):
        print(
            f"Warning: listening on {args.host}, not loopback: anyone who "
            "can reach this port can run completions and load adapters "
            "from paths on this machine. There is no authentication.",
            file=sys.stderr,
        )
    server = build_server(args)
    try:
        server.run()
    except SystemExit as error:  # uvicorn exits when it cannot bind
        return error.code if isinstance(error.code, int) else 1
    # A failed start-up (e.g. an adapter that does not load) ends `run`
    # before the server started.
    return 0 if server.started else 1
