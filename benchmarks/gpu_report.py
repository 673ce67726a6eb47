"""The GPU pack's markdown report and its targets (`render(record)`)."""

from benchmarks import common

# The GPU targets (W2 shape, same GPU): (quantity, ratio, bound, backend or
# None for every backend). Memory is the variant's peak device memory,
# weights included.
TARGETS = (
    ("step", "keras_lora/full", 0.70, None),
    ("memory", "keras_lora/full", 0.65, None),
    ("step", "keras_lora/peft", 0.80, "jax"),
)
TARGET_WORKLOAD = "w2"
RATIO_PAIRS = (
    ("keras_lora/full", "keras_lora", "full"),
    ("keras_lora/builtin", "keras_lora", "builtin"),
    ("builtin/full", "builtin", "full"),
    ("keras_lora/peft", "keras_lora", "peft"),
)
STATUS_WORDS = {"ok": "ok", "failed": "**FAILED**", "timeout": "**TIMEOUT**"}


def render(record):
    steps = record["steps"]
    lines = _header(record) + ["## Steps", ""]
    lines.append(common.markdown_table(_status_rows(steps), STATUS_COLUMNS))
    lines += _tests_section(steps)
    lines += _memory_section(steps)
    lines += _training_section(steps, record["mode"])
    lines += _generate_section(steps)
    lines += _failures_section(steps)
    return "\n".join(lines) + "\n"


def _header(record):
    dry = record["mode"] == "dry-run"
    host = record["host"]
    lines = [
        "# keras_lora GPU validation pack"
        + (" (dry run: CPU, tiny sizes)" if dry else ""),
        "",
        f"Command: `{record['command']}`",
        "",
        f"Date: {record['started']}; budget {record['budget_s']:.0f} s, "
        f"took {record.get('elapsed_s', 0):.0f} s; exit status "
        f"{record.get('exit_status')}.",
        "",
        f"Machine: GPU {host['gpu'] or 'none found (no nvidia-smi)'}; CPU "
        f"{host['cpu']} ({host['cores']} cores); Python {host['python']}.",
        "",
        f"Bundle: {record['bundle']['status']}"
        + (
            f" ({record['bundle']['detail']})"
            if record["bundle"]["detail"]
            else ""
        )
        + ".",
    ]
    for backend, env in sorted(record["environments"].items()):
        device = env.get("accelerator", {})
        versions = ", ".join(
            f"{k} {v}"
            for k, v in {
                "keras": env.get("keras"),
                "keras-hub": env.get("keras_hub"),
                **env.get("backend_versions", {}),
                "torch": env.get("torch"),
                "peft": env.get("peft"),
                "transformers": env.get("transformers"),
            }.items()
            if v
        )
        lines += [
            "",
            f"{backend}: runs on {device.get('platform')} "
            f"({device.get('device')}); {versions}.",
        ]
    if dry:
        lines += [
            "",
            "A dry run tests the pack itself: its figures come from tiny "
            "models on a CPU and say nothing about speed or memory.",
        ]
    return lines + [""]


STATUS_COLUMNS = [
    ("backend", "backend"),
    ("unit", "step"),
    ("status", "status"),
    ("seconds", "seconds"),
    ("note", "note"),
]


def _status_rows(steps):
    rows = []
    for step in steps:
        note = step.get("error") or step.get("reason") or ""
        rows.append(
            {
                "backend": step["backend"],
                "unit": step["unit"],
                "status": STATUS_WORDS.get(step["status"], step["status"]),
                "seconds": step.get("seconds"),
                "note": _cell(note, 160),
            }
        )
    return rows


def _cell(text, limit):
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _done(steps, unit):
    return [s for s in steps if s["unit"] == unit and s.get("result")]


def _tests_section(steps):
    done = _done(steps, "tests")
    if not done:
        return []
    rows = []
    for step in done:
        r = step["result"]
        failures = ", ".join(f["test"] for f in r.get("failures", []))
        rows.append(
            {
                "backend": step["backend"],
                "files": len(r["files"]),
                "passed": r.get("passed"),
                "failed": r.get("failed"),
                "errors": r.get("errors"),
                "skipped": r.get("skipped"),
                "failing": _cell(failures or "-", 400),
            }
        )
    return [
        "## (a) Tests on the device",
        "",
        "The test files of layers, model-level operations, routing and "
        "serving, callbacks, adapter files and the loss, run on each "
        "backend's default device (JAX with full float32 matrix products)."
        " Files: " + ", ".join(done[0]["result"]["files"]) + ".",
        "",
        common.markdown_table(rows),
    ]


def _memory_section(steps):
    rows = []
    for step in _done(steps, "memory"):
        r = step["result"]
        mib = 2**20
        rows.append(
            {
                "backend": step["backend"],
                "probe": f"{r['with']['kind']}: {r['with']['device']}",
                "scope": r["with"]["peak_scope"],
                "block MiB": r["known_bytes"] / mib,
                "overhead without MiB": r["without"]["overhead_bytes"] / mib,
                "overhead with MiB": r["with"]["overhead_bytes"] / mib,
                "block seen": "yes" if step["status"] == "ok" else "**no**",
            }
        )
    if not rows:
        return []
    return [
        "## (b) MemoryUsage on the device allocator",
        "",
        "`kl.callbacks.MemoryUsage` over two `fit` calls of a small model; "
        "in the second a known block is allocated on the device at step 2. "
        "Overhead = peak - memory in use when training began.",
        "",
        common.markdown_table(rows),
    ]


def _train_steps(steps):
    """`{(workload, precision): [step, ...]}` of finished training units."""
    found = {}
    for step in steps:
        if step["unit"].startswith("train-") and step.get("result"):
            _, key, precision = step["unit"].split("-", 2)
            if "ratios" in step["result"]:
                found.setdefault((key, precision), []).append(step)
    return found


def memory_basis(variants):
    """Device peak (weights included) where every variant has one, else
    the host's resident-memory training overhead (CPU runs)."""
    memories = [info["memory"] for info in variants.values()]
    if memories and all("device_peak_mb" in m for m in memories):
        return "device peak"
    return "host RSS overhead"


def memory_value(info, basis):
    memory = info["memory"]
    if basis == "device peak":
        return memory["device_peak_mb"], memory["device_peak_exact"]
    return memory["peak_overhead_mb"], True


def ratios(step):
    """`{label: {"step": x, "memory": (x, exact)}}` for one training unit."""
    result = step["result"]
    variants = result["variants"]
    basis = memory_basis(variants)
    out = {}
    for label, top, bottom in RATIO_PAIRS:
        value = result["ratios"]["step"].get(label)
        memory = (None, "")
        if top in variants and bottom in variants:
            a, a_exact = memory_value(variants[top], basis)
            b, b_exact = memory_value(variants[bottom], basis)
            if a is not None and b:
                memory = (a / b, BOUND[(a_exact, b_exact)])
        out[label] = {"step": value, "memory": memory}
    return out, basis


# A ratio of two peaks, each exact or an upper bound: exact, an upper
# bound, a lower bound, or unknown ("?").
BOUND = {
    (True, True): "",
    (False, True): "<=",
    (True, False): ">=",
    (False, False): "?",
}


def meets(value, bound, limit):
    """Whether a ratio (`value`, its `bound` kind) is <= `limit`: True,
    False, or None where the bound cannot tell."""
    if value is None or bound == "?":
        return None
    if value <= limit:
        return True if bound in ("", "<=") else None
    return False if bound in ("", ">=") else None


def target_rows(steps):
    rows = []
    for (key, precision), done in sorted(_train_steps(steps).items()):
        if key != TARGET_WORKLOAD:
            continue
        for step in done:
            measured, basis = ratios(step)
            for quantity, label, bound, backend in TARGETS:
                if backend not in (None, step["backend"]):
                    continue
                value, kind = measured[label][quantity], ""
                if quantity == "memory":
                    value, kind = value
                met = meets(value, kind, bound)
                what = "step" if quantity == "step" else f"memory ({basis})"
                rows.append(
                    {
                        "workload": key.upper(),
                        "precision": precision,
                        "backend": step["backend"],
                        "target": f"{what} {label} <= {bound:.2f}",
                        "measured": _bounded(value, kind),
                        "met": {True: "yes", False: "**no**"}.get(
                            met, "n/a (JAX peak not exact)" if kind else "n/a"
                        ),
                    }
                )
    return rows


def _training_section(steps, mode):
    found = _train_steps(steps)
    if not found:
        return []
    lines = [
        "## (c) Training step: full fine-tuning vs LoRA",
        "",
        "keras-hub `GPT2CausalLM` (random weights; shapes below) as in "
        "`benchmarks/gpt2_variants.py`: `full` trains every weight, "
        "`builtin` is Keras's `enable_lora(4)`, `keras_lora` is "
        "`kl.apply_lora` (rank 4), `peft` is PEFT LoRA on the Hugging Face "
        "GPT-2 of the same shape (eager PyTorch, in the same process, on "
        "the same device). Keras steps are `train_on_batch` (JAX: XLA; PyTorch:"
        " eager). float32 uses full float32 matrix products on both "
        "frameworks (no TF32); mixed_bfloat16 is Keras's policy and "
        "`torch.autocast(bfloat16)` for PEFT. Step: median of the timed "
        "rounds (variants interleaved). Peak device memory: from the "
        "variant's build to its last measured step, minus what was in use "
        "before (weights, optimizer state, gradients, activations); JAX "
        "cannot reset its peak counter, so a JAX figure marked `<=` is an "
        "upper bound.",
        "",
    ]
    for key in ("w2", "w1"):
        rows = []
        for precision in ("float32", "mixed_bfloat16"):
            for step in found.get((key, precision), []):
                rows += _variant_rows(step, precision)
        if not rows:
            continue
        label = next(iter(found.get((key, "float32"), [])), None) or next(
            iter(found[(key, "mixed_bfloat16")])
        )
        shape = label["result"]["shape"]
        lines += [
            f"### {shape['label']}",
            "",
            f"{shape['num_layers']} layers, hidden {shape['hidden_dim']}, "
            f"{shape['num_heads']} heads, sequence {shape['seq']}, batch "
            f"{shape['batch']}, vocabulary {shape['vocab']}; LoRA on "
            f"{shape['targets']}.",
            "",
            common.markdown_table(rows, VARIANT_COLUMNS),
        ]
    ratio_rows = []
    for (key, precision), done in sorted(found.items(), reverse=True):
        for step in done:
            measured, basis = ratios(step)
            row = {"workload": key.upper(), "precision": precision}
            row["backend"] = step["backend"]
            for label, _, _ in RATIO_PAIRS:
                row[f"step {label}"] = measured[label]["step"]
            value, kind = measured["keras_lora/full"]["memory"]
            row["memory keras_lora/full"] = _bounded(value, kind)
            row["memory basis"] = basis
            ratio_rows.append(row)
    lines += [
        "### Ratios (same process, same device)",
        "",
        "Targets (W2): step keras_lora/full <= 0.70, peak memory "
        "keras_lora/full <= 0.65, on JAX step keras_lora/peft <= 0.80.",
        "",
        common.markdown_table(ratio_rows),
        "### Targets",
        "",
        common.markdown_table(target_rows(steps))
        or "No W2 training step finished.\n",
    ]
    return lines


VARIANT_COLUMNS = [
    ("precision", "precision"),
    ("backend", "backend"),
    ("variant", "variant"),
    ("trainable", "trainable params"),
    ("step", "step ms"),
    ("iqr", "p25-p75 ms"),
    ("peak", "peak device MiB"),
    ("overhead", "training overhead MiB"),
    ("rss", "host RSS overhead MiB"),
    ("loss", "loss at step 0"),
]


def _variant_rows(step, precision):
    rows = []
    for name, info in step["result"]["variants"].items():
        timing = info.get("step")
        memory = info["memory"]
        rows.append(
            {
                "precision": precision,
                "backend": step["backend"],
                "variant": name,
                "trainable": f"{info['trainable_params']:,}",
                "step": None if timing is None else timing["median_ms"],
                "iqr": None
                if timing is None
                else f"{timing['p25_ms']:.1f}-{timing['p75_ms']:.1f}",
                "peak": _bounded(
                    memory.get("device_peak_mb"),
                    memory.get("device_peak_exact", True),
                ),
                "overhead": memory.get("device_overhead_mb"),
                "rss": memory.get("peak_overhead_mb"),
                "loss": f"{info['first_loss']:.4f}",
            }
        )
    return rows


def _bounded(value, kind):
    """A figure with its bound kind: "" or True (exact), False or "<="
    (an upper bound), ">=" (a lower bound), "?" (unknown)."""
    if value is None:
        return None
    kind = {True: "", False: "<="}.get(kind, kind)
    if kind == "":
        return value
    return f"{value:.2f} ?" if kind == "?" else f"{kind} {value:.2f}"


def _generate_section(steps):
    rows = []
    for step in _done(steps, "generate"):
        r = step["result"]
        rows.append(
            {
                "backend": step["backend"],
                "adapters": r["adapters"],
                "routed ms": r["variants"]["routed"]["median_ms"],
                "loop ms": r["variants"]["loop"]["median_ms"],
                "routed new tokens/s": r["variants"]["routed"][
                    "new_tokens_per_s"
                ],
                "loop new tokens/s": r["variants"]["loop"]["new_tokens_per_s"],
                "throughput routed/loop": r["throughput_ratio"],
                "differing tokens": r["differing_tokens_routed_vs_loop"],
            }
        )
    if not rows:
        return []
    model = _done(steps, "generate")[0]["result"]["model"]
    first = _done(steps, "generate")[0]["result"]
    return [
        "## (d) Routed vs looped generation",
        "",
        f"keras-hub GPT-2 ({model['num_layers']} layers, hidden "
        f"{model['hidden_dim']}, vocabulary {model['vocabulary_size']}), "
        f"{first['adapters']} adapters of rank {first['rank']} on "
        f"query/value: greedy `generate` of {first['new_tokens']} tokens "
        f"after {first['prompt_tokens']}-token prompts, one routed call for "
        "all prompts vs one call per adapter (`benchmarks/serving.py`).",
        "",
        common.markdown_table(rows),
    ]


def _failures_section(steps):
    bad = [s for s in steps if s["status"] in ("failed", "timeout")]
    if not bad:
        return []
    lines = ["## Failures", ""]
    for step in bad:
        lines += [f"### {step['backend']} {step['unit']}: {step['status']}", ""]
        lines += [_cell(step.get("error", ""), 2000), ""]
        tail = step.get("traceback") or step.get("output_tail") or []
        if tail:
            lines += ["```", *tail[-15:], "```", ""]
    return lines
