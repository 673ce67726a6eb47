"""Per-example adapter routing: a different adapter for every batch row.

One forward pass computes, for every row `i` of a batch,

    y_i = base(x_i) + s[id_i] * (x_i @ A[id_i]) @ B[id_i]

where `id_i` is the row's adapter *slot* (`-1`: the base model, i.e. no
routed branch). The adapters live stacked in a fixed number of slots per
layer (`SlotWeights`):

    A: (slots + 1, contracted..., r_max)    B: (slots + 1, r_max, outputs...)
    scales: (slots + 1,)

padded with zeros to the largest rank `r_max` (zero columns of A and rows of
B add exactly nothing), and the last slot is all zeros with scale 0: rows
routed to `-1` read it. A pass gathers one A and one B per row and does two
batched einsums, so its cost depends on the batch, `r_max` and the layer
shapes, never on how many adapters are registered or resident.

How the ids reach the layers. A keras-hub `CausalLM` calls its layers deep
inside `generate` (`call_with_cache`, under `jax.jit` or `tf.function`), and
its call signature has no room for adapter ids. So the ids live in one
non-trainable int32 variable per model (`Router.ids`, shape `(max_batch,)`),
which every routed layer tracks and reads, slicing it to the batch size. We
chose a variable over the alternatives because it is the only kind of state
every backend's compiled path reads fresh on every call without retracing:

- JAX: keras-hub's compiled `generate` (and `stateless_call`) passes the
  model's non-trainable variables into the jitted function as arguments, so
  a new value of the ids is a new argument, not a new trace. A Python
  context or a captured array would be baked into the trace as a constant.
- TensorFlow: a `tf.function` reads a `tf.Variable` at run time.
- torch: eager, reads the current value.

Slot contents change the same way (variable assignment), so filling,
evicting and refilling slots never recompiles. Set the ids right before each
call (`Router.set`, or `AdapterBank.routing`); rows past the ids given run
the base model. The routed branch adds to whatever the layer computes
without routing (its active named adapters included), so a `-1` row equals
the model's un-routed output. Routed adapters are for inference: their
variables are not trainable and dropout does not apply.
"""

import contextlib
import string

import keras
import numpy as np
from keras import ops

from keras_lora._keras_internals import (
    track_variable,
    unlocked_tracker,
    untrack_variable,
)
from keras_lora.layers import LoraLayer, lora_class_for, supported_layer_types
from keras_lora.layers.construction import variable_scopes_of
from keras_lora.layers.layouts import adapter_layout, replicated_layout


class Router:
    """The adapter slot of every batch row, in one int32 variable.

    Args:
        max_batch: the largest batch a routed call may have.
        name: the variable's name.

    Example:

    >>> router = Router(max_batch=4)
    >>> router.set([0, -1, 1])
    >>> router.current().tolist()
    [0, -1, 1, -1]
    """

    def __init__(self, max_batch=32, name="routing_ids"):
        if not _is_positive_int(max_batch):
            raise ValueError(
                f"Router: `max_batch` must be a positive integer, got "
                f"{max_batch!r}."
            )
        self.max_batch = int(max_batch)
        with replicated_layout(name):
            self.ids = keras.Variable(
                np.full((self.max_batch,), -1, "int32"),
                dtype="int32",
                trainable=False,
                name=name,
            )

    def set(self, slot_ids):
        """Routes row `i` to slot `slot_ids[i]` (`-1`: base model)."""
        ids = np.asarray(slot_ids, dtype="int64").reshape(-1)
        if len(ids) > self.max_batch:
            raise ValueError(
                f"Router: {len(ids)} routing ids for a router of "
                f"max_batch={self.max_batch}. Split the batch, or create "
                f"the bank/router with max_batch>={len(ids)}."
            )
        if ids.size and ids.min() < -1:
            raise ValueError(
                f"Router: invalid slot id {int(ids.min())}; use -1 for the "
                "base model."
            )
        padded = np.full((self.max_batch,), -1, "int32")
        padded[: len(ids)] = ids
        self.ids.assign(padded)

    def clear(self):
        """Routes every row to the base model."""
        self.ids.assign(np.full((self.max_batch,), -1, "int32"))

    def current(self):
        """The routing ids as a numpy array of length `max_batch`."""
        return np.asarray(ops.convert_to_numpy(self.ids))

    @contextlib.contextmanager
    def routed(self, slot_ids):
        """Context manager: `set(slot_ids)` inside, all `-1` after."""
        self.set(slot_ids)
        try:
            yield self
        finally:
            self.clear()


def batched_equation(equation, name="layer"):
    """Adds a leading batch axis to the kernel operand of `equation`.

    `"abc,cr->abr"` becomes `"abc,acr->abr"` (the input's first axis is the
    batch); `"...i,ir->...r"` becomes `"a...i,air->a...r"`, with a letter
    the equation does not use. Raises `ValueError` when the input's first
    axis does not reach the output first (routing needs the batch to be
    the leading axis).
    """
    inputs, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    if inputs.startswith("..."):
        if not output.startswith("..."):
            raise ValueError(_not_routable(name, equation))
        used = set(inputs + kernel + output)
        letter = next(c for c in string.ascii_letters if c not in used)
        return f"{letter}{inputs},{letter}{kernel}->{letter}{output}"
    letter = inputs[0]
    if not output.startswith(letter) or letter in kernel:
        raise ValueError(_not_routable(name, equation))
    return f"{inputs},{letter}{kernel}->{output}"


def unit_scaling_equation(up):
    """From `up` (`h, B -> y`), the einsum multiplying `y` by one value per
    output unit: B's axes without the rank axis. `"...r,ro->...o"` gives
    `"...o,o->...o"`; `"abr,rde->abde"` gives `"abde,de->abde"`."""
    hidden, rest = up.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    rank = next(c for c in kernel if c in hidden and c not in output)
    return f"{output},{kernel.replace(rank, '')}->{output}"


def _not_routable(name, equation):
    return (
        f"Layer '{name}': cannot route adapters per example through "
        f"'{equation}': the input's first (batch) axis must also be the "
        "output's first axis."
    )


class SlotWeights:
    """Stacked adapter weights of one LoRA layer, in device slots.

    Created by `attach(layer, router, slots, max_rank)`; the variables are
    tracked by `layer` (so compiled functions see them) but not saved with
    it. `write(slot, a, b, scale)` fills a slot by variable assignment.

    DoRA slots. A DoRA adapter also rescales the layer's output per output
    unit by `f = m / ||W + s A B||` (`keras_lora.layers.dora`), which
    depends only on the frozen kernel and the adapter, so it is computed
    once when the adapter enters a slot and stored as `f - 1` (zero for
    LoRA slots and the base slot). Row `i` then gets

        y_i = out_i + t_i + (f_i - 1) * (out_i - bias + t_i)

    with `out` the layer's un-routed output and `t_i = s (x_i A) B`:
    exactly the DoRA layer's output, and `out_i + t_i` for LoRA rows. The
    rescaling costs a few elementwise products per layer, so it is only
    traced once `enable_rescaling()` was called (the bank does so when a
    DoRA adapter is registered for the layer, and rebuilds compiled
    functions then).
    """

    def __init__(self, layer, router, slots, max_rank):
        self.layer = layer
        self.router = router
        self.slots = int(slots)
        self.max_rank = int(max_rank)
        down, up = layer.routing_equations()
        self.down = batched_equation(down, layer.name)
        self.up = batched_equation(up, layer.name)
        self.a_shape, self.b_shape = layer.adapter_shapes(self.max_rank)
        rows = self.slots + 1  # the last slot stays zero: routed by -1
        # Under keras.distribution the stacked A and B are laid out like
        # the layer's own adapters (following its kernel), the slot axis
        # replicated (`keras_lora.layers.layouts`).
        with unlocked_tracker(layer), variable_scopes_of(layer.base_layer):
            self.a = _slot_weight(
                layer, "lora_a", "lora_a_slots", (rows,) + tuple(self.a_shape)
            )
            self.b = _slot_weight(
                layer, "lora_b", "lora_b_slots", (rows,) + tuple(self.b_shape)
            )
            self.scales = _slot_weight(layer, None, "lora_slot_scales", (rows,))
            self.rescales = _slot_weight(
                layer,
                "lora_magnitude",
                "lora_slot_rescales",
                (rows,) + tuple(self.b_shape[1:]),
            )
        self.rescale = batched_equation(unit_scaling_equation(up), layer.name)
        self.rescaling = False
        track_variable(layer, router.ids)

    @property
    def variables(self):
        return [self.a, self.b, self.scales, self.rescales]

    def enable_rescaling(self):
        """Traces DoRA's per-unit rescaling from now on; returns True if
        that is a change (compiled functions must then be rebuilt)."""
        changed = not self.rescaling
        self.rescaling = True
        return changed

    def apply(self, inputs, outputs):
        """`outputs` (the layer's un-routed pre-activation output) with
        every row's routed adapter applied."""
        term = self.branch(inputs)
        if not self.rescaling:
            return outputs + term
        if self.layer.kernel_transposed:
            raise ValueError(
                f"Layer '{self.layer.name}': DoRA adapters are routed per "
                "example through its forward call only, not its reverse "
                "(tied logits) call. Serve DoRA adapters on the token "
                "embedding on their own model (keras_lora.load_adapter), "
                "or train them without the embedding."
            )
        rescale = ops.take(self.rescales.value, self._slot_ids(inputs), 0)
        bias = self.layer.output_bias()
        base = (
            outputs if bias is None else outputs - ops.cast(bias, outputs.dtype)
        )
        rescaled = ops.einsum(
            self.rescale, base + term, ops.cast(rescale, outputs.dtype)
        )
        return outputs + term + rescaled

    def branch(self, inputs):
        """The routed low-rank term for `inputs` (batch axis first)."""
        slot = self._slot_ids(inputs)
        # The layer says how its projections read the gathered A and B
        # (an embedding gathers rows of A by token id, a convolution
        # reads its input as patches).
        layer = self.layer
        a, b = layer.branch_factors(
            inputs,
            ops.take(self.a.value, slot, axis=0),
            ops.take(self.b.value, slot, axis=0),
        )
        scale = ops.cast(ops.take(self.scales.value, slot), a.dtype)
        hidden = layer.routed_project_down(inputs, a, self.down)
        rank = len(hidden.shape)  # (batch, ..., r_max)
        hidden = hidden * ops.reshape(scale, (-1,) + (1,) * (rank - 1))
        return layer.routed_project_up(hidden, b, self.up)

    def _slot_ids(self, inputs):
        batch = ops.shape(inputs)[0]
        ids = self.router.ids.value[:batch]  # (batch,)
        # -1 (base model) reads the zero slot at the end.
        return ops.where(ids < 0, self.slots, ids)

    def write(self, slot, a, b, scale, factor=None):
        """Puts an adapter's `A`, `B` (numpy, its own rank) in `slot`;
        `factor`: DoRA's per-output-unit factor (`variant.routed_factor`),
        None for LoRA."""
        self._check_slot(slot)
        rescale = np.zeros((1,) + tuple(self.b_shape[1:]), "float32")
        if factor is not None:
            if not self.rescaling:
                raise ValueError(
                    f"Layer '{self.layer.name}': call enable_rescaling() "
                    "(and rebuild compiled functions) before writing a "
                    "DoRA adapter into its slots."
                )
            rescale[0] = np.asarray(factor, "float32") - 1.0
        a = np.asarray(a, "float32")
        b = np.asarray(b, "float32")
        rank = a.shape[-1]
        if rank > self.max_rank:
            raise ValueError(
                f"Layer '{self.layer.name}': adapter rank {rank} exceeds "
                f"the slots' max_rank {self.max_rank}. Create the bank with "
                f"max_rank>={rank}."
            )
        want_a = tuple(self.a_shape[:-1]) + (rank,)
        want_b = (rank,) + tuple(self.b_shape[1:])
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(
                f"Layer '{self.layer.name}': adapter shapes A {a.shape}, B "
                f"{b.shape} do not fit this layer (expected A {want_a}, B "
                f"{want_b})."
            )
        padded_a = np.zeros((1,) + tuple(self.a_shape), "float32")
        padded_a[0, ..., :rank] = a
        padded_b = np.zeros((1,) + tuple(self.b_shape), "float32")
        padded_b[0, :rank] = b
        self._put(self.a, slot, padded_a)
        self._put(self.b, slot, padded_b)
        self._put(self.scales, slot, np.asarray([scale], "float32"))
        self._put(self.rescales, slot, rescale)

    def clear(self, slot):
        """Zeroes `slot` (rows routed to it then get the base output)."""
        self._check_slot(slot)
        for variable in self.variables:
            zeros = np.zeros((1,) + tuple(variable.shape[1:]), "float32")
            self._put(variable, slot, zeros)

    def _check_slot(self, slot):
        if not 0 <= slot < self.slots:
            raise IndexError(
                f"Layer '{self.layer.name}': slot {slot} out of range "
                f"[0, {self.slots})."
            )

    @staticmethod
    def _put(variable, slot, value):
        start = (slot,) + (0,) * (len(variable.shape) - 1)
        variable.assign(ops.slice_update(variable.value, start, value))


def _slot_weight(layer, tensor, name, shape):
    """A zero float32 variable on `layer` stacking adapter tensor `tensor`
    on its leading (slot) axis; `tensor=None`: one number per slot."""
    with adapter_layout(layer, tensor, name, stacked=True):
        return layer.add_weight(
            name=name,
            shape=shape,
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )


def attach(layer, router, slots, max_rank):
    """Gives LoRA `layer` routed slots; returns its `SlotWeights`.

    The layer's outputs are unchanged until a slot is written and a row
    routed to it. Call `detach(layer)` to remove them.
    """
    if not isinstance(layer, LoraLayer):
        raise TypeError(
            f"attach: layer '{getattr(layer, 'name', layer)}' is a "
            f"{type(layer).__name__}, not a keras_lora LoRA layer."
        )
    if layer.routed_slots is not None:
        raise ValueError(
            f"Layer '{layer.name}' already has routed slots (of another "
            "bank?). Detach them first: "
            "keras_lora.serving.routing.detach(layer)."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built; build the model before "
            "routing adapters through it."
        )
    for value, what in ((slots, "slots"), (max_rank, "max_rank")):
        if not _is_positive_int(value):
            raise ValueError(
                f"attach: `{what}` must be a positive integer, got {value!r}."
            )
    weights = SlotWeights(layer, router, slots, max_rank)
    layer.attach_routed_slots(weights)
    return weights


def detach(layer):
    """Removes `layer`'s routed slots and their variables."""
    weights = layer.routed_slots
    if weights is None:
        return
    for variable in weights.variables + [weights.router.ids]:
        untrack_variable(layer, variable)
    layer.attach_routed_slots(None)


def routable_layer(layer):
    """Returns `layer` wrapped as a LoRA layer without adapters.

    Used to route adapters through a layer that has none of its own: the
    wrapper shares the built layer's variables and computes exactly what
    it computed.
    """
    if isinstance(layer, LoraLayer):
        return layer
    cls = lora_class_for(layer)
    if cls is None:
        raise TypeError(
            f"Layer '{layer.name}' is a {type(layer).__name__}; adapters can "
            f"be routed through {', '.join(supported_layer_types())} layers "
            "only."
        )
    cls.check_wrappable(layer)
    wrapper = cls(base_layer=layer, name=layer.name, adapters=[])
    wrapper.build((layer.get_build_config() or {}).get("input_shape"))
    return wrapper


def _is_positive_int(value):
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and value > 0
    )
