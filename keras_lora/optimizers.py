"""Optimizers for LoRA training: LoRA+ (Hayou et al. 2024).

LoRA+ gives B (the up-projection, which starts at zero) a learning rate
`ratio` times A's: with `ratio = 16` (the paper's default) fine-tuning
converges faster at no cost per step. `lora_plus(optimizer, ratio)` turns
any Keras optimizer into that: same class, same settings, B's updates
(and its decoupled weight decay) computed with `ratio * learning_rate`.
An Adam step then equals two Adam optimizers, one with the learning rate
on everything else and one with `ratio` times it on the B tensors.

    model.compile(
        optimizer=kl.optimizers.lora_plus(keras.optimizers.AdamW(2e-4)),
        loss=...,
    )

B tensors are recognised by the adapter tensor they hold
(`keras_lora.layers.variants.tensor_of`), not by their names.
"""

import math
import numbers

import keras

from keras_lora._keras_internals import PerVariableLearningRate
from keras_lora.layers.variants import tensor_of

DEFAULT_RATIO = 16.0
_REGISTERED_NAME = "LoraPlus"
_CLASSES = {}  # optimizer class -> its LoRA+ subclass


class LoraPlusMixin(PerVariableLearningRate):
    """What a LoRA+ optimizer adds to its Keras optimizer class
    (`optimizer_class`)."""

    optimizer_class = None

    def __init__(self, *args, ratio=DEFAULT_RATIO, vectors=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.ratio = _check_ratio(ratio)
        self.vectors = bool(vectors)

    def learning_rate_multiplier(self, variable):
        if tensor_of(variable) == "lora_b":
            return self.ratio
        if self.vectors and len(variable.shape) == 1:
            return self.ratio
        return 1.0

    def get_config(self):
        config = super().get_config()
        config.update(
            ratio=self.ratio,
            vectors=self.vectors,
            base_optimizer=keras.saving.get_registered_name(
                self.optimizer_class
            ),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        ratio = config.pop("ratio", DEFAULT_RATIO)
        vectors = config.pop("vectors", False)
        base = config.pop("base_optimizer")
        optimizer = keras.optimizers.get({"class_name": base, "config": config})
        return lora_plus(optimizer, ratio=ratio, vectors=vectors)


def lora_plus(optimizer="adam", ratio=DEFAULT_RATIO, vectors=False):
    """Returns `optimizer` as a LoRA+ optimizer: B learns `ratio` times
    faster than A.

    The result is a new optimizer of `optimizer`'s class with its settings
    (learning rate or schedule, weight decay, clipping, ...); `optimizer`
    itself is not used afterwards. Variables holding a LoRA `B` tensor are
    updated with `ratio * learning_rate`, every other trainable variable
    (A, DoRA magnitudes, `modules_to_save`, biases) with the learning rate,
    on every backend and in `compile`/`fit`. It saves with the model and
    loads back as a LoRA+ optimizer.

    Args:
        optimizer: a Keras optimizer that has not been built yet (not used
            in training), or an identifier such as `"adam"`.
        ratio: B's learning rate over A's (LoRA+'s lambda), a positive
            number; the paper recommends 16 (default) for most tasks.
        vectors: also use `ratio * learning_rate` for every 1-D trainable
            variable (DoRA magnitudes, trained biases), as PEFT's
            `create_loraplus_optimizer` does.

    Returns:
        The LoRA+ optimizer.

    Example:

    >>> import keras, keras_lora as kl
    >>> opt = kl.optimizers.lora_plus(keras.optimizers.Adam(1e-3), ratio=16)
    >>> type(opt).__name__, opt.ratio
    ('LoraPlusAdam', 16.0)
    """
    optimizer = keras.optimizers.get(optimizer)
    if isinstance(optimizer, LoraPlusMixin):
        raise ValueError(
            "lora_plus: the optimizer is already a LoRA+ optimizer (ratio "
            f"{optimizer.ratio}). Pass the plain optimizer."
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "lora_plus: pass the inner optimizer, not a LossScaleOptimizer "
            "(compile() adds loss scaling under a mixed_float16 policy)."
        )
    if optimizer.built:
        raise ValueError(
            f"lora_plus: optimizer '{optimizer.name}' has been used already "
            "(it holds state for its variables). Pass a new optimizer."
        )
    _check_ratio(ratio)
    config = optimizer.get_config()
    rate = config.get("learning_rate")
    if isinstance(rate, dict):  # a serialized schedule
        config["learning_rate"] = keras.optimizers.schedules.deserialize(rate)
    cls = _lora_plus_class(type(optimizer))
    return cls(**config, ratio=float(ratio), vectors=vectors)


def _lora_plus_class(base):
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(
            f"LoraPlus{base.__name__}",
            (LoraPlusMixin, base),
            {"optimizer_class": base},
        )
        # One registered name for every LoRA+ class: `from_config` reads
        # the optimizer class from the config.
        keras.saving.register_keras_serializable(
            package="keras_lora", name=_REGISTERED_NAME
        )(cls)
        _CLASSES[base] = cls
    return cls


def _check_ratio(ratio):
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, numbers.Real)
        or not math.isfinite(ratio)
        or ratio <= 0
    ):
        raise ValueError(
            f"lora_plus: `ratio` must be a positive number (B's learning "
            f"rate over A's), got {ratio!r}. Pass e.g. 16."
        )
    return float(ratio)


# Registered on import, so a saved LoRA+ optimizer loads in a new process.
_lora_plus_class(keras.optimizers.Adam)
