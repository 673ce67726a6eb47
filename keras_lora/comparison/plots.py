"""The comparison's PNG plots (matplotlib `Figure`s, no pyplot state).

One style everywhere: full fine-tuning is blue, LoRA orange, the base
model gray; every title names the backend; value labels stay inside the
axes (the y-limits leave room for them); memory axes start at 0 so bar
and line heights compare honestly.
"""

COLORS = {"full": "tab:blue", "lora": "tab:orange", "base": "tab:gray"}
LABELS = {"full": "full fine-tune", "lora": "LoRA"}
MODES = ("full", "lora")
_MIB = 1024.0**2


def figure(width, height, columns=1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, columns)


def _headroom(ax, top, factor=1.15):
    """y from 0 to `top` plus room for the labels written above bars."""
    ax.set_ylim(0, max(top, 1e-9) * factor)


def _title(fig, text, results):
    fig.suptitle(f"{text} - backend {results['backend']}", fontsize=11)


def main_figures(results):
    """`(loss, memory, speed)` figures of one comparison run."""
    return loss_figure(results), memory_figure(results), speed_figure(results)


def loss_figure(results):
    fig, ax = figure(7.5, 4.2)
    for mode in MODES:
        curve = results[mode]["loss_curve"]
        steps = list(range(1, len(curve) + 1))
        ax.plot(steps, curve, color=COLORS[mode], alpha=0.25, linewidth=1)
        ax.plot(
            steps,
            smooth(curve),
            color=COLORS[mode],
            label=f"{LABELS[mode]}: training loss (smoothed)",
        )
        after = results[mode]["validation_after"]["loss"]
        ax.scatter(
            [len(curve)],
            [after],
            color=COLORS[mode],
            marker="*",
            s=140,
            zorder=3,
            label=f"{LABELS[mode]}: validation after, {after:.3f}",
        )
    before = results["base"]["validation_before"]["loss"]
    ax.axhline(
        before,
        color=COLORS["base"],
        linestyle="--",
        label=f"base model: validation, {before:.3f}",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _title(fig, "Fine-tuning loss (same data, same held-out windows)", results)
    return fig


def smooth(values, width=None):
    """Trailing moving average (window: a 15th of the curve)."""
    width = width or max(1, len(values) // 15)
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def memory_figure(results):
    fig, (left, right) = figure(10.5, 4, columns=2)
    kind = results["full"]["memory"]["kind"]
    what = "GPU memory" if kind == "gpu" else "process RSS (CPU)"
    top = 0.0
    for mode in MODES:
        records = results[mode]["memory"]["records"]
        peaks = [r["peak_bytes"] / _MIB for r in records]
        top = max([top, *peaks])
        left.plot(
            [r["step"] for r in records],
            peaks,
            marker="o",
            color=COLORS[mode],
            label=f"{LABELS[mode]} peak",
        )
    _headroom(left, top)
    left.set_xlabel("training step")
    left.set_ylabel("MiB")
    left.set_title(f"Peak {what} during training", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")

    names = [LABELS[m] for m in MODES]
    baseline = [
        (results[m]["memory"]["baseline_bytes"] or 0) / _MIB for m in MODES
    ]
    overhead = [
        (results[m]["memory"]["overhead_bytes"] or 0) / _MIB for m in MODES
    ]
    right.bar(names, baseline, color="lightgray", label="in use at start")
    right.bar(
        names,
        overhead,
        bottom=baseline,
        color=[COLORS[m] for m in MODES],
        label="added by training",
    )
    for index, value in enumerate(overhead):
        right.text(
            index,
            baseline[index] + value,
            f"+{value:,.0f} MiB",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    totals = [b + o for b, o in zip(baseline, overhead, strict=True)]
    _headroom(right, max(totals))
    right.set_ylabel("MiB")
    right.set_title("Memory at start + training overhead", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    _title(fig, "Memory", results)
    return fig


def speed_figure(results):
    fig, (left, right) = figure(10.5, 4, columns=2)
    names = [LABELS[m] for m in MODES]
    times = [results[m]["timer"]["step_times_s"] for m in MODES]
    if all(times):
        boxes = left.boxplot(
            times, showfliers=False, patch_artist=True, widths=0.5
        )
        for box, mode in zip(boxes["boxes"], MODES, strict=True):
            box.set_facecolor(COLORS[mode])
            box.set_alpha(0.8)
        for median in boxes["medians"]:
            median.set_color("black")
        left.set_xticks([1, 2], names)
        _headroom(left, max(max(t) for t in times), factor=1.1)
    left.set_ylabel("seconds per step")
    left.set_title("Step time (after warm-up)", fontsize=10)
    left.grid(alpha=0.3)
    tokens = [results[m]["timer"]["tokens_per_second"] or 0.0 for m in MODES]
    right.bar(names, tokens, color=[COLORS[m] for m in MODES])
    for index, value in enumerate(tokens):
        right.text(index, value, f"{value:,.0f}", ha="center", va="bottom")
    _headroom(right, max(tokens))
    right.set_ylabel("tokens / s")
    right.set_title("Training throughput (median step)", fontsize=10)
    _title(fig, "Speed", results)
    return fig


def lr_sweep_figure(sweep):
    """Validation loss against learning rate, one line per method."""
    fig, ax = figure(7, 4.2)
    for mode in MODES:
        runs = sorted(
            (r for r in sweep["runs"] if r["mode"] == mode),
            key=lambda r: r["learning_rate"],
        )
        if not runs:
            continue
        ax.plot(
            [r["learning_rate"] for r in runs],
            [r["val_loss"] for r in runs],
            marker="o",
            color=COLORS[mode],
            label=LABELS[mode],
        )
        best = min(runs, key=lambda r: r["val_loss"])
        ax.scatter(
            [best["learning_rate"]],
            [best["val_loss"]],
            marker="*",
            s=180,
            color=COLORS[mode],
            zorder=3,
            label=f"{LABELS[mode]} best: {best['learning_rate']:g}",
        )
    ax.axhline(
        sweep["base_val_loss"],
        color=COLORS["base"],
        linestyle="--",
        label=f"base model: {sweep['base_val_loss']:.3f}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW, warm-up + cosine decay)")
    ax.set_ylabel("validation loss after fine-tuning")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left")
    _title(fig, f"Learning-rate sweep, {sweep['steps']} steps", sweep)
    return fig


def rank_sweep_figure(sweep):
    """Validation loss against trainable parameters (the LoRA paper's
    picture): one line per LoRA target set, full fine-tuning as a point."""
    fig, ax = figure(7.5, 4.5)
    markers = {"query_value": "o", "all-linear": "s"}
    shades = {"query_value": "tab:orange", "all-linear": "darkorange"}
    for targets in sweep["targets"]:
        runs = sorted(
            (
                r
                for r in sweep["runs"]
                if r["mode"] == "lora" and r["targets"] == targets
            ),
            key=lambda r: r["trainable_params"],
        )
        if not runs:
            continue
        line = "-" if targets == "query_value" else "--"
        ax.plot(
            [r["trainable_params"] for r in runs],
            [r["val_loss"] for r in runs],
            line,
            marker=markers.get(targets, "o"),
            color=shades.get(targets, COLORS["lora"]),
            label=f"LoRA on {_targets_label(targets)}",
        )
        for r in runs:
            ax.annotate(
                f"r={r['rank']}",
                (r["trainable_params"], r["val_loss"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    for r in sweep["runs"]:
        if r["mode"] == "full":
            ax.scatter(
                [r["trainable_params"]],
                [r["val_loss"]],
                marker="D",
                s=70,
                color=COLORS["full"],
                zorder=3,
                label="full fine-tune",
            )
    ax.axhline(
        sweep["base_val_loss"],
        color=COLORS["base"],
        linestyle="--",
        label=f"base model: {sweep['base_val_loss']:.3f}",
    )
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("validation loss after fine-tuning")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    _title(fig, "Validation loss vs trainable parameters", sweep)
    return fig


def _targets_label(targets):
    return "query/value" if targets == "query_value" else "all linear layers"
