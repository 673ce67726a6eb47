"""Training, evaluation and generation helpers shared by every phase."""

import math

import keras
import numpy as np

from keras_lora.comparison import data


def training_model(causal_lm):
    """A plain functional `keras.Model` sharing `causal_lm`'s layers.

    keras-hub tasks run their preprocessor inside `fit`; the comparison
    trains on token windows that are already tokenized, so it trains this
    plain model (same variables, token ids in, logits out) instead.
    """
    return keras.Model(
        inputs=causal_lm.input, outputs=causal_lm.output, name="lm"
    )


def cosine_schedule(learning_rate, total_steps, warmup_fraction=0.1):
    """Linear warm-up, then cosine decay to 10% of `learning_rate`.

    The usual recipe for fine-tuning transformers (warm-up over the first
    `warmup_fraction` of the steps, at least one step).
    """
    warmup = max(1, int(round(total_steps * warmup_fraction)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate * 0.1,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.1,
        warmup_target=learning_rate,
        warmup_steps=warmup,
    )


def compile_for_training(
    model, learning_rate, weight_decay, epsilon=1e-6, clipnorm=1.0
):
    """AdamW as in the keras.io recipe, next-token cross-entropy.

    The loss is `kl.losses.TokenCrossEntropy` (the same values as
    `SparseCategoricalCrossentropy(from_logits=True)`, faster on JAX and
    PyTorch).
    """
    from keras_lora.losses import TokenCrossEntropy

    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        epsilon=epsilon,
        global_clipnorm=clipnorm,
    )
    # Biases and layer-norm scales/offsets are not decayed.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer, loss=TokenCrossEntropy())
    return model


def compile_for_evaluation(model):
    """Compiles `model` for `evaluate` only (the same loss as training)."""
    from keras_lora.losses import TokenCrossEntropy

    model.compile(loss=TokenCrossEntropy())
    return model


def apply_lora(causal_lm, config):
    """LoRA of `config.rank`/`alpha` on `config.targets`; rest frozen."""
    import keras_lora as kl

    kl.apply_lora(
        causal_lm,
        kl.LoraConfig(
            rank=config.rank,
            alpha=config.alpha,
            target_modules=config.target_modules(),
        ),
    )
    return causal_lm


class LossHistory(keras.callbacks.Callback):
    """The training loss of every step (not Keras's running epoch mean).

    Keras logs the mean loss since the epoch began; with equal batch sizes
    step `k`'s own loss is `k * mean_k - (k - 1) * mean_(k-1)`.
    """

    def __init__(self):
        super().__init__()
        self.losses = []
        self._previous_mean = 0.0

    def on_train_begin(self, logs=None):
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(keras.ops.convert_to_numpy(logs["loss"]))
        loss = (batch + 1) * mean - batch * self._previous_mean
        self._previous_mean = mean
        self.losses.append(loss)


def evaluate_loss(model, windows, batch_size):
    """Mean next-token cross-entropy on `windows` and its perplexity."""
    x, y = data.as_inputs(windows)
    batch_size = min(batch_size, len(windows))
    result = model.evaluate(
        x, y, batch_size=batch_size, verbose=0, return_dict=True
    )
    loss = float(result["loss"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def generate_samples(causal_lm, prompts, max_length, top_k=10, seed=1):
    """Continuations of `prompts` (prompt text not repeated).

    Tokens are drawn from the `top_k` most likely ones (keras-hub's
    `TopKSampler`) with a fixed `seed`, so a run's samples are repeatable;
    `top_k=1` is greedy decoding. End-of-text is never the first token
    drawn (as `min_new_tokens=1` in other libraries), so no sample is
    empty by a single unlucky draw; it still ends a sample later. The
    start token is not prepended: training windows start anywhere in the
    text, so a prompt at position 0 is what the model has seen.
    """
    preprocessor = causal_lm.preprocessor
    causal_lm.compile(
        sampler=_sampler(top_k, seed, preprocessor.tokenizer.end_token_id)
    )
    previous = preprocessor.add_start_token
    preprocessor.add_start_token = False
    try:
        outputs = causal_lm.generate(
            list(prompts), max_length=max_length, strip_prompt=True
        )
    finally:
        preprocessor.add_start_token = previous
    if isinstance(outputs, str):
        outputs = [outputs]
    return [
        {"prompt": prompt, "completion": _text(out)}
        for prompt, out in zip(prompts, outputs, strict=True)
    ]


def _sampler(top_k, seed, end_token_id):
    """keras-hub's `TopKSampler` that never draws `end_token_id` first."""
    import keras_hub
    from keras import ops

    class NonEmptyTopKSampler(keras_hub.samplers.TopKSampler):
        def __call__(self, next, prompt, cache=None, index=0, mask=None, **kw):
            # keras-hub passes the prompt's padding mask: a row's first
            # new token goes at its prompt length.
            first = ops.sum(ops.cast(mask, "int32"), axis=-1)

            def next_without_empty(prompt, cache, index):
                logits, hidden_states, cache = next(prompt, cache, index)
                vocabulary = ops.arange(ops.shape(logits)[-1])
                banned = ops.logical_and(
                    ops.equal(first, index)[:, None],
                    ops.equal(vocabulary, end_token_id)[None, :],
                )
                logits = ops.where(banned, ops.cast(-1e9, logits.dtype), logits)
                return logits, hidden_states, cache

            return super().__call__(
                next_without_empty, prompt, cache, index, mask, **kw
            )

    return NonEmptyTopKSampler(k=top_k, seed=seed)


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return _text(value.item())
    return str(value)
