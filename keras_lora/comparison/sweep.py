"""Sweeps: the learning rate per method, and LoRA's rank and targets.

Both run every fine-tune in this process, one after the other, on the same
base model, training windows, steps, schedule and held-out windows as the
main comparison (`run_comparison`), and record the validation loss after
each; nothing is saved but the report.

- `lr_sweep`: full fine-tuning and LoRA at each learning rate of a grid
  (`keras-lora compare --lr-sweep`). It is how the default learning rates
  of `ComparisonConfig` were chosen: LoRA usually wants a much higher rate
  than full fine-tuning, and comparing the two at one shared rate would
  favour one of them.
- `rank_sweep`: LoRA at several ranks on query/value and on all linear
  layers, next to full fine-tuning (`keras-lora compare --sweep`): the
  validation loss against the number of trainable parameters, the
  picture of the LoRA paper's rank tables.

Each writes `<name>.json` (every run), `<name>.txt` (a table) and
`<name>.png` into the output directory.
"""

import json
import os
import tempfile

from keras_lora.comparison import base_model, report
from keras_lora.comparison.config import LEARNING_RATE_GRID, TARGETS
from keras_lora.comparison.phase import run_phase
from keras_lora.comparison.progress import Clock, status

LR_SWEEP_NAME = "lr_sweep"
RANK_SWEEP_NAME = "sweep"
DEFAULT_RANKS = (1, 2, 4, 8, 16)


def output_names(name):
    return tuple(f"{name}.{ext}" for ext in ("json", "txt", "png"))


def lr_sweep(
    config,
    output_dir,
    learning_rates=None,
    cache_dir=None,
    progress=True,
    plots=True,
    overwrite=False,
):
    """Fine-tunes both ways at each learning rate; returns the sweep dict.

    `learning_rates` maps `"full"` and `"lora"` to rates (default:
    `LEARNING_RATE_GRID`).
    """
    grid = LEARNING_RATE_GRID if learning_rates is None else learning_rates
    runs = []
    for mode in ("full", "lora"):
        for rate in grid.get(mode, ()):
            field = f"{mode}_learning_rate"
            runs.append((mode, config.replace(**{field: float(rate)})))
    return _sweep(
        LR_SWEEP_NAME,
        config,
        runs,
        output_dir,
        cache_dir,
        progress,
        plots,
        overwrite,
        extra={"grid": {k: list(v) for k, v in grid.items()}},
    )


def rank_sweep(
    config,
    output_dir,
    ranks=DEFAULT_RANKS,
    targets=TARGETS,
    cache_dir=None,
    progress=True,
    plots=True,
    overwrite=False,
):
    """LoRA at each rank on each target set, and full fine-tuning once.

    Alpha stays `config.alpha` at every rank, as in the LoRA paper (with
    Adam, the scale `alpha / r` then keeps the size of the update about
    the same across ranks, so one learning rate serves them all).
    """
    runs = [("full", config)]
    for target in targets:
        for rank in ranks:
            runs.append(
                (
                    "lora",
                    config.replace(rank=int(rank), targets=target),
                )
            )
    return _sweep(
        RANK_SWEEP_NAME,
        config,
        runs,
        output_dir,
        cache_dir,
        progress,
        plots,
        overwrite,
        extra={"ranks": list(ranks), "targets": list(targets)},
    )


def _sweep(
    name,
    config,
    runs,
    output_dir,
    cache_dir,
    progress,
    plots,
    overwrite,
    extra,
):
    import keras

    from keras_lora.comparison.runner import (
        check_output_dir,
        prepare_data_and_base,
    )

    clock = Clock()
    output_dir = check_output_dir(output_dir, output_names(name), overwrite)
    os.makedirs(output_dir, exist_ok=True)
    preset, base_info = base_model.prepare_base(config, cache_dir, progress)
    records = []
    with tempfile.TemporaryDirectory(prefix=".work-", dir=output_dir) as work:
        windows_path = os.path.join(work, "windows.npz")
        base = prepare_data_and_base(
            config, preset, windows_path, progress, clock, samples=False
        )
        for index, (mode, run_config) in enumerate(runs, start=1):
            label = _run_label(mode, run_config)
            status(f"[{index}/{len(runs)}] {label}", progress)
            result = run_phase(
                {
                    "mode": mode,
                    "config": run_config.to_dict(),
                    "preset": preset,
                    "windows": windows_path,
                    "output_dir": work,
                    "progress": progress,
                    "samples": False,
                    "save": False,
                    "label": label,
                }
            )
            records.append(_record(mode, run_config, result))
            clock.lap(f"run {index}")
            status(
                f"    validation loss {records[-1]['val_loss']:.3f} (base "
                f"{base['validation_before']['loss']:.3f})",
                progress,
            )
            keras.backend.clear_session()
    sweep = {
        "name": name,
        "backend": keras.backend.backend(),
        "config": config.to_dict(),
        "preset": preset,
        "base_info": base_info,
        "steps": config.steps,
        "base_val_loss": base["validation_before"]["loss"],
        "validation_windows": base["validation_windows"],
        "runs": records,
        "seconds": sum(clock.laps.values()),
        **extra,
    }
    sweep["best_learning_rate"] = _best_rates(records)
    write_sweep(sweep, output_dir, plots=plots)
    return sweep


def _run_label(mode, config):
    if mode == "full":
        return f"full fine-tune, lr {config.full_learning_rate:g}"
    return (
        f"LoRA r={config.rank} on {config.targets_label()}, "
        f"lr {config.lora_learning_rate:g}"
    )


def _record(mode, config, result):
    curve = result["loss_curve"]
    tail = curve[-max(1, len(curve) // 10) :]
    return {
        "mode": mode,
        "rank": config.rank if mode == "lora" else None,
        "alpha": config.alpha if mode == "lora" else None,
        "targets": config.targets if mode == "lora" else None,
        "learning_rate": result["learning_rate"],
        "trainable_params": result["trainable_params"],
        "val_loss": result["validation_after"]["loss"],
        "final_train_loss": sum(tail) / len(tail),
        "train_seconds": result["train_seconds"],
        "median_step_time_s": result["timer"]["median_step_time_s"],
    }


def _best_rates(records):
    best = {}
    for record in records:
        mode = record["mode"]
        if mode not in best or record["val_loss"] < best[mode]["val_loss"]:
            best[mode] = record
    return {mode: record["learning_rate"] for mode, record in best.items()}


def format_sweep(sweep):
    """The sweep as a plain-text table."""
    base = sweep["base_val_loss"]
    full = [r["val_loss"] for r in sweep["runs"] if r["mode"] == "full"]
    full_gain = base - min(full) if full else None
    rows = [
        (
            "method",
            "rank",
            "targets",
            "peak lr",
            "trainable",
            "val loss",
            "gain",
            "/ best full",
        )
    ]
    for r in sweep["runs"]:
        gain = base - r["val_loss"]
        rows.append(
            (
                "full" if r["mode"] == "full" else "LoRA",
                "" if r["rank"] is None else str(r["rank"]),
                "" if r["targets"] is None else r["targets"],
                f"{r['learning_rate']:g}",
                f"{r['trainable_params']:,}",
                f"{r['val_loss']:.3f}",
                f"{gain:.3f}",
                f"{gain / full_gain:.2f}" if full_gain else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    config = sweep["config"]
    title = (
        "Learning-rate sweep"
        if sweep["name"] == LR_SWEEP_NAME
        else "Rank / targets sweep"
    )
    header = (
        f"{title} - backend {sweep['backend']}, {config['steps']} steps of "
        f"{config['batch_size']} x {config['sequence_length']} tokens, "
        f"warm-up + cosine decay; validation on "
        f"{sweep['validation_windows']} held-out windows; base model "
        f"validation loss {base:.3f}"
    )
    best = ", ".join(
        f"{mode} {rate:g}" for mode, rate in sweep["best_learning_rate"].items()
    )
    footer = f"best learning rate: {best}; {sweep['seconds']:.0f} s"
    return "\n".join([header, ""] + lines + ["", footer])


def write_sweep(sweep, output_dir, plots=True):
    """Writes `<name>.json`, `<name>.txt` and (optionally) `<name>.png`."""
    from keras_lora.comparison import plots as figures

    name = sweep["name"]
    report.write_text(
        os.path.join(output_dir, f"{name}.json"),
        json.dumps(sweep, indent=2, default=report.jsonable),
    )
    report.write_text(
        os.path.join(output_dir, f"{name}.txt"), format_sweep(sweep) + "\n"
    )
    if plots:
        draw = (
            figures.lr_sweep_figure
            if name == LR_SWEEP_NAME
            else figures.rank_sweep_figure
        )
        path = os.path.join(output_dir, f"{name}.png")
        report.write_figure(path, draw(sweep))
