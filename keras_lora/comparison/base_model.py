"""The base model the fine-tunes start from.

`prepare_base(config, cache_dir)` returns the keras-hub preset (a local
directory or a keras-hub name) and facts about it:

- with `config.preset` set, that preset (a keras-hub name such as
  `"gpt2_base_en"`, which keras-hub downloads, or a local directory);
- with `config.base == "shipped"` (the default), the small GPT-2 that
  ships inside the package (`SHIPPED_PRESET`), pre-trained offline on
  Python's documentation and most of its standard library's code by
  `python -m keras_lora.comparison.shipped` (see `shipped.py`); nothing is
  trained on the user's machine;
- with `config.base == "scratch"`, a small GPT-2 of `config`'s size
  pre-trained here: a byte-level BPE and the model are trained on
  `pydoc_data.topics` (`data.pretraining_documents`) and the
  `GPT2CausalLM` (tokenizer included) is saved with `save_to_preset`
  under `cache_dir/base-<config hash>`. Later runs with the same settings
  load it from there. The directory is written atomically, so an
  interrupted run leaves no half-written cache.

`pretrain` is the pre-training both small models use.
"""

import json
import os
import tempfile
import time

from keras_lora.comparison import data, tokenizer
from keras_lora.comparison.progress import TqdmCallback, status
from keras_lora.files.atomic import atomic_write_dir

# How a small base model was built (JSON, next to the preset's files).
BASE_INFO_FILE = "keras_lora_base.json"
SHIPPED_NAME = "gpt2_stdlib_1m"
SHIPPED_PRESET = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "presets", SHIPPED_NAME
)


def default_cache_dir():
    """`$KERAS_LORA_CACHE`, else `~/.cache/keras_lora`, plus `comparison`."""
    root = os.environ.get("KERAS_LORA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_lora"
    )
    return os.path.join(root, "comparison")


def prepare_base(config, cache_dir=None, progress=True):
    """The preset (directory or name) to fine-tune, and facts about it.

    Returns `(preset, info)`: `info` says where the base came from and, for
    the small offline models, how it was pre-trained (shipped, cached or
    trained this run).
    """
    if config.preset is not None:
        return resolve_preset(config.preset), {"source": "preset"}
    if config.base == "shipped":
        info = read_info(SHIPPED_PRESET, what="The shipped base model")
        info["source"] = "shipped"
        status(
            f"base model: shipped with the package, {SHIPPED_PRESET}", progress
        )
        return SHIPPED_PRESET, info
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    directory = os.path.join(
        os.path.abspath(cache_dir), f"base-{config.base_key()}"
    )
    if os.path.isfile(os.path.join(directory, BASE_INFO_FILE)):
        info = read_info(directory, what="The cached base model")
        info["cached"] = True
        status(f"base model: cached at {directory}", progress)
        return directory, info
    info = {}

    def write(tmp):
        documents = data.pretraining_documents(
            config.pretrain_bytes, config.pretrain_code_bytes
        )
        info.update(
            pretrain(config, documents, tmp, _corpus_name(config), progress)
        )
        write_info(tmp, info)

    atomic_write_dir(directory, write)
    info["cached"] = False
    return directory, info


def read_info(directory, what="The base model"):
    """The `BASE_INFO_FILE` of a small base model's preset directory."""
    path = os.path.join(directory, BASE_INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} is missing: '{path}' does not exist. Reinstall "
            "keras-lora (the shipped base is package data), rebuild it with "
            "`python -m keras_lora.comparison.shipped`, or pass --base "
            "scratch to pre-train one here."
        )
    with open(path) as f:
        return json.load(f)


def write_info(directory, info):
    with open(os.path.join(directory, BASE_INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


def resolve_preset(preset):
    """Checks `preset` before keras-hub sees it; returns it unchanged.

    A local directory must hold a keras-hub preset (`config.json`); a name
    must be one of keras-hub's GPT-2 presets (`kaggle://`/`hf://` handles
    pass through to keras-hub, which downloads them).
    """
    import keras_hub

    preset = os.fspath(preset)
    known = sorted(keras_hub.models.GPT2CausalLM.presets)
    if os.path.isdir(preset):
        if not os.path.isfile(os.path.join(preset, "config.json")):
            raise FileNotFoundError(
                f"--preset: directory '{preset}' is not a keras-hub preset "
                "(no config.json). Save one with "
                "`causal_lm.save_to_preset(directory)`, or pass a keras-hub "
                f"preset name: {', '.join(known)}."
            )
        return os.path.abspath(preset)
    if "://" in preset or preset in known:
        return preset
    raise FileNotFoundError(
        f"--preset: '{preset}' is neither a local preset directory nor a "
        f"keras-hub GPT-2 preset name. Pass an existing directory written "
        f"by `save_to_preset`, or one of: {', '.join(known)} (downloaded by "
        "keras-hub; needs a network the first time). Leave --preset out "
        "to use the small offline model."
    )


def load_causal_lm(preset, sequence_length):
    """`GPT2CausalLM.from_preset` with a preprocessor of `sequence_length`."""
    import keras_hub

    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor.from_preset(
        preset, sequence_length=sequence_length
    )
    return keras_hub.models.GPT2CausalLM.from_preset(
        preset, preprocessor=preprocessor
    )


def build_causal_lm(config, gpt2_tokenizer):
    """A freshly initialised `GPT2CausalLM` of `config`'s size."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=gpt2_tokenizer.vocabulary_size(),
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        intermediate_dim=config.intermediate_dim,
        dropout=config.dropout,
        max_sequence_length=config.sequence_length,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=gpt2_tokenizer, sequence_length=config.sequence_length
    )
    return keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )


def pretrain(
    config,
    documents,
    directory,
    corpus,
    progress=True,
    eval_every=None,
    weights_dtype=None,
    held_out_windows=64,
):
    """Trains tokenizer and base model on `documents`; saves the preset.

    `config.pretrain_steps` steps of `pretrain_batch_size` windows drawn
    in shuffled passes over the text, AdamW with warm-up
    (`pretrain_warmup_fraction`) and cosine decay (as the fine-tunes).
    A twentieth of the windows (at most `held_out_windows`), drawn from
    all over the text, is held out and never trained on; its loss is
    measured every `eval_every` steps (and at the end) to show whether the
    model has stopped learning. `weights_dtype` (e.g. `"float16"`) stores
    the weights at that precision; the held-out loss is then measured
    again on the model loaded back from `directory`, as users get it.

    Returns a JSON-compatible dict of how the model was built.
    """
    import keras

    from keras_lora.comparison import training

    start = time.perf_counter()
    characters = sum(len(d) for d in documents)
    status(
        f"base model: training a {config.vocabulary_size}-token byte-level "
        f"BPE on {corpus} ({characters:,} characters)",
        progress,
    )
    with tempfile.TemporaryDirectory() as scratch:
        gpt2_tokenizer = tokenizer.train_tokenizer(
            documents, config.vocabulary_size, scratch
        )
        token_ids = tokenizer.encode_documents(gpt2_tokenizer, documents)
        keras.utils.set_random_seed(config.seed)
        causal_lm = build_causal_lm(config, gpt2_tokenizer)
        tokenizer_seconds = time.perf_counter() - start
        train, held_out = data.split_windows(
            _shuffled(data.windows(token_ids, config.sequence_length)),
            validation_fraction=0.05,
            max_validation_windows=held_out_windows,
        )
        model = training.training_model(causal_lm)
        training.compile_for_training(
            model,
            learning_rate=training.cosine_schedule(
                config.pretrain_learning_rate,
                config.pretrain_steps,
                config.pretrain_warmup_fraction,
            ),
            weight_decay=config.weight_decay,
            epsilon=config.epsilon,
            clipnorm=config.clipnorm,
        )
        train_start = time.perf_counter()
        losses, curve = _fit_in_chunks(
            model, train, held_out, config, eval_every, progress
        )
        train_seconds = time.perf_counter() - train_start
        held_out_loss = curve[-1][1]
        status(
            f"base model: held-out pre-training loss {held_out_loss:.3f}",
            progress,
        )
        save_preset(causal_lm, directory, weights_dtype)
    info = {
        "source": "pretrained",
        "corpus": corpus,
        "corpus_characters": characters,
        "tokens": int(len(token_ids)),
        "vocabulary_size": int(gpt2_tokenizer.vocabulary_size()),
        "parameters": int(causal_lm.count_params()),
        "steps": config.pretrain_steps,
        "epochs": config.pretrain_steps
        * config.pretrain_batch_size
        / max(1, len(train)),
        "held_out_windows": int(len(held_out)),
        "final_loss": losses[-1],
        "held_out_loss": held_out_loss,
        "held_out_curve": curve,
        "loss_curve": losses,
        "tokenizer_seconds": tokenizer_seconds,
        "pretrain_seconds": train_seconds,
        "backend": keras.backend.backend(),
    }
    if weights_dtype is not None:
        reloaded = training.compile_for_evaluation(
            training.training_model(
                load_causal_lm(directory, config.sequence_length)
            )
        )
        info["weights_dtype"] = weights_dtype
        info["held_out_loss_float32"] = held_out_loss
        info["held_out_loss"] = training.evaluate_loss(
            reloaded, held_out, config.pretrain_batch_size
        )["loss"]
    return info


def _fit_in_chunks(model, train, held_out, config, eval_every, progress):
    """Trains `config.pretrain_steps` steps, `eval_every` at a time.

    Returns the training loss of every step and `[step, held-out loss]`
    after each chunk. The optimizer (and its schedule) carries on from one
    `fit` call to the next.
    """
    from keras_lora.comparison import training

    steps, batch_size = config.pretrain_steps, config.pretrain_batch_size
    x, y = data.as_inputs(
        data.training_windows(train, steps, batch_size, config.seed)
    )
    chunk = steps if eval_every is None else eval_every
    history = training.LossHistory()
    callbacks = [history]
    bar = None
    if progress:
        bar = TqdmCallback(steps, "pre-training base", keep_open=True)
        callbacks.append(bar)
    losses, curve = [], []
    try:
        for begin in range(0, steps, chunk):
            end = min(steps, begin + chunk)
            rows = slice(begin * batch_size, end * batch_size)
            model.fit(
                {name: value[rows] for name, value in x.items()},
                y[rows],
                batch_size=batch_size,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=callbacks,
            )
            losses += history.losses
            loss = training.evaluate_loss(model, held_out, batch_size)
            curve.append([end, loss["loss"]])
            if bar is not None and end < steps:
                bar.write(f"  step {end}: held-out loss {loss['loss']:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return losses, curve


def save_preset(causal_lm, directory, weights_dtype=None):
    """`causal_lm.save_to_preset(directory)`, weights in `weights_dtype`.

    keras-hub loads a preset saved in a lower float precision into the
    current Keras dtype policy (float32 by default), as it does for its
    own bfloat16 presets; only the file is smaller.
    """
    if weights_dtype is None:
        causal_lm.save_to_preset(directory)
        return
    import keras_hub

    backbone = causal_lm.backbone
    copy = type(backbone).from_config(
        dict(backbone.get_config(), dtype=weights_dtype)
    )
    copy.set_weights(backbone.get_weights())  # cast on assignment
    keras_hub.models.GPT2CausalLM(
        backbone=copy, preprocessor=causal_lm.preprocessor
    ).save_to_preset(directory)


def _corpus_name(config):
    if config.pretrain_code_bytes:
        return "pydoc_data.topics + standard-library code"
    return "pydoc_data.topics"


def _shuffled(windows, seed=0):
    """The windows in a fixed random order, so the held-out ones (the
    last) come from all over the text, not from its last document."""
    import numpy as np

    return windows[np.random.default_rng(seed).permutation(len(windows))]
