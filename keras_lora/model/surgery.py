"""Model surgery: finding layers by path and swapping them in place.

A layer's *path* is the `/`-joined names from the model down to it, e.g.
`transformer_layer_0/self_attention/query` in a keras-hub GPT-2 backbone.
Paths are what configs match and what adapter files are keyed by; they do
not depend on layer order.
"""

import dataclasses

import keras

import keras_lora._keras_internals as internals
from keras_lora.layers.base import LoraLayer


@dataclasses.dataclass
class Site:
    """Where a layer sits: its path, its parent and how to replace it."""

    path: str
    layer: keras.layers.Layer
    parent: object
    attribute: str = None  # parent.<attribute> holds it (or a list of it)
    index: int = None  # position inside that list, if any
    in_graph: bool = False  # an operation of the Functional `parent`
    # Other graphs that call the same layer (keras-hub's causal LMs call
    # the backbone's token embedding again for the tied logits); `replace`
    # swaps the layer there too. Filled in by `walk` as it finds them.
    aliases: list = dataclasses.field(default_factory=list)


def walk(model):
    """Yields a `Site` for every layer under `model` (not `model` itself).

    Descends into Sequential and Functional models (their layers), layers
    held as attributes or in lists (MultiHeadAttention's projections,
    keras-hub blocks), and nested models. LoRA layers are yielded but not
    descended into.
    """
    seen = {id(model): None}
    yield from _walk(model, "", seen)


def _walk(parent, prefix, seen):
    for site in children(parent, prefix):
        if id(site.layer) in seen:
            first = seen[id(site.layer)]
            if first is not None and site.in_graph:
                if all(a.parent is not site.parent for a in first.aliases):
                    if site.parent is not first.parent:
                        first.aliases.append(site)
            continue
        seen[id(site.layer)] = site
        yield site
        if not isinstance(site.layer, LoraLayer):
            yield from _walk(site.layer, site.path + "/", seen)


def children(parent, prefix=""):
    """Yields a `Site` for each direct sublayer of `parent`."""
    if isinstance(parent, keras.Sequential):
        for layer in parent.layers:
            yield Site(prefix + layer.name, layer, parent, in_graph=True)
    elif internals.is_functional(parent):
        for layer in parent.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            yield Site(prefix + layer.name, layer, parent, in_graph=True)
    for attribute, value in internals.attribute_items(parent):
        if isinstance(value, keras.layers.Layer):
            yield Site(prefix + value.name, value, parent, attribute)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    yield Site(
                        prefix + item.name, item, parent, attribute, index
                    )


def replace(site, new_layer):
    """Puts `new_layer` where `site.layer` is, in place."""
    old = site.layer
    # `Model.quantize` leaves the model's tracker locked (Keras locks every
    # layer it visits, models included), so swaps run with it unlocked.
    for where in [site] + site.aliases:
        with internals.unlocked_tracker(where.parent):
            _replace(where, old, new_layer)
        where.layer = new_layer


def _replace(site, old, new_layer):
    if site.in_graph:
        if isinstance(site.parent, keras.Sequential):
            _replace_in_sequential(site.parent, old, new_layer)
        else:
            internals.replace_in_functional(site.parent, old, new_layer)
        # A graph model may also keep the layer as an attribute.
        for attribute, value in list(internals.attribute_items(site.parent)):
            if value is old:
                internals.set_sublayer(site.parent, attribute, new_layer)
            elif isinstance(value, list) and any(v is old for v in value):
                internals.replace_in_list(site.parent, value, old, new_layer)
    elif site.index is None:
        internals.set_sublayer(site.parent, site.attribute, new_layer)
    else:
        container = getattr(site.parent, site.attribute)
        if isinstance(container, tuple):
            raise TypeError(
                f"Cannot replace '{site.path}': it is held in a tuple "
                f"attribute '{site.attribute}'. Use a list."
            )
        internals.replace_in_list(site.parent, container, old, new_layer)


def _replace_in_sequential(model, old, new_layer):
    # Sequential is mutable by design: pop down to the layer, swap, re-add.
    tail = []
    while model.layers and model.layers[-1] is not old:
        tail.append(model.pop(rebuild=False))
    model.pop(rebuild=False)
    model.add(new_layer, rebuild=False)
    for layer in reversed(tail):
        model.add(layer, rebuild=False)
    internals.rebuild_sequential(model)


def replace_sublayer(parent, attribute, new_layer):
    """Replaces the sublayer `parent.<attribute>` with `new_layer`.

    Works on built layers (Keras locks their state after `build`), e.g.:

    >>> import keras, keras_lora as kl
    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> _ = mha(keras.ops.ones((1, 3, 8)), keras.ops.ones((1, 3, 8)))
    >>> q = kl.LoraEinsumDense.from_layer(mha._query_dense)
    >>> _ = kl.replace_sublayer(mha, "_query_dense", q)
    """
    if not hasattr(parent, attribute):
        raise AttributeError(
            f"Layer '{getattr(parent, 'name', parent)}' has no attribute "
            f"'{attribute}' to replace."
        )
    internals.set_sublayer(parent, attribute, new_layer)
    return new_layer


def reset_compiled_functions(model):
    """Drops a model's cached predict/train/test/generate functions.

    They capture Python-side layer state (merged, enabled, active adapters)
    when traced, so they must be rebuilt after surgery. `generate_function`
    is keras-hub's compiled `CausalLM.generate`.
    """
    names = ("train_function", "test_function", "predict_function")
    for name in names + ("generate_function",):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
