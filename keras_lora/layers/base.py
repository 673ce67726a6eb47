"""Adapter mechanics shared by every LoRA layer.

`LoraLayer` wraps a built (or to-be-built) base layer and adds named
adapters to it; with plain LoRA adapters

    y = activation(base(x) + sum_active s * ((dropout(x) @ A) @ B))

Naming, freezing, merge/unmerge bookkeeping, routing hooks and
serialization live here, once. What an adapter computes is its variant's
business (`keras_lora.layers.variants`); what a layer type is (its adapter
shapes, projections, kernel, description in files) is answered by the
subclass that wraps it (`dense.py`, `einsum_dense.py`, ...), registered in
`keras_lora.layers.registry`.
"""

import contextlib
import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_lora._keras_internals import (
    own_variable_lists,
    restore_own_variable_lists,
    set_own_trainable,
    unlocked_tracker,
    untrack_variable,
)
from keras_lora.layers import quantization
from keras_lora.layers.layouts import adapter_layout
from keras_lora.layers.registry import lora_class_for
from keras_lora.layers.spec import DEFAULT_ADAPTER, AdapterSpec, variant_for
from keras_lora.layers.variants import get_variant, mark_tensor

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass
class Adapter:
    """One named adapter of one layer: its spec and its variables."""

    spec: AdapterSpec
    variables: dict  # tensor name -> keras.Variable, e.g. "lora_a", "lora_b"
    # Numbers a variant keeps while merged, to unmerge exactly (DoRA's
    # norms at merge time): numpy arrays, saved in `.keras` files for
    # merged adapters, never in adapter files.
    state: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for tensor, variable in self.variables.items():
            mark_tensor(variable, tensor)

    @property
    def name(self):
        return self.spec.name

    @property
    def variant(self):
        return get_variant(self.spec.variant)


class LoraLayer(keras.layers.Layer):
    """Base class: a base layer plus named adapters.

    A subclass wraps one kind of Keras layer: it sets `wraps` (the Keras
    layer types) and `category` (`"linear"`, ...), registers itself with
    `keras_lora.layers.register_lora_layer`, and implements the
    type-specific hooks: `adapter_shapes_for`, `project_down`,
    `project_up`, `kernel_delta`, `kernel_matrix` and, if it differs from
    a matrix kernel, `routing_equations` and `describe`. Users create
    subclasses with their drop-in constructor or with `from_layer`.

    The base layer's kernel is frozen. Its activation moves to this layer,
    so the adapter output is added before the activation.
    """

    wraps = ()
    category = "linear"

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
        use_dora=False,
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
                    variant_for(use_dora, f"{type(self).__name__}: `use_dora`"),
                )
            ]
        if kwargs.get("dtype") is None:
            # A quantized base's policy would send this layer's call to
            # Keras's quantized-call methods; the wrapper is float.
            kwargs["dtype"] = quantization.float_policy(base_layer.dtype_policy)
        super().__init__(name=name, **kwargs)
        # Validate everything before touching the base layer: a failed
        # constructor must leave it exactly as it was.
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
        active = list(names[:1] if active_adapters is None else active_adapters)
        merged = list(merged_adapters or [])
        self._check_names(active, names)
        self._check_names(merged, names)
        base_activation = getattr(base_layer, "activation", None)
        linear = keras.activations.linear
        moves_activation = (
            base_activation is not None and base_activation is not linear
        )
        if moves_activation and activation is not None:
            raise ValueError(
                f"Layer '{self.name}': the base layer '{base_layer.name}' "
                "already has an activation; do not pass `activation` too."
            )
        if moves_activation:
            activation = base_activation
        self.activation = keras.activations.get(activation)
        self.bias_trainable = bool(bias_trainable)
        self._specs = {s.name: s for s in specs}
        self._adapters = {}
        self.base_layer = base_layer
        self.seed_generator = keras.random.SeedGenerator()
        self._active = active
        self._merged = merged
        self._enabled = True
        # Routed adapter slots (`keras_lora.serving.routing`); runtime
        # state, neither saved nor part of the config.
        self._routed = None
        # A requantizing merge keeps the quantized values it replaced, to
        # unmerge exactly, and what it cost (`quantization.Drift`).
        self._requantized_from = None
        self._requantizing = False
        self.merge_drift = None
        if moves_activation:
            # The adapter output must join before the activation, so the
            # activation moves from the base layer to this one.
            base_layer.activation = linear
        if base_layer.built:
            self.apply_freeze()

    # -- what a layer type answers (subclass hooks) -------------------------

    @classmethod
    def adapter_shapes_for(cls, base_layer, rank):
        """`(a_shape, b_shape)` of a rank-`rank` adapter on built
        `base_layer`."""
        raise NotImplementedError

    @classmethod
    def kernel_of(cls, base_layer):
        """The base layer's kernel as its public property gives it: the
        float kernel variable (what merges change), or for a quantized
        base its integer values (unpacked for int4, not dequantized),
        shaped like the float kernel."""
        return base_layer.kernel

    @classmethod
    def kernel_variables(cls, base_layer):
        """The variables a merge may rewrite: the kernel, or every
        variable of a quantized base (a requantizing merge rewrites its
        scales and zero points too)."""
        if quantization.is_quantized(base_layer):
            return list(base_layer.weights)
        return [cls.kernel_of(base_layer)]

    @classmethod
    def probe_inputs(cls, base_layer):
        """Inputs on which a requantizing merge measures its drift."""
        return quantization.gaussian_probe(base_layer)

    @classmethod
    def left_out_warning(cls, base_layer):
        """What `apply_lora` warns about when `base_layer` stays unwrapped
        (e.g. it then trains wrong), or None."""
        return None

    @classmethod
    def kernel_shape_of(cls, base_layer):
        """The base kernel's shape, or None while `base_layer` is unbuilt."""
        if not base_layer.built:
            return None
        return tuple(int(d) for d in cls.kernel_of(base_layer).shape)

    @classmethod
    def kind_of(cls, base_layer):
        """The base layer's kind as adapter files record it (`"Dense"`)."""
        for base_type in cls.wraps:
            if isinstance(base_layer, base_type):
                return base_type.__name__
        return type(base_layer).__name__

    @classmethod
    def describe(cls, base_layer):
        """What adapter files record about the base layer (JSON data)."""
        shape = cls.kernel_shape_of(base_layer)
        return {
            "lora_class": cls.__name__,
            "base_class": cls.kind_of(base_layer),
            "kernel_shape": list(shape or ()),
        }

    @classmethod
    def check_description(cls, base_layer, saved, where, path):
        """Raises `ValueError` if `saved` (from `describe`) does not fit
        `base_layer`."""
        kind = cls.kind_of(base_layer)
        if saved.get("base_class") not in (None, kind):
            raise ValueError(
                f"{where}: layer '{path}' is a {kind}, but the adapter was "
                f"saved for a {saved['base_class']}."
            )
        current = cls.describe(base_layer)
        for field, value in saved.items():
            if field in ("lora_class", "base_class", "kernel_shape"):
                continue
            if field in current and current[field] != value:
                raise ValueError(
                    f"{where}: layer '{path}' has {field} "
                    f"{current[field]!r}, but the adapter was saved for "
                    f"{value!r}."
                )

    @classmethod
    def check_wrappable(cls, layer, require_built=True):
        """Raises (naming the layer and the fix) if `layer` can't be
        wrapped by this class."""
        if isinstance(layer, LoraLayer):
            raise TypeError(
                f"Layer '{layer.name}' is already a LoRA layer "
                f"({type(layer).__name__}); add more adapters with "
                "`layer.add_adapter(name, rank=...)` instead of wrapping it."
            )
        if not isinstance(layer, cls.wraps):
            other = lora_class_for(layer)
            hint = (
                f"Use {other.__name__} for it."
                if other is not None
                else "keras_lora has no LoRA class for that type."
            )
            wanted = " or ".join(
                f"keras.layers.{t.__name__}" for t in cls.wraps
            )
            raise TypeError(
                f"{cls.__name__}.from_layer expects a {wanted}, but layer "
                f"'{getattr(layer, 'name', layer)}' is a "
                f"{type(layer).__name__}. {hint}"
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' has Keras's built-in LoRA enabled "
                "(`enable_lora`). Wrap the layer before calling enable_lora, "
                "or use one LoRA implementation only."
            )
        cls.check_factorable(layer)
        quantization.check_supported(layer, f"{cls.__name__}.from_layer")
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

    def project_down(self, x, a):
        """`x @ A`: the input projected to the rank axis, `(..., r)`."""
        raise NotImplementedError

    def project_up(self, hidden, b):
        """`hidden @ B`: the rank axis projected to the layer's output."""
        raise NotImplementedError

    def kernel_delta(self, a, b):
        """`A @ B` shaped like the base kernel (used by merges)."""
        raise NotImplementedError

    def kernel_matrix(self, kernel):
        """The numpy `kernel` as a `(contracted, outputs)` matrix."""
        raise NotImplementedError

    @classmethod
    def kernel_probe(cls, base_layer):
        """`(inputs, to_kernel)`: numpy one-hot inputs on which a call of
        `base_layer` without its bias gives the kernel it computes with,
        and the function turning those outputs into the kernel (LoftQ
        reads quantized kernels back through Keras's own quantized call
        this way). None if the layer type cannot."""
        return None

    @classmethod
    def kernel_output_axes(cls, base_layer):
        """The kernel axes that are output units (DoRA's magnitude has
        one entry per unit). The default: the kernel's last axis."""
        return (len(cls.kernel_shape_of(base_layer)) - 1,)

    def scale_output_units(self, outputs, factor):
        """`outputs` times `factor`, one value per output unit (shaped as
        the kernel's output axes). The default fits layers whose output
        units are the output's trailing axes, in kernel order."""
        return outputs * factor

    def output_bias(self):
        """The base layer's bias as its call adds it to the outputs
        (broadcastable against them), or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def kernel_transposed(self):
        """True while the call in progress computes with the kernel
        transposed (a tied embedding's reverse call): the kernel's output
        units are then the input's last axis."""
        return False

    def routing_equations(self):
        """`(down, up)` einsums of `project_down`/`project_up`, for routed
        slots (`keras_lora.serving.routing` adds the batch axis to A and
        B). The default fits a matrix kernel."""
        return "...i,ir->...r", "...r,ro->...o"

    def branch_factors(self, x, a, b):
        """The `(A, B)` that `project_down`/`project_up` apply to input `x`
        (plain or stacked per batch row), in the branch's dtype. The
        default: `a`, `b` cast to `x`'s dtype."""
        return ops.cast(a, x.dtype), ops.cast(b, x.dtype)

    def routed_project_down(self, x, a, equation):
        """`project_down` with one A per batch row (`a`: `(batch, ...)`);
        `equation` is `routing_equations()[0]` with the batch axis."""
        return ops.einsum(equation, x, a)

    def routed_project_up(self, hidden, b, equation):
        """`project_up` with one B per batch row, as `routed_project_down`."""
        return ops.einsum(equation, hidden, b)

    # -- construction -------------------------------------------------------

    @classmethod
    def wrap(cls, layer, **kwargs):
        """Wraps `layer`, built or not (model surgery uses this).

        A built layer is wrapped as by `from_layer`; an unbuilt one is
        wrapped as is and both build on first call.
        """
        if layer.built:
            return cls.from_layer(layer, **kwargs)
        cls.check_wrappable(layer, require_built=False)
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
        adapters=None,
        use_dora=False,
    ):
        """Wraps a built base layer, sharing (not copying) its variables.

        The base kernel (and bias, unless `bias_trainable`) is frozen and the
        base activation moves to the returned layer, which keeps the base
        layer's name unless `name` is given. Arguments as in the drop-in
        constructor (`use_dora=True`: a DoRA adapter, see
        `keras_lora.layers.dora`); `adapters` (a list of `AdapterSpec`s or
        their dicts)
        replaces the single adapter they describe (`[]` for none). If
        anything fails, `layer` is left exactly as it was.
        """
        cls.check_wrappable(layer)
        activation = getattr(layer, "activation", None)
        trainable = layer_trainable_state(layer)
        try:
            wrapper = cls(
                base_layer=layer,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                use_rslora=use_rslora,
                a_initializer=a_initializer,
                b_initializer=b_initializer,
                adapter_name=adapter_name,
                use_dora=use_dora,
                adapters=adapters,
                bias_trainable=bias_trainable,
                name=name or layer.name,
            )
            input_shape = (layer.get_build_config() or {}).get("input_shape")
            with variable_scopes_of(layer):
                wrapper.build(input_shape)
        except BaseException:
            if activation is not None:
                layer.activation = activation
            restore_trainable_state(trainable)
            raise
        return wrapper

    # -- Keras layer API ----------------------------------------------------

    def build(self, input_shape=None):
        if not self.base_layer.built:
            self.base_layer.build(input_shape)
        for spec in self._specs.values():
            self._create_adapter(spec)
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
        # `model.quantize` may have changed the base since it was wrapped.
        quantization.check_supported(self.base_layer, f"Layer '{self.name}'")
        outputs = self.base_call(inputs)
        if self._enabled:
            for name in self._active:
                if name not in self._merged:
                    adapter = self._adapters[name]
                    outputs = adapter.variant.forward(
                        self, adapter, inputs, outputs, training
                    )
            if self._routed is not None:
                outputs = self._routed.apply(inputs, outputs)
        return self.activation(outputs)

    def base_call(self, inputs):
        """The base layer's own output (its quantized call on a quantized
        base), before the activation this layer took over."""
        return self.base_layer(inputs)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    @property
    def trainable(self):
        return super().trainable

    @trainable.setter
    def trainable(self, value):
        # Unlike Keras's default, making this layer trainable does not
        # unfreeze the base kernel: a parent's `trainable = True` must not
        # silently turn LoRA into full fine-tuning.
        set_own_trainable(self, value)
        base = getattr(self, "base_layer", None)
        if base is None:
            return
        if value and base.built:
            self.apply_freeze()
        elif not value:
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
        for name, adapter in self._adapters.items():
            for tensor, variable in adapter.variables.items():
                store[f"{name}.{tensor}"] = variable
            if name in self._merged:
                for key, value in adapter.state.items():
                    store[f"{name}.{key}"] = value

    def load_own_variables(self, store):
        for name, adapter in self._adapters.items():
            for tensor, variable in adapter.variables.items():
                key = f"{name}.{tensor}"
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
                        f"{tuple(variable.shape)} (rank or base shape "
                        "differs)."
                    )
                variable.assign(value)
            if name in self._merged:
                prefix = f"{name}."
                for key in store.keys():
                    tensor = key[len(prefix) :]
                    if (
                        key.startswith(prefix)
                        and tensor not in adapter.variables
                    ):
                        adapter.state[tensor] = np.array(store[key])

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

    def adapter(self, name=DEFAULT_ADAPTER):
        """The `Adapter` (spec and variables) called `name`."""
        self._check_known([name])
        if name not in self._adapters:
            raise ValueError(
                f"Layer '{self.name}' is not built yet, so adapter "
                f"'{name}' has no variables. Build the model first."
            )
        return self._adapters[name]

    def adapter_variables(self, name=DEFAULT_ADAPTER):
        """`{tensor name: variable}` of adapter `name`."""
        return dict(self.adapter(name).variables)

    def lora_weights(self, name=DEFAULT_ADAPTER):
        """Returns the `(A, B)` variables of adapter `name`."""
        variables = self.adapter(name).variables
        return variables["lora_a"], variables["lora_b"]

    def adapter_shapes(self, rank):
        """`(a_shape, b_shape)` of a rank-`rank` adapter on this layer."""
        return self.adapter_shapes_for(self.base_layer, rank)

    def add_adapter(
        self, name, rank=8, alpha=None, dropout=0.0, use_dora=False, **kwargs
    ):
        """Adds a new (inactive) adapter; B starts at zero by default.

        `use_dora=True` makes it a DoRA adapter; other keyword arguments
        are `AdapterSpec` fields."""
        if name in self._specs:
            raise ValueError(
                f"Layer '{self.name}' already has an adapter named '{name}'. "
                "Pick another name or delete it first."
            )
        if use_dora is not False:
            kwargs["variant"] = variant_for(
                use_dora, f"Layer '{self.name}': `use_dora`"
            )
        spec = AdapterSpec(name, rank, alpha, dropout, **kwargs)
        spec.validate(self.name)
        if self.built:
            with unlocked_tracker(self):
                self._create_adapter(spec)
        self._specs[name] = spec

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables."""
        self._check_known([name])
        if name in self._merged:
            raise ValueError(
                f"Layer '{self.name}': adapter '{name}' is merged into the "
                "kernel. Call `unmerge()` before deleting it."
            )
        adapter = self._adapters.pop(name, None)
        if adapter is not None:
            for variable in adapter.variables.values():
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

    # -- routed slots (keras_lora.serving.routing) --------------------------

    @property
    def routed_slots(self):
        """The routed adapter slots attached to this layer, or None."""
        return self._routed

    def attach_routed_slots(self, slots):
        """Every call then ends with `slots.apply(inputs, outputs)`
        (None detaches)."""
        self._routed = slots

    # -- merge / unmerge ----------------------------------------------------

    @property
    def merged(self):
        """True when adapters are folded into the base kernel."""
        return bool(self._merged)

    @property
    def merged_adapters(self):
        return list(self._merged)

    def merge(self, adapter_names=None, requantize=False):
        """Folds the active (or named) adapters into the base kernel.

        Computed in float32. Refused if the layer is already merged. A
        quantized base (`model.quantize("int8" | "int4")`) is merged only
        with `requantize=True`: the kernel is dequantized, the update
        added and the sum requantized by Keras's own code, which rounds;
        the measured cost is then in `merge_drift` (a
        `keras_lora.layers.quantization.Drift`), and `unmerge()` restores
        the quantized kernel exactly (from a copy kept in memory).
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
            self.check_mergeable(requantize)
        base = self.base_layer
        requantizing = bool(names) and quantization.is_quantized(base)
        if requantizing:
            probe = self.probe_inputs(base)
            y_base, y_exact = self._probe_outputs(probe, names)
            self._requantized_from = {
                v.name: np.array(ops.convert_to_numpy(v)) for v in base.weights
            }
        done = []
        self._requantizing = requantizing
        try:
            for name in names:
                adapter = self._adapters[name]
                adapter.variant.merge(self, adapter)
                done.append(adapter)
                # Variants see what is merged before them (DoRA's norm
                # is that of the kernel without merged adapters).
                self._merged = [a.name for a in done]
        except BaseException:
            if requantizing:
                self._restore_quantized()
            else:
                for adapter in reversed(done):
                    adapter.variant.unmerge(self, adapter)
            self._merged = []
            raise
        finally:
            self._requantizing = False
        self._merged = names
        if requantizing:
            y_merged = ops.convert_to_numpy(self.base_call(probe))
            self.merge_drift = quantization.measure_drift(
                self.name,
                quantization.quantization_mode(base),
                y_base,
                y_exact,
                y_merged,
            )

    def unmerge(self):
        """Takes merged adapters back out of the kernel (no-op if none).

        After a requantizing merge the quantized kernel from before it
        comes back exactly. Without that copy (a model saved merged and
        loaded again) the update is subtracted and the kernel requantized,
        which rounds again.
        """
        if self._merged and self._requantized_from is not None:
            self._restore_quantized()
            self._merged = []
            return
        self._requantizing = quantization.is_quantized(self.base_layer)
        try:
            for name in reversed(self._merged):
                adapter = self._adapters[name]
                adapter.variant.unmerge(self, adapter)
        finally:
            self._requantizing = False
        self._merged = []

    def check_mergeable(self, requantize=False):
        """Raises (saying why and what to do) if adapters cannot be folded
        into the base kernel (a quantized one only with `requantize`)."""
        self.check_mergeable_kernel(self.base_layer, self.name, requantize)

    @classmethod
    def check_mergeable_kernel(cls, base_layer, where, requantize=False):
        """Raises if `base_layer`'s kernel cannot take a merged delta."""
        mode = quantization.quantization_mode(base_layer)
        if mode is not None:
            quantization.check_supported(base_layer, f"Layer '{where}'")
            if not requantize:
                raise ValueError(quantization.refusal(mode, where))
            return
        kernel = cls.kernel_of(base_layer)
        if kernel.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"Layer '{where}': cannot merge into a {kernel.dtype} "
                "kernel (quantized base). Keep the adapter unmerged, or "
                "merge before quantizing."
            )

    def pissa_init(self, name=DEFAULT_ADAPTER):
        """PiSSA: A, B from the top-r SVD of the kernel; residual in base.

        With the kernel as a matrix `W = U S V^T`, sets `A = U_r sqrt(S_r/s)`
        and `B = sqrt(S_r/s) V_r^T` and the base kernel to `W - s A B`, so
        outputs are unchanged. Computed in float32 on the host. Everything
        is checked before anything changes.
        """
        self._check_known([name])
        if name in self._merged:
            raise ValueError(
                f"Layer '{self.name}': unmerge before re-initialising '{name}'."
            )
        self.check_mergeable()
        adapter = self.adapter(name)
        if adapter.spec.variant != "lora":
            raise ValueError(
                f"Layer '{self.name}': PiSSA initialises plain LoRA adapters "
                f"only; adapter '{name}' is a {adapter.spec.variant!r} "
                "adapter."
            )
        spec = adapter.spec
        kernel = self.kernel_of(self.base_layer)
        matrix = self.kernel_matrix(ops.convert_to_numpy(kernel))
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
        a_var, b_var = self.lora_weights(name)
        a_var.assign(a.reshape(a_var.shape))
        b_var.assign(b.reshape(b_var.shape))
        adapter.variant.unmerge(self, adapter)

    def delta_weight(self, name=DEFAULT_ADAPTER):
        """The kernel-shaped float32 change adapter `name` amounts to
        (`s * A @ B` for plain LoRA)."""
        adapter = self.adapter(name)
        return adapter.variant.delta(self, adapter)

    def add_to_kernel(self, delta, sign):
        """`kernel += sign * delta`, computed in float32 (dequantized,
        added and requantized inside a requantizing merge)."""
        self.check_mergeable(self._requantizing)
        if self._requantizing:
            quantization.requantized_add(self.base_layer, sign * delta)
            return
        kernel = self.kernel_of(self.base_layer)
        updated = ops.cast(kernel, "float32") + sign * delta
        kernel.assign(ops.cast(updated, kernel.dtype))

    # -- transactions (keras_lora.model.transaction) ----------------------

    def snapshot_state(self):
        """This layer's adapter bookkeeping, for `restore_state`.

        Variable values are not included (a transaction saves the values
        it lets change); the adapters' variables are kept by reference.
        """
        return {
            "specs": {
                n: dataclasses.replace(s) for n, s in self._specs.items()
            },
            "adapters": dict(self._adapters),
            "active": list(self._active),
            "merged": list(self._merged),
            "enabled": self._enabled,
            "bias_trainable": self.bias_trainable,
            "activation": self.activation,
            "routed": self._routed,
            "requantized_from": self._requantized_from,
            "merge_drift": self.merge_drift,
            "variables": own_variable_lists(self),
        }

    def restore_state(self, state):
        """Puts back what `snapshot_state` returned: adapters added since
        are dropped (their variables untracked), deleted ones come back,
        and the layer's variables are in their old order."""
        saved = state["adapters"]
        restore_own_variable_lists(self, state["variables"])
        self._specs = dict(state["specs"])
        for name, adapter in saved.items():
            adapter.spec = self._specs[name]
        self._adapters = dict(saved)
        self._active = list(state["active"])
        self._merged = list(state["merged"])
        self._enabled = state["enabled"]
        self.bias_trainable = state["bias_trainable"]
        self.activation = state["activation"]
        self._routed = state["routed"]
        self._requantized_from = state["requantized_from"]
        self.merge_drift = state["merge_drift"]

    # -- helpers for variants -----------------------------------------------

    def branch_inputs(self, inputs, rate, training):
        """The branch's input: `inputs` with dropout in training."""
        if training and rate > 0:
            return keras.random.dropout(inputs, rate, seed=self.seed_generator)
        return inputs

    def apply_freeze(self):
        """Re-applies the freeze: base kernel frozen, bias per setting.

        Setting `trainable` does this too, but on TensorFlow assigning an
        attribute its current value is skipped, so call this explicitly.
        """
        base = self.base_layer
        bias = getattr(base, "bias", None)
        if self.bias_trainable and bias is not None and self.trainable:
            base.trainable = True
            for variable in base.weights:
                variable.trainable = variable is bias
        else:
            base.trainable = False

    # -- internals ----------------------------------------------------------

    def _probe_outputs(self, probe, names):
        """`(base output, output with adapters `names`)` for `probe`, as
        numpy (before the activation)."""
        y_base = self.base_call(probe)
        y = y_base
        for name in names:
            adapter = self._adapters[name]
            y = adapter.variant.forward(self, adapter, probe, y, False)
        return ops.convert_to_numpy(y_base), ops.convert_to_numpy(y)

    def _restore_quantized(self):
        """Puts back the quantized values a requantizing merge replaced."""
        saved = self._requantized_from
        for variable in self.base_layer.weights:
            variable.assign(saved[variable.name])
        self._requantized_from = None
        self.merge_drift = None

    def _check_known(self, names):
        self._check_names(names, self._specs)

    def _check_names(self, names, known):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"Layer '{self.name}' has no adapter named {unknown[0]!r}. "
                f"Its adapters are: {list(known)}."
            )

    def _create_adapter(self, spec):
        variant = get_variant(spec.variant, f"Layer '{self.name}'")
        variables = {}
        shapes = variant.tensor_shapes(type(self), self.base_layer, spec)
        for tensor, shape in shapes.items():
            name = f"{tensor}_{spec.name}"
            # Adapter weights stay float32 under mixed precision: small
            # updates would underflow in float16, and merge needs full
            # precision. Under keras.distribution their layout follows the
            # base kernel's (`layouts`).
            with adapter_layout(self, tensor, name):
                variables[tensor] = self.add_weight(
                    name=name,
                    shape=shape,
                    initializer=variant.initializer(tensor, spec),
                    dtype="float32",
                    trainable=True,
                )
        adapter = Adapter(spec, variables)
        variant.initialize(self, adapter)
        self._adapters[spec.name] = adapter


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
    "use_dora",
    "adapters",
    "active_adapters",
    "merged_adapters",
    "activation",
    "bias_trainable",
    "name",
    "trainable",
    "autocast",
)


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


def variable_scopes_of(layer):
    """Name scopes under which new variables get paths like `layer`'s own.

    Adapter variables created inside them read like the kernel's path
    (`model/block/query/lora_a_default`) and stay unique across a model.
    """
    stack = contextlib.ExitStack()
    weights = layer.weights
    if weights:
        for scope in weights[0].path.split("/")[:-2]:
            stack.enter_context(keras.name_scope(scope))
    return stack


def layer_trainable_state(layer):
    """The `trainable` flags of `layer` and its variables, to restore."""
    return (layer, layer.trainable, [(v, v.trainable) for v in layer.weights])


def restore_trainable_state(state):
    layer, flag, variables = state
    if layer.trainable != flag:
        layer.trainable = flag
    for variable, value in variables:
        variable.trainable = value


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
