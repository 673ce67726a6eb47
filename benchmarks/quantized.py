"""QLoRA: LoRA training on a float32, int8 or int4 GPT-2 base (W2 shape).

One Keras backend per process. The model is the W2 shape of
`benchmarks.gpt2_variants` (keras-hub `GPT2CausalLM`, 12 layers, hidden
768, vocabulary 50257, sequence 128, batch 4; LoRA rank 4 on every
linear layer of the blocks and on the tied token embedding:
`QLORA_TARGETS`). Its base is left in float32 or quantized by
Keras (`model.quantize("int8" | "int4")`, before LoRA is added, as in
Keras's QLoRA recipe), and LoRA comes from keras_lora (`kl.apply_lora`)
or from Keras's built-in `enable_lora` on the same quantized base (the
anchor). Per variant:

- bytes of the base weights (every model variable but the adapters, at
  its stored dtype: packed int4 kernels, scales and zero points count);
- peak resident memory of a training step (`training.build_and_measure`),
  as the overhead over the process before the model was built (weights,
  optimizer state, activations, gradients) and over the built model. Each
  variant is measured in a fresh process of its own (this module, run
  with `--memory-of VARIANT`): in one process, memory a runtime keeps
  pooled after one variant (TensorFlow's allocator, compiled programs)
  would be charged to the first and reused by the next;
- step time (`model.train_on_batch`, variants interleaved in one process).

Run through `python -m benchmarks quantized`, or directly with
`KERAS_BACKEND=jax python -m benchmarks.quantized --out result.json`.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np

import keras_lora as kl
from benchmarks import common, training
from benchmarks.gpt2_variants import RANK, TARGETS, WORKLOADS, keras_variant

__all__ = ["main", "render_markdown"]

MODES = ("float32", "int8", "int4")
IMPLEMENTATIONS = ("keras_lora", "builtin")
# (bound, what): the targets.
TARGETS_MET = {
    "int8_bytes": (0.27, "int8 base bytes / float32 base bytes"),
    "int4_bytes": (0.15, "int4 base bytes / float32 base bytes"),
    "int8_step": (1.0, "keras_lora / built-in step, int8 base"),
    "int4_step": (1.0, "keras_lora / built-in step, int4 base"),
    "int4_memory": (
        0.5,
        "int4 / float32 base: keras_lora peak training memory over the "
        "process before the model was built",
    ),
}
# LoRA targets on the W2 shape: every linear layer of the blocks and the
# tied token embedding (`gpt2_variants.TARGETS["all_linear_embedding"]`),
# the configuration that trains on every base: on an int8 base the tied
# logits pass no gradient below them unless the embedding is adapted.
QLORA_TARGETS = "all_linear_embedding"
FULL = dict(training.FULL)
QUICK = dict(training.QUICK)


def workload(shape_key):
    """The model shape of `--shape` (w2: with `QLORA_TARGETS`)."""
    shape = dict(WORKLOADS[shape_key])
    if shape_key == "w2":
        shape["targets"] = QLORA_TARGETS
    return shape


def variant_name(mode, implementation):
    return f"{implementation}-{mode}"


def adapter_ids(model):
    """Ids of the adapter variables: keras_lora's, or those Keras's
    built-in LoRA adds (`lora_kernel_a`, ...)."""
    ids = set()
    for layer in kl.lora_layers(model):
        for name in layer.adapters:
            ids.update(id(v) for v in layer.adapter_variables(name).values())
    for variable in model.weights:
        if variable.name.startswith("lora_"):
            ids.add(id(variable))
    return ids


def base_bytes(model):
    """`{"total", "kernels", "scales", "float"}` bytes of the base weights:
    integer kernels, their float scales/zero points/group indices, and
    the weights left in float (biases, norms, position embedding)."""
    adapters = adapter_ids(model)
    parts = {"kernels": 0, "scales": 0, "float": 0}
    seen = set()
    for variable in model.weights:
        if id(variable) in adapters or id(variable) in seen:
            continue
        seen.add(id(variable))
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
        size = int(np.prod(variable.shape)) * dtype.itemsize
        if dtype.kind in "iu":
            parts["kernels"] += size
        elif any(k in variable.name for k in ("scale", "zero", "g_idx")):
            parts["scales"] += size
        else:
            parts["float"] += size
    parts["total"] = sum(parts.values())
    return parts


def build(mode, implementation, shape, settings):
    """The compiled Keras variant (`gpt2_variants.keras_variant`)."""
    return keras_variant(
        implementation,
        shape,
        jit_compile=settings.get("jit_compile", "auto"),
        quantize=None if mode == "float32" else mode,
    )


def measure(mode, implementation, shape, settings, backend, log):
    """`info` of one variant: memory (`training.build_and_measure`, in
    this process), base bytes, parameters, first losses."""
    name = variant_name(mode, implementation)
    variant, info = training.build_and_measure(
        name,
        shape,
        settings,
        backend,
        log=log,
        build=lambda: build(mode, implementation, shape, settings),
    )
    memory = info["memory"]
    if memory["model_mb"] is not None and memory["peak_overhead_mb"]:
        memory["peak_over_process_mb"] = round(
            memory["model_mb"] + memory["peak_overhead_mb"], 1
        )
    else:
        memory["peak_over_process_mb"] = None
    info.update(mode=mode, implementation=implementation)
    info["base_bytes"] = base_bytes(variant.model)
    log(
        f"[{backend}] {name}: base weights "
        f"{info['base_bytes']['total'] / 2**20:.1f} MiB, peak over the "
        f"process before the build {memory['peak_over_process_mb']} MB"
    )
    return info


def measure_in_child(mode, implementation, argv, log):
    """`measure` in a fresh process of the same backend (`--memory-of`)."""
    name = variant_name(mode, implementation)
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        command = [sys.executable, "-m", "benchmarks.quantized"]
        command += argv + ["--memory-of", name, "--out", out]
        status = subprocess.run(command).returncode
        if status != 0:
            raise RuntimeError(f"measuring {name} failed (exit {status})")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def ratios_and_targets(infos, times):
    """The ratios the targets are about, and which targets are met."""

    def get(mode, implementation="keras_lora"):
        return infos.get(variant_name(mode, implementation))

    ratios = {}
    float_lora = get("float32")
    for mode in ("int8", "int4"):
        lora = get(mode)
        if lora is not None and float_lora is not None:
            ratios[f"{mode}_bytes"] = (
                lora["base_bytes"]["total"] / float_lora["base_bytes"]["total"]
            )
            top = lora["memory"]["peak_over_process_mb"]
            bottom = float_lora["memory"]["peak_over_process_mb"]
            ratios[f"{mode}_memory"] = top / bottom if top and bottom else None
            top = lora["memory"]["peak_overhead_mb"]
            bottom = float_lora["memory"]["peak_overhead_mb"]
            ratios[f"{mode}_memory_over_model"] = (
                top / bottom if top and bottom else None
            )
    for mode in MODES:
        names = [variant_name(mode, i) for i in IMPLEMENTATIONS]
        if all(n in times for n in names):
            ratios[f"{mode}_step"] = common.paired_ratio(
                times[names[0]], times[names[1]]
            )
    targets = []
    for key, (bound, what) in TARGETS_MET.items():
        value = ratios.get(key)
        targets.append(
            {
                "key": key,
                "what": what,
                "bound": bound,
                "value": value,
                "met": None if value is None else value <= bound,
            }
        )
    return ratios, targets


def run(
    settings, modes, implementations, child_argv, shape_key="w2", log=print
):
    backend = keras.backend.backend()
    shape = workload(shape_key)
    result = {
        "benchmark": "quantized",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(backend),
        "settings": {
            **settings,
            "shape": shape,
            "rank": RANK,
            "targets": TARGETS[shape["targets"]]["keras"],
            "keras_compile": training.backend_settings(
                backend, settings.get("jit_compile", "auto")
            ),
            "quantization": "model.quantize(mode) on the float32 model, "
            "then LoRA (Keras's default int8 / int4 configs: int4 in "
            "blocks of 128 with zero points)",
        },
        "load_average_start": common.load_average(),
    }
    monitor = common.CpuMonitor()
    infos = {}
    for mode in modes:
        for implementation in implementations:
            name = variant_name(mode, implementation)
            infos[name] = measure_in_child(
                mode, implementation, child_argv, log
            )
    training.warm_up_runtime(backend, settings, log=log)
    built = {}
    for name, info in infos.items():
        built[name] = build(
            info["mode"], info["implementation"], shape, settings
        )
        built[name].step()  # compiles
        log(f"[{backend}] {name}: built and compiled for timing")
    timing = {k: settings[k] for k in training.TIMING_KEYS}
    times, stats = common.time_interleaved_quiet(
        {name: variant.step for name, variant in built.items()}, **timing
    )
    for name in built:
        infos[name]["step"] = common.summarize(times[name])
        median = infos[name]["step"]["median_ms"]
        log(f"[{backend}] {name:<20} step {median:.0f} ms")
    result["variants"] = infos
    result["timing_stats"] = stats
    result["ratios"], result["targets_met"] = ratios_and_targets(infos, times)
    common.record_end_load(result, monitor)
    return result


# -- report ---------------------------------------------------------------


def _mib(n_bytes):
    return n_bytes / 2**20


def render_markdown(results, command):
    first = results[0]
    settings = first["settings"]
    shape = settings["shape"]
    lines = common.report_header(
        "QLoRA: LoRA on a float32 / int8 / int4 GPT-2 base", command, results
    ) + [
        f"Model: keras-hub `GPT2CausalLM`, {shape['label']} "
        f"({shape['num_layers']} layers, hidden {shape['hidden_dim']}, "
        f"vocabulary {shape['vocab']}, sequence {shape['seq']}, batch "
        f"{shape['batch']}), random weights, float32 compute; LoRA rank "
        f"{settings['rank']} on {', '.join(settings['targets'])}. Base: "
        f"{settings['quantization']}. `keras_lora`: `kl.apply_lora`; "
        "`builtin`: Keras's `backbone.enable_lora(4, target_layer_names=...)`"
        " on the same base (Keras's int8 and int4 reverse projections "
        "leave its embedding adapter out of the logits, and its int8 one "
        "passes no gradient below them). Adam, "
        "`kl.losses.TokenCrossEntropy`, "
        "`model.train_on_batch`. Compilation: "
        + "; ".join(
            f"{r['backend']}: {r['settings']['keras_compile']}" for r in results
        )
        + ".",
        "",
        "Base bytes: every model variable but the adapters, at its stored "
        "dtype (kernels: int8, or int4 packed two per byte; scales: their "
        "float32 scales, zero points and group indices; float: biases, "
        "layer norms, the position embedding). Memory: resident memory "
        "(RSS); `over process` = peak during a training step minus RSS "
        "before the model was built (weights + optimizer state + "
        "activations + gradients), `over model` = peak minus RSS after the "
        "build. Step: median of interleaved rounds; ratio keras_lora / "
        "built-in = median of per-round ratios.",
        "",
        f"Load: {common.load_line(results)}",
        "",
    ]
    for result in results:
        rows = []
        for name, info in result["variants"].items():
            parts = info["base_bytes"]
            memory = info["memory"]
            rows.append(
                {
                    "variant": name,
                    "base MiB": _mib(parts["total"]),
                    "int kernels MiB": _mib(parts["kernels"]),
                    "scales MiB": _mib(parts["scales"]),
                    "float MiB": _mib(parts["float"]),
                    "trainable": f"{info['trainable_params']:,}",
                    "peak over process MiB": memory["peak_over_process_mb"],
                    "peak over model MiB": memory["peak_overhead_mb"],
                    "step ms": info["step"]["median_ms"],
                }
            )
        stats = result["timing_stats"]
        lines += [
            f"## {result['backend']}",
            "",
            common.markdown_table(rows),
            f"Timing: {stats['rounds_kept']} rounds kept, "
            f"{stats['rounds_discarded']} discarded (CPU busy)"
            + ("; never quiet (all rounds used)" if stats["contended"] else "")
            + ".",
            "",
            common.markdown_table(
                [
                    {
                        "target": t["what"],
                        "bound": t["bound"],
                        "value": t["value"],
                        "met": {True: "yes", False: "no", None: "n/a"}[
                            t["met"]
                        ],
                    }
                    for t in result["targets_met"]
                ]
            ),
        ]
    lines += _arithmetic(results[0]) + _memory_arithmetic(results)
    return "\n".join(lines) + "\n"


def _arithmetic(result):
    """What the byte ratios can be on this shape, from the parts."""
    infos = result["variants"]
    lines = ["## Arithmetic of the base bytes", ""]
    float_info = infos.get(variant_name("float32", "keras_lora"))
    if float_info is None:
        return []
    total = float_info["base_bytes"]["total"]
    for mode in ("int8", "int4"):
        info = infos.get(variant_name(mode, "keras_lora"))
        if info is None:
            continue
        parts = info["base_bytes"]
        lines.append(
            f"- {mode}: kernels {_mib(parts['kernels']):.1f} MiB "
            f"({parts['kernels'] / total:.4f} of float32's "
            f"{_mib(total):.1f} MiB) + scales/zero points "
            f"{_mib(parts['scales']):.1f} MiB ({parts['scales'] / total:.4f}) "
            f"+ float leftovers {_mib(parts['float']):.1f} MiB "
            f"({parts['float'] / total:.4f}) = "
            f"{parts['total'] / total:.4f}."
        )
    lines += [
        "- Floor: an int8 kernel takes 1/4 of float32's bytes and a packed "
        "int4 one 1/8; Keras's int8 adds one float32 scale per output unit "
        "(per vocabulary row for the embedding), its int4 one float32 scale "
        "and one int8 zero point per 128 inputs per output (+5/128 byte per "
        "weight, i.e. +0.0098 of float32).",
        "",
    ]
    return lines


def _memory_arithmetic(results):
    """Whether the int4 memory target is reachable on this shape: the
    step's own overhead is not made of base weights."""
    lines = ["## Arithmetic of the int4 memory target", ""]
    for result in results:
        infos = result["variants"]
        float_info = infos.get(variant_name("float32", "keras_lora"))
        int4_info = infos.get(variant_name("int4", "keras_lora"))
        if float_info is None or int4_info is None:
            continue
        total = float_info["memory"]["peak_over_process_mb"]
        step_float = float_info["memory"]["peak_overhead_mb"]
        step_int4 = int4_info["memory"]["peak_overhead_mb"]
        base_int4 = _mib(int4_info["base_bytes"]["total"])
        if not (total and step_float and step_int4):
            continue
        floor = base_int4 + step_float
        lines.append(
            f"- {result['backend']}: float32 peak over the process "
            f"{total:.0f} MiB, of which the training step's own overhead "
            f"(activations, gradients, optimizer state, compiled programs) "
            f"is {step_float:.0f} MiB. Had the int4 step cost no more than "
            f"that, int4's peak would be {base_int4:.0f} + {step_float:.0f} "
            f"= {floor:.0f} MiB, {floor / total:.2f}x float32's (target "
            f"0.5x: {0.5 * total:.0f} MiB). Measured: the int4 step costs "
            f"{step_int4:.0f} MiB ({step_int4 / step_float:.2f}x float32's), "
            f"so {int4_info['memory']['peak_over_process_mb']:.0f} MiB."
        )
    lines.append("")
    return lines if len(lines) > 3 else []


# -- command line -----------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quantized",
        description="QLoRA on the current KERAS_BACKEND: LoRA training on a "
        "float32 / int8 / int4 GPT-2 base (W2 shape), keras_lora vs Keras's "
        "built-in LoRA.",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="Few steps (smoke test)."
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"Comma-separated base modes (default: {','.join(MODES)}).",
    )
    parser.add_argument(
        "--jit-compile",
        type=training.parse_jit,
        default="auto",
        help="Keras compile(jit_compile=...): auto (default), true, false.",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(WORKLOADS),
        default="w2",
        help="Model shape (default w2, the GPT-2 base shape; w1, with LoRA "
        "on query/value, for a quick look).",
    )
    parser.add_argument(
        "--memory-of",
        metavar="VARIANT",
        help="Only measure VARIANT's memory (e.g. keras_lora-int4) and write "
        "its info; the main run starts one such process per variant.",
    )
    common.add_timing_args(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    settings["jit_compile"] = args.jit_compile
    common.apply_timing_args(settings, args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {MODES}")

    def log(message):
        print(message, flush=True)

    if args.memory_of:
        implementation, _, mode = args.memory_of.partition("-")
        if implementation not in IMPLEMENTATIONS or mode not in MODES:
            parser.error(
                f"--memory-of: unknown variant {args.memory_of!r}; e.g. "
                "keras_lora-int4 or builtin-float32"
            )
        backend = keras.backend.backend()
        training.warm_up_runtime(backend, settings, log=log)
        shape = workload(args.shape)
        info = measure(mode, implementation, shape, settings, backend, log)
        common.write_json(args.out, info)
        return 0
    child_argv = [
        a
        for a in argv
        if a not in ("--out", args.out) and not a.startswith("--out=")
    ]
    result = run(settings, modes, IMPLEMENTATIONS, child_argv, args.shape, log)
    result["settings"]["quick"] = bool(args.quick)
    common.write_json(args.out, result)
    log(f"[{result['backend']}] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
