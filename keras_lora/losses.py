"""Token cross-entropy: the language-model loss, fast on every backend.

    model.compile(optimizer="adam", loss=kl.losses.TokenCrossEntropy())

It computes what `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`
computes on logits shaped `(batch, seq, vocabulary)`, but on the logits
flattened to `(tokens, vocabulary)` rows, which the backends handle much
faster for large vocabularies. Forward + backward on GPT-2-sized logits
(8, 128, 50257) on this project's 2-core CPU (`python -m benchmarks.profiles
loss`):

- PyTorch: Keras moves the class axis of 3-D logits to position 1 for
  `torch.nn.functional.cross_entropy`, which then reads the logits with a
  stride; on rows the class axis already is axis 1 (about 3.2x faster);
- JAX: Keras builds a one-hot `(tokens, vocabulary)` array and multiplies it
  with the log-probabilities; `logsumexp(row) - row[label]` reads the logits
  once (about 1.7x faster);
- TensorFlow: the same fused kernel either way (no change).
"""

import keras
from keras import ops


def _cross_entropy_rows(labels, rows):
    """`-log softmax(rows)[labels]` for `rows` (tokens, classes) and integer
    `labels` (tokens,), without a one-hot array: the same value, and the
    gradient `softmax - one_hot` comes out of logsumexp's and the gather's."""
    picked = ops.take_along_axis(rows, ops.expand_dims(labels, -1), axis=-1)
    return ops.logsumexp(rows, axis=-1) - ops.squeeze(picked, -1)  # (tokens,)


@keras.saving.register_keras_serializable(package="keras_lora")
class TokenCrossEntropy(keras.losses.Loss):
    """Sparse categorical cross-entropy over the last axis, computed on rows.

    Drop-in for `keras.losses.SparseCategoricalCrossentropy` on integer
    labels: same values, same `sample_weight` and mask handling (the
    per-token losses come back in the labels' shape before Keras reduces
    them), faster for large vocabularies (see the module docstring).

    Args:
        from_logits: whether `y_pred` holds logits (the usual case for
            language models) or probabilities.
        reduction: as for any Keras loss (default `"sum_over_batch_size"`).
        name: the loss's name.
        dtype: the dtype the loss is computed in (default: Keras's floatx).

    Shapes: `y_true` integer `(..., )` or `(..., 1)`; `y_pred`
    `(..., classes)`.

    Example:

    >>> import numpy as np
    >>> loss = TokenCrossEntropy()
    >>> logits = np.zeros((2, 3, 5), "float32")
    >>> round(float(loss(np.zeros((2, 3), "int32"), logits)), 4)  # log(5)
    1.6094
    """

    def __init__(
        self,
        from_logits=True,
        reduction="sum_over_batch_size",
        name="token_cross_entropy",
        dtype=None,
    ):
        if not isinstance(from_logits, bool):
            raise TypeError(
                "TokenCrossEntropy: `from_logits` must be True or False; "
                f"got {from_logits!r}."
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        token_shape = ops.shape(y_pred)[:-1]
        rows = ops.reshape(y_pred, (-1, classes))  # (tokens, classes)
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))  # (tokens,)
        if self.from_logits and keras.backend.backend() == "jax":
            # Keras's JAX version multiplies by a one-hot array instead.
            losses = _cross_entropy_rows(labels, rows)
        else:
            losses = keras.losses.sparse_categorical_crossentropy(
                labels, rows, from_logits=self.from_logits
            )
        return ops.reshape(losses, token_shape)  # (batch, seq)

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        return config
