"""RowSampler: per-row runtime options, counter-based noise, correctness."""

import keras
import numpy as np
import pytest

from keras_lora.serving.sampling import MAX_SEED, RowSampler, mix32
from tests.conftest import to_numpy

LOGITS = np.log(np.array([0.1, 0.2, 0.3, 0.4], "float32"))


def _draws(sampler, logits, options, positions):
    """Tokens drawn for every row in `options` at each position."""
    sampler.set_rows(options)
    batch = np.repeat(logits[None, :], len(options), axis=0)
    return np.stack(
        [to_numpy(sampler.sample(batch, index)) for index in positions]
    )  # (positions, rows)


def test_mix32_is_murmur3_finaliser():
    def reference(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = np.array([0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1], "uint64")
    got = to_numpy(mix32(values.astype("uint32").view("int32")))
    expected = [reference(int(v)) for v in values]
    assert got.astype("int32").view("uint32").tolist() == expected


def test_frequencies_follow_the_temperature_scaled_distribution():
    sampler = RowSampler(max_batch=16, vocabulary_size=4, filtered=False)
    for temperature in (1.0, 0.5):
        options = [(temperature, None, None, seed) for seed in range(16)]
        tokens = _draws(sampler, LOGITS, options, range(250)).reshape(-1)
        counts = np.bincount(tokens, minlength=4)
        p = np.exp(LOGITS / temperature)
        p /= p.sum()
        expected = p * tokens.size
        # Within 4 standard deviations of the binomial count, each token.
        spread = np.sqrt(tokens.size * p * (1 - p))
        assert np.all(np.abs(counts - expected) < 4 * spread), (
            temperature,
            counts,
            expected,
        )


def test_top_k_and_top_p_keep_the_right_tokens():
    sampler = RowSampler(max_batch=8, vocabulary_size=4)
    options = [
        (1.0, 1, None, 1),  # top_k 1: the most likely token only
        (1.0, 2, None, 2),  # tokens 3 and 2
        (1.0, None, 0.35, 3),  # 0.4 reaches 0.35: token 3 only
        (1.0, None, 0.5, 4),  # 0.4 < 0.5: tokens 3 and 2
        (1.0, 3, 0.75, 5),  # 0.4 + 0.3 < 0.75, k=3: tokens 3, 2, 1
        (1e-20, None, None, 6),  # near-greedy
        (5.0, None, 1.0, 7),  # everything
    ]
    draws = _draws(sampler, LOGITS, options, range(300))
    kept = [set(np.unique(draws[:, row]).tolist()) for row in range(7)]
    assert kept == [
        {3},
        {2, 3},
        {3},
        {2, 3},
        {1, 2, 3},
        {3},
        {0, 1, 2, 3},
    ]


def test_a_seeded_row_ignores_its_neighbours_and_place():
    sampler = RowSampler(max_batch=8, vocabulary_size=4)
    logits = np.log(np.full(4, 0.25, "float32"))
    alone = _draws(sampler, logits, [(1.0, None, None, 42)], range(40))
    crowded = _draws(
        sampler,
        logits,
        [(0.5, 2, None, 1), (1.0, None, 0.9, None), (1.0, None, None, 42)],
        range(40),
    )
    assert np.array_equal(alone[:, 0], crowded[:, 2])
    # Other seeds, other tokens; unseeded rows differ from call to call.
    other = _draws(sampler, logits, [(1.0, None, None, 43)], range(40))
    assert not np.array_equal(alone[:, 0], other[:, 0])
    assert len(np.unique(alone[:, 0])) == 4
    # The largest seed works; its high 32 bits matter.
    top = _draws(sampler, logits, [(1.0, None, None, MAX_SEED)], range(40))
    low = _draws(
        sampler, logits, [(1.0, None, None, MAX_SEED & 0xFFFFFFFF)], range(40)
    )
    assert not np.array_equal(top, low)


@pytest.mark.parametrize(
    "row, message",
    [
        ((0.0, None, None, 1), "temperature must be > 0"),
        ((float("inf"), None, None, 1), "must be finite"),
        ((1.0, 0, None, 1), "top_k must be an integer >= 1"),
        ((1.0, None, 1.5, 1), r"top_p must be in \(0, 1\]"),
        ((1.0, None, None, 2**63), "seed must be an integer"),
        ((1.0, None, None, -1), "seed must be an integer"),
    ],
)
def test_set_rows_errors(row, message):
    sampler = RowSampler(max_batch=2, vocabulary_size=4)
    with pytest.raises(ValueError, match=message):
        sampler.set_rows([row])
    with pytest.raises(ValueError, match="3 rows, but max_batch is 2"):
        sampler.set_rows([(1.0, None, None, 1)] * 3)
    plain = RowSampler(max_batch=2, vocabulary_size=4, filtered=False)
    with pytest.raises(ValueError, match="filtered=True"):
        plain.set_rows([(1.0, 2, None, 1)])


def test_keras_hub_generate_reads_the_rows_at_run_time():
    """The module's example: a CausalLM compiled with a RowSampler; new
    seeds and temperatures change the text, never the compiled function."""
    from benchmarks.hostile_clients import count_compilations
    from tests.tiny_lm import VOCABULARY, gpt2_causal_lm

    lm = gpt2_causal_lm()
    sampler = RowSampler(max_batch=4, vocabulary_size=len(VOCABULARY))
    lm.compile(sampler=sampler)
    counts = count_compilations(lm)

    def texts(rows):
        sampler.set_rows(rows)
        return lm.generate(["the", "a bed"], max_length=12, stop_token_ids=None)

    first = texts([(1.0, None, None, 1), (1.0, None, None, 2)])
    warm = dict(counts)
    assert texts([(1.0, None, None, 1), (1.0, None, None, 2)]) == first
    others = {
        tuple(texts([(t, None, None, 10 + i), (t, 3, 0.9, 20 + i)]))
        for i, t in enumerate((0.5, 1.5, 3.0))
    }
    assert len(others | {tuple(first)}) == 4
    assert counts["builds"] == warm["builds"] == 1
    if keras.backend.backend() != "torch":
        assert counts["traces"] == warm["traces"]
