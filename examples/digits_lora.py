"""LoRA on scikit-learn's digits: fix a model's weak digit with 1/7 of the
parameters, then switch the fix off again.

The setup, end to end:

1. Load the 8x8 digits that ship with scikit-learn (no download), scale the
   pixels to [0, 1] and make a fixed-seed stratified train/test split.
2. "Pre-train" a small MLP (64 -> 64 -> 64 -> 10) on a training subset in
   which one digit (`--rare-digit`, 8 by default) is kept to a handful of
   examples, the way a real data set can lack a class. The model is good on
   the other digits and clearly weak on that one.
3. Measure per-digit test accuracy and pick the digit the base model gets
   most wrong (found from the numbers, not assumed).
4. Build a second model from the *same built layers*, each Dense wrapped by
   `LoraDense.from_layer(dense, rank=4, alpha=8)`: the Dense kernels and
   biases are shared and frozen, only the small A/B adapters train.
5. Fine-tune the adapters on that digit's training examples plus a replay
   sample of the other digits (so they are not forgotten).
6. Compare per-digit accuracy of the base model, the adapted model and the
   adapted model with `adapters_enabled = False`, which must reproduce the
   base model's logits exactly. Merge the adapters into the kernels, check
   the outputs do not change, and unmerge.

Runs on any Keras 3 backend:

    KERAS_BACKEND=jax python examples/digits_lora.py
    KERAS_BACKEND=torch python examples/digits_lora.py --json results.json
    KERAS_BACKEND=tensorflow python examples/digits_lora.py --quick
"""

import argparse
import contextlib
import json
import os
import tempfile
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_lora as kl

NUM_CLASSES = 10
RANK = 4
ALPHA = 8
EVAL_BATCH = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="LoRA fine-tuning of a digits MLP on its weakest digit."
    )
    parser.add_argument(
        "--epochs-base",
        type=int,
        default=None,
        help="epochs to train the base model (default 20; 3 with --quick)",
    )
    parser.add_argument(
        "--epochs-lora",
        type=int,
        default=None,
        help="epochs to train the adapters (default 30; 3 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rare-digit",
        type=int,
        default=8,
        choices=range(NUM_CLASSES),
        help="digit kept rare in the base model's training data",
    )
    parser.add_argument(
        "--rare-keep",
        type=int,
        default=5,
        help="how many examples of the rare digit the base model sees",
    )
    parser.add_argument(
        "--replay-per-digit",
        type=int,
        default=50,
        help="examples of each other digit replayed during fine-tuning",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny epoch counts, for tests and smoke runs",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="write the results to this JSON file"
    )
    args = parser.parse_args(argv)
    if args.epochs_base is None:
        args.epochs_base = 3 if args.quick else 20
    if args.epochs_lora is None:
        args.epochs_lora = 3 if args.quick else 30
    return args


# -- data ---------------------------------------------------------------------


def load_data(seed):
    """Digits scaled to [0, 1], split 70/30, stratified, fixed seed."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)


def base_subset(y_train, rare_digit, rare_keep, rng):
    """Indices of the base model's training data: every digit, except that
    only `rare_keep` examples of `rare_digit` are kept."""
    rare = np.flatnonzero(y_train == rare_digit)
    kept = rng.choice(rare, size=min(rare_keep, rare.size), replace=False)
    return np.sort(
        np.concatenate([np.flatnonzero(y_train != rare_digit), kept])
    )


def finetune_subset(y_train, target, replay_per_digit, rng):
    """Indices for fine-tuning: all training examples of `target` plus a
    replay sample of `replay_per_digit` examples of every other digit."""
    parts = [np.flatnonzero(y_train == target)]
    for digit in range(NUM_CLASSES):
        if digit != target:
            pool = np.flatnonzero(y_train == digit)
            n = min(replay_per_digit, pool.size)
            parts.append(rng.choice(pool, size=n, replace=False))
    return rng.permutation(np.concatenate(parts))


# -- model helpers ------------------------------------------------------------


def build_base_model():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="hidden_1"),
            keras.layers.Dense(64, activation="relu", name="hidden_2"),
            keras.layers.Dense(NUM_CLASSES, name="logits"),
        ],
        name="base_mlp",
    )


def compile_for_training(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def logits_of(model, x):
    """Logits from direct, batched `model(x)` calls.

    Direct calls always run the layers' current Python state. `predict`
    would reuse a function compiled earlier, which does not see later
    changes to `adapters_enabled` or to merging without a new `compile()`.
    """
    out = [
        keras.ops.convert_to_numpy(model(x[i : i + EVAL_BATCH], training=False))
        for i in range(0, len(x), EVAL_BATCH)
    ]
    return np.concatenate(out).astype("float32")


def per_digit_accuracy(logits, y):
    pred = logits.argmax(axis=-1)
    return [float(np.mean(pred[y == d] == d)) for d in range(NUM_CLASSES)]


def overall_accuracy(logits, y):
    return float(np.mean(logits.argmax(axis=-1) == y))


def n_params(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def snapshot(weights):
    return [keras.ops.convert_to_numpy(w).copy() for w in weights]


def write_json_atomically(path, data):
    """Writes to a temporary file next to `path`, then renames it over
    `path`, so readers never see a half-written file."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=".digits_lora.", suffix=".json.tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def print_table(y_test, acc_base, acc_lora, acc_off, target, rare):
    counts = np.bincount(y_test, minlength=NUM_CLASSES)
    header = (
        f"{'digit':>5}  {'n_test':>6}  {'base':>6}  {'LoRA':>6}  "
        f"{'LoRA off':>8}"
    )
    print(header)
    print("-" * len(header))
    for d in range(NUM_CLASSES):
        notes = []
        if d == target:
            notes.append("target")
        if d == rare:
            notes.append("rare in base data")
        note = f"  <- {', '.join(notes)}" if notes else ""
        print(
            f"{d:>5}  {counts[d]:>6}  {acc_base[d]:>6.1%}  "
            f"{acc_lora[d]:>6.1%}  {acc_off[d]:>8.1%}{note}"
        )


# -- main ---------------------------------------------------------------------


@contextlib.contextmanager
def torch_single_thread():
    """Runs torch on one CPU thread, restoring the setting afterwards.

    The layers here are 64 wide: a second BLAS thread gains nothing, while
    torch's OpenMP threads can slow training tens of times when another
    process competes for the cores. JAX and TensorFlow need no such care.
    """
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    """Runs the demonstration; returns the results as a dict."""
    args = parse_args(argv)
    with torch_single_thread():
        return run(args)


def run(args):
    backend = keras.backend.backend()
    started = time.perf_counter()

    def phase(text):
        print(f"[{time.perf_counter() - started:5.1f}s] {text}", flush=True)

    phase(f"backend={backend}; seeding, loading scikit-learn digits")
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    base_idx = base_subset(y_train, args.rare_digit, args.rare_keep, rng)
    print(
        f"         train {len(x_train)}, test {len(x_test)}; the base model "
        f"trains on {len(base_idx)} examples with only "
        f"{int(np.sum(y_train[base_idx] == args.rare_digit))} of digit "
        f"{args.rare_digit}"
    )

    phase(f"training the base MLP for {args.epochs_base} epochs")
    base_model = build_base_model()
    compile_for_training(base_model, 1e-3)
    history = base_model.fit(
        x_train[base_idx],
        y_train[base_idx],
        epochs=args.epochs_base,
        batch_size=32,
        verbose=0,
    )
    print(
        f"         final loss {history.history['loss'][-1]:.3f}, "
        f"train acc {history.history['accuracy'][-1]:.1%}"
    )
    full_params = base_model.count_params()
    base_logits = logits_of(base_model, x_test)
    acc_base = per_digit_accuracy(base_logits, y_test)
    target = int(np.argmin(acc_base))
    base_overall = overall_accuracy(base_logits, y_test)
    print(
        f"         base test accuracy {base_overall:.1%}; "
        f"weakest digit: {target} ({acc_base[target]:.1%})"
    )

    phase(f"wrapping every Dense in LoraDense(rank={RANK}, alpha={ALPHA})")
    # `from_layer` shares the built Dense's kernel and bias (no copy) and
    # freezes them. It also moves the Dense's activation onto the wrapper
    # (the adapter output joins before the relu), so from here on the
    # Dense layers belong to the LoRA model: `base_model` itself is no
    # longer the base model, and `base_logits` above is the reference.
    lora_layers = [
        kl.LoraDense.from_layer(layer, rank=RANK, alpha=ALPHA)
        for layer in base_model.layers
    ]
    lora_model = keras.Sequential(
        [keras.Input((64,)), *lora_layers], name="lora_mlp"
    )
    base_weights = [
        w for layer in lora_layers for w in layer.base_layer.weights
    ]
    base_before = snapshot(base_weights)
    lora_params = n_params(lora_model.trainable_weights)
    trainable_names = sorted(
        {w.path.rsplit("/", 1)[-1] for w in lora_model.trainable_weights}
    )
    if trainable_names != ["lora_a_default", "lora_b_default"]:
        raise AssertionError(f"unexpected trainable weights {trainable_names}")
    print(
        f"         trainable parameters: LoRA {lora_params} vs full "
        f"fine-tuning {full_params} ({lora_params / full_params:.1%})"
    )

    ft_idx = finetune_subset(y_train, target, args.replay_per_digit, rng)
    phase(
        f"fine-tuning the adapters for {args.epochs_lora} epochs on "
        f"{int(np.sum(y_train[ft_idx] == target))} examples of digit "
        f"{target} + {args.replay_per_digit} replayed per other digit"
    )
    compile_for_training(lora_model, 5e-3)
    history = lora_model.fit(
        x_train[ft_idx],
        y_train[ft_idx],
        epochs=args.epochs_lora,
        batch_size=32,
        verbose=0,
    )
    print(
        f"         final loss {history.history['loss'][-1]:.3f}, "
        f"train acc {history.history['accuracy'][-1]:.1%}"
    )
    base_unchanged = all(
        np.array_equal(a, b)
        for a, b in zip(base_before, snapshot(base_weights), strict=True)
    )
    if not base_unchanged:
        raise AssertionError("fine-tuning changed the frozen base weights")

    phase("evaluating: adapters on / adapters disabled")
    lora_logits = logits_of(lora_model, x_test)
    acc_lora = per_digit_accuracy(lora_logits, y_test)
    for layer in lora_layers:
        layer.adapters_enabled = False
    off_logits = logits_of(lora_model, x_test)
    for layer in lora_layers:
        layer.adapters_enabled = True
    acc_off = per_digit_accuracy(off_logits, y_test)
    disabled_diff = float(np.max(np.abs(off_logits - base_logits)))
    disabled_exact = bool(np.array_equal(off_logits, base_logits))
    if disabled_diff > 1e-6:
        raise AssertionError(
            f"adapters disabled differs from the base model by "
            f"{disabled_diff:g}"
        )

    phase("merging the adapters into the kernels, then unmerging")
    for layer in lora_layers:
        layer.merge()
    merged_logits = logits_of(lora_model, x_test)
    for layer in lora_layers:
        layer.unmerge()
    unmerged_logits = logits_of(lora_model, x_test)
    # Merging re-associates float32 sums (x @ (W + s*A@B) instead of
    # x @ W + s*(x @ A) @ B), so outputs agree to rounding, not bit for bit.
    # The error is measured relative to the logits' scale (as in
    # tests/test_merge.py): float32 rounding grows with the magnitude.
    scale = max(float(np.max(np.abs(lora_logits))), 1.0)
    merge_diff = float(np.max(np.abs(merged_logits - lora_logits)))
    unmerge_diff = float(np.max(np.abs(unmerged_logits - lora_logits)))
    merge_error = merge_diff / scale
    unmerge_error = unmerge_diff / scale
    if merge_error > 1e-5 or unmerge_error > 1e-5:
        raise AssertionError(
            f"merge changed the outputs by {merge_diff:g} (relative "
            f"{merge_error:g}); after unmerge: {unmerge_diff:g}"
        )

    print()
    print(f"Per-digit test accuracy (backend {backend}, seed {args.seed}):")
    print_table(y_test, acc_base, acc_lora, acc_off, target, args.rare_digit)
    overall = {
        "base": overall_accuracy(base_logits, y_test),
        "lora": overall_accuracy(lora_logits, y_test),
        "disabled": overall_accuracy(off_logits, y_test),
    }
    print(
        f"{'all':>5}  {len(y_test):>6}  {overall['base']:>6.1%}  "
        f"{overall['lora']:>6.1%}  {overall['disabled']:>8.1%}"
    )
    print()
    gain = acc_lora[target] - acc_base[target]
    print(
        f"digit {target}: {acc_base[target]:.1%} -> {acc_lora[target]:.1%} "
        f"with the adapters ({gain * 100:+.1f} points)"
    )
    print(
        f"trainable parameters: LoRA {lora_params}, full {full_params} "
        f"({lora_params / full_params:.1%})"
    )
    print(
        "check: adapters disabled == base model logits: "
        f"{'exactly equal' if disabled_exact else 'within 1e-6'} "
        f"(max |diff| = {disabled_diff:.3g})"
    )
    print(
        f"check: merged == adapted logits: max |diff| = {merge_diff:.3g} "
        f"on logits up to {scale:.1f}, relative {merge_error:.2g} <= 1e-5; "
        f"after unmerge: relative {unmerge_error:.2g}"
    )
    print("check: frozen base weights unchanged by fine-tuning: True")
    phase("done")

    results = {
        "backend": backend,
        "seed": args.seed,
        "epochs_base": args.epochs_base,
        "epochs_lora": args.epochs_lora,
        "rank": RANK,
        "alpha": ALPHA,
        "rare_digit": args.rare_digit,
        "target_digit": target,
        "n_test_per_digit": np.bincount(y_test, minlength=10).tolist(),
        "accuracy": {"base": acc_base, "lora": acc_lora, "disabled": acc_off},
        "overall_accuracy": overall,
        "target_accuracy": {
            "base": acc_base[target],
            "lora": acc_lora[target],
            "disabled": acc_off[target],
        },
        "params": {
            "lora_trainable": lora_params,
            "full": full_params,
            "ratio": lora_params / full_params,
        },
        "disabled_max_abs_diff": disabled_diff,
        "disabled_exact": disabled_exact,
        "merge_max_abs_diff": merge_diff,
        "unmerge_max_abs_diff": unmerge_diff,
        "merge_error": merge_error,
        "unmerge_error": unmerge_error,
        "base_weights_unchanged": base_unchanged,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        write_json_atomically(args.json, results)
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
