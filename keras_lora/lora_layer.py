"""Adapter mechanics shared by every LoRA layer.

`LoraLayer` wraps a built (or to-be-built) base layer and adds named
low-rank adapters to it:

    y = activation(base(x) + sum_active s * ((dropout(x) @ A) @ B))

Subclasses say only how to project (`_down`, `_up`) and how to turn `A, B`
into a kernel-shaped delta (`_delta`); naming, scaling, dropout, freezing,
merge/unmerge and serialization live here, once. Per-example routing (a
different adapter per batch row) lives in `keras_lora.routing`; this class
only calls its branch when slots are attached.
"""

import contextlib
import dataclasses
import math
import re

import keras
import numpy as np
from keras import ops

from keras_lora._keras_internals import unlocked_tracker, untrack_variable

DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def kaiming_uniform():
    """loralib's A initializer: uniform in +-1/sqrt(fan_in).

    This is torch's `kaiming_uniform_(a=sqrt(5))`, which is what loralib and
    PEFT use for A; in Keras terms a variance-scaling uniform with scale 1/3.
    """
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


@dataclasses.dataclass
class AdapterSpec:
    """Hyper-parameters of one named adapter (plain data, JSON-friendly)."""

    name: str = DEFAULT_ADAPTER
    rank: int = 8
    alpha: float = None
    dropout: float = 0.0
    use_rslora: bool = False
    a_initializer: object = None
    b_initializer: object = "zeros"

    def __post_init__(self):
        if self.alpha is None and _is_int(self.rank):
            self.alpha = self.rank
        if self.a_initializer is not None and not isinstance(
            self.a_initializer, (str, dict)
        ):
            self.a_initializer = keras.initializers.serialize(
                keras.initializers.get(self.a_initializer)
            )
        if not isinstance(self.b_initializer, (str, dict)):
            self.b_initializer = keras.initializers.serialize(
                keras.initializers.get(self.b_initializer)
            )

    @property
    def scale(self):
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        denominator = math.sqrt(self.rank) if self.use_rslora else self.rank
        return float(self.alpha) / denominator

    def validate(self, layer_name):
        """Raises `ValueError` naming `layer_name` for bad values."""
        where = f"Layer '{layer_name}', adapter '{self.name}'"
        if not isinstance(self.name, str) or not _ADAPTER_NAME.match(self.name):
            raise ValueError(
                f"Layer '{layer_name}': invalid adapter name {self.name!r}. "
                "Use letters, digits, '_' or '-' only."
            )
        if not _is_int(self.rank) or self.rank <= 0:
            raise ValueError(
                f"{where}: `rank` must be a positive integer, got "
                f"{self.rank!r}. Pass e.g. rank=8."
            )
        if isinstance(self.alpha, bool) or not isinstance(
            self.alpha, (int, float)
        ):
            raise ValueError(
                f"{where}: `alpha` must be a positive number, got "
                f"{self.alpha!r}. Pass e.g. alpha={self.rank} (the default)."
            )
        if not self.alpha > 0:
            raise ValueError(
                f"{where}: `alpha` must be > 0, got {self.alpha!r}. "
                f"Pass e.g. alpha={self.rank} (the default)."
            )
        if isinstance(self.dropout, bool) or not isinstance(
            self.dropout, (int, float)
        ):
            raise ValueError(
                f"{where}: `dropout` must be a number in [0, 1), got "
                f"{self.dropout!r}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"{where}: `dropout` must be in [0, 1), got {self.dropout!r}."
                " Pass e.g. dropout=0.1, or 0.0 for none."
            )

    def a_init(self):
        if self.a_initializer is None:
            return kaiming_uniform()
        return keras.initializers.get(self.a_initializer)

    def b_init(self):
        return keras.initializers.get(self.b_initializer)

    def get_config(self):
        return dataclasses.asdict(self)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class LoraLayer(keras.layers.Layer):
    """Base class: a base layer plus named low-rank adapters.

    Subclasses set `base_class` and implement `_adapter_shapes`, `_down`,
    `_up` and `_delta`. Users create subclasses with their drop-in
    constructor or with `from_layer`.

    The base layer's kernel is frozen. Its activation moves to this layer,
    so the adapter output is added before the activation.
    """

    base_class = None

    def __init__(
        self,
        base_layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        a_initializer=None,
        b_initializer="zeros",
        adapter_name=DEFAULT_ADAPTER,
        adapters=None,
        active_adapters=None,
        merged_adapters=None,
        activation=None,
        bias_trainable=False,
        name=None,
        **kwargs,
    ):
        if adapters is None:
            adapters = [
                AdapterSpec(
                    adapter_name,
                    rank,
                    alpha,
                    dropout,
                    use_rslora,
                    a_initializer,
                    b_initializer,
                )
            ]
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = base_layer.dtype_policy
        super().__init__(name=name, **kwargs)
        base_activation = getattr(base_layer, "activation", None)
        linear = keras.activations.linear
        if base_activation is not None and base_activation is not linear:
            if activation is not None:
                raise ValueError(
                    f"Layer '{self.name}': the base layer '{base_layer.name}' "
                    "already has an activation; do not pass `activation` too."
                )
            # The adapter output must join before the activation, so the
            # activation moves from the base layer to this one.
            activation = base_activation
            base_layer.activation = linear
        self.activation = keras.activations.get(activation)
        self.bias_trainable = bool(bias_trainable)
        specs = [
            s if isinstance(s, AdapterSpec) else AdapterSpec(**s)
            for s in adapters
        ]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(
                f"Layer '{self.name}': duplicate adapter names {names}."
            )
        for spec in specs:
            spec.validate(self.name)
        self._specs = {s.name: s for s in specs}
        self._lora_a = {}
        self._lora_b = {}
        self.base_layer = base_layer
        self.seed_generator = keras.random.SeedGenerator()
        self._active = list(
            names[:1] if active_adapters is None else active_adapters
        )
        self._check_known(self._active)
        self._merged = list(merged_adapters or [])
        self._check_known(self._merged)
        self._enabled = True
        # Routed adapter slots (`keras_lora.routing.attach`); runtime state,
        # neither saved nor part of the config.
        self._slot_weights = None
        if base_layer.built:
            self.apply_freeze()

    # -- construction helpers for subclasses -------------------------------

    @classmethod
    def _check_wrappable(cls, layer, require_built=True):
        if isinstance(layer, LoraLayer):
            raise TypeError(
                f"Layer '{layer.name}' is already a LoRA layer "
                f"({type(layer).__name__}); add more adapters with "
                "`layer.add_adapter(name, rank=...)` instead of wrapping it."
            )
        if not isinstance(layer, cls.base_class):
            raise TypeError(
                f"{cls.__name__}.from_layer expects a "
                f"keras.layers.{cls.base_class.__name__}, but layer "
                f"'{getattr(layer, 'name', layer)}' is a "
                f"{type(layer).__name__}. Use the LoRA class for that type "
                "(LoraDense for Dense, LoraEinsumDense for EinsumDense)."
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' has Keras's built-in LoRA enabled "
                "(`enable_lora`). Wrap the layer before calling enable_lora, "
                "or use one LoRA implementation only."
            )
        cls.check_factorable(layer)
        if require_built and not layer.built:
            raise ValueError(
                f"Layer '{layer.name}' is not built yet, so it has no kernel "
                "to share. Call it on data or `layer.build(input_shape)` "
                f"first, or create a {cls.__name__} with its drop-in "
                "constructor."
            )

    @classmethod
    def check_factorable(cls, layer):
        """Raises if `layer`'s kernel cannot take a LoRA adapter."""

    @classmethod
    def wrap(cls, layer, **kwargs):
        """Wraps `layer`, built or not (model surgery uses this).

        A built layer is wrapped as by `from_layer`; an unbuilt one is
        wrapped as is and both build on first call.
        """
        if layer.built:
            return cls.from_layer(layer, **kwargs)
        cls._check_wrappable(layer, require_built=False)
        return cls(base_layer=layer, name=layer.name, **kwargs)

    @classmethod
    def from_layer(
        cls,
        layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        a_initializer=None,
        b_initializer="zeros",
        adapter_name=DEFAULT_ADAPTER,
        name=None,
        bias_trainable=False,
    ):
        """Wraps a built base layer, sharing (not copying) its variables.

        The base kernel (and bias, unless `bias_trainable`) is frozen and the
        base activation moves to the returned layer, which keeps the base
        layer's name unless `name` is given. Arguments as in the drop-in
        constructor.
        """
        cls._check_wrappable(layer)
        wrapper = cls(
            base_layer=layer,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            a_initializer=a_initializer,
            b_initializer=b_initializer,
            adapter_name=adapter_name,
            bias_trainable=bias_trainable,
            name=name or layer.name,
        )
        input_shape = (layer.get_build_config() or {}).get("input_shape")
        # Create the adapter variables under the base layer's parent scope,
        # so their paths read like the kernel's ("model/block/query/...")
        # and stay unique across a model.
        scopes = layer.kernel.path.split("/")[:-2]
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(keras.name_scope(scope))
            wrapper.build(input_shape)
        return wrapper

    # -- Keras layer API --------------------------------------------------

    def build(self, input_shape=None):
        if not self.base_layer.built:
            self.base_layer.build(input_shape)
        for spec in self._specs.values():
            self._create_adapter_variables(spec)
        self.apply_freeze()
        self.built = True

    def call(self, inputs, training=None):
        if training and self._merged:
            raise RuntimeError(
                f"Layer '{self.name}' is merged (adapters "
                f"{self._merged} are folded into the kernel) and cannot be "
                "trained: gradients would not reach A and B. Call "
                "`unmerge()` (or `keras_lora.unmerge_adapters(model)`) "
                "before training."
            )
        outputs = self.base_layer(inputs)
        if self._enabled:
            for name in self._active:
                if name not in self._merged:
                    outputs = outputs + self._branch(name, inputs, training)
            if self._slot_weights is not None:
                outputs = outputs + self._slot_weights.branch(inputs)
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        # Unlike Keras's default, making this layer trainable does not
        # unfreeze the base kernel: a parent's `trainable = True` must not
        # silently turn LoRA into full fine-tuning.
        self._trainable = bool(value)
        for variable in self._trainable_variables:
            variable.trainable = self._trainable
        base = getattr(self, "base_layer", None)
        if base is None:
            return
        if self._trainable and base.built:
            self.apply_freeze()
        elif not self._trainable:
            base.trainable = False

    def get_config(self):
        config = super().get_config()
        config.update(
            base_layer=keras.saving.serialize_keras_object(self.base_layer),
            adapters=[s.get_config() for s in self._specs.values()],
            active_adapters=list(self._active),
            merged_adapters=list(self._merged),
            activation=keras.activations.serialize(self.activation),
            bias_trainable=self.bias_trainable,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_layer"] = keras.saving.deserialize_keras_object(
            config["base_layer"]
        )
        return cls(**config)

    def save_own_variables(self, store):
        # Keyed by adapter name (not by position), so files stay readable
        # when adapters are added or deleted.
        for name in self._specs:
            store[f"{name}.lora_a"] = self._lora_a[name]
            store[f"{name}.lora_b"] = self._lora_b[name]

    def load_own_variables(self, store):
        for name in self._specs:
            for key, variable in (
                (f"{name}.lora_a", self._lora_a[name]),
                (f"{name}.lora_b", self._lora_b[name]),
            ):
                if key not in store:
                    raise ValueError(
                        f"Layer '{self.name}': the saved weights have no "
                        f"'{key}'. The file was saved with other adapters "
                        f"({sorted(store.keys())})."
                    )
                value = store[key]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"Layer '{self.name}': saved '{key}' has shape "
                        f"{tuple(value.shape)}, expected "
                        f"{tuple(variable.shape)} (rank or base shape differs)."
                    )
                variable.assign(value)

    # -- adapters -----------------------------------------------------------

    @property
    def adapters(self):
        """Names of the adapters this layer holds, in creation order."""
        return list(self._specs)

    @property
    def active_adapters(self):
        return list(self._active)

    @property
    def adapters_enabled(self):
        """Settable: `False` makes the layer compute its base output only.

        Changing it (like `merge`/`unmerge`) after a model has compiled its
        `predict`/`fit` functions needs `model.compile()` again, or the
        model-level helpers, which reset them.
        """
        return self._enabled

    @adapters_enabled.setter
    def adapters_enabled(self, value):
        self._enabled = bool(value)

    def adapter_spec(self, name=DEFAULT_ADAPTER):
        self._check_known([name])
        return self._specs[name]

    def lora_weights(self, name=DEFAULT_ADAPTER):
        """Returns the `(A, B)` variables of adapter `name`."""
        self._check_known([name])
        return self._lora_a[name], self._lora_b[name]

    def add_adapter(self, name, rank=8, alpha=None, dropout=0.0, **kwargs):
        """Adds a new (inactive) adapter; B starts at zero by default."""
        if name in self._specs:
            raise ValueError(
                f"Layer '{self.name}' already has an adapter named '{name}'. "
                "Pick another name or delete it first."
            )
        spec = AdapterSpec(name, rank, alpha, dropout, **kwargs)
        spec.validate(self.name)
        if self.built:
            with unlocked_tracker(self):
                self._create_adapter_variables(spec)
        self._specs[name] = spec

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables."""
        self._check_known([name])
        if name in self._merged:
            raise ValueError(
                f"Layer '{self.name}': adapter '{name}' is merged into the "
                "kernel. Call `unmerge()` before deleting it."
            )
        for store in (self._lora_a, self._lora_b):
            variable = store.pop(name, None)
            if variable is not None:
                untrack_variable(self, variable)
        del self._specs[name]
        self._active = [a for a in self._active if a != name]

    def set_adapter(self, names):
        """Activates one adapter name or a list whose outputs add up."""
        names = [names] if isinstance(names, str) else list(names)
        self._check_known(names)
        if self._merged and set(names) != set(self._active):
            raise ValueError(
                f"Layer '{self.name}' is merged; call `unmerge()` before "
                "switching adapters."
            )
        self._active = names

    def release_base_layer(self):
        """Returns the base layer, standalone again (used by `unload`).

        The activation moves back to it; it stays frozen. Adapters are not
        merged here: call `merge()` first to keep them.
        """
        base = self.base_layer
        if self.activation is not keras.activations.linear:
            base.activation = self.activation
            self.activation = keras.activations.linear
        if base.name != self.name:
            base.name = self.name
        return base

    # -- merge / unmerge ------------------------------------------------------

    @property
    def merged(self):
        """True when adapters are folded into the base kernel."""
        return bool(self._merged)

    @property
    def merged_adapters(self):
        return list(self._merged)

    def merge(self, adapter_names=None):
        """Folds `s * A @ B` of the active adapters into the base kernel.

        Computed in float32. Refused if the layer is already merged.
        """
        if self._merged:
            raise ValueError(
                f"Layer '{self.name}' is already merged (adapters "
                f"{self._merged}). Call `unmerge()` first; merging twice "
                "would add the update twice."
            )
        names = self._active if adapter_names is None else adapter_names
        names = [names] if isinstance(names, str) else list(names)
        self._check_known(names)
        if names:
            self._add_to_kernel(self._summed_delta(names), +1.0)
        self._merged = names

    def unmerge(self):
        """Takes merged adapters back out of the kernel (no-op if none)."""
        if self._merged:
            self._add_to_kernel(self._summed_delta(self._merged), -1.0)
        self._merged = []

    def pissa_init(self, name=DEFAULT_ADAPTER):
        """PiSSA: A, B from the top-r SVD of the kernel; residual in base.

        With the kernel as a matrix `W = U S V^T`, sets `A = U_r sqrt(S_r/s)`
        and `B = sqrt(S_r/s) V_r^T` and the base kernel to `W - s A B`, so
        outputs are unchanged. Computed in float32 on the host.
        """
        self._check_known([name])
        if name in self._merged:
            raise ValueError(
                f"Layer '{self.name}': unmerge before re-initialising '{name}'."
            )
        spec = self._specs[name]
        kernel = self._kernel()
        matrix = self._kernel_matrix(ops.convert_to_numpy(kernel))
        u, s, vt = np.linalg.svd(matrix.astype("float64"), full_matrices=False)
        r = spec.rank
        if r > len(s):
            raise ValueError(
                f"Layer '{self.name}': PiSSA rank {r} exceeds the kernel's "
                f"rank {len(s)}."
            )
        root = np.sqrt(s[:r] / spec.scale)
        a = (u[:, :r] * root).astype("float32")
        b = (root[:, None] * vt[:r]).astype("float32")
        a_var, b_var = self._lora_a[name], self._lora_b[name]
        a_var.assign(a.reshape(a_var.shape))
        b_var.assign(b.reshape(b_var.shape))
        self._add_to_kernel(self._summed_delta([name]), -1.0)

    def delta_weight(self, name=DEFAULT_ADAPTER):
        """`s * A @ B` of adapter `name`, kernel-shaped, float32."""
        return self._summed_delta([name])

    # -- internals ------------------------------------------------------------

    def _check_known(self, names):
        unknown = [n for n in names if n not in self._specs]
        if unknown:
            raise ValueError(
                f"Layer '{self.name}' has no adapter named {unknown[0]!r}. "
                f"Its adapters are: {list(self._specs)}."
            )

    def _create_adapter_variables(self, spec):
        a_shape, b_shape = self._adapter_shapes(spec.rank)
        # LoRA weights stay float32 under mixed precision: small updates
        # would underflow in float16, and merge needs full precision.
        self._lora_a[spec.name] = self.add_weight(
            name=f"lora_a_{spec.name}",
            shape=a_shape,
            initializer=spec.a_init(),
            dtype="float32",
            trainable=True,
        )
        self._lora_b[spec.name] = self.add_weight(
            name=f"lora_b_{spec.name}",
            shape=b_shape,
            initializer=spec.b_init(),
            dtype="float32",
            trainable=True,
        )

    def apply_freeze(self):
        """Re-applies the freeze: base kernel frozen, bias per setting.

        Setting `trainable` does this too, but on TensorFlow assigning an
        attribute its current value is skipped, so call this explicitly.
        """
        base = self.base_layer
        bias = getattr(base, "bias", None)
        if self.bias_trainable and bias is not None and self._trainable:
            base.trainable = True
            for variable in base.weights:
                variable.trainable = variable is bias
        else:
            base.trainable = False

    def _branch(self, name, inputs, training):
        spec = self._specs[name]
        x = inputs
        if training and spec.dropout > 0:
            x = keras.random.dropout(x, spec.dropout, seed=self.seed_generator)
        a = ops.cast(self._lora_a[name], x.dtype)
        b = ops.cast(self._lora_b[name], x.dtype)
        hidden = self._down(x, a) * spec.scale  # (..., r)
        return self._up(hidden, b)

    def _kernel(self):
        kernel = self.base_layer.kernel
        if kernel.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"Layer '{self.name}': cannot merge into a {kernel.dtype} "
                "kernel (quantized base). Keep the adapter unmerged, or "
                "merge before quantizing."
            )
        return kernel

    def _summed_delta(self, names):
        delta = None
        for name in names:
            spec = self._specs[name]
            a = ops.cast(self._lora_a[name], "float32")
            b = ops.cast(self._lora_b[name], "float32")
            term = self._delta(a, b) * spec.scale
            delta = term if delta is None else delta + term
        return delta

    def _add_to_kernel(self, delta, sign):
        kernel = self._kernel()
        updated = ops.cast(kernel, "float32") + sign * delta
        kernel.assign(ops.cast(updated, kernel.dtype))

    # Subclass hooks.
    def _adapter_shapes(self, rank):
        raise NotImplementedError

    def _down(self, x, a):
        raise NotImplementedError

    def _up(self, hidden, b):
        raise NotImplementedError

    def _delta(self, a, b):
        raise NotImplementedError

    def _kernel_matrix(self, kernel):
        """The kernel as a `(contracted, outputs)` numpy matrix."""
        raise NotImplementedError

    def _routing_equations(self):
        """`(down, up)` einsums of `_down`/`_up`, for routed slots.

        The default fits a matrix kernel (Dense); `keras_lora.routing` adds
        the batch axis to A and B.
        """
        return "...i,ir->...r", "...r,ro->...o"


# Arguments that configure the LoRA wrapper itself; a drop-in constructor
# passes every other keyword to the base layer it creates.
_WRAPPER_KWARGS = (
    "rank",
    "alpha",
    "dropout",
    "use_rslora",
    "a_initializer",
    "b_initializer",
    "adapter_name",
    "adapters",
    "active_adapters",
    "merged_adapters",
    "activation",
    "bias_trainable",
    "name",
    "trainable",
    "autocast",
)


def matmul_trailing(x, kernel, contracted_ndim=1):
    """`x (..., K1..Kc) @ kernel (K1..Kc, N1..Nm) -> (..., N1..Nm)`.

    On JAX and TensorFlow this is one 2-D matrix product on reshaped views
    (the leading axes of `x` folded into rows). The LoRA branches go
    through here because the gradient is then computed differently: for a
    3-D input, autodiff of a 3-D product contracts the weight gradient over
    two axes, and XLA:CPU copies the output gradient into a transposed
    layout for it, once per adapter (GPT-2 base shape with LoRA on every
    linear layer: a quarter of the JAX step; the 2-D form needs no copy).
    PyTorch folds the leading axes itself inside `tensordot`, which is
    about 2% faster in eager mode than reshaping from Python.
    """
    if keras.backend.backend() == "torch":
        return ops.tensordot(x, kernel, axes=contracted_ndim)
    shape = ops.shape(x)
    batch = tuple(shape[: len(shape) - contracted_ndim])
    rows = math.prod(kernel.shape[:contracted_ndim])
    outputs = tuple(kernel.shape[contracted_ndim:])
    product = ops.matmul(
        ops.reshape(x, (-1, rows)), ops.reshape(kernel, (rows, -1))
    )
    return ops.reshape(product, batch + outputs)


def split_kwargs(kwargs):
    """Splits drop-in constructor kwargs into (wrapper, base layer) parts."""
    wrapper = {k: v for k, v in kwargs.items() if k in _WRAPPER_KWARGS}
    base = {k: v for k, v in kwargs.items() if k not in _WRAPPER_KWARGS}
    if "lora_rank" in base or "lora_alpha" in base:
        raise ValueError(
            "Pass `rank=`/`alpha=` to keras_lora layers, not Keras's built-in "
            "`lora_rank`/`lora_alpha`."
        )
    return wrapper, base
