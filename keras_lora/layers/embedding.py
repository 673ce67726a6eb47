"""`LoraEmbedding`: a `keras.layers.Embedding` (or `ReversibleEmbedding`)
with low-rank adapters."""

import keras
import numpy as np
from keras import ops

from keras_lora.layers import quantization
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.construction import split_kwargs
from keras_lora.layers.projection import matmul_trailing
from keras_lora.layers.registry import register_lora_layer


@register_lora_layer
@keras.saving.register_keras_serializable(package="keras_lora")
class LoraEmbedding(LoraLayer):
    """Embedding with LoRA: `y = E[ids] + s * A[ids] @ B`.

    The table `E (input_dim, output_dim)` is the kernel, its rows being
    what the token ids select: `A (input_dim, r)` is gathered per token (a
    lookup, like `E`) and `B (r, output_dim)` projects to the embedding.
    PEFT stores the same tensors transposed (`lora_embedding_A (r,
    input_dim)`, `lora_embedding_B (output_dim, r)`).

    A `ReversibleEmbedding` with tied weights (GPT-2's and Llama's token
    embedding, whose transpose gives the logits) uses the same effective
    table `E + s A B` when called with `reverse=True`, computed factored:

        logits = h @ E^T + s * (h @ B^T) @ A^T

    so merged and unmerged models give the same logits, and the
    vocabulary-sized `A @ B` is never built. With `tie_weights=False` the
    separate reverse matrix is not adapted (the reverse call is the base's).

    Dropout never touches token ids: the forward branch has none (as in
    PEFT); the reverse branch drops out its input hidden states in
    training, like a Dense layer.

    Args:
        input_dim, output_dim: as for `Embedding` (vocabulary size, width).
        rank, alpha, dropout, use_rslora, a_initializer, b_initializer,
        adapter_name: as for `LoraDense`.
        **kwargs: any other `keras.layers.Embedding` argument.

    Input shape: integer ids `(...)`; with `reverse=True`, hidden states
    `(..., output_dim)`. Output shape: `(..., output_dim)`; reversed,
    `(..., input_dim)`.

    Example:

    >>> import numpy as np
    >>> layer = LoraEmbedding(10, 4, rank=2)
    >>> layer(np.array([[1, 2, 3]])).shape
    (1, 3, 4)
    >>> [tuple(w.shape) for w in layer.trainable_weights]
    [(10, 2), (2, 4)]
    """

    wraps = (keras.layers.ReversibleEmbedding, keras.layers.Embedding)
    category = "embedding"

    def __init__(
        self, input_dim=None, output_dim=None, base_layer=None, **kwargs
    ):
        wrapper_kwargs, embedding_kwargs = split_kwargs(kwargs)
        dtype = embedding_kwargs.pop("dtype", None)
        if base_layer is None:
            if input_dim is None or output_dim is None:
                raise ValueError(
                    "LoraEmbedding needs `input_dim` and `output_dim` (as "
                    "for Embedding), or use LoraEmbedding.from_layer() to "
                    "wrap an existing layer."
                )
            name = wrapper_kwargs.get("name")
            base_layer = keras.layers.Embedding(
                input_dim,
                output_dim,
                dtype=dtype,
                name=f"{name}_base" if name else None,
                **embedding_kwargs,
            )
        elif embedding_kwargs:
            raise TypeError(
                "LoraEmbedding: unexpected arguments "
                f"{sorted(embedding_kwargs)}."
            )
        super().__init__(base_layer, dtype=dtype, **wrapper_kwargs)
        self.supports_masking = bool(getattr(base_layer, "mask_zero", False))
        self._reverse = False  # the direction of the call in progress

    @property
    def input_dim(self):
        return self.base_layer.input_dim

    @property
    def output_dim(self):
        return self.base_layer.output_dim

    # -- layer-type hooks ----------------------------------------------------

    @classmethod
    def kernel_of(cls, base_layer):
        return base_layer.embeddings

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        input_dim, output_dim = cls.kernel_shape_of(base_layer)
        return (input_dim, rank), (rank, output_dim)

    @classmethod
    def describe(cls, base_layer):
        # Whether the adapter also changes the logits (a tied reversible
        # embedding): it then computes something else on an untied base.
        tied = isinstance(base_layer, keras.layers.ReversibleEmbedding) and (
            base_layer.tie_weights
        )
        return {**super().describe(base_layer), "tied_logits": bool(tied)}

    @classmethod
    def left_out_warning(cls, base_layer):
        if quantization.quantization_mode(base_layer) != "int8":
            return None
        tied = isinstance(base_layer, keras.layers.ReversibleEmbedding) and (
            base_layer.tie_weights
        )
        if not tied or base_layer.logit_soft_cap is not None:
            return None
        return (
            f"layer '{base_layer.name}' is an int8 ReversibleEmbedding tied "
            "to the logits, and Keras's int8 reverse projection gives its "
            "input no gradient: nothing below the logits would learn. "
            "Adapt it too (add it to target_modules, e.g. "
            "['all-linear', 'all-embedding']): keras_lora's layer supplies "
            "that gradient. Or quantize with 'int4'."
        )

    @classmethod
    def probe_inputs(cls, base_layer):
        # Every id once: the probe reads the whole (effective) table.
        return np.arange(base_layer.input_dim, dtype="int32")

    def branch_factors(self, x, a, b):
        if self._reverse:
            # The tied reverse kernel is the transposed table, so its
            # factors are B^T (output_dim, r) and A^T (r, input_dim).
            a, b = ops.swapaxes(b, -1, -2), ops.swapaxes(a, -1, -2)
            return ops.cast(a, x.dtype), ops.cast(b, x.dtype)
        # Token ids are integers: the branch computes in the layer's dtype.
        return ops.cast(a, self.compute_dtype), ops.cast(b, self.compute_dtype)

    @property
    def kernel_transposed(self):
        return self._reverse

    def branch_inputs(self, inputs, rate, training):
        if not self._reverse:
            return inputs  # never drop out token ids
        return super().branch_inputs(inputs, rate, training)

    def project_down(self, x, a):
        if self._reverse:
            return matmul_trailing(x, a)  # (..., r)
        return ops.take(a, _ids(x), axis=0)  # (..., r)

    def project_up(self, hidden, b):
        return matmul_trailing(hidden, b)  # (..., output_dim | input_dim)

    def routed_project_down(self, x, a, equation):
        if self._reverse:
            return super().routed_project_down(x, a, equation)
        # One A per batch row: gather row i's ids from its own table.
        ids = _ids(x)
        shape = ops.shape(ids)
        rows = ops.reshape(ids, (shape[0], -1))  # (batch, tokens)
        vocab = a.shape[1]
        offsets = ops.arange(shape[0], dtype="int32")[:, None] * vocab
        table = ops.reshape(a, (-1, a.shape[-1]))  # (batch * vocab, r)
        hidden = ops.take(table, rows + offsets, axis=0)
        return ops.reshape(hidden, tuple(shape) + (a.shape[-1],))

    def kernel_delta(self, a, b):
        return ops.matmul(a, b)  # (input_dim, output_dim)

    def kernel_matrix(self, kernel):
        return kernel

    # -- Keras layer API -----------------------------------------------------

    def call(self, inputs, reverse=False, training=None):
        if reverse:
            self._check_reverse()
            if not self.base_layer.tie_weights:
                # Adapters change the table, not the untied reverse matrix.
                return self.base_layer(inputs, reverse=True)
        previous, self._reverse = self._reverse, bool(reverse)
        try:
            return super().call(inputs, training=training)
        finally:
            self._reverse = previous

    def base_call(self, inputs):
        if not self._reverse:
            return self.base_layer(inputs)
        base = self.base_layer
        if quantization.is_quantized(base) and base.logit_soft_cap is None:
            return _quantized_reverse(base, inputs)
        return base(inputs, reverse=True)

    def compute_mask(self, inputs, mask=None):
        if not getattr(self.base_layer, "mask_zero", False):
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return self.base_layer.compute_output_shape(input_shape, True)
        return self.base_layer.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, reverse=False):
        shape = self.compute_output_shape(tuple(inputs.shape), reverse)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def _check_reverse(self):
        base = self.base_layer
        if not isinstance(base, keras.layers.ReversibleEmbedding):
            raise ValueError(
                f"Layer '{self.name}': `reverse=True` needs a "
                f"ReversibleEmbedding base layer; '{base.name}' is a "
                f"{type(base).__name__}."
            )
        adds_branch = self.adapters_enabled and (
            set(self.active_adapters) - set(self.merged_adapters)
            or self.routed_slots is not None
        )
        if base.tie_weights and base.logit_soft_cap is not None:
            if adds_branch:
                raise ValueError(
                    f"Layer '{self.name}': the tied reverse projection "
                    f"soft-caps its logits (logit_soft_cap="
                    f"{base.logit_soft_cap}), so the adapter's term cannot "
                    "be added after the base's call. Merge the adapters "
                    "(keras_lora.merge_adapters) to compute logits, or "
                    "exclude the embedding from LoRA."
                )


# Values of the dequantized table per block in a quantized tied reverse
# projection (16 MiB of float32: 5,461 rows at width 768).
_BLOCK_FLOATS = 2**22


def _quantized_reverse(base, inputs):
    """The logits of a quantized tied `ReversibleEmbedding`, `h @ E^T` with
    `E` its dequantized table, never holding `E` whole.

    `E` is read in blocks of rows (`quantization.dequantized_rows`: only
    the block's stored rows are unpacked and dequantized), one block at a
    time: a loop, so that a compiler cannot schedule every block at once.

    - Forward: on int4 without activation quantization (Keras's default),
      the logits are computed block by block; Keras's own call would
      build the whole float table (and, in eager PyTorch, several
      table-sized temporaries: 147 MiB each for GPT-2). Otherwise (int8,
      whose reverse projection rounds its input to int8 first) it is
      Keras's call.
    - Backward: the input's gradient is accumulated over blocks,
      `sum_b upstream[:, b] @ E[b]`. Keras's int8 call gives its input no
      gradient at all (without this, nothing below the tied logits would
      learn); autodiff through its int4 call would keep the whole float
      table from the forward pass to the backward.
    """
    vocabulary, width = base.input_dim, base.output_dim
    rows = min(vocabulary, max(1, _BLOCK_FLOATS // width))
    full_blocks, rest = divmod(vocabulary, rows)
    blocked_forward = (
        quantization.quantization_mode(base) == "int4"
        and getattr(base, "inputs_quantizer", None) is None
    )

    def table(start, n, dtype):
        return ops.cast(quantization.dequantized_rows(base, start, n), dtype)

    def logits(x):
        flat = ops.transpose(ops.reshape(x, (-1, width)))  # (width, N)

        def block(start, n):  # (n, N)
            return ops.matmul(table(start, n, x.dtype), flat)

        parts = []
        if full_blocks:
            stacked = ops.map(
                lambda i: block(i * rows, rows),
                ops.arange(full_blocks, dtype="int32"),
            )
            parts.append(ops.reshape(stacked, (full_blocks * rows, -1)))
        if rest:
            parts.append(block(full_blocks * rows, rest))
        out = ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        return ops.reshape(
            ops.transpose(out), tuple(ops.shape(x)[:-1]) + (vocabulary,)
        )

    @ops.custom_gradient
    def reverse(x):
        def grad(*args, upstream=None, variables=None):
            if upstream is None:
                (upstream,) = args
            flat = ops.reshape(upstream, (-1, vocabulary))
            count = ops.shape(flat)[0]

            def block_grad(start, n):
                part = ops.slice(flat, (0, start), (count, n))
                return ops.matmul(part, table(start, n, flat.dtype))

            dx = ops.fori_loop(
                0,
                full_blocks,
                lambda i, dx: ops.add(dx, block_grad(i * rows, rows)),
                ops.zeros((count, width), flat.dtype),
            )
            if rest:
                dx = ops.add(dx, block_grad(full_blocks * rows, rest))
            dx = ops.cast(ops.reshape(dx, ops.shape(x)), x.dtype)
            if variables is not None:  # TensorFlow: the frozen table
                return dx, [None] * len(variables)
            return dx

        if blocked_forward:
            return logits(x), grad
        return base(x, reverse=True), grad

    return reverse(inputs)


def _ids(x):
    if keras.backend.standardize_dtype(x.dtype) not in ("int32", "int64"):
        x = ops.cast(x, "int32")
    return x
