"""LoRA training sharded over devices and processes (`keras.distribution`).

`cluster` joins processes and builds the distribution (data parallel, or
model parallel with a backbone's layout map) and says which rows of each
global batch a process feeds; `job` is the training run that every
process executes; `command` is `keras-lora train-distributed`, which also
starts a multi-process job on one machine. Adapter variables need none of
this to be sharded right: they follow their base kernels' layouts by
themselves (`keras_lora.layers.layouts`).
"""

from keras_lora.distributed.cluster import (
    initialize,
    layout_map_for,
    make_distribution,
    process_rows,
)
from keras_lora.distributed.job import JobConfig, run

__all__ = [
    "JobConfig",
    "initialize",
    "layout_map_for",
    "make_distribution",
    "process_rows",
    "run",
]
