"""Which LoRA class wraps which Keras layer type: the one dispatch point.

A LoRA layer class declares the Keras layer types it wraps (`wraps`) and
registers itself with `@register_lora_layer`. `lora_class_for(layer)` picks
the class whose declared type is closest to the layer's own class in its
method resolution order, so a LoRA class registered for a subclass of
`Dense` wins over `LoraDense` for that subclass. Nothing else in
keras_lora names a Keras layer type.
"""

_CLASSES = []


def register_lora_layer(cls):
    """Class decorator: makes `cls` the LoRA class for `cls.wraps`."""
    wraps = tuple(getattr(cls, "wraps", ()) or ())
    if not wraps or not all(isinstance(t, type) for t in wraps):
        raise TypeError(
            f"register_lora_layer: {cls.__name__}.wraps must be a non-empty "
            "tuple of Keras layer classes."
        )
    if cls not in _CLASSES:
        _CLASSES.append(cls)
    return cls


def unregister_lora_layer(cls):
    """Removes `cls` from the registry (no error if it is not there)."""
    if cls in _CLASSES:
        _CLASSES.remove(cls)


def lora_class_for(layer):
    """The registered LoRA class for `layer`'s type, or None if none fits.

    LoRA layers themselves are not wrapped again: for them this returns
    None (add adapters to them instead).
    """
    best, best_distance = None, None
    mro = type(layer).__mro__
    if isinstance(layer, tuple(_CLASSES)):
        return None
    for cls in _CLASSES:
        for base_type in cls.wraps:
            if base_type in mro:
                distance = mro.index(base_type)
                # Later registrations win ties, so users can override.
                if best_distance is None or distance <= best_distance:
                    best, best_distance = cls, distance
    return best


def refusal_for(layer):
    """Why keras_lora cannot adapt `layer`'s type, where a registered class
    says so (its `refuses`: `{Keras layer type: reason}`), or None."""
    for cls in _CLASSES:
        for base_type, reason in getattr(cls, "refuses", {}).items():
            if isinstance(layer, base_type):
                return (
                    f"layer '{layer.name}' is a {type(layer).__name__}, "
                    f"which keras_lora cannot adapt: {reason}."
                )
    return None


def lora_class_named(name):
    """The registered LoRA class called `name` (as adapter files record)."""
    for cls in _CLASSES:
        if cls.__name__ == name:
            return cls
    return None


def registered_classes():
    """The registered LoRA classes, in registration order."""
    return list(_CLASSES)


def supported_layer_types(category=None):
    """Names of the Keras layer types LoRA can wrap (optionally of one
    `category`, e.g. `"linear"`)."""
    names = []
    for cls in _CLASSES:
        if category is None or cls.category == category:
            names += [t.__name__ for t in cls.wraps]
    return list(dict.fromkeys(names))
