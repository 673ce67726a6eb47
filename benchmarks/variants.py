"""LoRA variants on the digits task: LoRA, LoRA+, DoRA and, on an int4
base, LoftQ against plain QLoRA.

The task is `examples/digits_lora.py`'s (its data and base-model code are
imported from it): an MLP (64 -> 64 -> 64 -> 10) pre-trained on
scikit-learn's digits with one digit kept rare, then adapted (rank 4,
alpha 8 on every Dense layer) on that digit plus a replay sample of the
others. Each variant starts from the same base weights and sees the same
batches in the same order:

- `lora`: plain LoRA, Adam;
- `lora_plus`: the same adapters, `kl.optimizers.lora_plus(Adam, ratio=16)`;
- `dora`: `LoraConfig(use_dora=True)`, Adam;
- `qlora_int4`: every Dense quantized to int4 by Keras (`layer.quantize`),
  then plain LoRA (B = 0), Adam;
- `loftq_int4`: `LoraConfig(init="loftq", loftq_mode="int4")` (5
  alternating steps) on the float base, Adam.

Measured: validation loss (cross-entropy on the whole test split) and the
rare digit's test accuracy every `eval_every` steps, over several seeds;
the distance of what each adapted layer computes with from its float
kernel at step 0 (`||W - (Q + s A B)|| / ||W||`, zero on a float base);
the train-step time of each variant relative to LoRA (compiled
`train_on_batch`, timed interleaved on one batch); the bytes training
holds per variant (trainable variables and optimizer state) and, on JAX,
the temporary memory XLA plans for one forward and backward pass.

    KERAS_BACKEND=jax python -m benchmarks.variants --out results.json
    python -m benchmarks variants          # every backend, markdown report
"""

import argparse
import datetime
import importlib.util
import os
import statistics

import keras
import numpy as np

import keras_lora as kl
from benchmarks import common
from keras_lora.layers import loftq

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples",
    "digits_lora.py",
)
VARIANTS = ("lora", "lora_plus", "dora", "qlora_int4", "loftq_int4")
LABELS = {
    "lora": "LoRA",
    "lora_plus": "LoRA+ (ratio 16)",
    "dora": "DoRA",
    "qlora_int4": "int4 base, LoRA (QLoRA)",
    "loftq_int4": "int4 base, LoftQ",
}
FULL = dict(
    seeds=3,
    steps=300,
    eval_every=50,
    batch=32,
    learning_rate=1e-3,
    ratio=16.0,
    epochs_base=20,
    warmup=5,
    repeats=60,
    min_repeats=20,
    max_other_share=0.05,
)
QUICK = dict(
    FULL,
    seeds=1,
    steps=20,
    eval_every=10,
    epochs_base=2,
    repeats=5,
    min_repeats=3,
    max_other_share=1.0,
)


def load_example():
    """The digits example as a module (its data and model helpers)."""
    spec = importlib.util.spec_from_file_location("digits_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adapted_model(example, base, variant, settings):
    """A compiled copy of `base` with `variant`'s adapters and optimizer."""
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    if variant == "qlora_int4":
        for layer in model.layers:
            layer.quantize("int4")
    config = kl.LoraConfig(
        rank=example.RANK,
        alpha=example.ALPHA,
        target_modules=[layer.name for layer in model.layers],
        use_dora=variant == "dora",
        init="loftq" if variant == "loftq_int4" else "default",
        loftq_mode="int4",
    )
    kl.apply_lora(model, config)
    optimizer = keras.optimizers.Adam(settings["learning_rate"])
    if variant == "lora_plus":
        optimizer = kl.optimizers.lora_plus(optimizer, settings["ratio"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def validation(example, model, x, y, rare):
    logits = example.logits_of(model, x)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    value = float(keras.ops.convert_to_numpy(loss(y, logits)))
    accuracy = example.per_digit_accuracy(logits, y)[rare]
    return value, float(accuracy)


def run_seed(example, seed, settings, log):
    """Trains every variant from one base model; returns curves and the
    models (for timing)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, x_test, y_train, y_test = example.load_data(seed)
    rare = 8
    base_idx = example.base_subset(y_train, rare, 5, rng)
    base = example.build_base_model()
    example.compile_for_training(base, 1e-3)
    base.fit(
        x_train[base_idx],
        y_train[base_idx],
        epochs=settings["epochs_base"],
        batch_size=32,
        verbose=0,
    )
    idx = example.finetune_subset(y_train, rare, 50, rng)
    order = np.concatenate(
        [
            rng.permutation(idx)
            for _ in range(
                settings["steps"] * settings["batch"] // len(idx) + 1
            )
        ]
    )
    kernels = [
        keras.ops.convert_to_numpy(layer.kernel) for layer in base.layers
    ]
    curves, models, errors = {}, {}, {}
    for variant in VARIANTS:
        model = adapted_model(example, base, variant, settings)
        errors[variant] = kernel_error(model, kernels)
        curve = [(0, *validation(example, model, x_test, y_test, rare))]
        for step in range(1, settings["steps"] + 1):
            batch = order[(step - 1) * settings["batch"] :][: settings["batch"]]
            model.train_on_batch(x_train[batch], y_train[batch])
            if step % settings["eval_every"] == 0:
                curve.append(
                    (step, *validation(example, model, x_test, y_test, rare))
                )
        curves[variant] = [
            {"step": s, "val_loss": v, "rare_accuracy": a} for s, v, a in curve
        ]
        log(
            f"seed {seed} {variant}: val loss {curve[0][1]:.3f} -> "
            f"{curve[-1][1]:.3f}, digit {rare} {curve[-1][2]:.1%}"
        )
        models[variant] = model
    batch = order[: settings["batch"]]
    return curves, errors, models, (x_train[batch], y_train[batch])


def kernel_error(model, kernels):
    """`||W - (Q + s A B)|| / ||W||` over all adapted layers: how far what
    they compute with is from the float kernels `W`."""
    layers = kl.lora_layers(model)
    effective = [loftq.effective_kernel(layer, "default") for layer in layers]
    difference = sum(
        float(np.sum((k - e) ** 2))
        for k, e in zip(kernels, effective, strict=True)
    )
    return (difference / sum(float(np.sum(k**2)) for k in kernels)) ** 0.5


def state_bytes(model):
    """Bytes of the trainable variables and of the optimizer's state."""

    def size(variables):
        return int(
            sum(
                np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables
            )
        )

    return {
        "trainable_bytes": size(model.trainable_variables),
        "optimizer_bytes": size(model.optimizer.variables),
    }


def jax_temp_bytes(model, x, y):
    """Temporary bytes XLA plans for loss and gradients (JAX only)."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss_of(trainable, frozen, x, y):
        logits, _ = model.stateless_call(trainable, frozen, x, training=True)
        return loss(y, logits)

    compiled = jax.jit(jax.grad(loss_of)).lower(trainable, frozen, x, y)
    analysis = compiled.compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run(settings, log=print):
    backend = keras.backend.backend()
    example = load_example()
    result = {
        "benchmark": "variants",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(backend),
        "settings": dict(settings, rank=example.RANK, alpha=example.ALPHA),
        "load_average_start": common.load_average(),
        "seeds": {},
    }
    monitor = common.CpuMonitor()
    with example.torch_single_thread():
        result["kernel_error"] = {}
        for seed in range(settings["seeds"]):
            curves, errors, models, (x, y) = run_seed(
                example, seed, settings, log
            )
            result["seeds"][str(seed)] = curves
            result["kernel_error"][str(seed)] = errors
        steps = {
            v: (lambda m=models[v]: m.train_on_batch(x, y)) for v in VARIANTS
        }
        times, stats = common.time_interleaved_quiet(
            steps,
            warmup=settings["warmup"],
            repeats=settings["repeats"],
            min_repeats=settings["min_repeats"],
            max_other_share=settings["max_other_share"],
        )
    result["timing"] = stats
    result["step"] = {}
    for variant in VARIANTS:
        result["step"][variant] = {
            **common.summarize(times[variant]),
            "ratio_to_lora": common.paired_ratio(times[variant], times["lora"]),
            **state_bytes(models[variant]),
            "jax_temp_bytes": jax_temp_bytes(models[variant], x, y),
        }
    common.record_end_load(result, monitor)
    return result


# -- markdown -----------------------------------------------------------------


def summary(result, variant, step_index=-1):
    """Mean and sample std over seeds of the val loss and rare accuracy."""
    points = [c[variant][step_index] for c in result["seeds"].values()]
    losses = [p["val_loss"] for p in points]
    accuracies = [p["rare_accuracy"] for p in points]
    spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
    return (
        points[0]["step"],
        statistics.mean(losses),
        spread,
        statistics.mean(accuracies),
    )


def render_markdown(results, command):
    settings = results[0]["settings"]
    lines = common.report_header("LoRA variants on digits", command, results)
    lines += [
        "Task: `examples/digits_lora.py` (MLP 64-64-64-10, digit 8 kept to "
        f"5 examples in the base data); rank {settings['rank']}, alpha "
        f"{settings['alpha']} on every Dense layer; Adam, learning rate "
        f"{settings['learning_rate']}, batch {settings['batch']}, "
        f"{settings['steps']} steps, the same batches for every variant; "
        f"validation loss on the whole test split, mean +- std over "
        f"{settings['seeds']} seeds. Step time: compiled `train_on_batch` "
        "on one batch, variants timed interleaved, median ratio to LoRA. "
        "Memory: bytes of the trainable variables plus optimizer state, "
        "and (JAX) XLA's planned temporary bytes for loss and gradients. "
        "Kernel error: `||W - (Q + s A B)|| / ||W||` at step 0 over all "
        "layers (`Q` the int4 base, dequantized; 0 on a float base).",
        "",
        f"Load: {common.load_line(results)}",
        "",
    ]
    rows = []
    for result in results:
        lora = result["step"]["lora"]
        lora_state = lora["trainable_bytes"] + lora["optimizer_bytes"]
        for variant in VARIANTS:
            step, start, _, _ = summary(result, variant, 0)
            middle = len(result["seeds"]["0"][variant]) // 2
            mid_step, mid, mid_std, _ = summary(result, variant, middle)
            end_step, end, end_std, accuracy = summary(result, variant)
            timing = result["step"][variant]
            state = timing["trainable_bytes"] + timing["optimizer_bytes"]
            temp = timing["jax_temp_bytes"]
            error = statistics.mean(
                e[variant] for e in result["kernel_error"].values()
            )
            rows.append(
                {
                    "backend": result["backend"],
                    "variant": LABELS[variant],
                    f"val loss @{step}": f"{start:.3f}",
                    f"val loss @{mid_step}": f"{mid:.3f} +- {mid_std:.3f}",
                    f"val loss @{end_step}": f"{end:.3f} +- {end_std:.3f}",
                    "digit 8 acc": f"{accuracy:.1%}",
                    "kernel error @0": f"{error:.4f}",
                    "step time vs LoRA": f"{timing['ratio_to_lora']:.2f}x",
                    "step ms": f"{timing['median_ms']:.2f}",
                    "state bytes vs LoRA": f"{state / lora_state:.2f}x",
                    "XLA temp bytes vs LoRA": (
                        "n/a"
                        if temp is None
                        else f"{temp / lora['jax_temp_bytes']:.2f}x"
                    ),
                }
            )
    lines.append(common.markdown_table(rows))
    contended = [r["backend"] for r in results if r["timing"]["contended"]]
    if contended:
        lines += [
            f"Timing on {', '.join(contended)}: the CPU was never quiet "
            "(see Load), so every round was kept; the variants were timed "
            "interleaved, which keeps their ratios comparable, but the "
            "milliseconds are those of a busy machine.",
            "",
        ]
    return "\n".join(lines) + "\n"


# -- command line -------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.variants",
        description="LoRA, LoRA+ and DoRA on the digits task (current "
        "KERAS_BACKEND).",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="Tiny run (smoke test)."
    )
    parser.add_argument("--seeds", type=int, help="Override the seed count.")
    parser.add_argument("--steps", type=int, help="Override the step count.")
    common.add_timing_args(parser)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for name in ("seeds", "steps"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    common.apply_timing_args(settings, args)

    def log(message):
        print(f"[{keras.backend.backend()}] {message}", flush=True)

    result = run(settings, log=log)
    result["settings"]["quick"] = bool(args.quick)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
