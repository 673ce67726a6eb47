"""The comparison's report: summary, terminal table, JSON and PNG plots.

`write_report(results, output_dir)` writes, each atomically:

    comparison.json     everything `run_comparison` measured, plus `summary`
    comparison.txt      the table `format_table` prints
    loss_curves.png     training loss per step; validation before/after
    memory.png          peak memory over training; training overhead
    speed.png           step time and tokens/s

The plots themselves are drawn in `plots.py`.
"""

import collections
import json
import os
import re

from keras_lora.comparison.plots import main_figures
from keras_lora.files.atomic import atomic_write_file

JSON_NAME = "comparison.json"
TABLE_NAME = "comparison.txt"
PLOT_NAMES = ("loss_curves.png", "memory.png", "speed.png")
ADAPTER_NAME = "lora_adapter"
# Everything a comparison run writes into its output directory.
OUTPUT_NAMES = (JSON_NAME, TABLE_NAME, ADAPTER_NAME, *PLOT_NAMES)
_MIB = 1024.0**2
# LoRA's validation-loss gain must reach this share of full fine-tuning's.
GAIN_RATIO_TARGET = 0.6
# The one check that holds at any size (a count, not a measurement).
SIZE_INDEPENDENT_CHECKS = ("lora_params_match_formula",)


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
    full_gain = before["loss"] - full["val_loss_after"]
    lora_gain = before["loss"] - lora["val_loss_after"]
    summary["val_loss_gain"] = {"full": full_gain, "lora": lora_gain}
    summary["lora_gain_ratio"] = lora_gain / full_gain if full_gain else None
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
        "lora_gain_at_least_0.6x_full": full_gain > 0
        and lora_gain >= GAIN_RATIO_TARGET * full_gain,
        "full_samples_not_degenerate": not any(
            degenerate(s["completion"]) for s in results["full"]["samples"]
        ),
        "lora_samples_not_degenerate": not any(
            degenerate(s["completion"]) for s in results["lora"]["samples"]
        ),
    }
    summary["checks_meaningful"] = not results["config"].get("smoke_test")
    return summary


def degenerate(text):
    """Whether a sample is degenerate: blank, or one word over and over.

    Blank means fewer than three non-space characters; repetitive means
    one whitespace-separated word makes up more than half of the words
    (e.g. "the the the ..." or '" " " ...').
    """
    if len(re.sub(r"\s", "", text)) < 3:
        return True
    words = text.split()
    top = collections.Counter(words).most_common(1)[0][1]
    return len(words) >= 4 and top / len(words) > 0.5


def failed_checks(summary):
    """Names of the checks that failed and count (none at smoke-test
    size, where only `SIZE_INDEPENDENT_CHECKS` are judged)."""
    return [
        name
        for name, ok in summary["checks"].items()
        if not ok
        and (
            summary.get("checks_meaningful", True)
            or name in SIZE_INDEPENDENT_CHECKS
        )
    ]


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
            "val loss gain (base - tuned)",
            f"{s['val_loss_gain']['full']:.3f}",
            f"{s['val_loss_gain']['lora']:.3f}",
            _num(s["lora_gain_ratio"], ".2f"),
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
    targets = config.get("targets", "query_value")
    header = (
        f"GPT-2 fine-tuning: full vs LoRA (rank {config['rank']}, alpha "
        f"{config['alpha']:g}, {_TARGET_NAMES.get(targets, targets)}) - "
        f"backend {results['backend']}, {results['isolation']}, "
        f"{config['steps']} steps of {config['batch_size']} x "
        f"{config['sequence_length']} tokens; peak learning rate full "
        f"{config['full_learning_rate']:g}, LoRA "
        f"{config['lora_learning_rate']:g} (warm-up, cosine decay)"
    )
    base = results["base"]
    data_line = (
        f"fine-tuning text: {base['data_source']}; "
        f"{base['train_windows']:,} training windows, the same "
        f"{base['validation_windows']} held-out windows (the end of the "
        "text) evaluate the base and both tuned models"
    )
    out = [header, data_line, ""] + lines + [""] + _checks_lines(s)
    out += ["", _samples_title(config)]
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


_TARGET_NAMES = {"query_value": "query/value", "all-linear": "all linear"}


def _checks_lines(summary):
    checks = summary["checks"]
    if summary.get("checks_meaningful", True):
        marks = [f"{'ok' if v else 'NO'} {k}" for k, v in checks.items()]
        return ["checks: " + ", ".join(marks)]
    judged = [k for k in checks if k in SIZE_INDEPENDENT_CHECKS]
    marks = [f"{'ok' if checks[k] else 'NO'} {k}" for k in judged]
    rest = [k for k in checks if k not in SIZE_INDEPENDENT_CHECKS]
    return [
        "checks: " + ", ".join(marks),
        "not meaningful at this size (a smoke test: seconds of training on "
        "a toy model), so not judged: " + ", ".join(rest),
    ]


def _samples_title(config):
    top_k = config.get("sample_top_k", 1)
    if top_k == 1:
        return "Greedy samples (same prompts):"
    return (
        f"Samples (same prompts; top-{top_k} sampling, seed "
        f"{config.get('sample_seed')}):"
    )


def _base_line(results):
    info = results["base_info"]
    if info.get("source") == "preset":
        return f"preset {results['preset']}"
    if info.get("source") == "shipped":
        return (
            f"shipped with the package ({info['steps']} steps on "
            f"{info['corpus']}, held-out loss {info['held_out_loss']:.3f}; "
            f"not trained by this run) at {results['preset']}"
        )
    cached = "cached" if info.get("cached") else "pre-trained this run"
    held_out = info.get("held_out_loss")
    learned = "" if held_out is None else f", held-out loss {held_out:.3f}"
    return (
        f"{cached} ({info['steps']} steps on {info['corpus']}"
        f"{learned}, {info['pretrain_seconds']:.0f} s) at {results['preset']}"
    )


def write_report(results, output_dir, plots=True):
    """Writes JSON, table and (optionally) plots; returns their paths."""
    paths = [
        write_text(
            os.path.join(output_dir, JSON_NAME),
            json.dumps(results, indent=2, default=jsonable),
        ),
        write_text(
            os.path.join(output_dir, TABLE_NAME), format_table(results) + "\n"
        ),
    ]
    if plots:
        figures = main_figures(results)
        for name, figure in zip(PLOT_NAMES, figures, strict=True):
            paths.append(write_figure(os.path.join(output_dir, name), figure))
    return paths


def jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_text(path, text):
    def write(tmp, _scratch):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write_file(path, write)


def write_figure(path, figure):
    def write(tmp, _scratch):
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    return atomic_write_file(path, write)
