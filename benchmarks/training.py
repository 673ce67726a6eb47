"""W1/W2: a GPT-2 training step, full fine-tuning vs three LoRA options.

One Keras backend per process. Variants, timed interleaved in one run:

- `full`: every weight of a keras-hub `GPT2CausalLM` trains;
- `builtin`: Keras's built-in LoRA (`backbone.enable_lora`);
- `keras_lora`: `keras_lora.apply_lora`;
- `peft`: PEFT LoRA on a Hugging Face `GPT2LMHeadModel` of the same shape
  (PyTorch; it runs in every backend's process, so that the
  keras_lora/PEFT ratio comes from the same interleaved run).

Keras variants train with `model.train_on_batch` (Keras's own compiled
train step, as `fit` runs it: XLA on JAX and TensorFlow, eager on
PyTorch); PEFT with the usual PyTorch loop. Same optimizer (Adam, lr
1e-4), same loss (causal-LM cross-entropy over the full vocabulary),
random weights, dropout off.

Run through `python -m benchmarks training`, or directly with
`KERAS_BACKEND=jax python -m benchmarks.training --out result.json`.
"""

import argparse
import dataclasses
import datetime
import sys
import warnings

import keras
import numpy as np

import keras_lora as kl
from benchmarks import common

VOCAB = 50257
RANK = 4
LEARNING_RATE = 1e-4
# Keras layer names of the adapted projections and PEFT's equivalents
# (Hugging Face GPT-2 fuses query/key/value into one `c_attn`, and names
# both the attention output and the second feed-forward layer `c_proj`).
TARGETS = {
    "query_value": {
        "keras": ["query", "value"],
        "peft": ["c_attn"],
    },
    "all_linear": {
        "keras": [
            "query",
            "key",
            "value",
            "attention_output",
            "feedforward_intermediate_dense",
            "feedforward_output_dense",
        ],
        "peft": ["c_attn", "c_proj", "c_fc"],
    },
}
WORKLOADS = {
    "w1": {
        "label": "W1 gpt2-mini",
        "num_layers": 4,
        "hidden_dim": 256,
        "num_heads": 4,
        "seq": 128,
        "batch": 8,
        "vocab": VOCAB,
        "targets": "query_value",
    },
    "w2": {
        "label": "W2 gpt2-base shape",
        "num_layers": 12,
        "hidden_dim": 768,
        "num_heads": 12,
        "seq": 128,
        "batch": 4,
        "vocab": VOCAB,
        "targets": "all_linear",
    },
}
VARIANTS = ("full", "builtin", "keras_lora", "peft")
RATIOS = (
    ("keras_lora/full", "keras_lora", "full"),
    ("keras_lora/builtin", "keras_lora", "builtin"),
    ("builtin/full", "builtin", "full"),
    ("keras_lora/peft", "keras_lora", "peft"),
)
# (quantity, ratio, bound, strict): the targets, per workload.
TARGET_BOUNDS = {
    "w1": [
        ("step", "keras_lora/full", 0.65, False),
        ("step", "keras_lora/builtin", 1.0, False),
    ],
    "w2": [
        ("step", "keras_lora/builtin", 0.8, False),
        ("step", "keras_lora/full", 0.7, False),
        ("memory", "keras_lora/full", 0.45, False),
        ("memory", "keras_lora/builtin", 1.0, True),
    ],
}
# keras_lora on its fastest backend vs PEFT, on every training workload.
PEFT_TARGET = ("step", "keras_lora/peft", 0.6, False)
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


@dataclasses.dataclass
class Variant:
    """One way to train the model: `step()` runs a training step, blocks
    until it is done and returns the loss (computed before the update)."""

    name: str
    step: object
    model: object
    trainable_params: int
    total_params: int


# -- builders (also used by inference.py and tests) -------------------------


def build_backbone(shape, seed=0):
    """A keras-hub `GPT2Backbone` of `shape`, random weights, no dropout."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=shape["vocab"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        hidden_dim=shape["hidden_dim"],
        intermediate_dim=4 * shape["hidden_dim"],
        dropout=0.0,
        max_sequence_length=shape["seq"],
    )


def build_keras_model(variant, shape, rank=RANK, seed=0):
    """The `GPT2CausalLM` of a Keras variant (`full`, `builtin`,
    `keras_lora`); the base weights depend on `seed` only."""
    import keras_hub

    targets = TARGETS[shape["targets"]]["keras"]
    backbone = build_backbone(shape, seed)
    if variant == "builtin":
        if shape["targets"] == "query_value":
            backbone.enable_lora(rank)  # keras-hub's default: query/value
        else:
            backbone.enable_lora(rank, target_layer_names=targets)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    if variant == "keras_lora":
        config = kl.LoraConfig(rank=rank, target_modules=targets)
        kl.apply_lora(model, config)
    elif variant not in ("full", "builtin"):
        raise ValueError(f"Unknown Keras variant {variant!r}.")
    return model


def keras_batch(shape, seed=1):
    """`(x, y)`: random token ids and their next tokens (causal LM)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, shape["vocab"], (shape["batch"], shape["seq"] + 1))
    tokens = tokens.astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((shape["batch"], shape["seq"]), "int32"),
    }
    return x, tokens[:, 1:]


def count_params(variables):
    unique = {id(v): v for v in variables}.values()
    return int(sum(int(np.prod(v.shape)) for v in unique))


def keras_variant(
    variant, shape, rank=RANK, seed=0, jit_compile="auto", run_eagerly=False
):
    """A compiled Keras variant whose `step` is `model.train_on_batch`
    (`run_eagerly=True` is for tests: no tracing or compiling)."""
    model = build_keras_model(variant, shape, rank=rank, seed=seed)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=False if run_eagerly else jit_compile,
        run_eagerly=run_eagerly,
    )
    x, y = keras_batch(shape)

    def step():
        return float(model.train_on_batch(x, y, return_dict=True)["loss"])

    return Variant(
        name=variant,
        step=step,
        model=model,
        trainable_params=count_params(model.trainable_weights),
        total_params=count_params(model.weights),
    )


def build_peft_model(shape, rank=RANK, seed=0):
    """A Hugging Face `GPT2LMHeadModel` of `shape` with PEFT LoRA on the
    modules equivalent to the Keras targets (random weights, no dropout)."""
    import peft
    import torch
    import transformers

    # Quiet: warnings about a tiny test vocabulary and deprecations.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=shape["vocab"],
        n_positions=shape["seq"],
        n_embd=shape["hidden_dim"],
        n_layer=shape["num_layers"],
        n_head=shape["num_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=shape["vocab"] - 1,
        eos_token_id=shape["vocab"] - 1,
    )
    model = transformers.GPT2LMHeadModel(config)
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale 1, as Keras's built-in and keras_lora's
        lora_dropout=0.0,
        target_modules=TARGETS[shape["targets"]]["peft"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores (in, out) kernels
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora_config)


def peft_variant(shape, rank=RANK, seed=0):
    """PEFT LoRA trained with the standard PyTorch loop (eager, Adam)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_peft_model(shape, rank=rank, seed=seed).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    x, _ = keras_batch(shape)
    # Hugging Face shifts the labels itself: the same next-token loss.
    ids = torch.as_tensor(np.asarray(x["token_ids"]), dtype=torch.long)
    ids = ids.to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # synchronises

    every = {id(p): p for p in model.parameters()}.values()
    return Variant(
        name="peft",
        step=step,
        model=model,
        trainable_params=int(sum(p.numel() for p in params)),
        total_params=int(sum(p.numel() for p in every)),
    )


def build_variant(name, shape, seed=0, jit_compile="auto"):
    if name == "peft":
        return peft_variant(shape, seed=seed)
    return keras_variant(name, shape, seed=seed, jit_compile=jit_compile)


# -- memory ------------------------------------------------------------------


def device_memory(backend):
    """`(reset, in_use, peak)` byte counters of the accelerator, or None.

    Only where the backend can reset its peak counter (PyTorch and
    TensorFlow on a GPU); JAX has no reset, so on a JAX GPU run only host
    memory is measured. Untested here: this machine has no GPU.
    """
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return (
                torch.cuda.reset_peak_memory_stats,
                torch.cuda.memory_allocated,
                torch.cuda.max_memory_allocated,
            )
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            info = tf.config.experimental.get_memory_info
            return (
                lambda: tf.config.experimental.reset_memory_stats("GPU:0"),
                lambda: info("GPU:0")["current"],
                lambda: info("GPU:0")["peak"],
            )
    return None


def build_and_measure(name, shape, settings, backend, log=print):
    """Builds variant `name` and measures its training-memory overhead.

    Resident memory is read once the model is built (before the optimizer
    state exists); then `memory_warmup` steps run (compilation, optimizer
    state), the high-water mark is reset and `memory_steps` more steps
    run. Overhead = high-water mark - resident memory after the build:
    optimizer state, gradients, activations and compiled programs, but
    not the one-off peak of compiling.
    """
    common.release_free_memory()
    before = common.rss_bytes()
    variant = build_variant(
        name, shape, jit_compile=settings.get("jit_compile", "auto")
    )
    common.release_free_memory()
    built = common.rss_bytes()
    device = device_memory(backend) if name != "peft" else None
    if device is not None:
        device_built = device[1]()
    losses = [variant.step() for _ in range(settings["memory_warmup"])]
    common.release_free_memory()
    common.reset_peak_rss()
    if device is not None:
        device[0]()
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
        memory["device_peak_overhead_mb"] = _mb(device[2]() - device_built)
    log(
        f"[{backend}] {name}: {variant.trainable_params:,} trainable of "
        f"{variant.total_params:,}; first loss {losses[0]:.4f}; training "
        f"memory overhead {memory['peak_overhead_mb']} MB"
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


def run_workload(backend, key, settings, variants, log=print):
    shape = WORKLOADS[key]
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
        infos[n]["first_loss"] for n in ("full", "builtin", "keras_lora")
    ]
    checks = {
        "max_first_loss_diff_keras_variants": float(
            np.max(keras_losses) - np.min(keras_losses)
        )
        if all(n in infos for n in ("full", "builtin", "keras_lora"))
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


def evaluate_targets(key, ratios):
    """`[{quantity, ratio, bound, value, met}]` for this backend's run
    (the PEFT target is judged across backends, in the markdown)."""
    rows = []
    for quantity, label, bound, strict in TARGET_BOUNDS.get(key, []):
        value = ratios[quantity].get(label)
        met = None
        if value is not None:
            met = value < bound if strict else value <= bound
        rows.append(
            {
                "quantity": quantity,
                "ratio": label,
                "bound": bound,
                "strict": strict,
                "value": value,
                "met": met,
            }
        )
    return rows


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
            "loss": "next-token cross-entropy over the full vocabulary",
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
    result["load_average_end"] = common.load_average()
    share = monitor.other_share()
    result["other_processes_cpu_share"] = (
        None if share is None else round(share, 4)
    )
    return result


def _peft_versions():
    versions = {}
    for name in ("peft", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


# -- markdown --------------------------------------------------------------


def render_markdown(results, command):
    """The markdown report for a list of per-backend results."""
    first = results[0]
    settings = first["settings"]
    lines = [
        "# Training step: full fine-tuning vs LoRA (W1, W2)",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {first['date']}",
        "",
        f"Machine: {common.machine_line(results)}",
        "",
        "Keras variants: keras-hub `GPT2CausalLM`, random weights, "
        "vocabulary 50257, dropout 0, float32; `full` trains every weight, "
        "`builtin` is `backbone.enable_lora(4)` (on W2 with "
        "`target_layer_names`), `keras_lora` is `kl.apply_lora` with "
        "`LoraConfig(rank=4)` on the same layers. `peft` is PEFT LoRA "
        "(r=4, alpha=4) on a Hugging Face `GPT2LMHeadModel` of the same "
        "shape, which fuses query/key/value into `c_attn`. Every variant: "
        f"{settings['optimizer']}, {settings['loss']}. Keras step: "
        f"{settings['keras_step']}; PEFT step: {settings['peft_step']}. "
        "Compilation: "
        + "; ".join(
            f"{r['backend']}: {r['settings']['keras_compile']}" for r in results
        )
        + ". PEFT runs inside every backend's process, so each "
        "keras_lora/peft ratio comes from one interleaved run.",
        "",
        f"Timing: after {settings['memory_warmup']} + "
        f"{settings['memory_steps']} untimed steps (memory measurement) "
        f"and {settings['warmup']} warm-up step(s) each, the variants run "
        "interleaved (one step each per round, order rotating); rounds "
        "timed while other processes used more than "
        f"{100 * settings['max_other_share']:.0f}% of the CPU are "
        f"discarded; median of up to {settings['repeats']} kept rounds. "
        "Ratios: median of the per-round ratios. Memory: training "
        "overhead = peak resident memory during steps (VmHWM, reset after "
        "warm-up) - resident memory once the model is built; it holds "
        "optimizer state, gradients, activations and compiled programs.",
        "",
        "Load: " + common.load_line(results) + ".",
        "",
    ]
    keys = [k for k in WORKLOADS if any(k in r["workloads"] for r in results)]
    for key in keys:
        lines += _workload_section(results, key)
    lines += ["## Targets", ""]
    lines.append(common.markdown_table(target_rows(results), TARGET_COLUMNS))
    return "\n".join(lines)


TARGET_COLUMNS = [
    ("workload", "workload"),
    ("backend", "backend"),
    ("target", "target"),
    ("value", "measured"),
    ("met", "met"),
]


def target_rows(results):
    """Every target with its measured ratio, per workload and backend; the
    PEFT target uses keras_lora's fastest backend."""
    rows = []
    for key in WORKLOADS:
        runs = [r for r in results if key in r["workloads"]]
        for result in runs:
            for target in result["workloads"][key]["targets_met"]:
                rows.append(_target_row(key, result["backend"], target))
        fastest = None
        for result in runs:
            info = result["workloads"][key]["variants"].get("keras_lora")
            if info and "step" in info:
                median = info["step"]["median_ms"]
                if fastest is None or median < fastest[1]:
                    fastest = (result, median)
        if fastest is not None:
            quantity, label, bound, strict = PEFT_TARGET
            value = fastest[0]["workloads"][key]["ratios"][quantity][label]
            target = {
                "quantity": quantity,
                "ratio": label,
                "bound": bound,
                "strict": strict,
                "value": value,
                "met": None if value is None else value <= bound,
            }
            row = _target_row(key, fastest[0]["backend"], target)
            row["target"] += " (fastest keras_lora backend)"
            rows.append(row)
    return rows


def _target_row(key, backend, target):
    sign = "<" if target["strict"] else "<="
    met = {True: "yes", False: "**no**", None: "n/a"}[target["met"]]
    return {
        "workload": key.upper(),
        "backend": backend,
        "target": f"{target['quantity']} {target['ratio']} {sign} "
        f"{target['bound']:.2f}",
        "value": target["value"],
        "met": met,
    }


def _workload_section(results, key):
    runs = [r for r in results if key in r["workloads"]]
    work = runs[0]["workloads"][key]
    shape = work["shape"]
    lines = [
        f"## {work['label']}",
        "",
        f"{shape['num_layers']} layers, hidden {shape['hidden_dim']}, "
        f"{shape['num_heads']} heads, sequence {shape['seq']}, batch "
        f"{shape['batch']}; LoRA rank {work['rank']} on "
        f"{', '.join(work['targets']['keras'])} (PEFT: "
        f"{', '.join(work['targets']['peft'])}).",
        "",
    ]
    rows = []
    for result in runs:
        for name, info in result["workloads"][key]["variants"].items():
            step = info.get("step")
            memory = info["memory"]
            rows.append(
                {
                    "backend": result["backend"],
                    "variant": name,
                    "trainable": f"{info['trainable_params']:,}",
                    "step": None if step is None else step["median_ms"],
                    "iqr": None
                    if step is None
                    else f"{step['p25_ms']:.0f}-{step['p75_ms']:.0f}",
                    "memory": memory["peak_overhead_mb"],
                    "first_loss": f"{info['first_loss']:.4f}",
                }
            )
        for name, reason in result["workloads"][key].get("skipped", {}).items():
            rows.append(
                {"backend": result["backend"], "variant": f"{name} ({reason})"}
            )
    lines.append(
        common.markdown_table(
            rows,
            [
                ("backend", "backend"),
                ("variant", "variant"),
                ("trainable", "trainable params"),
                ("step", "step ms (median)"),
                ("iqr", "p25-p75"),
                ("memory", "training memory overhead MB"),
                ("first_loss", "loss at step 0"),
            ],
        )
    )
    lines += ["Ratios (same run):", ""]
    rows = []
    for result in runs:
        work = result["workloads"][key]
        row = {"backend": result["backend"]}
        for quantity in ("step", "memory"):
            for label, _, _ in RATIOS:
                row[f"{quantity} {label}"] = work["ratios"][quantity][label]
        stats = work["timing_stats"]
        row["rounds"] = str(stats["rounds_kept"]) + (
            " (contended)" if stats["contended"] else ""
        )
        rows.append(row)
    lines.append(common.markdown_table(rows))
    return lines


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
