"""`keras-lora compare`: GPT-2 LoRA versus full fine-tuning, from the shell.

keras-lora compare                         # offline default, minutes on CPU
keras-lora compare --tiny                  # seconds, a smoke test
keras-lora compare --base scratch          # pre-train the base here first
keras-lora compare --targets all-linear --rank 8
keras-lora compare --lr-sweep              # how the default rates were chosen
keras-lora compare --sweep                 # loss vs parameters, ranks/targets
keras-lora compare --data notes/ --steps 300
keras-lora compare --preset gpt2_base_en   # real GPT-2, keras.io recipe
"""

import argparse
import os
import sys

from keras_lora.comparison.config import BASES, TARGETS, ComparisonConfig
from keras_lora.comparison.data import CORPORA

# Ranks `--sweep` tries by default (also `sweep.DEFAULT_RANKS`).
DEFAULT_RANKS = (1, 2, 4, 8, 16)


def _int_list(value):
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {value!r}"
        )
    return numbers


def register(subparsers):
    """Adds the `compare` subcommand to the `keras-lora` parser."""
    parser = subparsers.add_parser(
        "compare",
        help="fine-tune GPT-2 fully and with LoRA; compare memory, speed, loss",
        description="Fine-tunes a GPT-2 (keras-hub) twice - every weight, "
        "and LoRA (rank 4 on the attention query/value projections by "
        "default) - and reports parameters, file sizes, step time, memory, "
        "validation loss on the same held-out text and samples as a "
        "table, JSON and PNG plots. Offline by default: the small GPT-2 "
        "shipped with the package (pre-trained on Python's documentation "
        "and most of its standard library) learns a task over the code it "
        "read: answering '### Source of `json.dumps`' with the function "
        "(--corpus unseen-packages: code it never read instead). "
        "--lr-sweep and --sweep run many fine-tunes instead (learning "
        "rates; ranks and targets).",
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
        "--base",
        choices=BASES,
        help="without --preset: the small GPT-2 shipped with the package, "
        "or one pre-trained here on pydoc_data.topics first (a few "
        "minutes, then cached; see --pretrain-steps). Default: shipped",
    )
    what.add_argument(
        "--corpus",
        choices=CORPORA,
        help="the built-in fine-tuning text: 'functions' (a task over code "
        "the base read: '### Source of `json.dumps`' answered by the "
        "function) or 'unseen-packages' (standard-library packages the "
        "base never read, as plain code: new knowledge). Default: "
        "functions",
    )
    what.add_argument(
        "--data",
        help="fine-tuning text instead of --corpus: a file or a directory "
        "of text files",
    )
    what.add_argument(
        "--targets",
        choices=TARGETS,
        help="where LoRA goes: the attention query/value projections, or "
        "every linear layer of the blocks (default: query_value)",
    )
    sweeps = what.add_mutually_exclusive_group()
    sweeps.add_argument(
        "--lr-sweep",
        action="store_true",
        help="instead of one comparison: fine-tune both ways at each "
        "learning rate of a grid (same data and steps) and report the "
        "validation loss of each (lr_sweep.txt/json/png)",
    )
    sweeps.add_argument(
        "--sweep",
        action="store_true",
        help="instead of one comparison: LoRA at ranks --ranks on "
        "query/value and on all linear layers, next to full fine-tuning; "
        "validation loss against trainable parameters (sweep.txt/json/png)",
    )
    what.add_argument(
        "--ranks",
        type=_int_list,
        default=DEFAULT_RANKS,
        metavar="R,R,...",
        help="ranks for --sweep (default: %(default)s)",
    )
    defaults = ComparisonConfig()
    sizes = parser.add_argument_group(
        "overrides (defaults: the offline default run; --preset uses the "
        "keras.io recipe, --tiny its own sizes)"
    )
    for flag, field, kind, text in (
        ("--steps", "steps", int, "training steps per fine-tune"),
        ("--batch-size", "batch_size", int, "fine-tuning batch size"),
        ("--sequence-length", "sequence_length", int, "tokens per window"),
        ("--rank", "rank", int, "LoRA rank"),
        ("--alpha", "alpha", float, "LoRA alpha (scale alpha / rank)"),
        ("--full-lr", "full_learning_rate", float, "full fine-tune LR"),
        ("--lora-lr", "lora_learning_rate", float, "LoRA learning rate"),
        ("--data-bytes", "data_bytes", int, "bytes of fine-tuning text"),
        (
            "--pretrain-steps",
            "pretrain_steps",
            int,
            "pre-training with --base scratch",
        ),
        ("--seed", "seed", int, "random seed"),
    ):
        metavar = flag[2:].upper().replace("-", "_")
        default = getattr(defaults, field)
        sizes.add_argument(
            flag,
            dest=field,
            type=kind,
            metavar=metavar,
            help=f"{text} (default: {default:g})",
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
        help="where the table, JSON, plots and adapter go (default: "
        "%(default)s)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's results in --output-dir (without "
        "it, an --output-dir that holds them is an error)",
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
        "parameters, at least 0.6x full fine-tuning's validation gain, "
        "readable samples, less memory and faster than full)",
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
    "pretrain_steps",
    "seed",
    "prompts",
    "targets",
    "base",
    "corpus",
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
    "smoke_test",
)


def config_from_args(args):
    """The `ComparisonConfig` the parsed arguments ask for."""
    if args.preset is not None and args.base is not None:
        raise ValueError(
            "--base chooses the small offline model; it cannot be combined "
            "with --preset. Leave one of them out."
        )
    if args.data is not None and args.corpus is not None:
        raise ValueError(
            "--data replaces the built-in --corpus; pass one of them."
        )
    config = _config(args)
    if args.pretrain_steps is not None and (
        config.preset is not None or config.base != "scratch"
    ):
        raise ValueError(
            "--pretrain-steps applies to a base pre-trained here: add "
            "--base scratch (the shipped base is already trained; it is "
            "rebuilt with `python -m keras_lora.comparison.shipped`)."
        )
    return config


def _config(args):
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
    """Runs the comparison (or a sweep); returns the exit status."""
    # keras-hub imports TensorFlow (for its tokenizers) whatever the
    # backend: keep TensorFlow's C++ start-up logging off the terminal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = config_from_args(args)
        check_inputs(config)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"keras-lora compare: error: {error}", file=sys.stderr)
        return 2
    common = dict(
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        plots=not args.no_plots,
        overwrite=args.overwrite,
    )
    try:
        if args.lr_sweep or args.sweep:
            return _run_sweep(args, config, common)
        from keras_lora.comparison.runner import run_comparison

        results = run_comparison(
            config,
            args.output_dir,
            isolation="in-process" if args.in_process else "subprocess",
            **common,
        )
    except FileExistsError as error:
        print(f"keras-lora compare: error: {error}", file=sys.stderr)
        return 2
    from keras_lora.comparison.report import failed_checks, format_table

    if not args.quiet:
        print(format_table(results))
        print(f"\nwritten to {os.path.abspath(args.output_dir)}")
    failed = failed_checks(results["summary"])
    if args.strict and failed:
        print(f"keras-lora compare: checks failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _run_sweep(args, config, common):
    from keras_lora.comparison import sweep

    if args.lr_sweep:
        result = sweep.lr_sweep(config, args.output_dir, **common)
    else:
        result = sweep.rank_sweep(
            config, args.output_dir, ranks=args.ranks, **common
        )
    if not args.quiet:
        print(sweep.format_sweep(result))
        print(f"\nwritten to {os.path.abspath(args.output_dir)}")
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
