"""Layer paths of adapter files: finding a saved layer in a model.

`SiteIndex` indexes a model's layers by their `surgery.walk` path (and
matches paths saved from another copy of the model); the helpers here
select the layers and variables an adapter saves (`modules_to_save`,
biases). What a layer type is (its kind, kernel and adapter shapes) is
asked of its LoRA class (`lora_class_of`). Shared by `adapter_files`,
`loading` and `model_files`.
"""

import difflib
import re

import keras

from keras_lora.layers import LoraLayer, lora_class_for
from keras_lora.model.matching import matches


def lora_class_of(layer):
    """The LoRA class that owns `layer` (a LoRA layer or a base layer), or
    None if no registered class wraps its type."""
    if isinstance(layer, LoraLayer):
        return type(layer)
    return lora_class_for(layer)


def nested_models(model, sites):
    """`{path: class name}` of `model` (path `""`) and the models in it
    (a keras-hub `CausalLM`'s backbone), so adapter files can move between
    a model and the models it contains."""
    models = {"": type(model).__name__}
    for site in sites:
        if isinstance(site.layer, keras.Model):
            models[site.path] = type(site.layer).__name__
    return models


def base_of(layer):
    """The base layer of a LoRA layer, or `layer` itself."""
    return layer.base_layer if isinstance(layer, LoraLayer) else layer


class SiteIndex:
    """Sites of a model by path, with the variables each layer owns."""

    def __init__(self, sites):
        self.sites = sites
        self.by_path = {}
        self.children = {}
        self.child_names = {}
        for site in sites:
            self.by_path.setdefault(site.path, []).append(site)
            self.children.setdefault(id(site.parent), []).append(site.layer)
            parent, _, name = site.path.rpartition("/")
            self.child_names.setdefault(parent, []).append(name)

    def map_paths(self, paths, where):
        """`{saved path: model path}` for paths saved from another copy.

        A path that exists is its own match. Otherwise each component must
        exist, or differ from exactly one sibling only by Keras's automatic
        numbering (`gpt2_backbone` in the saved model, `gpt2_backbone_1` in
        a second copy built in the same process); the renaming must be
        one-to-one. Anything else raises, naming the path.
        """
        renames = {}
        result = {}
        for path in paths:
            parts = path.split("/")
            prefix = ""
            for i, part in enumerate(parts):
                saved = "/".join(parts[: i + 1])
                if saved in renames:
                    prefix = renames[saved]
                    continue
                names = self.child_names.get(prefix, [])
                if part not in names:
                    stem = _unnumbered(part)
                    found = [n for n in names if _unnumbered(n) == stem]
                    if len(found) != 1:
                        self.site(path, where)  # raises, with close matches
                    part = found[0]
                prefix = f"{prefix}/{part}" if prefix else part
                renames[saved] = prefix
            result[path] = prefix
        targets = {}
        for saved, actual in renames.items():
            if targets.setdefault(actual, saved) != saved:
                raise ValueError(
                    f"{where}: saved layers '{targets[actual]}' and "
                    f"'{saved}' would both map to '{actual}' in this model. "
                    "Build the model with the same layer names as the one "
                    "the adapter was saved from."
                )
        return result

    def site(self, path, where):
        found = self.by_path.get(path)
        if not found:
            close = difflib.get_close_matches(path, self.by_path, n=5)
            raise ValueError(
                f"{where}: the model has no layer at path '{path}'. "
                f"Closest paths: {close or sorted(self.by_path)[:5]}. Layer "
                "paths are built from layer names: load into the same base "
                "model, with the same layer names."
            )
        if len(found) > 1:
            raise ValueError(
                f"{where}: {len(found)} layers share the path '{path}', so "
                "it cannot identify one. Give them distinct names."
            )
        return found[0]

    def own_variables(self, site):
        """`{name: variable}` a layer holds itself (not via sublayers).

        For a LoRA layer: its base layer's variables (kernel, bias), not
        the adapters'.
        """
        layer = site.layer
        if isinstance(layer, LoraLayer):
            layer = layer.base_layer
            children = []
        else:
            children = self.children.get(id(layer), [])
        taken = {id(w) for child in children for w in child.weights}
        owned = {}
        for variable in layer.weights:
            if id(variable) in taken:
                continue
            if variable.name in owned:
                raise ValueError(
                    f"Layer '{site.path}' holds two variables named "
                    f"'{variable.name}' ('{owned[variable.name].path}', "
                    f"'{variable.path}'), so keys '{site.path}/"
                    f"{variable.name}' would clash."
                )
            owned[variable.name] = variable
        return owned

    def module_variables(self, site):
        """`{key: (layer_path, variable)}` of a whole module, sublayers too.

        LoRA layers inside the module are skipped: their adapters are saved
        as adapters, their base kernels stay frozen.
        """
        if isinstance(site.layer, LoraLayer):
            return {}
        result = {}
        prefix = site.path + "/"
        for sub in [site] + [
            s for s in self.sites if s.path.startswith(prefix)
        ]:
            if isinstance(sub.layer, LoraLayer):
                continue
            for name, variable in self.own_variables(sub).items():
                result[f"{sub.path}/{name}"] = (sub.path, variable)
        return result


def _unnumbered(name):
    """`name` without Keras's automatic `_<n>` suffix."""
    return re.sub(r"_\d+$", "", name)


def modules_to_save_sites(index, patterns):
    """Sites matched by `modules_to_save` patterns (outermost only)."""
    if not patterns:
        return []
    matched = [
        s
        for s in index.sites
        if not isinstance(s.layer, LoraLayer) and matches(patterns, s.path)
    ]
    outer = []
    for site in matched:
        if not any(site.path.startswith(o.path + "/") for o in outer):
            outer.append(site)
    return outer


def bias_variables(index, bias, layer_sites):
    if bias == "none":
        return {}
    sites = layer_sites if bias == "lora_only" else index.sites
    result = {}
    for site in sites:
        layer = site.layer
        target = layer.base_layer if isinstance(layer, LoraLayer) else layer
        try:
            variable = getattr(target, "bias", None)
        except Exception:  # noqa: BLE001 - a property may raise; no bias
            continue
        if not isinstance(variable, keras.Variable):
            continue
        result[f"{site.path}/{variable.name}"] = (site.path, variable)
    return result


def check_unique_paths(sites, where):
    seen = {}
    for site in sites:
        if site.path in seen and seen[site.path] is not site.layer:
            raise ValueError(
                f"{where}: two layers share the path '{site.path}', so "
                "adapter keys would not be unique. Give the layers distinct "
                "names."
            )
        seen[site.path] = site.layer
