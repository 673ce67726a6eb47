"""The GPU pack's units: what one Keras backend's process measures.

- `memory`: `kl.callbacks.MemoryUsage` on the real allocator: two short
  `fit` calls, the second with a known block allocated on the device at
  step 2; that block must show in the device peak (and in a dry run, in
  the process's resident memory).
- `generate`: routed vs looped greedy generation for 32 adapters
  (`benchmarks.serving.routed_vs_loop_generate`).
- `train-<w1|w2>-<float32|mixed_bfloat16>`: a GPT-2 training step, full
  fine-tuning vs Keras's built-in LoRA vs keras_lora vs PEFT
  (`benchmarks.training.run_workload`), step time and peak device memory.

Each unit returns `(result, checks)`: the figures, and a list of checks
(`check(...)`) whose failure fails the unit. `benchmarks.gpu_steps` runs
them; `--dry-run` sizes are the `DRY_*` settings here.
"""

import contextlib

import keras
import numpy as np

import keras_lora as kl
from benchmarks import serving, training
from benchmarks.gpt2_variants import WORKLOADS

MIB = 2**20
PRECISIONS = ("float32", "mixed_bfloat16")
TRAIN_UNITS = tuple(f"train-{w}-{p}" for w in ("w2", "w1") for p in PRECISIONS)
UNITS = ("memory", "generate") + TRAIN_UNITS
# JAX cannot reset its peak counter: variants run in rising order of memory
# so that each one raises it (see benchmarks.device_memory).
VARIANT_ORDER = ("keras_lora", "builtin", "full", "peft")
# Each variant's first steps (compiling, cuBLAS and allocator set-up) come
# before its timed rounds, so no separate runtime warm-up is run.
TRAIN_SETTINGS = {
    "gpu": {
        "warmup": 2,
        "repeats": 10,
        "min_repeats": 5,
        "max_other_share": 1.0,  # the GPU machine runs nothing else
        "max_seconds": 30.0,
        "memory_warmup": 1,
        "memory_steps": 2,
        "jit_compile": "auto",
    },
    "dry-run": {
        "warmup": 0,
        "repeats": 1,
        "min_repeats": 1,
        "max_other_share": 1.0,
        "max_seconds": 2.0,
        "memory_warmup": 1,
        "memory_steps": 1,
        "jit_compile": "auto",
    },
}
# keras-hub's test-sized GPT-2 (one block) with each workload's targets.
DRY_SHAPE = dict(num_layers=1, hidden_dim=16, num_heads=2, seq=8, batch=2)
DRY_SHAPE["vocab"] = 64
DRY_GENERATE = dict(
    size=dict(serving.SIZES["quick"], num_layers=1, hidden_dim=32),
    settings=dict(
        rank=4,
        batch=4,
        prompt=4,
        loop_new_tokens=2,
        timing=dict(
            warmup=1,
            repeats=2,
            min_repeats=1,
            max_other_share=1.0,
            max_seconds=2.0,
        ),
    ),
)
# Keras's first losses of full / builtin / keras_lora start from the same
# weights with a zero LoRA branch, so they agree up to rounding.
FIRST_LOSS_TOLERANCE = {"float32": 1e-3, "mixed_bfloat16": 5e-2}


class Context:
    """What a unit needs: the mode, the backend and a logger."""

    def __init__(self, dry_run, log=print):
        self.mode = "dry-run" if dry_run else "gpu"
        self.dry_run = dry_run
        self.backend = keras.backend.backend()
        self.log = log


def check(name, ok, detail):
    return {"check": name, "ok": bool(ok), "detail": detail}


# -- where things run -------------------------------------------------------


def placement(tensor):
    """The device a backend tensor (or a Keras variable's value) is on."""
    backend = keras.backend.backend()
    if backend == "jax":
        return ",".join(sorted(str(d) for d in tensor.devices()))
    return str(tensor.device)  # torch, tensorflow


def on_gpu(where):
    return "cuda" in where.lower() or "gpu" in where.lower()


# -- (b) MemoryUsage on the device allocator ---------------------------------


class AllocateOnDevice(keras.callbacks.Callback):
    """Holds a block of `size` bytes on the backend's device during the end
    of training step `step`, then frees it."""

    def __init__(self, step, size):
        super().__init__()
        self.step, self.size, self.seen, self.where = step, size, 0, None

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            block = keras.ops.ones((self.size // 4,), "float32")
            keras.ops.convert_to_numpy(block[-1:])  # waits until it is filled
            self.where = placement(block)
            del block


def memory_unit(ctx):
    known = (64 if ctx.dry_run else 1024) * MIB
    model = keras.Sequential(
        [keras.Input((256,)), keras.layers.Dense(256), keras.layers.Dense(8)]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.random((4 * 32, 256)).astype("float32")
    y = rng.random((4 * 32, 8)).astype("float32")
    # An unmeasured fit first: the optimizer state and compiled steps
    # exist before the two measured ones, which differ only by the block.
    model.fit(x, y, batch_size=32, verbose=0)
    runs = {}
    allocator = AllocateOnDevice(2, known)
    for label, extra in (("without", []), ("with", [allocator])):
        usage = kl.callbacks.MemoryUsage(batches=(1, 2, 3))
        model.fit(x, y, batch_size=32, verbose=0, callbacks=extra + [usage])
        runs[label] = usage.summary()
        runs[label].pop("records")
    without, with_block = runs["without"], runs["with"]
    added = with_block["overhead_bytes"] - without["overhead_bytes"]
    # A device allocator counts the whole block; resident memory (the dry
    # run) can fall a little short where freed heap pages are reused.
    slack = max(known // 10, 32 * MIB)
    expected_kind = "cpu-rss" if ctx.dry_run else "gpu"
    checks = [
        check(
            "probe",
            with_block["kind"] == expected_kind,
            f"{with_block['kind']} on {with_block['device']} "
            f"(expected {expected_kind})",
        ),
        check(
            "block on the device",
            ctx.dry_run or on_gpu(allocator.where or ""),
            f"the block was on {allocator.where}",
        ),
        check(
            "peak without the block is smaller",
            without["overhead_bytes"] < known,
            f"overhead without the block "
            f"{without['overhead_bytes'] / MIB:.1f} MiB < {known / MIB:.0f} "
            "MiB",
        ),
        check(
            "peak shows the block",
            with_block["overhead_bytes"] >= 0.95 * known,
            f"overhead with the block {with_block['overhead_bytes'] / MIB:.1f}"
            f" MiB >= 95% of {known / MIB:.0f} MiB",
        ),
        check(
            "added = block",
            0.9 * known <= added <= known + slack,
            f"with - without = {added / MIB:.1f} MiB (block "
            f"{known / MIB:.0f} MiB)",
        ),
    ]
    ctx.log(
        f"[{ctx.backend}] memory: {with_block['kind']} {with_block['device']}"
        f"; overhead without {without['overhead_bytes'] / MIB:.1f} MiB, "
        f"with a {known / MIB:.0f} MiB block "
        f"{with_block['overhead_bytes'] / MIB:.1f} MiB"
    )
    result = {"known_bytes": known, "block_on": allocator.where, **runs}
    return result, checks


# -- (d) routed vs looped generation -----------------------------------------


def generate_unit(ctx):
    if ctx.dry_run:
        size, settings = DRY_GENERATE["size"], DRY_GENERATE["settings"]
    else:
        size, settings = serving.SIZES["full"], dict(serving.SETTINGS["full"])
        settings["timing"] = dict(settings["timing"], max_other_share=1.0)
    result = serving.routed_vs_loop_generate(size, settings, log=ctx.log)
    result["model"] = dict(size)
    generated = settings["batch"] * settings["loop_new_tokens"]
    differing = result["differing_tokens_routed_vs_loop"]
    checks = [
        check(
            "routed tokens = looped tokens (within 10%)",
            differing <= 0.1 * generated,
            f"{differing} of {generated} generated tokens differ",
        )
    ]
    return result, checks


# -- (c) training steps ------------------------------------------------------


@contextlib.contextmanager
def precision_scope(precision, backend):
    """Keras's dtype policy `precision`; under float32, full-precision
    float32 matrix products on both frameworks (no TF32), so that JAX and
    PyTorch compute the same math. Yields a description."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    described = {"dtype_policy": precision}
    with contextlib.ExitStack() as stack:
        try:
            import torch

            before = torch.get_float32_matmul_precision()
            stack.callback(torch.set_float32_matmul_precision, before)
            if precision == "float32":
                torch.set_float32_matmul_precision("highest")
            described["torch_float32_matmul"] = (
                torch.get_float32_matmul_precision()
            )
        except ImportError:
            pass
        if backend == "jax" and precision == "float32":
            import jax

            stack.enter_context(jax.default_matmul_precision("highest"))
            described["jax_matmul_precision"] = "highest"
        try:
            yield described
        finally:
            keras.config.set_dtype_policy(previous)


def train_unit(ctx, unit, partial):
    _, key, precision = unit.split("-", 2)
    if ctx.dry_run:
        shape = dict(WORKLOADS[key], label=f"{key} (dry-run size)")
        shape.update(DRY_SHAPE)
    else:
        shape = dict(WORKLOADS[key])
    settings = TRAIN_SETTINGS[ctx.mode]
    seen = {}

    def on_variant(name, info):
        seen[name] = info
        partial({"variants": dict(seen), "incomplete": True})

    with precision_scope(precision, ctx.backend) as described:
        result = training.run_workload(
            ctx.backend,
            key,
            settings,
            VARIANT_ORDER,
            log=ctx.log,
            shape=shape,
            on_variant=on_variant,
        )
    # Those targets are the CPU benchmark's (host memory): the pack judges
    # its own (benchmarks.gpu_report).
    result.pop("targets_met", None)
    result.update(precision=described, settings=settings)
    diff = result["checks"]["max_first_loss_diff_keras_variants"]
    tolerance = FIRST_LOSS_TOLERANCE[precision]
    checks = [
        check(
            "losses finite",
            result["checks"]["all_losses_finite"],
            "every recorded loss is finite",
        ),
        check(
            "Keras variants start equal",
            diff is not None and diff <= tolerance,
            f"first losses of full/builtin/keras_lora differ by {diff} "
            f"(tolerance {tolerance})",
        ),
        check(
            "every variant ran",
            not result["skipped"],
            f"skipped: {result['skipped']}" if result["skipped"] else "all",
        ),
    ]
    if not ctx.dry_run:
        exact = {
            name: info["memory"].get("device_peak_exact")
            for name, info in result["variants"].items()
        }
        checks.append(
            check(
                "device peak per variant",
                all(value is not None for value in exact.values()),
                f"device peak measured (exact: {exact})",
            )
        )
    return result, checks


# -- running units -----------------------------------------------------------


def run_unit(ctx, unit, partial):
    if unit == "memory":
        return memory_unit(ctx)
    if unit == "generate":
        return generate_unit(ctx)
    if unit in TRAIN_UNITS:
        return train_unit(ctx, unit, partial)
    raise ValueError(f"unknown unit {unit!r}; choose from {UNITS}")
