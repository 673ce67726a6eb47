"""The only place keras_lora touches private Keras state.

Keras locks a layer's variable tracker once the layer is built, and offers
no public way to add or drop a variable afterwards. Named adapters need both
(`add_adapter` on a built layer, `delete_adapter`), exactly as Keras's own
`enable_lora` does internally, and routed layers must track a routing
variable shared by the model (`track_variable`), so these helpers reach
into the tracker. Model surgery needs a layer's sublayer attributes and a
Functional model's graph, which Keras keeps in private state too.
Nothing else in the package uses private Keras API.
"""

import contextlib

# Keras bookkeeping attributes that hold layers already reached another way.
_SKIP_ATTRIBUTES = {
    "_layers",
    "_operations",
    "_functional",
    "_inbound_nodes",
    "_outbound_nodes",
    "_tracker",
    "_self_setattr_tracking",
}


def set_own_trainable(layer, value):
    """Sets `layer.trainable` without Keras's recursion into sublayers.

    Keras's setter also sets every sublayer's flag; a LoRA layer must keep
    its base layer frozen when it is made trainable, so it sets only its
    own flag and its own variables' here.
    """
    layer._trainable = bool(value)
    for variable in layer._trainable_variables:
        variable.trainable = layer._trainable


def attribute_items(layer):
    """`(name, value)` of `layer`'s attributes that may hold sublayers.

    Keras has no public list of a layer's sublayer attributes; this reads
    the instance dict (and torch's `_modules`, where the torch backend
    keeps sublayers), skipping Keras's own bookkeeping.
    """
    names = list(vars(layer))
    names += [n for n in getattr(layer, "_modules", None) or {}]
    for name in dict.fromkeys(names):
        if name in _SKIP_ATTRIBUTES or name.startswith("__"):
            continue
        try:
            value = getattr(layer, name)
        except Exception:  # noqa: BLE001 - properties may raise; skip them
            continue
        yield name, value


def is_model_output(model, layer):
    """True if `layer` produces one of Functional `model`'s outputs."""
    outputs = getattr(model, "outputs", None) or []
    return any(
        getattr(t, "_keras_history", (None,))[0] is layer for t in outputs
    )


@contextlib.contextmanager
def unlocked_tracker(layer):
    """Lets `layer.add_weight` run on an already-built layer."""
    tracker = getattr(layer, "_tracker", None)
    was_locked = bool(tracker is not None and tracker.locked)
    if was_locked:
        tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def untrack_variable(layer, variable):
    """Removes `variable` from `layer`'s state (and torch's parameters)."""
    layer._untrack_variable(variable)


def track_variable(layer, variable):
    """Makes built `layer` track an existing `variable` it did not create.

    Routed LoRA layers all read one routing-ids variable per model; each
    must track it so that compiled functions which take a model's variables
    as arguments (JAX `stateless_call`, keras-hub's jitted `generate`) pass
    its current value instead of baking it in. Keras has no public API to
    track a variable a layer did not create.
    """
    if any(v is variable for v in layer.variables):
        return
    with unlocked_tracker(layer):
        layer._track_variable(variable)


def own_variable_lists(layer):
    """Copies of the variable lists `layer` tracks itself, in order.

    `layer.weights` lists these first (trainable, then non-trainable), so
    their order is the order of weights in saved files and optimizers.
    """
    return list(layer._trainable_variables), list(
        layer._non_trainable_variables
    )


def restore_own_variable_lists(layer, lists):
    """Makes `layer` track exactly the variables of `lists`, in that order.

    Used to undo adding or deleting adapters: Keras can only append a
    tracked variable, which would change the order of `layer.weights`.
    """
    trainable, non_trainable = lists
    wanted = {id(v) for v in trainable + non_trainable}
    current = layer._trainable_variables + layer._non_trainable_variables
    for variable in current:
        if id(variable) not in wanted:
            untrack_variable(layer, variable)
    tracked = {
        id(v)
        for v in layer._trainable_variables + layer._non_trainable_variables
    }
    with unlocked_tracker(layer):
        for variable in trainable + non_trainable:
            if id(variable) not in tracked:
                layer._track_variable(variable)
    layer._trainable_variables[:] = trainable
    layer._non_trainable_variables[:] = non_trainable


def replace_in_list(parent, container, old, new_layer):
    """Swaps `old` for `new_layer` in a list attribute of built `parent`."""
    with unlocked_tracker(parent):
        index = _tracked_index(parent, old)
        for i, value in enumerate(container):
            if value is old:
                container[i] = new_layer
        tracker = getattr(parent, "_tracker", None)
        if tracker is not None:
            tracker.track(new_layer)
        _retrack_at(parent, old, new_layer, index)


def set_sublayer(parent, attribute, new_layer):
    """Sets `parent.<attribute> = new_layer` on a built `parent`.

    The old sublayer is untracked so `parent.layers`/weights don't list it
    twice (its variables stay reachable through the new layer if shared).
    """
    old = getattr(parent, attribute, None)
    with unlocked_tracker(parent):
        index = _tracked_index(parent, old)
        setattr(parent, attribute, new_layer)
        _retrack_at(parent, old, new_layer, index)


def _tracked_index(parent, layer):
    layers = getattr(parent, "_layers", None) or []
    return next((i for i, v in enumerate(layers) if v is layer), None)


def _retrack_at(parent, old, new_layer, index):
    # Keras saves a subclassed model's `layers` list by position, so the new
    # layer takes the old one's place in it (not the end).
    tracker = getattr(parent, "_tracker", None)
    if tracker is None or old is None:
        return
    tracker.untrack(old)
    layers = parent._layers
    if index is None:
        return
    current = _tracked_index(parent, new_layer)
    if current is not None and current != index:
        layers.insert(index, layers.pop(current))


def is_functional(model):
    """True for graph-built models (Functional, keras-hub backbones)."""
    return hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations")


def replace_in_functional(model, old, new):
    """Puts `new` in place of `old` in a Functional model's graph.

    Keras has no public API to swap a layer inside a built Functional model
    (`clone_model` builds a different model object), so this rewires the
    graph: the nodes that called `old` now call `new`, and the bookkeeping
    keyed by the operation object follows. `new` must carry `old`'s name,
    which is what the saved config refers to.
    """
    from keras.src.ops.node import KerasHistory

    if new.name != old.name:
        raise ValueError("Internal error: replacement must keep the name.")
    nodes = list(old._inbound_nodes)
    for node in nodes:
        node.operation = new
        for tensor in node.outputs:
            history = getattr(tensor, "_keras_history", None)
            if history is not None and history.operation is old:
                tensor._keras_history = KerasHistory(
                    new, history.node_index, history.tensor_index
                )
    new._inbound_nodes = nodes
    new._outbound_nodes = list(old._outbound_nodes)
    model._operations = [new if op is old else op for op in model._operations]
    prefix = f"{id(old)}_ib-"
    model._nodes = {
        f"{id(new)}_ib-{key[len(prefix) :]}" if key.startswith(prefix) else key
        for key in model._nodes
    }
    layers = getattr(model, "_layers", None)
    if layers is not None and any(layer is old for layer in layers):
        with unlocked_tracker(model):
            index = _tracked_index(model, old)
            model._tracker.track(new)
            _retrack_at(model, old, new, index)


def rebuild_sequential(model):
    """Rebuilds a Sequential model's graph after its layers changed.

    `Sequential.add(..., rebuild=True)` does this through the same private
    method; calling it once after several swaps avoids rebuilding per layer.
    """
    model._maybe_rebuild()


def layout_map_of(distribution):
    """The `LayoutMap` of a `keras.distribution.ModelParallel` (None for
    other distributions).

    Adapter layouts (`keras_lora.layers.layouts`) must tell an exact key
    from a regex and skip regexes written for base weights; Keras exposes
    only the lookup result (`get_tensor_layout`), not the map's keys.
    """
    return getattr(distribution, "_layout_map", None)


class PerVariableLearningRate:
    """Mixin for a Keras optimizer class: each trainable variable is
    updated with `learning_rate * self.learning_rate_multiplier(variable)`
    (LoRA+ trains B faster than A).

    Keras applies one learning rate to all variables inside the private
    `_backend_update_step` (per-variable `update_step` calls on JAX, the
    fused `_parallel_update_step` on torch, a distributed step on
    TensorFlow) and in `_apply_weight_decay`; there is no public per-variable
    learning rate. This mixin runs each of them once per group of variables
    that share a multiplier, so every backend's own update code still does
    the work, and decoupled weight decay scales with the group's rate (as
    with one optimizer per group).
    """

    def learning_rate_multiplier(self, variable):
        return 1.0

    def _groups(self, items, variable_of):
        groups = {}
        for item in items:
            factor = float(self.learning_rate_multiplier(variable_of(item)))
            groups.setdefault(factor, []).append(item)
        return groups

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        pairs = list(zip(grads, trainable_variables, strict=True))
        for factor, group in self._groups(pairs, lambda p: p[1]).items():
            rate = learning_rate if factor == 1.0 else learning_rate * factor
            super()._backend_update_step(
                [g for g, _ in group], [v for _, v in group], rate
            )

    def _apply_weight_decay(self, variables):
        decay = self.weight_decay
        if decay is None:
            return super()._apply_weight_decay(variables)
        for factor, group in self._groups(variables, lambda v: v).items():
            # Keras reads the decay from the attribute: `wd * lr` becomes
            # `(factor * wd) * lr` for this group only.
            self.weight_decay = decay * factor
            try:
                super()._apply_weight_decay(group)
            finally:
                self.weight_decay = decay
