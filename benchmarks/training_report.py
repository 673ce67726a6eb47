"""The W1/W2 targets and the markdown report of `benchmarks.training`."""

from benchmarks import common
from benchmarks.gpt2_variants import WORKLOADS

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


def render_markdown(results, command):
    """The markdown report for a list of per-backend results."""
    first = results[0]
    settings = first["settings"]
    title = "Training step: full fine-tuning vs LoRA (W1, W2)"
    lines = common.report_header(title, command, results) + [
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
