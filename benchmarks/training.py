"""W1/W2: a GPT-2 training step, full fine-tuning vs three LoRA options.

One Keras backend per process. Variants, timed interleaved in one run:

full fine-tuning, Keras's built-in LoRA, keras_lora and PEFT (built in
`benchmarks.gpt2_variants`; PEFT runs in every backend's process, so that
the keras_lora/PEFT ratio comes from the same interleaved run). This module
measures memory, times the variants interleaved and writes the JSON; the
targets and the markdown report are in `benchmarks.training_report`.

Run through `python -m benchmarks training`, or directly with
`KERAS_BACKEND=jax python -m benchmarks.training --out result.json`.
"""

import argparse
import datetime
import sys

import keras
import numpy as np

from benchmarks import common
from benchmarks.device_memory import device_meter
from benchmarks.gpt2_variants import (
    LEARNING_RATE,
    RANK,
    TARGETS,
    VARIANTS,
    WORKLOADS,
    build_variant,
)
from benchmarks.training_report import (
    RATIOS,
    evaluate_targets,
    render_markdown,
)

# `python -m benchmarks` calls `main(argv)` and `render_markdown(results,
# command)` of each workload module.
__all__ = ["main", "render_markdown"]

# Steps per variant: `memory_warmup` (compiles, creates the optimizer
# state) + `memory_steps` (high-water mark) untimed, then `warmup` +
# `repeats` interleaved rounds.
FULL = {
    "warmup": 0,
    "repeats": 8,
    "min_repeats": 5,
    "max_other_share": 0.05,
    "max_seconds": 100.0,
    "memory_warmup": 1,
    "memory_steps": 1,
}
QUICK = {
    "warmup": 0,
    "repeats": 3,
    "min_repeats": 2,
    "max_other_share": 1.0,
    "max_seconds": 5.0,
    "memory_warmup": 1,
    "memory_steps": 1,
}
# The settings that go to `common.time_interleaved_quiet`.
TIMING_KEYS = (
    "warmup",
    "repeats",
    "min_repeats",
    "max_other_share",
    "max_seconds",
)


# -- memory ------------------------------------------------------------------


def build_and_measure(name, shape, settings, backend, log=print, build=None):
    """Builds variant `name` (with `build()`, a `Variant`, if given) and
    measures its training-memory overhead.

    Resident memory is read once the model is built (before the optimizer
    state exists); then `memory_warmup` steps run (compilation, optimizer
    state), the high-water mark is reset and `memory_steps` more steps
    run. Overhead = high-water mark - resident memory after the build:
    optimizer state, gradients, activations and compiled programs, but
    not the one-off peak of compiling. On a GPU, the device's peak from
    the build to the last of these steps is recorded too
    (`benchmarks.device_memory`; PEFT's through PyTorch).
    """
    common.release_free_memory()
    before = common.rss_bytes()
    device = device_meter("torch" if name == "peft" else backend)
    if device is not None:
        device.start()
    if build is None:
        variant = build_variant(
            name, shape, jit_compile=settings.get("jit_compile", "auto")
        )
    else:
        variant = build()
    common.release_free_memory()
    built = common.rss_bytes()
    if device is not None:
        device.mark_built()
    losses = [variant.step() for _ in range(settings["memory_warmup"])]
    common.release_free_memory()
    common.reset_peak_rss()
    losses += [variant.step() for _ in range(settings["memory_steps"])]
    peak = common.peak_rss_bytes()
    memory = {
        "model_mb": _mb(built - before) if built and before else None,
        "peak_overhead_mb": _mb(peak - built) if peak and built else None,
        "steady_overhead_mb": _mb(common.rss_bytes() - built)
        if built
        else None,
    }
    if device is not None:
        memory.update(device.finish())
    log(
        f"[{backend}] {name}: {variant.trainable_params:,} trainable of "
        f"{variant.total_params:,}; first loss {losses[0]:.4f}; training "
        f"memory overhead {memory['peak_overhead_mb']} MB"
        + (
            ""
            if device is None
            else f"; device peak {memory['device_peak_mb']} MB"
            + ("" if memory["device_peak_exact"] else " (upper bound)")
        )
    )
    info = {
        "trainable_params": variant.trainable_params,
        "total_params": variant.total_params,
        "first_loss": losses[0],
        "losses": losses,
        "memory": memory,
    }
    return variant, info


def _mb(n_bytes):
    return round(n_bytes / 2**20, 1)


def warm_up_runtime(backend, settings, log=print):
    """Trains a tiny GPT-2 once, so one-off runtime set-up (thread pools,
    compiler, autograd engine) is not charged to the first variant."""
    tiny = dict(WORKLOADS["w1"], num_layers=1, hidden_dim=16, num_heads=2)
    tiny.update(vocab=64, seq=8, batch=2)
    for name in ("full", "peft"):
        try:
            variant = build_variant(
                name, tiny, jit_compile=settings.get("jit_compile", "auto")
            )
        except ImportError:
            continue
        variant.step()
        variant.step()
    log(f"[{backend}] runtime warmed up")


# -- running -------------------------------------------------------------


def run_workload(
    backend, key, settings, variants, log=print, shape=None, on_variant=None
):
    """Measures and times `variants` on workload `key` (its shape from
    `WORKLOADS` unless `shape` is given); `on_variant(name, info)` is
    called after each variant's memory measurement (partial results)."""
    shape = WORKLOADS[key] if shape is None else shape
    log(
        f"[{backend}] {shape['label']}: {shape['num_layers']} layers, "
        f"hidden {shape['hidden_dim']}, {shape['num_heads']} heads, seq "
        f"{shape['seq']}, batch {shape['batch']}, LoRA rank {RANK} on "
        f"{shape['targets']}"
    )
    built, infos, skipped = {}, {}, {}
    for name in variants:
        try:
            built[name], infos[name] = build_and_measure(
                name, shape, settings, backend, log=log
            )
            if on_variant is not None:
                on_variant(name, infos[name])
        except ImportError as error:
            skipped[name] = f"not installed: {error}"
            log(f"[{backend}] {name}: skipped ({skipped[name]})")
    timing = {k: settings[k] for k in TIMING_KEYS}
    times, stats = common.time_interleaved_quiet(
        {name: variant.step for name, variant in built.items()}, **timing
    )
    log(
        f"[{backend}] {key}: kept {stats['rounds_kept']} rounds, discarded "
        f"{stats['rounds_discarded']} (CPU busy), {stats['seconds']:.0f} s"
        + ("; WARNING: never quiet" if stats["contended"] else "")
    )
    for name in built:
        infos[name]["step"] = common.summarize(times[name])
        log(
            f"[{backend}] {key}: {name:<10} step "
            f"{infos[name]['step']['median_ms']:9.1f} ms"
        )
    ratios = {"step": {}, "memory": {}}
    for label, numerator, denominator in RATIOS:
        if numerator in built and denominator in built:
            ratios["step"][label] = common.paired_ratio(
                times[numerator], times[denominator]
            )
            top = infos[numerator]["memory"]["peak_overhead_mb"]
            bottom = infos[denominator]["memory"]["peak_overhead_mb"]
            ratios["memory"][label] = (
                top / bottom if top is not None and bottom else None
            )
        else:
            ratios["step"][label] = ratios["memory"][label] = None
    keras_losses = [
        infos[n]["first_loss"]
        for n in ("full", "builtin", "keras_lora")
        if n in infos
    ]
    checks = {
        "max_first_loss_diff_keras_variants": float(
            np.max(keras_losses) - np.min(keras_losses)
        )
        if len(keras_losses) > 1
        else None,
        "all_losses_finite": all(
            np.all(np.isfinite(info["losses"])) for info in infos.values()
        ),
    }
    return {
        "label": shape["label"],
        "shape": dict(shape),
        "rank": RANK,
        "targets": {
            "keras": TARGETS[shape["targets"]]["keras"],
            "peft": TARGETS[shape["targets"]]["peft"],
        },
        "variants": infos,
        "skipped": skipped,
        "ratios": ratios,
        "targets_met": evaluate_targets(key, ratios),
        "checks": checks,
        "timing_stats": stats,
    }


def backend_settings(backend, jit_compile):
    resolved = {
        "jax": "jax.jit (XLA)",
        "tensorflow": "tf.function + XLA (jit_compile)",
        "torch": "eager (Keras 'auto' leaves PyTorch uncompiled)",
    }[backend]
    if jit_compile is False:
        resolved = {
            "jax": "jax.jit (JAX always compiles)",
            "tensorflow": "tf.function, no XLA",
            "torch": "eager",
        }[backend]
    elif jit_compile is True and backend == "torch":
        resolved = "torch.compile"
    return resolved


def run(workloads, settings, variants, log=print):
    backend = keras.backend.backend()
    machine = common.machine_info(backend)
    try:
        import torch

        machine["torch_threads"] = torch.get_num_threads()
        machine["peft_versions"] = _peft_versions()
    except ImportError:
        pass
    result = {
        "benchmark": "training",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            **settings,
            "keras_step": "model.train_on_batch (Keras's compiled train "
            "step, as in fit)",
            "keras_compile": backend_settings(
                backend, settings.get("jit_compile", "auto")
            ),
            "peft_step": "eager PyTorch: zero_grad, forward with labels, "
            "backward, optimizer.step",
            "optimizer": f"Adam(lr={LEARNING_RATE})",
            "loss": "next-token cross-entropy over the full vocabulary "
            "(Keras variants: kl.losses.TokenCrossEntropy, on (tokens, "
            "vocabulary) rows; PEFT: Hugging Face's, also on rows)",
            "dtype": "float32",
            "dropout": 0.0,
        },
        "load_average_start": common.load_average(),
        "workloads": {},
    }
    monitor = common.CpuMonitor()
    warm_up_runtime(backend, settings, log=log)
    for key in workloads:
        result["workloads"][key] = run_workload(
            backend, key, settings, variants, log=log
        )
    common.record_end_load(result, monitor)
    return result


def _peft_versions():
    versions = {}
    for name in ("peft", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


# -- command line ------------------------------------------------------------


def parse_jit(value):
    return {"auto": "auto", "true": True, "false": False}[value.lower()]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training",
        description="W1 (and W2) GPT-2 training step on the current "
        "KERAS_BACKEND: full fine-tuning, Keras built-in LoRA, keras_lora, "
        "PEFT.",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="Few steps (smoke test)."
    )
    parser.add_argument(
        "--with-w2",
        action="store_true",
        help="Also run W2 (GPT-2 base shape, LoRA on all linear layers).",
    )
    parser.add_argument(
        "--workloads",
        help="Comma-separated workloads, overriding --with-w2 (w1,w2).",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"Comma-separated variants (default: {','.join(VARIANTS)}).",
    )
    parser.add_argument(
        "--jit-compile",
        type=parse_jit,
        default="auto",
        help="Keras compile(jit_compile=...): auto (default), true, false.",
    )
    common.add_timing_args(parser)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    settings["jit_compile"] = args.jit_compile
    common.apply_timing_args(settings, args)
    if args.workloads:
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    else:
        workloads = ["w1", "w2"] if args.with_w2 else ["w1"]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for value, known, what in (
        (workloads, WORKLOADS, "workload"),
        (variants, VARIANTS, "variant"),
    ):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {known}")

    def log(message):
        print(message, flush=True)

    result = run(workloads, settings, variants, log=log)
    result["settings"]["quick"] = bool(args.quick)
    common.write_json(args.out, result)
    log(f"[{result['backend']}] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
