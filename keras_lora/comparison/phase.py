"""One fine-tuning phase: full fine-tuning or LoRA, measured.

`run_phase(spec)` loads the base preset, fine-tunes it (every weight, or
LoRA of rank `r` on the configured targets with the rest frozen), and
returns plain data: parameter counts, the per-step training loss, step time
and throughput (`StepTimer`), memory (`MemoryUsage`), validation loss and
perplexity after training, top-k samples, and the size of what must be
saved (the LoRA adapter directory, or the full weights).

It runs in a fresh worker process by default (`keras_lora.comparison.worker`)
so that each phase's memory is measured on its own; tests call it in
process. `spec` is JSON-compatible:

    {"mode": "full" | "lora", "config": ComparisonConfig.to_dict(),
     "preset": "<preset dir or name>", "windows": "<.npz from the runner>",
     "output_dir": "<directory>", "progress": true,
     "samples": true, "save": true}

The sweeps (`keras_lora.comparison.sweep`) run it in process with
`samples` and `save` off.
"""

import os
import tempfile

import numpy as np

MODES = ("full", "lora")


def run_phase(spec):
    """Runs one phase described by `spec`; returns its results as a dict."""
    import keras

    import keras_lora as kl
    from keras_lora.comparison import base_model, data, training
    from keras_lora.comparison.config import ComparisonConfig
    from keras_lora.comparison.progress import Clock, TqdmCallback, status

    mode = spec["mode"]
    if mode not in MODES:
        raise ValueError(f"run_phase: mode must be one of {MODES}, got {mode}")
    config = ComparisonConfig.from_dict(spec["config"])
    progress = spec.get("progress", True)
    windows = np.load(spec["windows"])
    train, val = windows["train"], windows["validation"]

    clock = Clock()
    keras.utils.set_random_seed(config.seed)
    causal_lm = base_model.load_causal_lm(
        spec["preset"], config.sequence_length
    )
    if mode == "lora":
        training.apply_lora(causal_lm, config)
        learning_rate = config.lora_learning_rate
    else:
        learning_rate = config.full_learning_rate
    trainable, total = kl.count_parameters(causal_lm)
    clock.lap("load")
    model = training.training_model(causal_lm)
    training.compile_for_training(
        model,
        learning_rate=training.cosine_schedule(
            learning_rate, config.steps, config.warmup_fraction
        ),
        weight_decay=config.weight_decay,
        epsilon=config.epsilon,
        clipnorm=config.clipnorm,
    )
    x, y = data.as_inputs(
        data.training_windows(
            train, config.steps, config.batch_size, config.seed
        )
    )

    memory = kl.callbacks.MemoryUsage(
        batches=(1,), every=max(1, config.steps // 10)
    )
    timer = kl.callbacks.StepTimer(
        config.batch_size, config.sequence_length, warmup=2
    )
    losses = training.LossHistory()
    callbacks = [memory, timer, losses]
    if progress:
        label = spec.get("label") or f"fine-tuning: {mode}"
        callbacks.append(TqdmCallback(config.steps, label))
    clock.lap("prepare")
    model.fit(
        x,
        y,
        batch_size=config.batch_size,
        epochs=1,
        shuffle=False,  # already shuffled; keeps the two phases' order equal
        verbose=0,
        callbacks=callbacks,
    )
    train_seconds = clock.lap("train")

    if spec.get("samples", True):
        status(f"{mode}: evaluating and generating samples", progress)
    after = training.evaluate_loss(model, val, config.batch_size)
    clock.lap("evaluate")
    samples = []
    if spec.get("samples", True):
        samples = training.generate_samples(
            causal_lm,
            config.prompts,
            config.generate_length,
            top_k=config.sample_top_k,
            seed=config.sample_seed,
        )
        clock.lap("generate")
    saved = {}
    if spec.get("save", True):
        saved = _save_size(kl, causal_lm, mode, spec["output_dir"])
        clock.lap("save")
    return {
        "mode": mode,
        "backend": keras.backend.backend(),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "learning_rate": learning_rate,
        "train_seconds": train_seconds,
        "loss_curve": losses.losses,
        "validation_after": after,
        "timer": timer.summary(),
        "memory": memory.summary(),
        "samples": samples,
        "seconds": clock.laps,
        **saved,
    }


def _save_size(kl, causal_lm, mode, output_dir):
    """Saves what this phase produces and measures it on disk.

    LoRA: the adapter directory (`kl.save_adapter`), kept in `output_dir`.
    Full: the model's weights (`save_weights`), measured in a temporary
    directory and deleted (the full checkpoint can be large).
    """
    if mode == "lora":
        directory = os.path.join(output_dir, "lora_adapter")
        kl.save_adapter(causal_lm, directory)
        return {
            "saved_bytes": _tree_size(directory),
            "saved_path": directory,
            "saved_what": "LoRA adapter (kl.save_adapter)",
        }
    with tempfile.TemporaryDirectory(dir=output_dir) as scratch:
        path = os.path.join(scratch, "full.weights.h5")
        causal_lm.save_weights(path)
        size = os.path.getsize(path)
    return {
        "saved_bytes": size,
        "saved_path": None,
        "saved_what": "full weights (save_weights, .weights.h5)",
    }


def _tree_size(directory):
    total = 0
    for root, _dirs, names in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return total
