"""keras.io's "Parameter-efficient fine-tuning of GPT-2 with LoRA", with
keras_lora.

The keras.io tutorial (examples/nlp/parameter_efficient_finetuning_of_gpt2_
with_lora.py in keras-team/keras-io) is written against `keras_nlp`. This
script follows its flow step by step, with two replacements:

- its hand-written GPU-memory callback -> `kl.callbacks.MemoryUsage`
  (device memory on a GPU, the process's resident memory on a CPU);
- its hand-written `LoraLayer` swapped into every block's `_query_dense`
  and `_value_dense` -> `kl.apply_lora(model, kl.LoraConfig(rank=4,
  alpha=32, target_modules=["query", "value"]))`, and its manual merge ->
  `kl.merge_adapters`.

The flow: load `GPT2CausalLM.from_preset` with its preprocessor (raw text
in, so `fit` tokenizes inside the `tf.data` pipeline, as in the tutorial),
generate before training, fine-tune every weight with the tutorial's AdamW
(5e-5, weight decay 0.01 without layer norms and biases, epsilon 1e-6,
global clip norm 1.0), generate, reload the preset, fine-tune LoRA rank 4
(alpha 32) on query/value with the same optimizer, merge, generate, and
compare peak memory and parameter counts.

    # offline: a local keras-hub preset directory (save_to_preset)
    KERAS_BACKEND=jax python examples/keras_io_gpt2_lora.py --preset DIR
    # where a network exists: the tutorial's own model
    KERAS_BACKEND=jax python examples/keras_io_gpt2_lora.py \\
        --preset gpt2_base_en --batches 500

Without `--preset`, the small GPT-2 that ships with keras_lora for
`keras-lora compare` is used (pre-trained offline on Python's
documentation and most of its standard library). The text is the
tutorial's stand-in: the tutorial fine-tunes on Reddit TIFU posts
(`tensorflow_datasets`, a download); offline this script uses paragraphs
of the standard-library packages that base model never read (e-mail,
HTTP, URLs, ...), or `--data FILE` (one document per blank-line-separated
paragraph).
"""

import argparse
import json
import sys
import time

import keras
import keras_nlp  # the tutorial's import; an alias of keras_hub today

import keras_lora as kl

# The keras.io tutorial's settings.
BATCH_SIZE = 32
SEQUENCE_LENGTH = 128
LEARNING_RATE = 5e-5
RANK = 4
ALPHA = 32.0
PROMPTS = ("I like basketball", "def ")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="The keras.io GPT-2 LoRA tutorial's flow with "
        "keras_lora (full fine-tuning, then LoRA on query/value)."
    )
    parser.add_argument(
        "--preset",
        help="keras-hub/keras_nlp preset: a local directory or a name such "
        "as gpt2_base_en (downloaded by keras-hub). Default: the small "
        "offline GPT-2 that ships for `keras-lora compare`",
    )
    parser.add_argument(
        "--data", help="a text file; paragraphs become training documents"
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=40,
        help="training batches per run (the tutorial takes 500 batches of "
        "Reddit TIFU; default %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--sequence-length", type=int, default=SEQUENCE_LENGTH)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=LEARNING_RATE,
        help="AdamW learning rate for both runs (the tutorial's default "
        "%(default)g)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=64,
        help="generated length (the tutorial uses 200)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def documents(path=None, limit=4000):
    """Short text documents, as the tutorial's Reddit posts are."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        parts = text.split("\n\n")
    else:
        from keras_lora.comparison import data

        parts = []
        for source in data.finetune_package_documents(2_000_000):
            parts += source.split("\n\n")
    parts = [p.strip() for p in parts if len(p.strip()) > 40]
    if not parts:
        raise ValueError(
            f"--data: no paragraphs of more than 40 characters in {path!r}; "
            "separate documents with blank lines."
        )
    return parts[:limit]


def text_dataset(texts, batch_size, batches):
    """Raw strings, batched: the preprocessor tokenizes inside `fit`."""
    import tensorflow as tf

    texts = (texts * (batches * batch_size // len(texts) + 1))[
        : batches * batch_size
    ]
    return (
        tf.data.Dataset.from_tensor_slices(texts)
        .batch(batch_size)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )


def default_preset():
    """The small GPT-2 that `keras-lora compare` fine-tunes (shipped)."""
    from keras_lora.comparison import ComparisonConfig, base_model

    preset, _ = base_model.prepare_base(ComparisonConfig())
    return preset


def load_model(preset, sequence_length):
    # As in the tutorial: the preprocessor first, with its sequence length.
    preprocessor = keras_nlp.models.GPT2CausalLMPreprocessor.from_preset(
        preset, sequence_length=sequence_length
    )
    return keras_nlp.models.GPT2CausalLM.from_preset(
        preset, preprocessor=preprocessor
    )


def compile_model(model, learning_rate):
    """The tutorial's optimizer, loss and metric, for both runs."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=0.01,
        epsilon=1e-6,
        global_clipnorm=1.0,  # gradient clipping by norm, as in the paper
    )
    # Exclude layer-norm and bias terms from weight decay.
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.exclude_from_weight_decay(var_names=["gamma"])
    optimizer.exclude_from_weight_decay(var_names=["beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )


def generate_text(model, prompt, max_length):
    start = time.perf_counter()
    output = model.generate(prompt, max_length=max_length)
    seconds = time.perf_counter() - start
    print(f"  {prompt!r} -> {output!r}  ({seconds:.2f} s)")
    return {"prompt": prompt, "output": output, "seconds": seconds}


def train(model, dataset, learning_rate, label):
    """Compiles and fits one epoch, recording memory like the tutorial."""
    memory = kl.callbacks.MemoryUsage(batches=(1,), every=10)
    timer = kl.callbacks.StepTimer(warmup=2)
    compile_model(model, learning_rate)
    print(f"{label}: fine-tuning")
    history = model.fit(dataset, epochs=1, callbacks=[memory, timer], verbose=2)
    return {
        "loss": float(history.history["loss"][-1]),
        "memory": memory.summary(),
        "median_step_time_s": timer.median_step_time,
    }


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    preset = args.preset or default_preset()
    texts = documents(args.data)
    dataset = text_dataset(texts, args.batch_size, args.batches)
    print(f"backend {keras.backend.backend()}, preset {preset}")
    print(f"{len(texts)} documents, {args.batches} batches per run")
    results = {"backend": keras.backend.backend(), "preset": preset}

    # Full fine-tuning, as in the tutorial's first part.
    gpt2_lm = load_model(preset, args.sequence_length)
    print("before fine-tuning:")
    results["base_samples"] = [
        generate_text(gpt2_lm, p, args.max_length) for p in PROMPTS
    ]
    trainable, total = kl.count_parameters(gpt2_lm)
    results["full"] = train(gpt2_lm, dataset, args.learning_rate, "full")
    results["full"]["trainable_params"] = int(trainable)
    results["full"]["samples"] = [
        generate_text(gpt2_lm, p, args.max_length) for p in PROMPTS
    ]
    del gpt2_lm

    # LoRA: the tutorial swaps its own layer into every block's query and
    # value projections and freezes the rest; keras_lora does both.
    keras.utils.set_random_seed(args.seed)
    lora_model = load_model(preset, args.sequence_length)
    kl.apply_lora(
        lora_model,
        kl.LoraConfig(
            rank=RANK, alpha=ALPHA, target_modules=["query", "value"]
        ),
    )
    kl.print_trainable_parameters(lora_model)
    trainable, total = kl.count_parameters(lora_model)
    results["lora"] = train(lora_model, dataset, args.learning_rate, "LoRA")
    results["lora"]["trainable_params"] = int(trainable)
    results["lora"]["total_params"] = int(total)
    # The tutorial merges the adapters into the kernels for inference.
    kl.merge_adapters(lora_model)
    results["lora"]["samples"] = [
        generate_text(lora_model, p, args.max_length) for p in PROMPTS
    ]

    for mode in ("full", "lora"):
        peak = results[mode]["memory"]["peak_bytes"]
        trainable = results[mode]["trainable_params"]
        print(
            f"{mode}: peak memory {peak / 2**20:,.0f} MiB, trainable "
            f"parameters {trainable:,}"
        )
    if args.json:
        from keras_lora.files.atomic import atomic_write_file

        def write(tmp, _scratch):
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2, default=str)

        atomic_write_file(args.json, write)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
