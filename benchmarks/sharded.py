"""Per-device memory of full fine-tuning vs LoRA under ModelParallel (JAX).

    python -m benchmarks sharded            # the JAX backend only

Builds a keras-hub GPT-2 backbone of GPT-2 base's shape (12 layers, hidden
768, 12 heads, MLP 3072, vocabulary 50257, 1024 positions; random weights,
nothing downloaded) under `keras.distribution.ModelParallel` on 8
simulated CPU devices: a (batch 2, model 4) mesh with the Megatron-style
base-weight layout of `keras_lora.distributed.cluster.TRANSFORMER_LAYOUT`
(GPT-2's 12 heads split 4 ways; 8 do not divide them). For full
fine-tuning and for LoRA configs it builds Adam's state for what trains
and reads the bytes every device holds from the arrays' addressable
shards: base weights, adapter weights, optimizer state. "one device" is
what an unsharded model keeps on its single device (the arrays' global
sizes). `--quick` uses a 2-layer model of hidden 64.
"""

import argparse
import collections
import datetime
import os
import sys

from benchmarks import common

DEVICES = 8
MESH = (2, 4)  # (batch, model)
GPT2_BASE = dict(
    vocabulary_size=50257,
    num_layers=12,
    num_heads=12,
    hidden_dim=768,
    intermediate_dim=3072,
    max_sequence_length=1024,
)
QUICK_SHAPE = dict(
    vocabulary_size=256,
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=256,
    max_sequence_length=64,
)
ALL_LINEAR = [
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
]
# (label, LoraConfig arguments); None: full fine-tuning.
SETUPS = [
    ("full fine-tuning", None),
    ("LoRA r=4, query+value", dict(rank=4, alpha=8)),
    (
        "LoRA r=16, all linear",
        dict(rank=16, alpha=32, target_modules=ALL_LINEAR),
    ),
]


def device_bytes(variables):
    """`{device: bytes}` that `variables` occupy, from their values'
    addressable shards (JAX arrays)."""
    totals = collections.Counter()
    for variable in variables:
        for shard in variable.value.addressable_shards:
            totals[str(shard.device)] += shard.data.nbytes
    return totals


def global_bytes(variables):
    """Bytes the variables hold on one device when nothing is sharded."""
    return sum(int(variable.value.nbytes) for variable in variables)


def measure(label, backbone, lora_kwargs, distribution):
    """One row: bytes per device of base weights, adapters and Adam."""
    import keras

    import keras_lora as kl

    if lora_kwargs is not None:
        # Under the distribution, so adapters take their layouts.
        with distribution.scope():
            kl.apply_lora(backbone, kl.LoraConfig(**lora_kwargs))
    adapters = [
        variable
        for layer in kl.lora_layers(backbone)
        for name in layer.adapters
        for variable in layer.adapter_variables(name).values()
    ]
    adapter_ids = {id(v) for v in adapters}
    base = [v for v in backbone.weights if id(v) not in adapter_ids]
    trainable = backbone.trainable_variables
    with distribution.scope():
        optimizer = keras.optimizers.Adam()
        optimizer.build(trainable)
    groups = {
        "base": base,
        "adapter": adapters,
        "optimizer": list(optimizer.variables),
    }
    per_device = {k: device_bytes(v) for k, v in groups.items()}
    devices = sorted(set().union(*per_device.values()))
    row = {
        "setup": label,
        "lora": lora_kwargs,
        "trainable_params": int(sum(v.value.size for v in trainable)),
        "devices": len(devices),
    }
    for key in groups:
        values = [per_device[key].get(d, 0) for d in devices]
        row[f"{key}_bytes_per_device"] = max(values)
        row[f"{key}_bytes_min_device"] = min(values)
        row[f"{key}_bytes_one_device"] = global_bytes(groups[key])
    row["total_bytes_per_device"] = max(
        sum(per_device[k].get(d, 0) for k in groups) for d in devices
    )
    row["total_bytes_one_device"] = sum(
        row[f"{k}_bytes_one_device"] for k in groups
    )
    if lora_kwargs is not None:
        kl.unload(backbone)
    return row


def run(shape, mesh_shape=MESH, log=print):
    """Measures every setup on a `shape` GPT-2 under ModelParallel over
    `mesh_shape` (batch, model); returns the result dict."""
    import keras
    import keras_hub

    from keras_lora.distributed import cluster

    devices = keras.distribution.list_devices()
    needed = mesh_shape[0] * mesh_shape[1]
    if len(devices) < needed:
        raise RuntimeError(
            f"benchmarks.sharded needs {needed} devices, JAX has "
            f"{len(devices)}; run it as `python -m benchmarks sharded` "
            "(which sets XLA_FLAGS before JAX starts)."
        )
    mesh = keras.distribution.DeviceMesh(
        mesh_shape, (cluster.BATCH, cluster.MODEL), devices[:needed]
    )
    distribution = keras.distribution.ModelParallel(
        layout_map=cluster.layout_map_for(keras_hub.models.GPT2Backbone, mesh),
        batch_dim_name=cluster.BATCH,
    )
    log(f"building GPT-2 {shape} on mesh {mesh_shape} ...")
    with distribution.scope():
        backbone = keras_hub.models.GPT2Backbone(**shape)
    rows = []
    for label, lora_kwargs in SETUPS:
        row = measure(label, backbone, lora_kwargs, distribution)
        log(
            f"{label}: {_mib(row['total_bytes_per_device'])} MiB per device, "
            f"{_mib(row['total_bytes_one_device'])} MiB on one device"
        )
        rows.append(row)
    return {
        "workload": "sharded",
        "backend": keras.backend.backend(),
        "date": datetime.date.today().isoformat(),
        "machine": common.machine_info("jax"),
        "shape": shape,
        "mesh": dict(
            zip((cluster.BATCH, cluster.MODEL), mesh_shape, strict=True)
        ),
        "layout": "keras_lora.distributed.cluster.TRANSFORMER_LAYOUT",
        "optimizer": "Adam",
        "rows": rows,
    }


def render_markdown(results, command):
    result = results[0]
    mesh = " x ".join(f"{n} {k}" for k, n in result["mesh"].items())
    lines = common.report_header(
        "Sharded memory: full fine-tuning vs LoRA", command, results
    )
    uniform = all(
        row[f"{key}_bytes_per_device"] == row[f"{key}_bytes_min_device"]
        for row in result["rows"]
        for key, _ in _COLUMNS[:3]
    )
    spread = (
        "every device holds the same"
        if uniform
        else "the largest of the devices"
    )
    lines += [
        f"GPT-2 shape {result['shape']}, ModelParallel on a {mesh} mesh "
        f"of simulated CPU devices, {result['optimizer']}. MiB held per "
        f"device (read from the arrays' addressable shards; {spread}) "
        "and, in brackets, on one device without sharding.",
        "",
        markdown_rows(result["rows"]),
    ]
    return "\n".join(lines)


def markdown_rows(rows):
    """The table of `rows` (MiB per device, one device in brackets)."""
    table = []
    for row in rows:
        cells = {"setup": row["setup"]}
        cells["trainable"] = f"{row['trainable_params']:,}"
        for key, header in _COLUMNS:
            cells[header] = (
                f"{_mib(row[f'{key}_bytes_per_device'])} "
                f"({_mib(row[f'{key}_bytes_one_device'])})"
            )
        table.append(cells)
    return common.markdown_table(
        table, ["setup", "trainable"] + [h for _, h in _COLUMNS]
    )


_COLUMNS = [
    ("base", "base weights"),
    ("adapter", "adapter weights"),
    ("optimizer", "optimizer state"),
    ("total", "total"),
]


def _mib(nbytes):
    mib = nbytes / 2**20
    return f"{mib:.3f}" if mib < 1 else f"{mib:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sharded",
        description="Per-device bytes of base weights, adapters and "
        "optimizer state under ModelParallel (JAX, 8 simulated devices).",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="A 2-layer model (smoke test)."
    )
    args = parser.parse_args(argv)
    # JAX reads the device count when it starts, so before Keras runs.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    import keras

    if keras.backend.backend() != "jax":
        print(
            "benchmarks.sharded: keras.distribution shards variables on "
            f"JAX only; KERAS_BACKEND is {keras.backend.backend()}.",
            file=sys.stderr,
        )
        return 2
    result = run(QUICK_SHAPE if args.quick else GPT2_BASE)
    result["settings"] = {"quick": bool(args.quick)}
    common.write_json(args.out, result)
    print(f"[jax] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
