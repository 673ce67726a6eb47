"""Layouts of adapter variables under `keras.distribution`.

Under a `ModelParallel` distribution Keras lays out each new variable by
looking its path up in the user's `LayoutMap` (an exact key first, then
every key as a regex; several regex matches raise). Users write those maps
(or take keras-hub's `Backbone.get_layout_map`) for base weights, and a
regex written for a kernel can catch an adapter variable by accident and
give it a layout of the wrong shape (keras #19496). So every adapter
variable is created inside `adapter_layout`, which decides its layout
here, in this order:

1. an exact `LayoutMap` key equal to the variable's path;
2. a regex key that mentions `lora` (the text of every adapter variable's
   name) and matches the path; two such matches raise `ValueError`;
3. otherwise a layout derived from the base kernel's, by the rules below.

Map keys that do not mention `lora` never apply to adapter variables, so
a map written for base weights works unchanged with LoRA applied.

The derived layout. A LoRA layer class says which kernel axes are output
units (`kernel_output_axes`); every other kernel axis is contracted with
the input. `A` is `(contracted..., r)`: its leading axes are laid out like
the kernel axes they stand for. `B` is `(r, outputs...)` and every other
per-output tensor (DoRA's magnitude) ends in the output axes: those are
laid out like the kernel's output axes. The rank axis is replicated. So a
kernel sharded on its output axes (column-parallel) gets `B` sharded the
same way and `A` replicated; a kernel sharded on its contracted axes
(row-parallel) gets `A` sharded and `B` replicated; a kernel sharded on
both gets both, and the low-rank branch needs the same collectives as the
base product. This holds for any layer type whose class answers
`kernel_output_axes`: Dense, EinsumDense (per-head axes included),
Embedding and Conv layers alike. Routed adapter slots
(`keras_lora.serving.routing`) stack adapters on a leading slot axis,
which is replicated. An axis whose size the mesh axis does not divide is
replicated too.

Without an active distribution (and on backends without one) nothing
here changes how variables are created.
"""

import contextlib
import math
import re

import keras

from keras_lora._keras_internals import layout_map_of

# Map keys containing this text are explicit rules for adapter variables.
ADAPTER_KEY_MARK = "lora"
LORA_A = "lora_a"


@contextlib.contextmanager
def adapter_layout(layer, tensor, name, stacked=False):
    """Lays out the next variable called `name` as adapter tensor `tensor`.

    Wrap the `add_weight` call that creates one of LoRA `layer`'s adapter
    tensors (`"lora_a"`, `"lora_b"`, `"lora_magnitude"`, ...) in it.

    Args:
        layer: the `LoraLayer` whose base kernel the layout follows.
        tensor: the adapter tensor the variable holds; `None` for a
            variable that is always replicated (routing scales).
        name: the variable's name, as passed to `add_weight`.
        stacked: the variable stacks the tensor on a leading axis (routed
            slots); that axis is replicated.
    """
    active = keras.distribution.distribution()
    if active is None:
        yield
        return

    def decide(variable):
        shape = tuple(int(d) for d in variable.shape)
        explicit = explicit_layout(active, variable.path, shape)
        if explicit is not None:
            return explicit
        axes = [None] * len(shape)
        if tensor is not None:
            inner = shape[1:] if stacked else shape
            derived = derived_axes(
                type(layer), layer.base_layer, tensor, inner, active
            )
            axes[len(shape) - len(inner) :] = derived
        return keras.distribution.TensorLayout(axes, active.device_mesh)

    with _NextVariable(active, name, decide).scope():
        yield


@contextlib.contextmanager
def replicated_layout(name):
    """Replicates the next variable called `name` (unless the `LayoutMap`
    names it exactly or with a `lora` key): for state such as routing ids
    that a regex written for base weights must not catch."""
    active = keras.distribution.distribution()
    if active is None:
        yield
        return

    def decide(variable):
        shape = tuple(int(d) for d in variable.shape)
        explicit = explicit_layout(active, variable.path, shape)
        if explicit is not None:
            return explicit
        return keras.distribution.TensorLayout(
            [None] * len(shape), active.device_mesh
        )

    with _NextVariable(active, name, decide).scope():
        yield


def derived_axes(lora_class, base_layer, tensor, shape, distribution):
    """The mesh axes of adapter tensor `tensor` (of `shape`) on
    `base_layer`, derived from its kernel's layout under `distribution`
    (see the module docstring)."""
    kernel_axes = kernel_layout_axes(lora_class, base_layer, distribution)
    outputs = tuple(lora_class.kernel_output_axes(base_layer))
    if tensor == LORA_A:
        contracted = [k for k in range(len(kernel_axes)) if k not in outputs]
        follows = list(zip(range(len(shape) - 1), contracted, strict=False))
    else:
        start = len(shape) - len(outputs)
        follows = [(start + j, k) for j, k in enumerate(outputs)]
    sizes = mesh_axis_sizes(distribution.device_mesh)
    axes = [None] * len(shape)
    for position, kernel_axis in follows:
        mesh_axis = kernel_axes[kernel_axis]
        if position < 0 or mesh_axis is None:
            continue
        if shape[position] % _mesh_size(mesh_axis, sizes) == 0:
            axes[position] = mesh_axis
    return tuple(axes)


def kernel_layout_axes(lora_class, base_layer, distribution):
    """The mesh axis (or None) of each axis of `base_layer`'s kernel, as
    `distribution` lays it out."""
    kernel = lora_class.kernel_of(base_layer)
    ndim = len(kernel.shape)
    layout = distribution.get_variable_layout(kernel)
    axes = getattr(layout, "axes", None)
    if axes is None:  # a backend layout, e.g. a jax NamedSharding
        spec = getattr(layout, "spec", None)
        axes = tuple(spec) if spec is not None else ()
    axes = tuple(axes)[:ndim]
    return axes + (None,) * (ndim - len(axes))


def explicit_layout(distribution, path, shape):
    """The layout the user's `LayoutMap` gives adapter variable `path`
    explicitly (an exact key, or one regex key mentioning `lora`), or
    None. Keys that do not mention `lora` are ignored."""
    layout_map = layout_map_of(distribution)
    if layout_map is None:
        return None
    keys = list(layout_map)
    if path in keys:
        found = path
    else:
        matches = [
            k for k in keys if ADAPTER_KEY_MARK in k and re.fullmatch(k, path)
        ]
        if len(matches) > 1:
            raise ValueError(
                f"Adapter variable '{path}' matches several LayoutMap keys "
                f"that mention '{ADAPTER_KEY_MARK}': {matches}. Keep one, "
                "or add the exact path as a key."
            )
        if not matches:
            return None
        found = matches[0]
    layout = layout_map[found]
    if len(layout.axes) != len(shape):
        raise ValueError(
            f"LayoutMap key {found!r} gives adapter variable '{path}' of "
            f"shape {shape} the layout {tuple(layout.axes)}, which has "
            f"{len(layout.axes)} axes instead of {len(shape)}. Fix the "
            "layout, or remove the key to let the adapter follow its "
            "kernel."
        )
    return layout


def mesh_axis_sizes(device_mesh):
    """`{mesh axis name: size}` of a `keras.distribution.DeviceMesh`."""
    return dict(zip(device_mesh.axis_names, device_mesh.shape, strict=True))


def variable_axes(variable):
    """The mesh axis (or None) of each axis of `variable`'s current value
    (JAX), or None for a value that is not laid out on a mesh."""
    spec = getattr(getattr(variable.value, "sharding", None), "spec", None)
    if spec is None:
        return None
    axes = tuple(spec)
    return axes + (None,) * (len(variable.shape) - len(axes))


def _mesh_size(mesh_axis, sizes):
    names = mesh_axis if isinstance(mesh_axis, (tuple, list)) else [mesh_axis]
    return math.prod(sizes[n] for n in names)


class _NextVariable:
    """The active distribution, except that it gives the next variable
    called `name` the layout `decide(variable)` returns.

    Keras asks the active distribution for a new variable's layout
    (`get_variable_layout`) while creating it, and `add_weight` takes no
    layout; making this proxy the active distribution for one
    `add_weight` call sets the layout through public API only. Everything
    else is the active distribution's.
    """

    def __init__(self, outer, name, decide):
        self._outer = outer
        self._name = name
        self._decide = decide
        self._pending = True

    def __getattr__(self, attribute):
        return getattr(self._outer, attribute)

    def get_variable_layout(self, variable):
        if self._pending and variable.name == self._name:
            self._pending = False
            return self._decide(variable)
        return self._outer.get_variable_layout(variable)

    @contextlib.contextmanager
    def scope(self):
        keras.distribution.set_distribution(self)
        try:
            yield
        finally:
            keras.distribution.set_distribution(self._outer)
