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

import dataclasses

import keras
import numpy as np

from keras_lora._keras_internals import (
    own_variable_lists,
    restore_own_variable_lists,
    set_own_trainable,
    unlocked_tracker,
    untrack_variable,
)
from keras_lora.layers import quantization
from keras_lora.layers.construction import (
    layer_trainable_state,
    restore_trainable_state,
    variable_scopes_of,
)
from keras_lora.layers.layer_type import LayerType
from keras_lora.layers.layouts import adapter_layout
from keras_lora.layers.merging import Merging
from keras_lora.layers.spec import DEFAULT_ADAPTER, AdapterSpec, variant_for
from keras_lora.layers.variants import get_variant, mark_tensor


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


class LoraLayer(LayerType, Merging, keras.layers.Layer):
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
