"""Where the training step's time goes: the profiles behind the W1/W2 notes.

    KERAS_BACKEND=jax python -m benchmarks.profiles flops [w1|w2]
    KERAS_BACKEND=torch python -m benchmarks.profiles torch-loss

`flops`: XLA's cost analysis (FLOPs and bytes accessed) of one compiled
training step per variant (full fine-tuning, Keras built-in LoRA,
keras_lora), built with the same builders as `benchmarks.training`. It is
load-independent, so it says what a step must cost whatever the machine
is doing.

`torch-loss`: forward + backward of Keras's
`sparse_categorical_crossentropy` on W1's logits (8, 128, 50257) on the
torch backend, next to `torch.nn.functional.cross_entropy` on the same
logits flattened to (N, classes). Keras's torch implementation moves the
class axis to position 1 before calling PyTorch, which copies the logits;
this is part of every Keras-on-torch training step and none of PEFT's.

Both print a table and write JSON with `--out FILE`.
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

    from benchmarks import training

    shape = training.WORKLOADS[workload]
    x, y = training.keras_batch(shape)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows = []
    for variant in ("full", "builtin", "keras_lora"):
        model = training.build_keras_model(variant, shape)
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


def torch_loss(repeats=6):
    import keras
    import torch
    import torch.nn.functional as F

    if keras.backend.backend() != "torch":
        raise SystemExit("torch-loss needs KERAS_BACKEND=torch.")
    torch.manual_seed(0)
    classes = 50257
    logits = torch.randn(8, 128, classes, requires_grad=True)
    labels = torch.randint(0, classes, (8, 128))

    def keras_loss():
        loss = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )
        keras.ops.mean(loss).backward()
        logits.grad = None

    def flat_loss():
        loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))
        loss.backward()
        logits.grad = None

    times = common.time_interleaved(
        {"keras": keras_loss, "flat": flat_loss}, warmup=1, repeats=repeats
    )
    rows = [
        {"loss": name, "fwd+bwd ms": round(statistics.median(t) * 1e3, 1)}
        for name, t in times.items()
    ]
    return {
        "profile": "torch-loss",
        "logits": [8, 128, classes],
        "rows": rows,
        "keras / flat": round(rows[0]["fwd+bwd ms"] / rows[1]["fwd+bwd ms"], 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiles")
    parser.add_argument("profile", choices=("flops", "torch-loss"))
    parser.add_argument("workload", nargs="?", default="w1")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.profile == "flops":
        result = flops(args.workload)
    else:
        result = torch_loss()
    result["machine"] = common.machine_info()
    result["load_average"] = common.load_average()
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(common.markdown_table(result["rows"]))
    if "keras / flat" in result:
        print(f"keras / flat: {result['keras / flat']}")
    if args.out:
        common.write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
