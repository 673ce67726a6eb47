"""`keras-lora compare`: GPT-2 LoRA versus full fine-tuning, from the shell.

keras-lora compare                         # offline default, ~5 min CPU
keras-lora compare --tiny                  # seconds, a smoke test
keras-lora compare --data notes/ --steps 300
keras-lora compare --preset gpt2_base_en   # real GPT-2, keras.io recipe
"""

import argparse
import os
import sys


def register(subparsers):
    """Adds the `compare` subcommand to the `keras-lora` parser."""
    parser = subparsers.add_parser(
        "compare",
        help="fine-tune GPT-2 fully and with LoRA; compare memory, speed, loss",
        description="Fine-tunes a GPT-2 (keras-hub) twice - every weight, "
        "and LoRA on the attention query/value projections - and reports "
        "parameters, file sizes, step time, memory, validation loss and "
        "samples as a table, JSON and PNG plots. Offline by default: a "
        "small GPT-2 is pre-trained on pydoc_data.topics (cached) and "
        "fine-tuned on the Python standard library's source code.",
    )
    what = parser.add_argument_group("what to compare")
    what.add_argument(
        "--tiny",
        action="store_true",
        help="a seconds-long configuration (tests, smoke runs)",
    )
    what.add_argument(
        "--preset",
        help="keras-hub GPT-2 preset name (e.g. gpt2_base_en; downloaded "
        "by keras-hub) or local preset directory; uses the keras.io LoRA "
        "recipe. Default: the small offline model",
    )
    what.add_argument(
        "--data",
        help="fine-tuning text: a file or a directory of text files "
        "(default: the Python standard library's .py sources)",
    )
    sizes = parser.add_argument_group("overrides")
    for flag, field, kind, text in (
        ("--steps", "steps", int, "training steps per fine-tune"),
        ("--batch-size", "batch_size", int, "fine-tuning batch size"),
        ("--sequence-length", "sequence_length", int, "tokens per window"),
        ("--rank", "rank", int, "LoRA rank"),
        ("--alpha", "alpha", float, "LoRA alpha (scale alpha / rank)"),
        ("--full-lr", "full_learning_rate", float, "full fine-tune LR"),
        ("--lora-lr", "lora_learning_rate", float, "LoRA learning rate"),
        ("--data-bytes", "data_bytes", int, "bytes of fine-tuning text"),
        ("--pretrain-epochs", "pretrain_epochs", int, "base pre-training"),
        ("--seed", "seed", int, "random seed"),
    ):
        metavar = flag[2:].upper().replace("-", "_")
        sizes.add_argument(
            flag, dest=field, type=kind, metavar=metavar, help=text
        )
    sizes.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        help="a prompt for the samples (repeat for several)",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--output-dir",
        default="keras_lora_compare",
        help="where the table, JSON, plots and adapter go "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--cache-dir",
        help="cache for the pre-trained base model (default: "
        "$KERAS_LORA_CACHE/comparison or ~/.cache/keras_lora/comparison)",
    )
    run.add_argument(
        "--in-process",
        action="store_true",
        help="run both fine-tunes in this process (default: one worker "
        "process each, so each phase's memory is measured on its own)",
    )
    run.add_argument("--no-plots", action="store_true", help="skip PNGs")
    run.add_argument(
        "--quiet", action="store_true", help="no progress or table output"
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if a check fails (LoRA under 1%% of the "
        "parameters, better than base, less memory and faster than full)",
    )
    parser.set_defaults(func=handler)
    return parser


_OVERRIDES = (
    "steps",
    "batch_size",
    "sequence_length",
    "rank",
    "alpha",
    "full_learning_rate",
    "lora_learning_rate",
    "data_bytes",
    "pretrain_epochs",
    "seed",
    "prompts",
)


# With --preset --tiny: the preset's model, the tiny run's sizes.
_TINY_RUN_FIELDS = (
    "steps",
    "batch_size",
    "sequence_length",
    "data_bytes",
    "max_validation_windows",
    "generate_length",
    "prompts",
)


def config_from_args(args):
    """The `ComparisonConfig` the parsed arguments ask for."""
    from keras_lora.comparison.config import ComparisonConfig

    overrides = {
        name: getattr(args, name)
        for name in _OVERRIDES
        if getattr(args, name, None) is not None
    }
    if args.data is not None:
        overrides["data"] = args.data
    if args.preset is not None:
        base = ComparisonConfig.for_preset(args.preset)
        if args.tiny:
            tiny = ComparisonConfig.tiny()
            base = base.replace(
                **{name: getattr(tiny, name) for name in _TINY_RUN_FIELDS}
            )
        return base.replace(**overrides)
    if args.tiny:
        return ComparisonConfig.tiny(**overrides)
    return ComparisonConfig(**overrides)


def check_inputs(config):
    """Fails early, naming the argument, on a bad --data or --preset."""
    from keras_lora.comparison import base_model, data

    if config.data is not None:
        data.user_documents(config.data, max_bytes=1)
    if config.preset is not None:
        base_model.resolve_preset(config.preset)


def handler(args):
    """Runs the comparison; returns the exit status."""
    try:
        config = config_from_args(args)
        check_inputs(config)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"keras-lora compare: error: {error}", file=sys.stderr)
        return 2

    from keras_lora.comparison.runner import run_comparison

    results = run_comparison(
        config,
        args.output_dir,
        cache_dir=args.cache_dir,
        isolation="in-process" if args.in_process else "subprocess",
        progress=not args.quiet,
        plots=not args.no_plots,
    )
    if not args.quiet:
        from keras_lora.comparison.report import format_table

        print(format_table(results))
        print(f"\nwritten to {os.path.abspath(args.output_dir)}")
    if args.strict and not all(results["summary"]["checks"].values()):
        failed = [k for k, v in results["summary"]["checks"].items() if not v]
        print(f"keras-lora compare: checks failed: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """`python -m keras_lora.comparison.command [args]`."""
    parser = argparse.ArgumentParser(prog="keras-lora")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["compare", *(sys.argv[1:] if argv is None else argv)]
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
