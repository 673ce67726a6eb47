"""Processes, device meshes and distributions for training at scale (JAX).

A job runs the same program in every process (one per host, or one per
GPU): `initialize` joins the processes, `make_distribution` lays the
model out over all their devices, and each process feeds its own rows of
every global batch (`process_rows`). Adapter layouts need nothing here:
LoRA layers follow their base kernels' layouts by themselves
(`keras_lora.layers.layouts`).
"""

import keras

BATCH = "batch"
MODEL = "model"
PARALLEL_KINDS = ("none", "data", "model")

# Base-weight layouts for keras-hub transformer backbones that have no
# `get_layout_map` of their own (GPT-2): Megatron-style tensor parallelism
# over the "model" axis. The query/key/value projections and the first
# MLP dense are split on their output axes (column-parallel), the
# attention output and the second dense on their input axes
# (row-parallel), and the embeddings on the hidden axis. Path regexes, as
# in keras-hub's own maps; they name base weights only.
TRANSFORMER_LAYOUT = {
    "token_embedding/embeddings": (None, MODEL),
    "position_embedding/embeddings": (None, MODEL),
    "transformer_layer.*self_attention.*(query|key|value)/kernel": (
        None,
        MODEL,
        None,
    ),
    "transformer_layer.*self_attention.*(query|key|value)/bias": (MODEL, None),
    "transformer_layer.*attention_output/kernel": (MODEL, None, None),
    "transformer_layer.*feedforward_intermediate_dense/kernel": (None, MODEL),
    "transformer_layer.*feedforward_intermediate_dense/bias": (MODEL,),
    "transformer_layer.*feedforward_output_dense/kernel": (MODEL, None),
}


def initialize(coordinator=None, num_processes=None, process_id=None):
    """Joins this process to a multi-process JAX job; call it first.

    Arguments as for `keras.distribution.initialize` (`coordinator`:
    `"host:port"` of process 0), which also reads them from the
    environment (`KERAS_DISTRIBUTION_JOB_ADDRESSES`,
    `KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID`)
    or, on Cloud TPU and SLURM, from the cluster. On CPU, JAX exchanges
    data between processes with gloo, which must be chosen before JAX
    starts; GPU and TPU jobs use their own collectives and ignore it.
    """
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(coordinator, num_processes, process_id)


def local_device_count():
    """Devices of this process (all of them with one process)."""
    import jax

    return jax.local_device_count()


def make_distribution(parallel, model_axis=None, backbone=None):
    """A `keras.distribution` over every device of every process.

    Args:
        parallel: `"none"` (returns None), `"data"` (`DataParallel`:
            weights replicated, batches split) or `"model"`
            (`ModelParallel` over a `(batch, model)` mesh).
        model_axis: size of the mesh's `"model"` axis; by default the
            devices of one process, so weights are split within a host and
            batches across hosts (the fast links carry the per-layer
            collectives).
        backbone: the keras-hub backbone (class or instance) the layout is
            for: its `get_layout_map` where it has one (Llama, Gemma, Qwen,
            ...), else `TRANSFORMER_LAYOUT`.

    Batches are fed per process (`process_rows`), so the distribution does
    not shard datasets itself (`auto_shard_dataset=False`).
    """
    if parallel not in PARALLEL_KINDS:
        raise ValueError(
            f"make_distribution: `parallel` must be one of {PARALLEL_KINDS}, "
            f"got {parallel!r}."
        )
    if parallel == "none":
        return None
    devices = keras.distribution.list_devices()
    if parallel == "data":
        return keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=False
        )
    model_axis = int(model_axis or local_device_count())
    if model_axis < 1 or len(devices) % model_axis:
        raise ValueError(
            f"make_distribution: the model axis ({model_axis}) must divide "
            f"the number of devices ({len(devices)}). Pass another "
            "`--model-axis`."
        )
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // model_axis, model_axis), (BATCH, MODEL), devices
    )
    return keras.distribution.ModelParallel(
        layout_map=layout_map_for(backbone, mesh),
        batch_dim_name=BATCH,
        auto_shard_dataset=False,
    )


def layout_map_for(backbone, mesh):
    """The base-weight `LayoutMap` of `backbone` on `mesh` (see
    `make_distribution`); adapters are not in it and need not be."""
    get_layout_map = getattr(backbone, "get_layout_map", None)
    if get_layout_map is not None:
        return get_layout_map(
            mesh, model_parallel_dim_name=MODEL, data_parallel_dim_name=BATCH
        )
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in TRANSFORMER_LAYOUT.items():
        layout_map[key] = axes
    return layout_map


def process_rows(distribution, batch_size):
    """The `slice` of every global batch that this process feeds.

    Keras assembles a global batch from each process's rows in process
    order. Processes that hold the same model replica (a model axis
    spanning hosts) feed the same rows. One process feeds everything.
    """
    if distribution is None or distribution.num_processes == 1:
        return slice(0, batch_size)
    shards = min(distribution.num_model_replicas, distribution.num_processes)
    if batch_size % shards:
        raise ValueError(
            f"The global batch size ({batch_size}) must be divisible by "
            f"the number of data shards across processes ({shards})."
        )
    rows = batch_size // shards
    start = distribution.data_shard_id * rows
    return slice(start, start + rows)
