"""The base model shipped inside the package, and how it was built.

    python -m keras_lora.comparison.shipped --overwrite   # rebuild in place
    python -m keras_lora.comparison.shipped --output DIR  # build elsewhere
    python -m keras_lora.comparison.shipped --tiny --output DIR  # seconds

The default `keras-lora compare` fine-tunes a small GPT-2 that this module
pre-trained once, offline, and that ships as a keras-hub preset directory
inside the package (`base_model.SHIPPED_PRESET`): a 2,048-token
byte-level BPE and a 4-block GPT-2 (hidden 128, 1.07 M parameters)
trained on `data.broad_documents()`, Python's English documentation
(`pydoc_data.topics`) and the standard library's own code except the
`data.FINETUNE_PACKAGES`, which it never reads (the comparison's
`--corpus unseen-packages`; its default corpus is a task over code the
base did read, `data.function_documents`). The
loss on held-out windows of that text is measured every `EVAL_EVERY`
steps; the recipe below ran until it had flattened (see the curve in the
preset's `keras_lora_base.json`, which also records the command, the
corpus, the versions and the time it took). Weights are stored as
float16 (keras-hub loads them into float32); the held-out loss is
measured on the model loaded back from the file.

Pre-training is seeded, so a rebuild with the same Python (whose standard
library is the corpus), backend and versions gives the same model up to
floating-point differences between machines.
"""

import argparse
import platform
import sys
import time

from keras_lora.comparison import base_model, data
from keras_lora.comparison.config import ComparisonConfig
from keras_lora.comparison.progress import status
from keras_lora.files.atomic import atomic_write_dir

# The shipped base's sizes and pre-training schedule (ComparisonConfig
# fields; everything else keeps its default).
RECIPE = dict(
    vocabulary_size=2048,
    num_layers=4,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=512,
    sequence_length=128,
    pretrain_steps=4500,
    pretrain_batch_size=16,
    pretrain_learning_rate=3e-3,
    pretrain_warmup_fraction=0.02,
    seed=0,
)
EVAL_EVERY = 250
HELD_OUT_WINDOWS = 128
WEIGHTS_DTYPE = "float16"
# The per-step training loss is kept as means over this many steps.
LOSS_CURVE_EVERY = 50
# `--tiny`: the tiny comparison's sizes on 60 KB of the same text.
TINY_BYTES = 60_000
TINY_EVAL_EVERY = 4
_PROG = "python -m keras_lora.comparison.shipped"


def recipe_config(tiny=False, **overrides):
    """The `ComparisonConfig` holding the build's settings."""
    if tiny:
        return ComparisonConfig.tiny(**overrides)
    return ComparisonConfig(**dict(RECIPE, **overrides))


def build_shipped_base(
    directory=base_model.SHIPPED_PRESET,
    tiny=False,
    steps=None,
    overwrite=False,
    progress=True,
    command=None,
):
    """Pre-trains the shipped base model into `directory` (atomically).

    Args:
        directory: where the preset goes (default: inside the package).
        tiny: the tiny comparison's sizes on `TINY_BYTES` of the text (a
            seconds-long build, for tests).
        steps: pre-training steps instead of the recipe's.
        overwrite: replace a preset already in `directory` (otherwise
            that is an error).
        progress: print progress.
        command: the command line to record (default: this process's).

    Returns:
        The build record written to `keras_lora_base.json`.
    """
    overrides = {} if steps is None else {"pretrain_steps": steps}
    config = recipe_config(tiny, **overrides)
    if not overwrite and _holds_preset(directory):
        raise FileExistsError(
            f"--output: '{directory}' already holds a preset. Pass "
            "--overwrite to replace it, or choose another --output."
        )
    started = time.perf_counter()
    documents = data.broad_documents(TINY_BYTES if tiny else None)
    corpus = (
        "pydoc_data.topics + the standard library's code without "
        + ", ".join(data.FINETUNE_PACKAGES)
    )
    info = {}

    def write(tmp):
        built = base_model.pretrain(
            config,
            documents,
            tmp,
            corpus,
            progress=progress,
            eval_every=TINY_EVAL_EVERY if tiny else EVAL_EVERY,
            weights_dtype=WEIGHTS_DTYPE,
            held_out_windows=HELD_OUT_WINDOWS,
        )
        info.update(_record(config, built, command, started))
        info["eval_every"] = TINY_EVAL_EVERY if tiny else EVAL_EVERY
        base_model.write_info(tmp, info)

    atomic_write_dir(directory, write)
    status(
        f"wrote {directory}: held-out loss {info['held_out_loss']:.3f} "
        f"after {config.pretrain_steps} steps "
        f"({info['build_seconds'] / 60:.0f} min)",
        progress,
    )
    return info


def _holds_preset(directory):
    import os

    return os.path.isfile(os.path.join(directory, "config.json"))


def _record(config, built, command, started):
    """The JSON record: recipe, corpus, curves, versions, command."""
    import keras
    import keras_hub

    losses = built.pop("loss_curve")
    every = LOSS_CURVE_EVERY
    built["loss_curve_means"] = {
        "every": every,
        "values": [
            round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4)
            for i in range(0, len(losses), every)
        ],
    }
    recipe = {name: getattr(config, name) for name in RECIPE}
    return {
        **built,
        "source": "shipped",
        "name": base_model.SHIPPED_NAME,
        "command": command or " ".join([_PROG, *sys.argv[1:]]),
        "recipe": recipe,
        "finetune_packages_excluded": list(data.FINETUNE_PACKAGES),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "build_seconds": time.perf_counter() - started,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Pre-train the small GPT-2 that `keras-lora compare` "
        "ships and fine-tunes (tens of minutes on a 2-core CPU).",
    )
    parser.add_argument(
        "--output",
        default=base_model.SHIPPED_PRESET,
        help="preset directory to write (default: the package's own, "
        "%(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"pre-training steps (default: {RECIPE['pretrain_steps']})",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a seconds-long build at the tiny comparison's sizes (tests)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing preset"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        build_shipped_base(
            args.output,
            tiny=args.tiny,
            steps=args.steps,
            overwrite=args.overwrite,
            progress=not args.quiet,
            command=" ".join(
                [_PROG, *(sys.argv[1:] if argv is None else argv)]
            ),
        )
    except FileExistsError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
