"""`RowSampler`: sampling options per batch row, read at run time.

keras-hub's samplers hold `temperature`, `k`, `p` and the seed as Python
values, which become constants of the compiled generate function: every new
value means a new sampler and a new trace (about a second on JAX and
TensorFlow, on the one thread that serves everybody). A `RowSampler` keeps
them in variables with one entry per batch row, which the compiled function
reads on every call (as it reads the adapter routing ids, see `routing`).
One compiled function then serves every temperature, top-k, top-p and seed,
and rows with different options share a pass.

Randomness is counter-based: the noise for token `t` at position `i` of a
row is a hash of (the row's seed, `i`, `t`). A seeded row therefore draws
the same tokens whatever its neighbours, its place in the batch, or the
position where the generation loop starts. Tokens are drawn by the
Gumbel-max trick: `argmax(log p + g)` over the tokens top-k and top-p keep,
with `g = -log(-log(u))` and `u` uniform, is a draw from `p` restricted to
those tokens and renormalised.

Example:

```python
sampler = RowSampler(max_batch=4, vocabulary_size=50257)
# (temperature, top_k, top_p, seed) of rows 0 and 1; others: defaults.
sampler.set_rows([(0.7, None, 0.9, 1), (1.0, 40, None, None)])
causal_lm.compile(sampler=sampler)  # compiles generate once, on first use
causal_lm.generate(["Hello", "Bonjour"], max_length=32)
sampler.set_rows([(1.2, None, None, 7), (0.3, 5, None, None)])  # no recompile
causal_lm.generate(["Hello", "Bonjour"], max_length=32)
```
"""

import math
import secrets

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_lora.serving.checks import MAX_SEED

# Temperatures below this act as this (the sampler's division stays finite).
_TINY_TEMPERATURE = 1e-30
# A top-p above any cumulative probability: the row keeps every token.
_TOP_P_OFF = 2.0


def _int32(value):
    """The int32 with the same low 32 bits as the Python int `value`."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


_GOLDEN = _int32(0x9E3779B9)
_MIX_1 = _int32(0x85EBCA6B)
_MIX_2 = _int32(0xC2B2AE35)


def _shift_right(x, bits):
    """Logical right shift of int32 bit patterns (ops shift arithmetically)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _times(x, constant):
    # int32 products wrap around on every backend: the low 32 bits of the
    # unsigned product, as the hash needs.
    return ops.multiply(x, ops.convert_to_tensor(constant, "int32"))


def mix32(x):
    """MurmurHash3's 32-bit finaliser on int32 bit patterns (a bijection)."""
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = _times(x, _MIX_1)
    x = ops.bitwise_xor(x, _shift_right(x, 13))
    x = _times(x, _MIX_2)
    return ops.bitwise_xor(x, _shift_right(x, 16))


def gumbel_noise(seeds, index, vocabulary_size):
    """Gumbel noise `(rows, vocabulary_size)` hashed from seeds and position.

    Args:
        seeds: int32 `(rows, 2)`: the low and high 32 bits of each row's
            seed.
        index: the position being sampled (a scalar).
        vocabulary_size: the number of tokens (a Python int).
    """
    index = ops.cast(index, "int32")
    position = mix32(ops.add(_times(index, _GOLDEN), 1))
    key = mix32(ops.bitwise_xor(seeds[:, 1], position))
    key = mix32(ops.bitwise_xor(seeds[:, 0], key))  # (rows,)
    tokens = _times(ops.arange(vocabulary_size, dtype="int32"), _GOLDEN)
    bits = mix32(ops.bitwise_xor(key[:, None], tokens[None, :]))
    # The top 24 bits, as a float in (0, 1): exact in float32.
    uniform = (ops.cast(_shift_right(bits, 8), "float32") + 0.5) / 2.0**24
    return -ops.log(-ops.log(uniform))


class RowSampler(keras_hub.samplers.Sampler):
    """A keras-hub sampler whose options are per-row runtime variables.

    Args:
        max_batch: the largest batch it samples for.
        vocabulary_size: the number of logits per row.
        filtered: whether rows may use top-k or top-p (one sort of the
            vocabulary per step). Without it, rows sample from the whole
            temperature-scaled distribution and `top_k`/`top_p` are
            refused.

    Set the rows' options with `set_rows` before each generate call; rows
    past those given sample at temperature 1 from a random seed.
    """

    def __init__(self, max_batch, vocabulary_size, filtered=True):
        super().__init__(temperature=1.0)
        self.max_batch = int(max_batch)
        self.vocabulary_size = int(vocabulary_size)
        self.filtered = bool(filtered)
        rows = (self.max_batch,)
        self.temperatures = _variable(np.ones(rows, "float32"), "temperature")
        self.top_ks = _variable(
            np.full(rows, self.vocabulary_size, "int32"), "top_k"
        )
        self.top_ps = _variable(np.full(rows, _TOP_P_OFF, "float32"), "top_p")
        self.seeds = _variable(np.zeros(rows + (2,), "int32"), "seed")
        self._index = None

    @property
    def variables(self):
        # keras-hub passes these into its compiled generate function (as
        # arguments under JAX): their values are inputs, not constants.
        return [self.temperatures, self.top_ks, self.top_ps, self.seeds]

    def set_rows(self, rows):
        """Sets `(temperature, top_k, top_p, seed)` of rows 0, 1, ...

        `top_k`/`top_p` None: no such cut; `seed` None: a fresh random one.
        """
        rows = list(rows)
        if len(rows) > self.max_batch:
            raise ValueError(
                f"RowSampler: {len(rows)} rows, but max_batch is "
                f"{self.max_batch}."
            )
        shape = (self.max_batch,)
        temperatures = np.ones(shape, "float32")
        top_ks = np.full(shape, self.vocabulary_size, "int32")
        top_ps = np.full(shape, _TOP_P_OFF, "float32")
        seeds = [secrets.randbits(63) for _ in range(self.max_batch)]
        for row, (temperature, top_k, top_p, seed) in enumerate(rows):
            self._check_row(row, temperature, top_k, top_p, seed)
            temperatures[row] = temperature
            if top_k is not None:
                top_ks[row] = min(top_k, self.vocabulary_size)
            if top_p is not None:
                top_ps[row] = top_p
            if seed is not None:
                seeds[row] = seed
        words = np.array(
            [[s & 0xFFFFFFFF, s >> 32] for s in seeds], "uint32"
        ).view("int32")
        self.temperatures.assign(temperatures)
        self.top_ks.assign(top_ks)
        self.top_ps.assign(top_ps)
        self.seeds.assign(words)

    def _check_row(self, row, temperature, top_k, top_p, seed):
        def fail(what):
            raise ValueError(f"RowSampler: row {row}: {what}.")

        if not (isinstance(temperature, (int, float)) and temperature > 0):
            fail(f"temperature must be > 0, got {temperature!r}")
        if not math.isfinite(temperature):
            fail(f"temperature must be finite, got {temperature!r}")
        if (top_k is not None or top_p is not None) and not self.filtered:
            fail("top_k/top_p need a sampler built with filtered=True")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            fail(f"top_k must be an integer >= 1, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            fail(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and not (
            isinstance(seed, int) and 0 <= seed <= MAX_SEED
        ):
            fail(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")

    # -- keras-hub's hooks -------------------------------------------------

    def __call__(self, next, prompt, **kwargs):
        # keras-hub's loop tells `next` the position it fills; the noise
        # needs it, so it is noted on the way through.
        def next_at(prompt, cache, index):
            self._index = index
            return next(prompt, cache, index)

        try:
            return super().__call__(next=next_at, prompt=prompt, **kwargs)
        finally:
            self._index = None

    def compute_probabilities(self, logits):
        logits = ops.cast(logits, "float32")  # (rows, vocabulary)
        rows = ops.shape(logits)[0]
        temperature = ops.maximum(
            self._rows(self.temperatures, rows), _TINY_TEMPERATURE
        )
        # The top logit becomes exactly 0 before the division, so a tiny
        # temperature gives -inf elsewhere, never inf - inf = NaN.
        shifted = logits - ops.max(logits, axis=-1, keepdims=True)
        return ops.softmax(shifted / temperature[:, None], axis=-1)

    def get_next_token(self, probabilities):
        return self.choose(probabilities, self._index)

    # -- sampling ----------------------------------------------------------

    def sample(self, logits, index):
        """The next token of each row from `logits` at position `index`."""
        return self.choose(self.compute_probabilities(logits), index)

    def choose(self, probabilities, index):
        """Draws one token per row from `probabilities` (rows, vocab)."""
        rows, vocabulary = ops.shape(probabilities)
        scores = ops.log(probabilities) + gumbel_noise(
            self._rows(self.seeds, rows), index, vocabulary
        )
        if self.filtered:
            keep = self._kept(probabilities)
            scores = ops.where(keep, scores, float("-inf"))
        return ops.argmax(scores, axis=-1)

    def _kept(self, probabilities):
        """Which tokens each row's top-k and top-p keep (rows, vocab)."""
        rows, vocabulary = ops.shape(probabilities)
        ordered, _ = ops.top_k(probabilities, k=vocabulary, sorted=True)
        mass = ops.cumsum(ordered, axis=-1)
        top_p = self._rows(self.top_ps, rows)[:, None]
        # Top-p keeps the smallest prefix whose mass reaches p: a token
        # stays while the mass before it is below p.
        count = 1 + ops.sum(ops.cast(mass[:, :-1] < top_p, "int32"), axis=-1)
        count = ops.minimum(count, self._rows(self.top_ks, rows))
        cutoff = ops.take_along_axis(ordered, (count - 1)[:, None], axis=-1)
        # Ties at the cut-off all stay.
        return probabilities >= cutoff

    @staticmethod
    def _rows(variable, rows):
        return ops.convert_to_tensor(variable)[:rows]

    def get_config(self):
        return {
            "max_batch": self.max_batch,
            "vocabulary_size": self.vocabulary_size,
            "filtered": self.filtered,
        }


def _variable(value, name):
    return keras.Variable(
        value, dtype=value.dtype.name, trainable=False, name=name
    )
