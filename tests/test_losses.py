"""kl.losses.TokenCrossEntropy: Keras's sparse cross-entropy, on rows."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from tests.conftest import to_numpy

VOCAB = 37


def _data(shape=(3, 5), seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (VOCAB,)).astype("float32") * 3
    labels = rng.integers(0, VOCAB, shape).astype("int32")
    return labels, logits


def _keras_loss(**kwargs):
    return keras.losses.SparseCategoricalCrossentropy(**kwargs)


@pytest.mark.parametrize("shape", [(3, 5), (4,), (2, 3, 4)])
def test_equals_keras_sparse_cross_entropy(shape):
    labels, logits = _data(shape)
    ours = kl.losses.TokenCrossEntropy()(labels, logits)
    theirs = _keras_loss(from_logits=True)(labels, logits)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=1e-6)
    # The value against numpy: mean of -log softmax at the label.
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, labels[..., None], -1)
    np.testing.assert_allclose(to_numpy(ours), -picked.mean(), rtol=1e-5)


def test_per_token_losses_keep_the_label_shape():
    labels, logits = _data((3, 5))
    loss = kl.losses.TokenCrossEntropy(reduction=None)
    per_token = to_numpy(loss(labels, logits))
    assert per_token.shape == (3, 5)
    expected = to_numpy(
        _keras_loss(from_logits=True, reduction=None)(labels, logits)
    )
    np.testing.assert_allclose(per_token, expected, rtol=1e-6, atol=1e-6)


def test_labels_with_a_trailing_axis_and_sample_weight():
    labels, logits = _data((3, 5))
    weights = np.random.default_rng(1).uniform(size=(3, 5)).astype("float32")
    weights[0, :2] = 0.0  # e.g. padding
    ours = kl.losses.TokenCrossEntropy()(labels[..., None], logits, weights)
    theirs = _keras_loss(from_logits=True)(labels, logits, weights)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=1e-6)


def test_probabilities():
    labels, logits = _data((3, 5))
    probs = to_numpy(keras.ops.softmax(logits, axis=-1))
    ours = kl.losses.TokenCrossEntropy(from_logits=False)(labels, probs)
    theirs = _keras_loss()(labels, probs)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=1e-5)


def test_bad_from_logits_names_the_argument():
    with pytest.raises(TypeError, match="TokenCrossEntropy: `from_logits`"):
        kl.losses.TokenCrossEntropy(from_logits="yes")


def test_config_round_trip():
    loss = kl.losses.TokenCrossEntropy(from_logits=False, name="lm")
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, kl.losses.TokenCrossEntropy)
    assert again.from_logits is False and again.name == "lm"


def _tiny_lm():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 8),
            keras.layers.Dense(VOCAB),
        ]
    )


def test_training_step_matches_keras_loss():
    """Compiled `train_on_batch` (jit on JAX/TensorFlow): the same loss and
    the same update as Keras's loss, so the same gradients."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, VOCAB, (4, 6)).astype("int32")
    y = rng.integers(0, VOCAB, (4, 6)).astype("int32")
    results = []
    for loss in (kl.losses.TokenCrossEntropy(), _keras_loss(from_logits=True)):
        model = _tiny_lm()
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
        first = model.train_on_batch(x, y)
        results.append((first, [to_numpy(w) for w in model.weights]))
    (loss_a, weights_a), (loss_b, weights_b) = results
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The step moved the weights (so the comparison above is not vacuous).
    start = [to_numpy(w) for w in _tiny_lm().weights]
    assert (
        max(np.abs(a - s).max() for a, s in zip(weights_a, start, strict=True))
        > 1e-3
    )
