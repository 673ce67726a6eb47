"""LoRA training sharded over devices and processes (`keras.distribution`).

`cluster` joins processes and builds the distribution (data parallel, or
model parallel with a backbone's layout map) and says which rows of each
global batch a process feeds; `job` is the training run that every
process executes; `command` is `keras-lora train-distributed`, which also
starts a multi-process job on one machine. Adapter variables need none of
this to be sharded right: they follow their base kernels' layouts by
themselves (`keras_lora.layers.layouts`).
"""

from keras_lora.lazy import lazy_module

_EXPORTS = {
    "initialize": "keras_lora.distributed.cluster",
    "layout_map_for": "keras_lora.distributed.cluster",
    "make_distribution": "keras_lora.distributed.cluster",
    "process_rows": "keras_lora.distributed.cluster",
    "JobConfig": "keras_lora.distributed.job",
    "run": "keras_lora.distributed.job",
}
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
