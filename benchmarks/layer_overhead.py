"""W4: per-layer overhead of LoRA, one Keras backend per process.

Compares, on the same shapes and weights, in one process:

- `base`: the plain `keras.layers.Dense` / `EinsumDense`;
- `builtin`: the same layer with Keras's built-in LoRA (`enable_lora`);
- `unmerged`: `keras_lora.LoraDense` / `LoraEinsumDense.from_layer`;
- `merged`: the same after `merge()` (B set to random non-zero values).

For each it times a forward (inference) call and a training step (forward
plus gradients w.r.t. the layer's trainable weights; for `base`, all of its
weights). The variants are timed interleaved, one call each per round.

Run through `python -m benchmarks layer`, which starts one process per
backend; or directly with `KERAS_BACKEND=jax python -m
benchmarks.layer_overhead --out result.json`.
"""

import argparse
import datetime
import sys

import keras
import numpy as np
from keras import ops

import keras_lora
from benchmarks import common

CASES = {
    "dense": {
        "label": "Dense 1024->1024, x (8, 128, 1024), rank 8",
        "input_shape": (8, 128, 1024),
        "rank": 8,
        "units": 1024,
    },
    "einsum": {
        "label": (
            "EinsumDense abc,cde->abde (GPT-2 base query), kernel "
            "(768, 12, 64), x (4, 128, 768), rank 4"
        ),
        "input_shape": (4, 128, 768),
        "rank": 4,
        "equation": "abc,cde->abde",
        "output_shape": (None, 12, 64),
        "bias_axes": "de",
    },
}
VARIANTS = ("base", "builtin", "unmerged", "merged")
RATIOS = (
    ("unmerged/base", "unmerged", "base"),
    ("builtin/base", "builtin", "base"),
    ("unmerged/builtin", "unmerged", "builtin"),
    ("merged/base", "merged", "base"),
)
MERGED_TRAIN_NOTE = (
    "n/a: a merged layer cannot be trained (LoraLayer.call(training=True) "
    "raises, since gradients would not reach A and B)"
)
# Timed rounds are kept only while other processes use at most
# `max_other_share` of the CPU (see `common.time_interleaved_quiet`).
FULL = {
    "warmup": 5,
    "repeats": 40,
    "min_repeats": 20,
    "max_other_share": 0.05,
    "max_seconds": 90.0,
}
QUICK = {
    "warmup": 1,
    "repeats": 5,
    "min_repeats": 5,
    "max_other_share": 0.05,
    "max_seconds": 10.0,
}


# -- layers ---------------------------------------------------------------


def make_base(case):
    """A fresh, built base layer for `case`."""
    if "units" in case:
        layer = keras.layers.Dense(case["units"])
    else:
        layer = keras.layers.EinsumDense(
            case["equation"],
            case["output_shape"],
            bias_axes=case["bias_axes"],
        )
    layer.build(case["input_shape"])
    return layer


def build_variants(case, seed=0):
    """The four variants of `case`, each on its own copy of the weights."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    reference = make_base(case)
    weights = [
        rng.normal(0.0, 0.02, w.shape).astype("float32")
        for w in reference.get_weights()
    ]

    def fresh_base():
        layer = make_base(case)
        layer.set_weights(weights)
        return layer

    rank = case["rank"]
    layers = {"base": fresh_base()}

    # keras_lora, unmerged and merged, with the same non-zero A and B.
    unmerged = _wrap(fresh_base(), rank)
    a_var, b_var = unmerged.lora_weights()
    a_value = rng.uniform(-0.05, 0.05, a_var.shape).astype("float32")
    b_value = rng.normal(0.0, 0.02, b_var.shape).astype("float32")
    a_var.assign(a_value)
    b_var.assign(b_value)
    merged = _wrap(fresh_base(), rank)
    merged_a, merged_b = merged.lora_weights()
    merged_a.assign(a_value)
    merged_b.assign(b_value)
    merged.merge()

    # Keras built-in LoRA. Its factorization can differ from keras_lora's
    # (EinsumDense: A (768, 12, r), B (r, 64)); reuse A and B when the
    # shapes match, else draw non-zero values of its own shapes.
    builtin = fresh_base()
    builtin.enable_lora(rank)
    if tuple(builtin.lora_kernel_a.shape) == tuple(a_value.shape) and tuple(
        builtin.lora_kernel_b.shape
    ) == tuple(b_value.shape):
        builtin.lora_kernel_a.assign(a_value)
        builtin.lora_kernel_b.assign(b_value)
        builtin_shares_adapter = True
    else:
        builtin.lora_kernel_b.assign(
            rng.normal(0.0, 0.02, builtin.lora_kernel_b.shape).astype("float32")
        )
        builtin_shares_adapter = False

    layers["builtin"] = builtin
    layers["unmerged"] = unmerged
    layers["merged"] = merged
    return layers, builtin_shares_adapter


def _wrap(base, rank):
    if isinstance(base, keras.layers.EinsumDense):
        return keras_lora.LoraEinsumDense.from_layer(base, rank=rank)
    return keras_lora.LoraDense.from_layer(base, rank=rank)


def param_counts(layer):
    def count(variables):
        return int(sum(int(np.prod(v.shape)) for v in variables))

    return {
        "trainable_params": count(layer.trainable_weights),
        "total_params": count(layer.weights),
        "trainable_weights": [
            f"{v.path} {tuple(v.shape)}" for v in layer.trainable_weights
        ],
    }


# -- backend-specific forward / train-step callables ----------------------


def make_callables(backend, layer, x, train):
    """Returns `(forward, train_step, grad_check)` for `layer` on `x`.

    `forward()` and `train_step()` run one call and block until done;
    `train_step` is None when `train` is False. `grad_check()` returns the
    gradients of one training step as numpy arrays.
    """
    if backend == "jax":
        return _jax_callables(layer, x, train)
    if backend == "tensorflow":
        return _tf_callables(layer, x, train)
    if backend == "torch":
        return _torch_callables(layer, x, train)
    raise ValueError(f"Unsupported backend {backend!r}.")


def _jax_callables(layer, x, train):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def forward_fn(trainable, non_trainable, x):
        y, _ = layer.stateless_call(trainable, non_trainable, x)
        return y

    def loss_fn(trainable, non_trainable, x):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.mean(jnp.square(y))

    grad_fn = jax.jit(jax.grad(loss_fn))

    def forward():
        forward_fn(trainable, non_trainable, x).block_until_ready()

    def train_step():
        jax.block_until_ready(grad_fn(trainable, non_trainable, x))

    def grad_check():
        return [np.asarray(g) for g in grad_fn(trainable, non_trainable, x)]

    return forward, (train_step if train else None), grad_check


def _tf_callables(layer, x, train):
    import tensorflow as tf

    # Each variant gets its own tf.function, traced once during warm-up;
    # TF would warn about "retracing" once five of them have been traced.
    tf.get_logger().setLevel("ERROR")
    variables = list(layer.trainable_weights)

    @tf.function(jit_compile=False)
    def forward_fn(x):
        return layer(x, training=False)

    @tf.function(jit_compile=False)
    def grad_fn(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_mean(tf.square(y))
        return tape.gradient(loss, variables)

    def forward():
        forward_fn(x)

    def train_step():
        grad_fn(x)

    def grad_check():
        return [None if g is None else g.numpy() for g in grad_fn(x)]

    return forward, (train_step if train else None), grad_check


def _torch_callables(layer, x, train):
    import torch

    params = [v.value for v in layer.trainable_weights]

    def forward():
        with torch.no_grad():
            layer(x, training=False)

    def train_step():
        for p in params:
            p.grad = None
        y = layer(x, training=True)
        loss = torch.mean(torch.square(y))
        loss.backward()

    def grad_check():
        train_step()
        return [
            None if p.grad is None else p.grad.detach().cpu().numpy()
            for p in params
        ]

    return forward, (train_step if train else None), grad_check


# -- running --------------------------------------------------------------


def _to_numpy(y):
    return np.asarray(keras.ops.convert_to_numpy(y))


def run_case(backend, name, case, timing, log=print):
    layers, builtin_shares_adapter = build_variants(case)
    x_value = (
        np.random.default_rng(1)
        .normal(0.0, 1.0, case["input_shape"])
        .astype("float32")
    )
    x = ops.convert_to_tensor(x_value)

    # Sanity checks: merged == unmerged, both != base; builtin == unmerged
    # when they share the same A and B.
    outputs = {v: _to_numpy(layers[v](x, training=False)) for v in VARIANTS}
    checks = {
        "max_abs_diff_merged_vs_unmerged": float(
            np.max(np.abs(outputs["merged"] - outputs["unmerged"]))
        ),
        "max_abs_diff_unmerged_vs_base": float(
            np.max(np.abs(outputs["unmerged"] - outputs["base"]))
        ),
        "builtin_shares_adapter_values": builtin_shares_adapter,
    }
    if builtin_shares_adapter:
        checks["max_abs_diff_builtin_vs_unmerged"] = float(
            np.max(np.abs(outputs["builtin"] - outputs["unmerged"]))
        )

    forwards, trains, variants = {}, {}, {}
    for variant in VARIANTS:
        layer = layers[variant]
        can_train = variant != "merged"
        forward, train_step, grad_check = make_callables(
            backend, layer, x, can_train
        )
        forwards[variant] = forward
        info = param_counts(layer)
        if can_train:
            trains[variant] = train_step
            grads = grad_check()
            info["grads_ok"] = all(
                g is not None and np.all(np.isfinite(g)) and np.any(g != 0)
                for g in grads
            )
        variants[variant] = info

    log(f"[{backend}] {name}: forward, {len(VARIANTS)} variants interleaved")
    forward_times, forward_stats = common.time_interleaved_quiet(
        forwards, **timing
    )
    _log_stats(backend, name, "forward", forward_stats, log)
    log(f"[{backend}] {name}: train step, {len(trains)} variants interleaved")
    train_times, train_stats = common.time_interleaved_quiet(trains, **timing)
    _log_stats(backend, name, "train", train_stats, log)

    for variant, info in variants.items():
        info["forward"] = common.summarize(forward_times[variant])
        info["forward"]["times_ms"] = [
            round(t * 1e3, 4) for t in forward_times[variant]
        ]
        if variant in train_times:
            info["train"] = common.summarize(train_times[variant])
            info["train"]["times_ms"] = [
                round(t * 1e3, 4) for t in train_times[variant]
            ]
        else:
            info["train"] = None
            info["train_note"] = MERGED_TRAIN_NOTE

    # Main ratios: median over rounds of the per-round ratio. The variants
    # of a round ran back to back, so slow phases of the machine (which
    # come and go on shared hosts) cancel out. Ratios of the medians are
    # kept for reference.
    ratios, ratios_of_medians = {}, {}
    step_times = {"forward": forward_times, "train": train_times}
    for step in ("forward", "train"):
        ratios[step], ratios_of_medians[step] = {}, {}
        times = step_times[step]
        for label, numerator, denominator in RATIOS:
            if numerator not in times or denominator not in times:
                ratios[step][label] = ratios_of_medians[step][label] = None
                continue
            ratios[step][label] = common.paired_ratio(
                times[numerator], times[denominator]
            )
            ratios_of_medians[step][label] = (
                variants[numerator][step]["median_ms"]
                / variants[denominator][step]["median_ms"]
            )
    for variant in VARIANTS:
        train = variants[variant]["train"]
        log(
            f"[{backend}] {name}: {variant:<9} forward "
            f"{variants[variant]['forward']['median_ms']:8.3f} ms  train "
            + ("     n/a" if train is None else f"{train['median_ms']:8.3f}")
            + " ms"
        )
    return {
        "label": case["label"],
        "input_shape": list(case["input_shape"]),
        "rank": case["rank"],
        "checks": checks,
        "variants": variants,
        "ratios": ratios,
        "ratios_of_medians": ratios_of_medians,
        "timing_stats": {"forward": forward_stats, "train": train_stats},
    }


def _log_stats(backend, name, step, stats, log):
    message = (
        f"[{backend}] {name}: {step}: kept {stats['rounds_kept']} rounds, "
        f"discarded {stats['rounds_discarded']} (CPU busy), "
        f"{stats['seconds']:.0f} s"
    )
    if stats["contended"]:
        message += "; WARNING: machine never quiet, kept all rounds"
    log(message)


def backend_details(backend):
    details = {}
    if backend == "torch":
        import torch

        details["torch_num_threads"] = torch.get_num_threads()
    elif backend == "tensorflow":
        import tensorflow as tf

        details["tf_intra_op_threads"] = (
            tf.config.threading.get_intra_op_parallelism_threads()
        )
    elif backend == "jax":
        import jax

        details["jax_devices"] = [str(d) for d in jax.devices()]
    return details


def run(cases, timing, log=print):
    backend = keras.backend.backend()
    machine = common.machine_info(backend)
    machine.update(backend_details(backend))
    result = {
        "benchmark": "layer_overhead",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            **timing,
            "dtype": "float32",
            "loss": "mean(square(y))",
            "timing": "interleaved rounds, one call per variant per round",
            "forward": {
                "jax": "jax.jit(stateless_call)",
                "tensorflow": "tf.function(jit_compile=False)",
                "torch": "eager under torch.no_grad()",
            }[backend],
            "train": {
                "jax": "jax.jit(jax.grad(stateless_call loss))",
                "tensorflow": "tf.function(jit_compile=False) + GradientTape",
                "torch": "eager autograd, loss.backward(), grads set to None",
            }[backend],
        },
        "cases": {},
        "load_average_start": common.load_average(),
    }
    monitor = common.CpuMonitor()
    for name in cases:
        log(f"[{backend}] case {name}: {CASES[name]['label']}")
        result["cases"][name] = run_case(
            backend, name, CASES[name], timing, log=log
        )
    common.record_end_load(result, monitor)
    return result


# -- markdown -------------------------------------------------------------


def render_markdown(results, command):
    """The combined markdown report for a list of per-backend results."""
    settings = results[0]["settings"]
    lines = common.report_header("Layer overhead (W4)", command, results) + [
        "Each backend ran in its own process. Variants: `base` (plain "
        "Keras layer), `builtin` (Keras `enable_lora`), `unmerged` "
        "(`keras_lora` `from_layer`), `merged` (`keras_lora` after "
        "`merge()`, B non-zero). Same input and base weights for all "
        "variants; float32. After "
        f"{settings['warmup']} warm-up call(s) each, the variants are "
        "timed interleaved (one call each per round, order rotating); "
        "rounds run in ~0.5 s blocks, and a block in which other "
        "processes used more than "
        f"{100 * settings['max_other_share']:.0f}% of the CPU is "
        f"discarded. Median of {settings['repeats']} kept rounds (at "
        f"least {settings['min_repeats']}). Forward: jax "
        "`jit(stateless_call)`, tensorflow `tf.function`, torch eager "
        "under `no_grad`. Train step: forward + gradients of "
        "`mean(y**2)` w.r.t. the layer's trainable weights (for `base`: "
        "all its weights) - jax `jit(grad)`, tensorflow `tf.function` + "
        "`GradientTape`, torch eager `backward()`. The p25-p75 columns "
        "give the spread of the timed calls.",
        "",
        "Other work on the machine while each backend ran (CPU used by "
        "other processes, as a share of all cores, over the whole process; "
        "load average at start -> end) - blocks timed while it was busy "
        "were discarded, see the Checks table: "
        + "; ".join(
            f"{r['backend']} {_share(r.get('other_processes_cpu_share'))}"
            f" ({_load(r.get('load_average_start'))} -> "
            f"{_load(r.get('load_average_end'))})"
            for r in results
        )
        + ".",
        "",
        "## Median time per call (ms)",
        "",
    ]
    rows = []
    for result in results:
        for name, case in result["cases"].items():
            for variant, info in case["variants"].items():
                forward, train = info["forward"], info["train"]
                rows.append(
                    {
                        "backend": result["backend"],
                        "case": name,
                        "variant": variant,
                        "params": info["trainable_params"],
                        "forward": forward["median_ms"],
                        "forward_iqr": _iqr(forward),
                        "train": None if train is None else train["median_ms"],
                        "train_iqr": _iqr(train),
                    }
                )
    lines.append(
        common.markdown_table(
            rows,
            [
                ("backend", "backend"),
                ("case", "case"),
                ("variant", "variant"),
                ("params", "trainable params"),
                ("forward", "forward ms"),
                ("forward_iqr", "forward p25-p75"),
                ("train", "train step ms"),
                ("train_iqr", "train p25-p75"),
            ],
        )
    )
    lines += [
        "## Ratios (same run)",
        "",
        "Median over the kept rounds of the per-round time ratio (the "
        "variants of a round ran back to back); ratios of the medians "
        "above are in the JSON files as `ratios_of_medians`.",
        "",
    ]
    rows = []
    for result in results:
        for name, case in result["cases"].items():
            for step in ("forward", "train"):
                row = {
                    "backend": result["backend"],
                    "case": name,
                    "step": step,
                }
                row.update(case["ratios"][step])
                rows.append(row)
    lines.append(
        common.markdown_table(
            rows,
            ["backend", "case", "step"] + [label for label, _, _ in RATIOS],
        )
    )
    lines += ["## Cases", ""]
    for name, case in results[0]["cases"].items():
        lines.append(f"- `{name}`: {case['label']}.")
    lines += ["", "## Checks", ""]
    rows = []
    for result in results:
        for name, case in result["cases"].items():
            checks = case["checks"]
            grads_ok = all(
                info.get("grads_ok", True) for info in case["variants"].values()
            )
            stats = case["timing_stats"]
            rows.append(
                {
                    "backend": result["backend"],
                    "case": name,
                    "merged_vs_unmerged": checks[
                        "max_abs_diff_merged_vs_unmerged"
                    ],
                    "unmerged_vs_base": checks["max_abs_diff_unmerged_vs_base"],
                    "builtin_vs_unmerged": checks.get(
                        "max_abs_diff_builtin_vs_unmerged"
                    ),
                    "grads_ok": "yes" if grads_ok else "NO",
                    "rounds": "/".join(
                        str(stats[step]["rounds_kept"])
                        + (" (contended!)" if stats[step]["contended"] else "")
                        for step in ("forward", "train")
                    ),
                    "discarded": "/".join(
                        str(stats[step]["rounds_discarded"])
                        for step in ("forward", "train")
                    ),
                }
            )
    lines.append(
        common.markdown_table(
            [{k: _sci(v) for k, v in row.items()} for row in rows],
            [
                ("backend", "backend"),
                ("case", "case"),
                ("merged_vs_unmerged", "max abs diff merged vs unmerged"),
                ("unmerged_vs_base", "max abs diff unmerged vs base"),
                ("builtin_vs_unmerged", "max abs diff builtin vs unmerged"),
                ("grads_ok", "all grads finite, non-zero"),
                ("rounds", "rounds kept fwd/train"),
                ("discarded", "rounds discarded (CPU busy) fwd/train"),
            ],
        )
    )
    lines += [
        "Notes:",
        "",
        f"- `merged` train step: {MERGED_TRAIN_NOTE}.",
        "- Trainable params: `builtin` keeps the base bias trainable "
        "(Keras freezes only the kernel); `unmerged` trains A and B only. "
        "For `einsum`, Keras's built-in LoRA factors the kernel as "
        "A (768, 12, r) @ B (r, 64), keras_lora as A (768, r) @ "
        "B (r, 12, 64), so their adapters differ in size and the "
        "builtin-vs-unmerged output check does not apply (n/a). `merged` "
        "still holds A and B (counted) but does not use them.",
        "- Per-call times and quartiles are in the per-backend JSON files "
        "next to this one.",
        "",
    ]
    return "\n".join(lines)


def _share(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _load(values):
    if not values:
        return "n/a"
    return "/".join(f"{v:.2f}" for v in values)


def _iqr(summary):
    if summary is None:
        return None
    return f"{summary['p25_ms']:.2f}-{summary['p75_ms']:.2f}"


def _sci(value):
    if isinstance(value, float):
        return f"{value:.1e}"
    return value


# -- command line -----------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.layer_overhead",
        description="W4 layer-overhead benchmark on the current "
        "KERAS_BACKEND (one backend per process).",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="Few repetitions (smoke test)."
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"Comma-separated cases (default: {','.join(CASES)}).",
    )
    parser.add_argument("--warmup", type=int, help="Override warm-up calls.")
    common.add_timing_args(parser)
    args = parser.parse_args(argv)

    timing = dict(QUICK if args.quick else FULL)
    if args.warmup is not None:
        timing["warmup"] = args.warmup
    common.apply_timing_args(timing, args)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    def log(message):
        print(message, flush=True)

    result = run(cases, timing, log=log)
    result["settings"]["quick"] = bool(args.quick)
    common.write_json(args.out, result)
    share = result["other_processes_cpu_share"]
    if share is not None and share > 0.05:
        log(
            f"[{result['backend']}] note: other processes used "
            f"{100 * share:.0f}% of the CPU during the run; blocks timed "
            "while it was busy were discarded."
        )
    contended = [
        f"{name} {step}"
        for name, case in result["cases"].items()
        for step, stats in case["timing_stats"].items()
        if stats["contended"]
    ]
    if contended:
        log(
            f"[{result['backend']}] WARNING: never quiet for "
            f"{', '.join(contended)}; those timings are distorted."
        )
    log(f"[{result['backend']}] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
