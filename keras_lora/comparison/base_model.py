"""The base model: a small GPT-2 pre-trained offline, or a keras-hub preset.

`prepare_base(config, cache_dir)` returns the local keras-hub preset
directory the fine-tunes start from:

- with `config.preset` set, that preset (a keras-hub name such as
  `"gpt2_base_en"`, which keras-hub downloads, or a local directory);
- otherwise the small offline model. A byte-level BPE is trained on the
  pre-training text (`pydoc_data.topics`, see
  `data.pretraining_documents`), a `GPT2Backbone`
  of `config`'s size is pre-trained on the same text, and the
  `GPT2CausalLM` (tokenizer included) is saved with `save_to_preset` under
  `cache_dir/base-<config hash>`. Later runs with the same settings load it
  from there. The directory is written atomically, so an interrupted run
  leaves no half-written cache.
"""

import json
import os
import tempfile
import time

from keras_lora.comparison import data, tokenizer
from keras_lora.comparison.progress import TqdmCallback, status
from keras_lora.files.atomic import atomic_write_dir

BASE_INFO_FILE = "keras_lora_base.json"


def default_cache_dir():
    """`$KERAS_LORA_CACHE`, else `~/.cache/keras_lora`, plus `comparison`."""
    root = os.environ.get("KERAS_LORA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_lora"
    )
    return os.path.join(root, "comparison")


def prepare_base(config, cache_dir=None, progress=True):
    """The preset (directory or name) to fine-tune, and facts about it.

    Returns `(preset, info)`: `info` says where the base came from and, for
    the offline model, how it was pre-trained (cached or not).
    """
    if config.preset is not None:
        return resolve_preset(config.preset), {"source": "preset"}
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    directory = os.path.join(
        os.path.abspath(cache_dir), f"base-{config.base_key()}"
    )
    info_path = os.path.join(directory, BASE_INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        info["cached"] = True
        status(f"base model: cached at {directory}", progress)
        return directory, info
    info = {}

    def write(tmp):
        info.update(pretrain_base(config, tmp, progress=progress))
        with open(os.path.join(tmp, BASE_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)

    atomic_write_dir(directory, write)
    info["cached"] = False
    return directory, info


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


def pretrain_base(config, directory, progress=True):
    """Trains tokenizer and base model; saves the preset in `directory`.

    `config.pretrain_steps` steps of `pretrain_batch_size` windows drawn
    in shuffled passes over the text, AdamW with warm-up and cosine decay
    (as the fine-tunes), the last twentieth of the windows held out to
    report how well the base model learned its text.
    """
    import keras

    from keras_lora.comparison import training

    start = time.perf_counter()
    documents = data.pretraining_documents(
        config.pretrain_bytes, config.pretrain_code_bytes
    )
    characters = sum(len(d) for d in documents)
    status(
        f"base model: training a {config.vocabulary_size}-token byte-level "
        f"BPE on {_corpus_name(config)} ({characters:,} characters)",
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
            max_validation_windows=64,
        )
        x, y = data.as_inputs(
            data.training_windows(
                train,
                config.pretrain_steps,
                config.pretrain_batch_size,
                config.seed,
            )
        )
        model = training.training_model(causal_lm)
        training.compile_for_training(
            model,
            learning_rate=training.cosine_schedule(
                config.pretrain_learning_rate,
                config.pretrain_steps,
                config.warmup_fraction,
            ),
            weight_decay=config.weight_decay,
            epsilon=config.epsilon,
            clipnorm=config.clipnorm,
        )
        losses = training.LossHistory()
        callbacks = [losses]
        if progress:
            callbacks.append(
                TqdmCallback(config.pretrain_steps, "pre-training base")
            )
        train_start = time.perf_counter()
        model.fit(
            x,
            y,
            batch_size=config.pretrain_batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        train_seconds = time.perf_counter() - train_start
        held_out_loss = training.evaluate_loss(
            model, held_out, config.pretrain_batch_size
        )
        status(
            f"base model: held-out pre-training loss "
            f"{held_out_loss['loss']:.3f}",
            progress,
        )
        causal_lm.save_to_preset(directory)
    return {
        "source": "pretrained",
        "corpus": _corpus_name(config),
        "corpus_characters": characters,
        "tokens": int(len(token_ids)),
        "steps": config.pretrain_steps,
        "epochs": config.pretrain_steps
        * config.pretrain_batch_size
        / max(1, len(train)),
        "final_loss": losses.losses[-1],
        "held_out_loss": held_out_loss["loss"],
        "loss_curve": losses.losses,
        "tokenizer_seconds": tokenizer_seconds,
        "pretrain_seconds": train_seconds,
        "backend": keras.backend.backend(),
    }


def _corpus_name(config):
    if config.pretrain_code_bytes:
        return "pydoc_data.topics + standard-library package code"
    return "pydoc_data.topics"


def _shuffled(windows, seed=0):
    """The windows in a fixed random order, so the held-out ones (the
    last) come from all over the text, not from its last document."""
    import numpy as np

    return windows[np.random.default_rng(seed).permutation(len(windows))]
