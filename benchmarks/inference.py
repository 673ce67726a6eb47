"""W3: inference cost of LoRA on the W1 model (gpt2-mini), one backend.

Variants of the same keras-hub `GPT2CausalLM` (same base weights, LoRA
rank 4 on query/value, B non-zero), timed interleaved in one run:

- `base`: no LoRA;
- `builtin`: Keras's built-in LoRA (`backbone.enable_lora`), which
  rebuilds `W + A @ B` on every call;
- `unmerged`: `keras_lora.apply_lora`, the branch computed on every call;
- `merged`: the same after `keras_lora.merge_adapters` (folded in; the
  LoRA layers stay and skip their branch);
- `unloaded`: `keras_lora.merge_and_unload`, a plain Keras model.

Each times one forward pass over a batch (logits for every position):
`jax.jit(model.stateless_call)`, `tf.function(jit_compile=True)` (XLA, as
Keras's `predict` picks on TensorFlow) or eager PyTorch under `no_grad`.

Run through `python -m benchmarks inference`, or directly with
`KERAS_BACKEND=jax python -m benchmarks.inference --out result.json`.
"""

import argparse
import datetime
import sys

import keras
import numpy as np

import keras_lora as kl
from benchmarks import common, gpt2_variants

VARIANTS = ("base", "builtin", "unmerged", "merged", "unloaded")
RATIOS = (
    ("merged/base", "merged", "base"),
    ("unloaded/base", "unloaded", "base"),
    ("unmerged/base", "unmerged", "base"),
    ("builtin/base", "builtin", "base"),
)
# The target: merged inference costs the same as the base model.
TARGET = ("merged/base", 1.02)
FULL = {
    "warmup": 1,
    "repeats": 10,
    "min_repeats": 6,
    "max_other_share": 0.05,
    "max_seconds": 60.0,
}
QUICK = {
    "warmup": 1,
    "repeats": 3,
    "min_repeats": 2,
    "max_other_share": 1.0,
    "max_seconds": 5.0,
}


def build_models(shape, rank=gpt2_variants.RANK, seed=0):
    """`{variant: GPT2CausalLM}` with the same base weights; the LoRA
    variants share one non-zero adapter (the built-in one its own)."""
    rng = np.random.default_rng(seed + 1)
    models = {"base": gpt2_variants.build_keras_model("full", shape, seed=seed)}
    builtin = gpt2_variants.build_keras_model("builtin", shape, seed=seed)
    for b in builtin.weights:
        if b.path.endswith("lora_kernel_b"):
            b.assign(rng.normal(0.0, 0.02, b.shape).astype("float32"))
    models["builtin"] = builtin
    adapters = None
    for name in ("unmerged", "merged", "unloaded"):
        model = gpt2_variants.build_keras_model("keras_lora", shape, seed=seed)
        lora_layers = kl.lora_layers(model)
        if adapters is None:
            adapters = [
                [
                    rng.normal(0.0, 0.02, w.shape).astype("float32")
                    for w in layer.lora_weights()
                ]
                for layer in lora_layers
            ]
        for layer, values in zip(lora_layers, adapters, strict=True):
            for variable, value in zip(
                layer.lora_weights(), values, strict=True
            ):
                variable.assign(value)
        if name == "merged":
            kl.merge_adapters(model)
        elif name == "unloaded":
            model = kl.merge_and_unload(model)
        models[name] = model
    return models


def forward_fn(backend, model, x):
    """A callable running one forward pass of `model` on `x`; it blocks
    until done and returns the logits."""
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def call(trainable, frozen, x):
            return model.stateless_call(trainable, frozen, x)[0]

        return lambda: call(trainable, frozen, x).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        call = tf.function(jit_compile=True)(lambda x: model(x, training=False))
        return lambda: call(x)
    if backend == "torch":
        import torch

        def call():
            with torch.no_grad():
                return model(x, training=False)

        return call
    raise ValueError(f"Unsupported backend {backend!r}.")


def run(settings, log=print):
    backend = keras.backend.backend()
    load_start = common.load_average()
    monitor = common.CpuMonitor()
    shape = gpt2_variants.WORKLOADS["w1"]
    x, _ = gpt2_variants.keras_batch(shape)
    x = {k: keras.ops.convert_to_tensor(v) for k, v in x.items()}
    log(f"[{backend}] W3: building {len(VARIANTS)} variants of gpt2-mini")
    models = build_models(shape)
    fns = {name: forward_fn(backend, models[name], x) for name in VARIANTS}
    logits = {
        name: np.asarray(keras.ops.convert_to_numpy(fn()))
        for name, fn in fns.items()
    }

    def diff(a, b):
        return float(np.max(np.abs(logits[a] - logits[b])))

    checks = {
        "max_abs_diff_merged_vs_unmerged": diff("merged", "unmerged"),
        "max_abs_diff_unloaded_vs_unmerged": diff("unloaded", "unmerged"),
        "max_abs_diff_unmerged_vs_base": diff("unmerged", "base"),
        "unloaded_has_no_lora_layers": not kl.lora_layers(models["unloaded"]),
    }
    timing = {k: settings[k] for k in FULL}
    times, stats = common.time_interleaved_quiet(fns, **timing)
    log(
        f"[{backend}] W3: kept {stats['rounds_kept']} rounds, discarded "
        f"{stats['rounds_discarded']} (CPU busy), {stats['seconds']:.0f} s"
        + ("; WARNING: never quiet" if stats["contended"] else "")
    )
    variants = {}
    for name in VARIANTS:
        variants[name] = {
            "forward": common.summarize(times[name]),
            "params": gpt2_variants.count_params(models[name].weights),
        }
        log(
            f"[{backend}] W3: {name:<9} forward "
            f"{variants[name]['forward']['median_ms']:8.1f} ms"
        )
    ratios = {
        label: common.paired_ratio(times[a], times[b]) for label, a, b in RATIOS
    }
    label, bound = TARGET
    share = monitor.other_share()
    return {
        "benchmark": "inference",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(backend),
        "settings": {
            **settings,
            "forward": {
                "jax": "jax.jit(model.stateless_call)",
                "tensorflow": "tf.function(jit_compile=True) (XLA)",
                "torch": "eager under torch.no_grad()",
            }[backend],
            "dtype": "float32",
        },
        "shape": dict(shape),
        "rank": gpt2_variants.RANK,
        "variants": variants,
        "ratios": ratios,
        "target": {
            "ratio": label,
            "bound": bound,
            "value": ratios[label],
            "met": ratios[label] <= bound,
        },
        "checks": checks,
        "timing_stats": stats,
        "load_average_start": load_start,
        "load_average_end": common.load_average(),
        "other_processes_cpu_share": None if share is None else round(share, 4),
    }


# -- markdown --------------------------------------------------------------


def render_markdown(results, command):
    """The markdown report for a list of per-backend results."""
    first = results[0]
    shape = first["shape"]
    title = "Inference: merged and unmerged LoRA vs the base model (W3)"
    lines = common.report_header(title, command, results) + [
        f"Forward pass (logits over the full vocabulary) of gpt2-mini "
        f"({shape['num_layers']} layers, hidden {shape['hidden_dim']}, "
        f"{shape['num_heads']} heads, vocabulary {shape['vocab']}) on a "
        f"batch of {shape['batch']} x {shape['seq']} tokens, float32, "
        f"random weights; LoRA rank {first['rank']} on query/value with "
        "non-zero B. `merged`: `kl.merge_adapters` (LoRA layers stay, "
        "branch skipped); `unloaded`: `kl.merge_and_unload` (plain Keras "
        "model); `builtin`: Keras `enable_lora`. Forward: "
        + "; ".join(
            f"{r['backend']} {r['settings']['forward']}" for r in results
        )
        + ". Variants timed interleaved; rounds timed while other "
        "processes used more than "
        f"{100 * first['settings']['max_other_share']:.0f}% of the CPU are "
        f"discarded; median of up to {first['settings']['repeats']} kept "
        "rounds; ratios are medians of per-round ratios.",
        "",
        "Load: " + common.load_line(results) + ".",
        "",
        "## Median forward time (ms)",
        "",
    ]
    rows = []
    for result in results:
        row = {"backend": result["backend"]}
        for name, info in result["variants"].items():
            row[name] = info["forward"]["median_ms"]
        rows.append(row)
    lines.append(common.markdown_table(rows))
    lines += ["## Ratios (same run) and checks", ""]
    rows = []
    for result in results:
        row = {"backend": result["backend"]}
        row.update(result["ratios"])
        target = result["target"]
        row["target"] = f"{target['ratio']} <= {target['bound']:.2f}: " + (
            "yes" if target["met"] else "**no**"
        )
        checks = result["checks"]
        row["max |merged - unmerged|"] = (
            f"{checks['max_abs_diff_merged_vs_unmerged']:.1e}"
        )
        row["max |unmerged - base|"] = (
            f"{checks['max_abs_diff_unmerged_vs_base']:.1e}"
        )
        stats = result["timing_stats"]
        row["rounds"] = str(stats["rounds_kept"]) + (
            " (contended)" if stats["contended"] else ""
        )
        rows.append(row)
    lines.append(common.markdown_table(rows))
    return "\n".join(lines)


# -- command line ------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference",
        description="W3 inference benchmark on the current KERAS_BACKEND.",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="Few calls (smoke test)."
    )
    common.add_timing_args(parser)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    common.apply_timing_args(settings, args)

    def log(message):
        print(message, flush=True)

    result = run(settings, log=log)
    result["settings"]["quick"] = bool(args.quick)
    common.write_json(args.out, result)
    log(f"[{result['backend']}] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
