"""Runs GPU pack units inside one Keras backend's process (a child of
`benchmarks.gpu_check`):

    KERAS_BACKEND=jax python -m benchmarks.gpu_steps --out part.json \\
        --units memory,generate [--dry-run] [--deadline EPOCH]

The units are in `benchmarks.gpu_units`. On a GPU run the process first
checks that the backend computes on a GPU, and every unit fails if not (a
unit never falls back to the CPU unnoticed); a dry run checks it computes
on the CPU. Each unit's outcome (`ok`, `failed` with the error or failed
checks, `skipped` with the reason) is written to `--out` as soon as it is
known, partial training results too, so a process killed at its time limit
still leaves what it finished. Exit status 1 if any unit failed.
"""

import argparse
import gc
import os
import sys
import time
import traceback

import keras

import keras_lora as kl
from benchmarks import common
from benchmarks.gpu_units import UNITS, Context, on_gpu, placement, run_unit

# A unit does not start with less time than this left (seconds).
MIN_UNIT_SECONDS = {"gpu": 20.0, "dry-run": 1.0}


def accelerator():
    """A description of the device the backend runs on by default."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return {"platform": device.platform, "device": device.device_kind}
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return {
                "platform": "cuda",
                "device": torch.cuda.get_device_name(0),
                "cuda": torch.version.cuda,
            }
        return {"platform": "cpu", "device": common.cpu_model()}
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return {"platform": "gpu" if gpus else "cpu", "device": str(gpus)}


def environment():
    backend = keras.backend.backend()
    info = common.machine_info(backend)
    info["accelerator"] = accelerator()
    info["keras_lora"] = {"version": kl.__version__, "file": kl.__file__}
    for name in ("keras_hub", "peft", "transformers", "torch"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def require_device(ctx):
    """Raises unless the backend runs where the mode says (GPU or CPU)."""
    where = placement(keras.ops.zeros((1,)))
    if ctx.dry_run and on_gpu(where):
        raise RuntimeError(f"dry run, but {ctx.backend} computes on {where}")
    if not ctx.dry_run and not on_gpu(where):
        raise RuntimeError(
            f"no GPU visible to {ctx.backend}: a new tensor lands on "
            f"{where}. Check the CUDA install ({accelerator()})."
        )
    return where


def run(units, out, dry_run, deadline=None, fail=(), log=print):
    ctx = Context(dry_run, log=log)
    part = {"backend": ctx.backend, "mode": ctx.mode, "units": {}}

    def save():
        common.write_json(out, part)

    try:
        part["environment"] = environment()
        part["environment"]["default_device"] = require_device(ctx)
        ready = None
    except Exception as error:  # every unit fails with this reason
        ready = f"{type(error).__name__}: {error}"
    save()
    for unit in units:
        entry = part["units"][unit] = {"status": "running"}
        left = None if deadline is None else deadline - time.time()
        if ready is not None:
            entry.update(status="failed", error=ready)
        elif left is not None and left < MIN_UNIT_SECONDS[ctx.mode]:
            entry.update(
                status="skipped",
                reason=f"time budget: {max(left, 0):.0f} s left in this "
                "process's share",
            )
        else:
            save()
            start = time.perf_counter()

            def partial(data, entry=entry):
                entry["result"] = data
                save()

            try:
                if unit in fail:
                    raise RuntimeError(f"injected failure (--fail {unit})")
                result, checks = run_unit(ctx, unit, partial)
                failed = [c for c in checks if not c["ok"]]
                entry.update(
                    status="failed" if failed else "ok",
                    result=result,
                    checks=checks,
                )
                if failed:
                    entry["error"] = "; ".join(
                        f"{c['check']}: {c['detail']}" for c in failed
                    )
            except Exception as error:
                entry.update(
                    status="failed",
                    error=f"{type(error).__name__}: {error}",
                    traceback=traceback.format_exc().splitlines()[-25:],
                )
            entry["seconds"] = round(time.perf_counter() - start, 1)
            free_memory()
        log(
            f"[{ctx.backend}] {unit}: {entry['status']}"
            + (f" ({entry['error']})" if "error" in entry else "")
            + (f" ({entry['reason']})" if "reason" in entry else "")
        )
        save()
    statuses = [e["status"] for e in part["units"].values()]
    return 1 if "failed" in statuses else 0


def free_memory():
    gc.collect()
    if keras.backend.backend() == "torch" or "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_steps",
        description="GPU pack units in this Keras backend's process.",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--units", required=True, help=f"Comma-separated, of: {UNITS}."
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Tiny sizes, on the CPU."
    )
    parser.add_argument(
        "--deadline",
        type=float,
        help="Start no unit after this time (seconds since the epoch).",
    )
    parser.add_argument(
        "--fail", default="", help="Units to fail on purpose (tests the pack)."
    )
    args = parser.parse_args(argv)
    units = [u for u in args.units.split(",") if u]
    unknown = [u for u in units if u not in UNITS]
    if unknown:
        parser.error(f"unknown unit(s) {unknown}; choose from {UNITS}")
    fail = {u for u in args.fail.split(",") if u}

    def log(message):
        print(message, flush=True)

    log(f"[{keras.backend.backend()}] pid {os.getpid()}: {', '.join(units)}")
    return run(units, args.out, args.dry_run, args.deadline, fail, log=log)


if __name__ == "__main__":
    sys.exit(main())
