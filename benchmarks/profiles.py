"""Where the training step's time goes: the profiles behind the W1/W2 notes.

    KERAS_BACKEND=jax python -m benchmarks.profiles flops [w1|w2]
    KERAS_BACKEND=<backend> python -m benchmarks.profiles loss
    KERAS_BACKEND=jax|torch python -m benchmarks.profiles ops [w1|w2]

`flops`: XLA's cost analysis (FLOPs and bytes accessed) of one compiled
training step per variant (full fine-tuning, Keras built-in LoRA,
keras_lora), built with the same builders as `benchmarks.training`
(`benchmarks.gpt2_variants`). It is load-independent, so it says what a
step must cost whatever the machine is doing.

`loss`: forward + backward of the language-model loss on W1's logits
(8, 128, 50257) on the current backend: Keras's
`sparse_categorical_crossentropy` on the 3-D logits (what
`SparseCategoricalCrossentropy` does in a GPT-2 training step), the same
on logits flattened to (tokens, vocabulary) rows, and
`kl.losses.TokenCrossEntropy`, which the training benchmark uses. On torch
Keras moves the class axis of 3-D logits to position 1 (a strided read of
the whole logits), on JAX it multiplies by a one-hot array.

`ops`: a JAX profiler trace of two compiled training steps per variant,
the XLA:CPU operations' thread time summed by kind: matrix products,
fusions that write a transposed/copied array (and compute what XLA fused
into them), everything else. It shows which part of a step does not
shrink with the FLOPs. On torch, the same from `torch.profiler`: the
operators' own CPU time summed by kind, matrix products (and, of those, the
rank-r products of the LoRA branches) and everything else.

All print a table and write JSON with `--out FILE`.
"""

import argparse
import json
import statistics
import sys
import time

from benchmarks import common


def flops(workload):
    import jax
    import keras

    from benchmarks import gpt2_variants as variants

    shape = variants.WORKLOADS[workload]
    x, y = variants.keras_batch(shape)
    loss_fn = variants.lm_loss()
    rows = []
    for variant in ("full", "builtin", "keras_lora"):
        model = variants.build_keras_model(variant, shape)
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(model.trainable_variables)

        def compute(trainable, non_trainable, x, y, model=model):
            logits, non_trainable = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return loss_fn(y, logits), non_trainable

        def step(trainable, non_trainable, opt_vars, x, y, opt=optimizer):
            grad_fn = jax.value_and_grad(compute, has_aux=True)
            (loss, non_trainable), grads = grad_fn(
                trainable, non_trainable, x, y
            )
            trainable, opt_vars = opt.stateless_apply(
                opt_vars, grads, trainable
            )
            return loss, trainable, non_trainable, opt_vars

        args = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in optimizer.variables],
            x,
            y,
        )
        cost = jax.jit(step).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        rows.append(
            {
                "variant": variant,
                "gflop": round(cost["flops"] / 1e9, 2),
                "gb_accessed": round(cost["bytes accessed"] / 1e9, 2),
            }
        )
    full = rows[0]["gflop"]
    for row in rows:
        row["gflop / full"] = round(row["gflop"] / full, 3)
    return {"profile": "flops", "workload": workload, "rows": rows}


def _loss_variants(classes):
    """Per-token mean losses `f(labels, logits)` to compare."""
    import keras
    from keras import ops

    import keras_lora as kl

    def keras_3d(labels, logits):
        return ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
        )

    def keras_rows(labels, logits):
        return ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                ops.reshape(labels, (-1,)),
                ops.reshape(logits, (-1, classes)),
                from_logits=True,
            )
        )

    return {
        "keras (batch, seq, vocab)": keras_3d,
        "keras on rows (tokens, vocab)": keras_rows,
        "kl.losses.TokenCrossEntropy": kl.losses.TokenCrossEntropy(),
    }


def _value_and_grad_runner(fn, labels, logits):
    """A no-argument callable running forward + backward of `fn` w.r.t. the
    logits and blocking until done: jax.jit, tf.function(jit_compile=True)
    (as Keras compiles on these backends) or eager PyTorch (as Keras runs
    on torch). Gradients have no backend-agnostic Keras API."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grad = jax.jit(jax.value_and_grad(lambda z, y: fn(y, z)))
        z, y = jax.numpy.asarray(logits), jax.numpy.asarray(labels)
        return lambda: jax.block_until_ready(grad(z, y))
    if backend == "tensorflow":
        import tensorflow as tf

        z, y = tf.constant(logits), tf.constant(labels)

        @tf.function(jit_compile=True)
        def grad(z, y):
            with tf.GradientTape() as tape:
                tape.watch(z)
                loss = fn(y, z)
            return loss, tape.gradient(loss, z)

        return lambda: [t.numpy() for t in grad(z, y)]
    import torch

    z = torch.tensor(logits, requires_grad=True)
    y = torch.tensor(labels)

    def run():
        fn(y, z).backward()
        z.grad = None

    return run


def loss(repeats=6):
    """Forward + backward of the LM loss on W1's logits (8, 128, 50257)."""
    import keras
    import numpy as np

    classes = 50257
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 128, classes)).astype("float32")
    labels = rng.integers(0, classes, (8, 128)).astype("int32")
    runners = {
        name: _value_and_grad_runner(fn, labels, logits)
        for name, fn in _loss_variants(classes).items()
    }
    times = common.time_interleaved(runners, warmup=2, repeats=repeats)
    rows = [
        {"loss": name, "fwd+bwd ms": round(statistics.median(t) * 1e3, 1)}
        for name, t in times.items()
    ]
    keras_ms = rows[0]["fwd+bwd ms"]
    for row in rows:
        row["/ keras"] = round(row["fwd+bwd ms"] / keras_ms, 2)
    return {
        "profile": "loss",
        "backend": keras.backend.backend(),
        "logits": [8, 128, classes],
        "rows": rows,
    }


# XLA:CPU thunk names in a JAX trace, by what they do. Matrix products run
# as library calls (YNNPACK/XNNPACK/oneDNN fusions, or plain `dot`);
# fusions XLA names after a leading copy/transpose write a re-laid-out
# array (for a following matrix product) and compute whatever XLA fused
# into them.
_OP_KINDS = (
    ("matmul", ("ynn_fusion", "xnn_fusion", "onednn", "dot")),
    ("copy/transpose fusions", ("copy", "transpose")),
)
# Trace events that are not XLA operations (Python, runtime bookkeeping).
_NOT_OPS = (
    "$",
    "ThunkExecutor",
    "SlinkyThreadPool",
    "PjitFunction",
    "CommonPjRt",
)


def _op_kind(name):
    for kind, prefixes in _OP_KINDS:
        if name.startswith(prefixes):
            return kind
    return "other (elementwise, reductions)"


def _trace_op_times(directory):
    """Thread-milliseconds per op kind in the JAX trace under `directory`."""
    import collections
    import glob
    import gzip

    (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith(_NOT_OPS):
            totals[_op_kind(name)] += event["dur"] / 1e3
    return totals


# PyTorch operators that run matrix products (their self time is the
# product; `aten::matmul`/`aten::linear` only dispatch to them).
_TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _torch_op_times(events, rank):
    """Milliseconds per kind from `(name, input_shapes, self_us)` tuples.

    Kinds: all matrix products; of those, the rank-`rank` ones (a 2-D
    operand with `rank` rows or columns: the LoRA branches); the rest.
    """
    import collections

    totals = collections.Counter()
    for name, shapes, self_us in events:
        ms = self_us / 1e3
        totals["all"] += ms
        if name in _TORCH_MATMULS:
            totals["matmul"] += ms
            if any(len(s) == 2 and rank in s for s in shapes if s):
                totals[f"rank-{rank} products"] += ms
    totals["other"] = totals["all"] - totals["matmul"]
    return totals


def _ops_torch(shape, steps):
    import torch

    from benchmarks import gpt2_variants as variants

    rank = variants.RANK
    rows = []
    for name in ("full", "builtin", "keras_lora"):
        variant = variants.keras_variant(name, shape)
        for _ in range(2):  # create the optimizer state
            variant.step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(
            activities=activities, record_shapes=True
        ) as profile:
            start = time.perf_counter()
            for _ in range(steps):
                variant.step()
            wall = (time.perf_counter() - start) / steps
        events = [
            (e.key, e.input_shapes, e.self_cpu_time_total)
            for e in profile.key_averages(group_by_input_shape=True)
        ]
        totals = _torch_op_times(events, rank)
        row = {"variant": name, "step ms (profiled)": round(wall * 1e3)}
        for kind in ("all", "matmul", f"rank-{rank} products", "other"):
            row[f"{kind} self-CPU ms"] = round(totals[kind] / steps)
        rows.append(row)
        del variant
    return rows


def _ops_jax(shape, steps):
    import tempfile

    import jax

    from benchmarks import gpt2_variants as variants

    if jax.default_backend() != "cpu":
        raise SystemExit("ops: the op kinds are XLA:CPU's; run on a CPU.")
    rows = []
    for name in ("full", "builtin", "keras_lora"):
        variant = variants.keras_variant(name, shape)
        for _ in range(2):  # compile, create the optimizer state
            variant.step()
        with tempfile.TemporaryDirectory() as directory:
            jax.profiler.start_trace(directory)
            start = time.perf_counter()
            for _ in range(steps):
                variant.step()
            wall = (time.perf_counter() - start) / steps
            jax.profiler.stop_trace()
            totals = _trace_op_times(directory)
        row = {"variant": name, "step ms (traced)": round(wall * 1e3)}
        for kind in [k for k, _ in _OP_KINDS] + [_op_kind("")]:
            row[f"{kind} thread-ms"] = round(totals[kind] / steps)
        rows.append(row)
        del variant
    return rows


def ops(workload, steps=2):
    """Where a training step spends its time, per op kind (JAX or torch)."""
    import keras

    from benchmarks import gpt2_variants as variants

    shape = variants.WORKLOADS[workload]
    backend = keras.backend.backend()
    if backend == "jax":
        rows, unit = _ops_jax(shape, steps), "thread-ms"
    elif backend == "torch":
        rows, unit = _ops_torch(shape, steps), "self-CPU ms"
    else:
        raise SystemExit("ops: run with KERAS_BACKEND=jax or torch.")
    full = rows[0]
    for row in rows:
        for key in [k for k in row if k.endswith(unit) and full[k]]:
            row[key.replace(unit, "/ full")] = round(row[key] / full[key], 2)
    return {
        "profile": "ops",
        "workload": workload,
        "backend": backend,
        "steps": steps,
        "rows": rows,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiles")
    parser.add_argument("profile", choices=("flops", "loss", "ops"))
    parser.add_argument("workload", nargs="?", default="w1")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.profile == "flops":
        result = flops(args.workload)
    elif args.profile == "ops":
        result = ops(args.workload)
    else:
        result = loss()
    result["machine"] = common.machine_info()
    result["load_average"] = common.load_average()
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(common.markdown_table(result["rows"]))
    if args.out:
        common.write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
