"""The distributed LoRA training job behind `keras-lora train-distributed`.

Every process runs `run(config)` with the same config: it builds the
model under the job's distribution (so base weights are sharded as they
are created, and adapters follow them), applies LoRA, trains `steps`
global batches fed row-wise by the processes, evaluates one held-out
batch, and process 0 saves the adapter. With `parallel="none"` the same
code trains on one device, which is what the sharded runs are checked
against.

Models: `"tiny-gpt2"` and `"tiny-llama"` are seconds-long keras-hub
configurations with weights drawn from `seed` (for tests and smoke runs);
anything else is a keras-hub `CausalLM` preset (a local directory, or a
preset name where a network is available). Data: `data` is a text file
tokenized by the preset's tokenizer, or, without it, random tokens drawn
from `seed`.
"""

import contextlib
import dataclasses
import json
import os

import keras
import numpy as np

import keras_lora as kl
from keras_lora.distributed import cluster
from keras_lora.layers.layouts import variable_axes

# keras-hub backbone arguments of the tiny models (dropout off, so that
# every layout computes the same numbers).
TINY_MODELS = {
    "tiny-gpt2": (
        "GPT2",
        dict(
            vocabulary_size=64,
            num_layers=2,
            num_heads=8,
            hidden_dim=32,
            intermediate_dim=64,
            max_sequence_length=64,
            dropout=0.0,
        ),
    ),
    "tiny-llama": (
        "Llama",
        dict(
            vocabulary_size=64,
            num_layers=2,
            num_query_heads=8,
            num_key_value_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            dropout=0.0,
        ),
    ),
}


@dataclasses.dataclass
class JobConfig:
    """What one distributed LoRA training run does.

    Attributes:
        model: `"tiny-gpt2"`, `"tiny-llama"` or a keras-hub preset.
        parallel: `"none"`, `"data"` or `"model"`
            (`cluster.make_distribution`).
        model_axis: size of the mesh's model axis (default: the devices
            of one process).
        steps: training steps (global batches).
        batch_size: rows per global batch (split across processes).
        sequence_length: tokens per row.
        rank, alpha, target_modules: the LoRA config (layer names; by
            default the query and value projections).
        learning_rate: Adam's learning rate.
        seed: weights of tiny models, adapter initialisation, random data.
        data: a text file to train on (needs a preset's tokenizer).
        save_adapter: directory process 0 writes the adapter to.
    """

    model: str = "tiny-gpt2"
    parallel: str = "model"
    model_axis: int | None = None
    steps: int = 5
    batch_size: int = 8
    sequence_length: int = 16
    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple = ("query", "value")
    learning_rate: float = 1e-2
    seed: int = 0
    data: str | None = None
    save_adapter: str | None = None


def run(config, log=print):
    """Runs the job in this process; returns its results (a dict).

    Results: `losses` (the training loss of each step, over the global
    batch), `eval_loss` (a held-out batch after training),
    `process_count`, `device_count`, `mesh` and `adapter_layouts` (the
    mesh axes of every adapter variable), `adapter_dir` if saved.
    """
    check_saving(config)
    # The same seed in every process and run: adapters start equal.
    keras.utils.set_random_seed(config.seed)
    distribution = cluster.make_distribution(
        config.parallel, config.model_axis, _backbone_class(config.model)
    )
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        causal_lm = build_causal_lm(config)
        backbone = causal_lm.backbone
        lora = kl.LoraConfig(
            rank=config.rank,
            alpha=config.alpha,
            target_modules=list(config.target_modules),
        )
        kl.apply_lora(backbone, lora)
        tokens = token_batches(config, causal_lm)
        # The batches are token ids already: no preprocessing in training.
        causal_lm.preprocessor = None
        causal_lm.compile(
            optimizer=keras.optimizers.Adam(config.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
        rows = cluster.process_rows(distribution, config.batch_size)
        log(
            f"{config.model}: LoRA r={config.rank} on "
            f"{','.join(config.target_modules)}; "
            f"{_process_count(distribution)} process(es), "
            f"{len(keras.distribution.list_devices())} devices, mesh "
            f"{_mesh_of(distribution) or 'none (one device)'}"
        )
        losses = []
        for step in range(config.steps):
            x, y = _inputs(tokens[step][rows])
            loss = float(causal_lm.train_on_batch(x, y))
            losses.append(loss)
            log(f"step {step + 1}/{config.steps}: loss {loss:.6f}")
        x, y = _inputs(tokens[config.steps][rows])
        eval_loss = float(causal_lm.test_on_batch(x, y))
        log(f"held-out batch: loss {eval_loss:.6f}")
        results = {
            "model": config.model,
            "parallel": config.parallel,
            "losses": losses,
            "eval_loss": eval_loss,
            "process_count": _process_count(distribution),
            "device_count": len(keras.distribution.list_devices()),
            "mesh": _mesh_of(distribution),
            "adapter_layouts": adapter_layouts(backbone),
        }
        if config.save_adapter and _process_index(distribution) == 0:
            results["adapter_dir"] = kl.save_adapter(
                backbone, config.save_adapter
            )
            log(f"adapter saved to {results['adapter_dir']}")
    return results


def check_saving(config):
    """Raises before training if process 0 could not read the adapter.

    Process 0 writes the adapter file from what its own devices hold,
    which is all of it as long as the model axis stays within a process.
    """
    if not config.save_adapter or config.parallel != "model":
        return
    local = cluster.local_device_count()
    if (config.model_axis or local) > local:
        raise ValueError(
            f"train-distributed: --save-adapter needs every process to hold "
            f"whole adapters, but the model axis ({config.model_axis}) "
            f"spans processes ({local} devices each). Use --model-axis "
            f"{local} or less, or leave out --save-adapter."
        )


def build_causal_lm(config):
    """The job's keras-hub `CausalLM` (build it under the distribution)."""
    import keras_hub

    if config.model in TINY_MODELS:
        family, kwargs = TINY_MODELS[config.model]
        backbone_class = getattr(keras_hub.models, f"{family}Backbone")
        causal_lm_class = getattr(keras_hub.models, f"{family}CausalLM")
        backbone = backbone_class(**kwargs)
        # Same seed, same weights, whatever the layout (Keras's random
        # initialisers would depend on how variables are created).
        rng = np.random.default_rng(config.seed)
        for variable in backbone.weights:
            if len(variable.shape) >= 2:
                variable.assign(rng.normal(0.0, 0.1, variable.shape))
        return causal_lm_class(backbone=backbone, preprocessor=None)
    return keras_hub.models.CausalLM.from_preset(config.model)


def token_batches(config, causal_lm):
    """`(steps + 1, batch_size, sequence_length + 1)` int32 tokens: the
    training batches and a held-out one, the same in every process."""
    shape = (config.steps + 1, config.batch_size, config.sequence_length + 1)
    if config.data is None:
        vocabulary = causal_lm.backbone.vocabulary_size
        rng = np.random.default_rng(config.seed + 1)
        return rng.integers(1, vocabulary, shape).astype("int32")
    tokenizer = getattr(causal_lm.preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"train-distributed: `--data {config.data}` needs a model with "
            "a tokenizer (a keras-hub preset); the tiny models have none."
        )
    with open(config.data, encoding="utf-8") as f:
        text = f.read()
    ids = np.asarray(keras.ops.convert_to_numpy(tokenizer(text)), "int32")
    needed = int(np.prod(shape))
    if len(ids) == 0:
        raise ValueError(f"train-distributed: '{config.data}' has no text.")
    repeats = -(-needed // len(ids))
    return np.tile(ids, repeats)[:needed].reshape(shape)


def adapter_layouts(model):
    """`{variable path: mesh axes}` of every adapter variable of `model`
    (empty without a distribution)."""
    layouts = {}
    for layer in kl.lora_layers(model):
        for name in layer.adapters:
            for variable in layer.adapter_variables(name).values():
                axes = variable_axes(variable)
                if axes is not None:
                    layouts[variable.path] = [
                        a if a is None or isinstance(a, str) else list(a)
                        for a in axes
                    ]
    return layouts


def _inputs(tokens):
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones_like(tokens[:, :-1], dtype="bool"),
    }
    return x, tokens[:, 1:]


def _backbone_class(model):
    """The backbone class of a tiny model or a local preset directory
    (its `config.json`), whose `get_layout_map` lays it out; None when
    unknown (the generic transformer layout is used)."""
    import keras_hub

    if model in TINY_MODELS:
        name = f"{TINY_MODELS[model][0]}Backbone"
    else:
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            name = json.load(f).get("class_name", "")
    return getattr(keras_hub.models, name, None)


def _process_count(distribution):
    return 1 if distribution is None else distribution.num_processes


def _process_index(distribution):
    if distribution is None:
        return 0
    import jax

    return jax.process_index()


def _mesh_of(distribution):
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    return dict(zip(mesh.axis_names, mesh.shape, strict=True))
