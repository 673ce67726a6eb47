"""Multi-adapter serving: routed batches and many registered adapters.

One Keras backend per process (`KERAS_BACKEND`). Two measurements on a
randomly initialised keras-hub GPT-2 (no download; sizes in `SIZES`):

- `routed_vs_loop`: a batch of 32 sequences for 32 different adapters
  (rank 8 on query/value, all resident in 32 slots). `routed` is one
  forward pass with per-row routing; `loop` is the PEFT-style alternative,
  one forward pass per adapter's sub-batch (here one row each) on the same
  compiled model. Throughput in tokens per second.
- `registered_1000_vs_1`: per-token latency of greedy `generate` for a
  batch of 8 rows on 8 different adapters, on a model whose bank holds
  1,000 registered adapters versus one whose bank holds 1 (the rows all use
  it). The 8 needed adapters are resident in both; the rest sit on the
  host, so only host memory should grow.

Run through `python -m benchmarks serving`, or directly with
`KERAS_BACKEND=jax python -m benchmarks.serving --out result.json`.
"""

import argparse
import datetime
import sys
import warnings

import keras
import numpy as np

import keras_lora as kl
from benchmarks import common
from keras_lora.files.adapter_files import collect_adapter
from keras_lora.serving import AdapterBank

SIZES = {
    "full": dict(
        vocabulary_size=8192,
        num_layers=6,
        num_heads=6,
        hidden_dim=384,
        intermediate_dim=1536,
        max_sequence_length=128,
    ),
    "quick": dict(
        vocabulary_size=512,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=64,
    ),
}
SETTINGS = {
    "full": dict(
        rank=8,
        batch=32,
        sequence=64,
        registered=1000,
        decode_batch=8,
        prompt=8,
        new_tokens=32,
        loop_new_tokens=8,
        timing=dict(
            warmup=2,
            repeats=20,
            min_repeats=10,
            max_other_share=0.05,
            max_seconds=120.0,
        ),
    ),
    "quick": dict(
        rank=8,
        batch=32,
        sequence=16,
        registered=1000,
        decode_batch=8,
        prompt=4,
        new_tokens=8,
        loop_new_tokens=4,
        timing=dict(
            warmup=1,
            repeats=5,
            min_repeats=3,
            max_other_share=0.05,
            max_seconds=10.0,
        ),
    ),
}
CONFIG = dict(target_modules=["query", "value"])


# -- models and adapters ------------------------------------------------------


def build_lm(size, seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(**size, name="gpt2_backbone")
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def adapter_template(size, rank):
    """`(meta, tensors)` of one rank-`rank` adapter for a GPT-2 of `size`."""
    source = build_lm(size)
    kl.apply_lora(source, kl.LoraConfig(rank=rank, **CONFIG))
    tensors, meta = collect_adapter(source, "default")
    return meta, tensors


def random_adapter(template, rng):
    meta, tensors = template
    return meta, {
        k: rng.normal(0.0, 0.02, v.shape).astype("float32")
        for k, v in tensors.items()
    }


def make_bank(lm, template, count, slots, max_batch, rank, seed=1):
    rng = np.random.default_rng(seed)
    bank = AdapterBank(lm, slots=slots, max_rank=rank, max_batch=max_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(count):
            bank.register(f"adapter_{i}", random_adapter(template, rng))
    return bank


# -- compiled calls -----------------------------------------------------------


def compiled_forward(lm):
    """`forward(inputs)` of the backbone, compiled, blocking until done."""
    backbone = lm.backbone
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def run(trainable, non_trainable, inputs):
            return backbone.stateless_call(trainable, non_trainable, inputs)[0]

        def forward(inputs):
            y = run(
                [v.value for v in backbone.trainable_variables],
                [v.value for v in backbone.non_trainable_variables],
                inputs,
            )
            return y.block_until_ready()

        return forward
    if backend == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        return tf.function(lambda inputs: backbone(inputs), jit_compile=True)
    import torch

    def forward(inputs):
        with torch.no_grad():
            return backbone(inputs)

    return forward


def token_inputs(rows, length, vocabulary, seed=2):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, vocabulary, (rows, length)).astype(
            "int32"
        ),
        "padding_mask": np.ones((rows, length), "int32"),
    }


def slice_rows(inputs, start, stop):
    return {k: v[start:stop] for k, v in inputs.items()}


# -- measurements -------------------------------------------------------------


def routed_vs_loop(size, settings, log=print):
    rank, batch, length = (
        settings["rank"],
        settings["batch"],
        settings["sequence"],
    )
    template = adapter_template(size, rank)
    lm = build_lm(size)
    bank = make_bank(
        lm, template, batch, slots=batch, max_batch=batch, rank=rank
    )
    names = bank.names
    inputs = token_inputs(batch, length, size["vocabulary_size"])
    rows = [slice_rows(inputs, i, i + 1) for i in range(batch)]
    forward = compiled_forward(lm)
    bank.activate(names)

    def routed():
        bank.route(names)
        forward(inputs)

    def loop():
        for i, name in enumerate(names):
            bank.route([name])
            forward(rows[i])

    # Check: the routed batch equals the per-adapter sub-batches.
    bank.route(names)
    batched = np.asarray(keras.ops.convert_to_numpy(forward(inputs)))
    singles = []
    for i, name in enumerate(names):
        bank.route([name])
        singles.append(np.asarray(keras.ops.convert_to_numpy(forward(rows[i]))))
    max_diff = float(np.max(np.abs(batched - np.concatenate(singles))))
    log(f"routed vs loop: max |difference| {max_diff:.2e}")
    times, stats = common.time_interleaved_quiet(
        {"routed": routed, "loop": loop}, **settings["timing"]
    )
    tokens = batch * length
    result = {
        "adapters": batch,
        "batch": batch,
        "sequence": length,
        "rank": rank,
        "max_abs_diff_routed_vs_loop": max_diff,
        "timing_stats": stats,
        "variants": {},
    }
    for name, values in times.items():
        summary = common.summarize(values)
        summary["tokens_per_s"] = tokens / (summary["median_ms"] / 1e3)
        result["variants"][name] = summary
    result["throughput_ratio"] = common.paired_ratio(
        times["loop"], times["routed"]
    )
    log(
        "routed vs loop: routed "
        f"{result['variants']['routed']['median_ms']:.1f} ms, loop "
        f"{result['variants']['loop']['median_ms']:.1f} ms, "
        f"throughput x{result['throughput_ratio']:.2f}"
    )
    return result


def routed_vs_loop_generate(size, settings, log=print):
    """Greedy generation for `batch` prompts on `batch` different adapters:
    one routed `generate` call versus one call per adapter's sub-batch."""
    rank, batch = settings["rank"], settings["batch"]
    prompt, new = settings["prompt"], settings["loop_new_tokens"]
    template = adapter_template(size, rank)
    lm = build_lm(size)
    bank = make_bank(
        lm, template, batch, slots=batch, max_batch=batch, rank=rank
    )
    names = bank.names
    bank.activate(names)
    inputs = token_inputs(batch, prompt + new, size["vocabulary_size"])
    inputs["padding_mask"][:, prompt:] = 0
    inputs["token_ids"][:, prompt:] = 0
    rows = [slice_rows(inputs, i, i + 1) for i in range(batch)]

    def generate(batch_inputs, route):
        bank.route(route)
        out = lm.generate(dict(batch_inputs), stop_token_ids=None)
        return np.asarray(keras.ops.convert_to_numpy(out["token_ids"]))

    def routed():
        return generate(inputs, names)

    def loop():
        return np.concatenate(
            [generate(rows[i], [name]) for i, name in enumerate(names)]
        )

    mismatched = int(np.sum(routed() != loop()))
    log(f"routed vs loop generate: {mismatched} differing tokens")
    # A loop round is `batch` generate calls: fewer rounds keep it short.
    timing = dict(settings["timing"], warmup=1)
    timing["repeats"] = min(timing["repeats"], 4)
    timing["min_repeats"] = min(timing["min_repeats"], 2)
    times, stats = common.time_interleaved_quiet(
        {"routed": routed, "loop": loop}, **timing
    )
    result = {
        "adapters": batch,
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "rank": rank,
        "differing_tokens_routed_vs_loop": mismatched,
        "timing_stats": stats,
        "variants": {},
    }
    for name, values in times.items():
        summary = common.summarize(values)
        summary["new_tokens_per_s"] = batch * new / (summary["median_ms"] / 1e3)
        result["variants"][name] = summary
    result["throughput_ratio"] = common.paired_ratio(
        times["loop"], times["routed"]
    )
    log(
        "routed vs loop generate: routed "
        f"{result['variants']['routed']['median_ms']:.1f} ms, loop "
        f"{result['variants']['loop']['median_ms']:.1f} ms, "
        f"throughput x{result['throughput_ratio']:.2f}"
    )
    return result


def registered_many_vs_one(size, settings, log=print):
    rank, rows = settings["rank"], settings["decode_batch"]
    prompt, new = settings["prompt"], settings["new_tokens"]
    template = adapter_template(size, rank)
    count = settings["registered"]
    models = {}
    for label, registered in (("1", 1), (str(count), count)):
        lm = build_lm(size)
        bank = make_bank(lm, template, registered, rows, rows, rank)
        names = bank.names[:rows] if registered > 1 else [bank.names[0]] * rows
        bank.route(names)
        models[label] = (lm, bank, names)
        log(f"registered {registered}: {len(bank)} adapters on the host")
    length = prompt + new
    inputs = token_inputs(rows, length, size["vocabulary_size"])
    inputs["padding_mask"][:, prompt:] = 0
    inputs["token_ids"][:, prompt:] = 0

    def runner(lm, bank, names):
        def run():
            bank.route(names)
            out = lm.generate(dict(inputs), stop_token_ids=None)
            keras.ops.convert_to_numpy(out["token_ids"])

        return run

    fns = {label: runner(*entry) for label, entry in models.items()}
    times, stats = common.time_interleaved_quiet(fns, **settings["timing"])
    result = {
        "registered": [1, count],
        "batch": rows,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "rank": rank,
        "timing_stats": stats,
        "variants": {},
    }
    for label, values in times.items():
        summary = common.summarize(values)
        summary["per_token_ms"] = summary["median_ms"] / new
        result["variants"][label] = summary
    result["latency_ratio"] = common.paired_ratio(times[str(count)], times["1"])
    log(
        f"per-token latency: 1 registered "
        f"{result['variants']['1']['per_token_ms']:.2f} ms, {count} "
        f"registered {result['variants'][str(count)]['per_token_ms']:.2f} ms,"
        f" ratio {result['latency_ratio']:.3f}"
    )
    return result


def run(quick=False, log=print):
    mode = "quick" if quick else "full"
    size, settings = SIZES[mode], SETTINGS[mode]
    backend = keras.backend.backend()
    result = {
        "benchmark": "serving",
        "backend": backend,
        "mode": mode,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(backend),
        "model": {"kind": "GPT2CausalLM, random weights", **size},
        "settings": settings,
        "load_average_start": common.load_average(),
    }
    monitor = common.CpuMonitor()
    log(f"[{backend}] routed batch vs per-adapter loop")
    result["routed_vs_loop"] = routed_vs_loop(size, settings, log)
    log(f"[{backend}] routed generate vs per-adapter generate loop")
    result["routed_vs_loop_generate"] = routed_vs_loop_generate(
        size, settings, log
    )
    log(f"[{backend}] per-token latency, many registered adapters vs 1")
    result["registered_many_vs_one"] = registered_many_vs_one(
        size, settings, log
    )
    common.record_end_load(result, monitor)
    return result


# -- markdown -----------------------------------------------------------------


def render_markdown(results, command):
    """The combined markdown report for a list of per-backend results."""
    first = results[0]
    settings = first["settings"]
    size = first["model"]
    lines = [
        "# Multi-adapter serving",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {first['date']} ({first['mode']} mode)",
        "",
        f"Machine: CPU {first['machine']['cpu']} "
        f"({first['machine']['usable_cores']} usable cores), Keras "
        f"{first['machine']['keras']}.",
        "",
        f"Model: keras-hub GPT2CausalLM with random weights, "
        f"{size['num_layers']} layers, hidden {size['hidden_dim']}, "
        f"vocabulary {size['vocabulary_size']}; adapters rank "
        f"{settings['rank']} on query and value. Variants are timed "
        "interleaved; blocks in which other processes used more than "
        f"{100 * settings['timing']['max_other_share']:.0f}% of the CPU "
        "are discarded (see `timing_stats` in the JSON files). Ratios are "
        "medians of per-round ratios.",
        "",
        "## Routed forward pass (prefill) vs per-adapter loop",
        "",
        f"A batch of {settings['batch']} sequences of "
        f"{settings['sequence']} tokens, each for a different adapter "
        "(all resident): one routed forward pass versus one pass per "
        "adapter's sub-batch (PEFT's mixed-batch strategy) on the same "
        "compiled model (jax `jit`, tensorflow `tf.function(jit_compile=True)`"
        ", torch eager `no_grad`). Target: routed >= 4x throughput.",
        "",
    ]
    rows = []
    for result in results:
        case = result["routed_vs_loop"]
        rows.append(
            {
                "backend": result["backend"],
                "routed_ms": case["variants"]["routed"]["median_ms"],
                "loop_ms": case["variants"]["loop"]["median_ms"],
                "routed_tps": case["variants"]["routed"]["tokens_per_s"],
                "loop_tps": case["variants"]["loop"]["tokens_per_s"],
                "ratio": case["throughput_ratio"],
                "diff": f"{case['max_abs_diff_routed_vs_loop']:.1e}",
                "contended": case["timing_stats"]["contended"],
            }
        )
    lines.append(
        common.markdown_table(
            rows,
            [
                ("backend", "backend"),
                ("routed_ms", "routed ms"),
                ("loop_ms", "loop ms"),
                ("routed_tps", "routed tokens/s"),
                ("loop_tps", "loop tokens/s"),
                ("ratio", "throughput routed/loop"),
                ("diff", "max abs diff"),
                ("contended", "contended"),
            ],
        )
    )
    lines += [
        "",
        "## Routed generation vs per-adapter generation loop",
        "",
        f"Greedy `CausalLM.generate` of {settings['loop_new_tokens']} new "
        f"tokens after {settings['prompt']}-token prompts, {settings['batch']} "
        "prompts for as many adapters: one routed call versus one call per "
        "adapter's sub-batch (one row each). Decoding is what serving "
        "spends its time on; the routed and looped tokens are compared. "
        "Target: routed >= 4x throughput.",
        "",
    ]
    rows = []
    for result in results:
        case = result.get("routed_vs_loop_generate")
        if case is None:
            continue
        rows.append(
            {
                "backend": result["backend"],
                "routed_ms": case["variants"]["routed"]["median_ms"],
                "loop_ms": case["variants"]["loop"]["median_ms"],
                "routed_tps": case["variants"]["routed"]["new_tokens_per_s"],
                "loop_tps": case["variants"]["loop"]["new_tokens_per_s"],
                "ratio": case["throughput_ratio"],
                "diff": case["differing_tokens_routed_vs_loop"],
                "contended": case["timing_stats"]["contended"],
            }
        )
    lines.append(
        common.markdown_table(
            rows,
            [
                ("backend", "backend"),
                ("routed_ms", "routed ms"),
                ("loop_ms", "loop ms"),
                ("routed_tps", "routed new tokens/s"),
                ("loop_tps", "loop new tokens/s"),
                ("ratio", "throughput routed/loop"),
                ("diff", "differing tokens"),
                ("contended", "contended"),
            ],
        )
    )
    count = settings["registered"]
    lines += [
        "",
        f"## Per-token latency: {count} registered adapters vs 1",
        "",
        f"Greedy `CausalLM.generate` of {settings['new_tokens']} new tokens "
        f"after a {settings['prompt']}-token prompt, batch of "
        f"{settings['decode_batch']} rows routed to "
        f"{settings['decode_batch']} resident adapters (or all to the one "
        "adapter); time per generated token (prefill included). Target: "
        "<= 1.1x.",
        "",
    ]
    rows = []
    for result in results:
        case = result["registered_many_vs_one"]
        rows.append(
            {
                "backend": result["backend"],
                "one": case["variants"]["1"]["per_token_ms"],
                "many": case["variants"][str(count)]["per_token_ms"],
                "ratio": case["latency_ratio"],
                "contended": case["timing_stats"]["contended"],
            }
        )
    lines.append(
        common.markdown_table(
            rows,
            [
                ("backend", "backend"),
                ("one", "1 registered, ms/token"),
                ("many", f"{count} registered, ms/token"),
                ("ratio", "ratio"),
                ("contended", "contended"),
            ],
        )
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description="Multi-adapter serving benchmark, one backend "
        "(KERAS_BACKEND).",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="Small model, few repetitions."
    )
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    common.write_json(args.out, result)
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
