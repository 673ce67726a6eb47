"""The comparison's report: summary, terminal table, JSON and PNG plots.

`write_report(results, output_dir)` writes, each atomically:

    comparison.json     everything `run_comparison` measured, plus `summary`
    comparison.txt      the table `format_table` prints
    loss_curves.png     training loss per step; validation before/after
    memory.png          peak memory over training; training overhead
    speed.png           step time and tokens/s
"""

import json
import os

from keras_lora.files.atomic import atomic_write_file

JSON_NAME = "comparison.json"
TABLE_NAME = "comparison.txt"
PLOT_NAMES = ("loss_curves.png", "memory.png", "speed.png")
_MIB = 1024.0**2


def summarize(results):
    """The headline numbers of `results`, per phase, and the checks."""
    base = results["base"]
    before = base["validation_before"]
    summary = {
        "base": {
            "total_params": base["total_params"],
            "val_loss": before["loss"],
            "perplexity": before["perplexity"],
        }
    }
    for mode in ("full", "lora"):
        phase = results[mode]
        memory, timer = phase["memory"], phase["timer"]
        after = phase["validation_after"]
        summary[mode] = {
            "trainable_params": phase["trainable_params"],
            "total_params": phase["total_params"],
            "trainable_percent": 100.0
            * phase["trainable_params"]
            / phase["total_params"],
            "saved_bytes": phase["saved_bytes"],
            "median_step_time_s": timer["median_step_time_s"],
            "tokens_per_second": timer["tokens_per_second"],
            "memory_kind": memory["kind"],
            "peak_memory_bytes": memory["peak_bytes"],
            "memory_overhead_bytes": memory["overhead_bytes"],
            "train_seconds": phase["train_seconds"],
            "val_loss_before": before["loss"],
            "val_loss_after": after["loss"],
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"],
        }
    full, lora = summary["full"], summary["lora"]
    summary["checks"] = {
        "lora_params_match_formula": lora["trainable_params"]
        == results["expected_lora_params"],
        "lora_trains_under_1_percent": lora["trainable_percent"] < 1.0,
        "lora_improves_on_base": lora["val_loss_after"] < before["loss"],
        "full_improves_on_base": full["val_loss_after"] < before["loss"],
        "lora_memory_overhead_below_full": _less(
            lora["memory_overhead_bytes"], full["memory_overhead_bytes"]
        ),
        "lora_peak_memory_below_full": _less(
            lora["peak_memory_bytes"], full["peak_memory_bytes"]
        ),
        "lora_step_faster_than_full": _less(
            lora["median_step_time_s"], full["median_step_time_s"]
        ),
        "lora_file_smaller_than_full": lora["saved_bytes"]
        < full["saved_bytes"],
    }
    return summary


def _less(a, b):
    return a is not None and b is not None and a < b


def _bytes(n):
    if n is None:
        return "n/a"
    if abs(n) >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if abs(n) >= _MIB:
        return f"{n / _MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _ratio(a, b):
    if a is None or b is None or not b:
        return ""
    return f"{a / b:.3f}"


def _num(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def format_table(results):
    """The comparison as a plain-text table, then the samples."""
    s = results.get("summary") or summarize(results)
    full, lora = s["full"], s["lora"]
    kind = "GPU memory" if full["memory_kind"] == "gpu" else "peak RSS"
    rows = [
        ("", "full fine-tune", "LoRA", "LoRA / full"),
        (
            "trainable params",
            f"{full['trainable_params']:,}",
            f"{lora['trainable_params']:,}",
            _ratio(lora["trainable_params"], full["trainable_params"]),
        ),
        (
            "total params",
            f"{full['total_params']:,}",
            f"{lora['total_params']:,}",
            "",
        ),
        (
            "trainable %",
            f"{full['trainable_percent']:.2f}%",
            f"{lora['trainable_percent']:.3f}%",
            "",
        ),
        (
            "saved file size",
            _bytes(full["saved_bytes"]),
            _bytes(lora["saved_bytes"]),
            _ratio(lora["saved_bytes"], full["saved_bytes"]),
        ),
        (
            "median step time",
            _num(full["median_step_time_s"], ".3f") + " s",
            _num(lora["median_step_time_s"], ".3f") + " s",
            _ratio(lora["median_step_time_s"], full["median_step_time_s"]),
        ),
        (
            "tokens / s",
            _num(full["tokens_per_second"], ",.0f"),
            _num(lora["tokens_per_second"], ",.0f"),
            _ratio(lora["tokens_per_second"], full["tokens_per_second"]),
        ),
        (
            f"{kind} during training",
            _bytes(full["peak_memory_bytes"]),
            _bytes(lora["peak_memory_bytes"]),
            _ratio(lora["peak_memory_bytes"], full["peak_memory_bytes"]),
        ),
        (
            "training memory overhead",
            _bytes(full["memory_overhead_bytes"]),
            _bytes(lora["memory_overhead_bytes"]),
            _ratio(
                lora["memory_overhead_bytes"], full["memory_overhead_bytes"]
            ),
        ),
        (
            "val loss: base -> tuned",
            f"{full['val_loss_before']:.3f} -> {full['val_loss_after']:.3f}",
            f"{lora['val_loss_before']:.3f} -> {lora['val_loss_after']:.3f}",
            "",
        ),
        (
            "perplexity: base -> tuned",
            f"{full['perplexity_before']:.1f} -> "
            f"{full['perplexity_after']:.1f}",
            f"{lora['perplexity_before']:.1f} -> "
            f"{lora['perplexity_after']:.1f}",
            "",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    config = results["config"]
    header = (
        f"GPT-2 fine-tuning: full vs LoRA (rank {config['rank']}, alpha "
        f"{config['alpha']:g}, query/value) - backend "
        f"{results['backend']}, {results['isolation']}, "
        f"{config['steps']} steps of {config['batch_size']} x "
        f"{config['sequence_length']} tokens"
    )
    out = [header, ""] + lines + ["", _checks_line(s["checks"])]
    out += ["", "Greedy samples (same prompts):"]
    for index, prompt in enumerate(config["prompts"]):
        out.append(f"  prompt {prompt!r}")
        for name, samples in (
            ("base", results["base"]["samples"]),
            ("full", results["full"]["samples"]),
            ("lora", results["lora"]["samples"]),
        ):
            out.append(f"    {name:>4}: {samples[index]['completion']!r}")
    out.append(
        f"\nwall time {results['wall_seconds']:.0f} s; base model: "
        f"{_base_line(results)}"
    )
    return "\n".join(out)


def _checks_line(checks):
    marks = [f"{'ok' if v else 'NO'} {k}" for k, v in checks.items()]
    return "checks: " + ", ".join(marks)


def _base_line(results):
    info = results["base_info"]
    if info.get("source") == "preset":
        return f"preset {results['preset']}"
    cached = "cached" if info.get("cached") else "pre-trained this run"
    return (
        f"{cached} ({info['steps']} steps on pydoc_data.topics, "
        f"{info['pretrain_seconds']:.0f} s) at {results['preset']}"
    )


def write_report(results, output_dir, plots=True):
    """Writes JSON, table and (optionally) plots; returns their paths."""
    paths = [
        _write_text(
            os.path.join(output_dir, JSON_NAME),
            json.dumps(results, indent=2, default=_jsonable),
        ),
        _write_text(
            os.path.join(output_dir, TABLE_NAME), format_table(results) + "\n"
        ),
    ]
    if plots:
        for name, figure in zip(PLOT_NAMES, make_figures(results), strict=True):
            paths.append(_write_figure(os.path.join(output_dir, name), figure))
    return paths


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _write_text(path, text):
    def write(tmp, _scratch):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write_file(path, write)


def _write_figure(path, figure):
    def write(tmp, _scratch):
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    return atomic_write_file(path, write)


def make_figures(results):
    """`(loss, memory, speed)` matplotlib figures (no pyplot state)."""
    return loss_figure(results), memory_figure(results), speed_figure(results)


_COLORS = {"full": "tab:blue", "lora": "tab:orange"}
_LABELS = {"full": "full fine-tune", "lora": "LoRA"}


def _figure(width, height, columns=1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(1, columns)
    return figure, axes


def loss_figure(results):
    figure, ax = _figure(7, 4)
    for mode in ("full", "lora"):
        curve = results[mode]["loss_curve"]
        steps = list(range(1, len(curve) + 1))
        ax.plot(steps, curve, color=_COLORS[mode], alpha=0.25, linewidth=1)
        ax.plot(
            steps,
            _smooth(curve),
            color=_COLORS[mode],
            label=f"{_LABELS[mode]} (train, smoothed)",
        )
        after = results[mode]["validation_after"]["loss"]
        ax.scatter(
            [len(curve)],
            [after],
            color=_COLORS[mode],
            marker="*",
            s=120,
            zorder=3,
            label=f"{_LABELS[mode]} validation after: {after:.3f}",
        )
    before = results["base"]["validation_before"]["loss"]
    ax.axhline(
        before,
        color="gray",
        linestyle="--",
        label=f"base model validation: {before:.3f}",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"Training loss ({results['backend']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def _smooth(values, width=None):
    width = width or max(1, len(values) // 15)
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def memory_figure(results):
    figure, (left, right) = _figure(10, 3.8, columns=2)
    kind = results["full"]["memory"]["kind"]
    what = "GPU memory" if kind == "gpu" else "process RSS (CPU)"
    for mode in ("full", "lora"):
        records = results[mode]["memory"]["records"]
        left.plot(
            [r["step"] for r in records],
            [r["peak_bytes"] / _MIB for r in records],
            marker="o",
            color=_COLORS[mode],
            label=f"{_LABELS[mode]} peak",
        )
    left.set_xlabel("training step")
    left.set_ylabel("MiB")
    left.set_title(f"Peak {what}", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = [_LABELS[m] for m in ("full", "lora")]
    baseline = [
        (results[m]["memory"]["baseline_bytes"] or 0) / _MIB
        for m in ("full", "lora")
    ]
    overhead = [
        (results[m]["memory"]["overhead_bytes"] or 0) / _MIB
        for m in ("full", "lora")
    ]
    right.bar(names, baseline, color="lightgray", label="in use at start")
    right.bar(
        names,
        overhead,
        bottom=baseline,
        color=[_COLORS["full"], _COLORS["lora"]],
        label="training overhead",
    )
    for index, value in enumerate(overhead):
        right.text(
            index,
            baseline[index] + value,
            f"+{value:.0f} MiB",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    right.set_ylabel("MiB")
    right.set_title("Memory at start + training overhead", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    return figure


def speed_figure(results):
    figure, (left, right) = _figure(10, 3.8, columns=2)
    names = [_LABELS[m] for m in ("full", "lora")]
    colors = [_COLORS["full"], _COLORS["lora"]]
    times = [results[m]["timer"]["step_times_s"] for m in ("full", "lora")]
    if all(times):
        left.boxplot(times, showfliers=False)
        left.set_xticks([1, 2], names)
    left.set_ylabel("seconds per step")
    left.set_title("Step time (after warm-up)", fontsize=10)
    left.grid(alpha=0.3)
    tokens = [
        results[m]["timer"]["tokens_per_second"] or 0.0
        for m in ("full", "lora")
    ]
    right.bar(names, tokens, color=colors)
    for index, value in enumerate(tokens):
        right.text(index, value, f"{value:,.0f}", ha="center", va="bottom")
    right.set_ylabel("tokens / s")
    right.set_title("Training throughput (median step)", fontsize=10)
    return figure
