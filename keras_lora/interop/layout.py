"""Finding an architecture's HF modules in a keras-hub model.

`supported()` lists the architectures (one module each: `gpt2.py`,
`llama.py`); `detect` tells which one a model is and `resolve` finds, for
every HF module of every block, the keras-hub layers it covers (a
`Layout` of `Slot`s, see `architecture.py`).
"""

import math

from keras_lora.files.paths import SiteIndex, base_of, lora_class_of
from keras_lora.interop import gpt2, llama
from keras_lora.interop.architecture import Layout, Slot
from keras_lora.model import surgery


def supported():
    """The architectures PEFT interop knows, one module each."""
    return (gpt2.ARCHITECTURE, llama.ARCHITECTURE)


def detect(model, where):
    """`(architecture, kind, backbone)` of a keras-hub model, or raises."""
    names = ", ".join(
        f"{a.backbone_class}/{a.causal_lm_class}" for a in supported()
    )
    try:
        import keras_hub
    except ImportError:
        raise ValueError(
            f"{where}: PEFT interop works on keras-hub models ({names}), "
            "but keras-hub is not installed. Install it: "
            "pip install keras-hub."
        ) from None
    for arch in supported():
        causal_lm = getattr(keras_hub.models, arch.causal_lm_class)
        backbone = getattr(keras_hub.models, arch.backbone_class)
        if isinstance(model, causal_lm):
            return arch, "causal_lm", model.backbone
        if isinstance(model, backbone):
            return arch, "backbone", model
    raise ValueError(
        f"{where}: model '{getattr(model, 'name', model)}' is a "
        f"{type(model).__name__}, which has no PEFT module mapping. "
        f"Supported: keras-hub {names} (and their subclasses, e.g. "
        "Llama3Backbone). For other models use keras_lora.save_adapter / "
        "load_adapter, which need no mapping."
    )


def resolve(model, where):
    """The `Layout` of a supported keras-hub model (see `detect`)."""
    arch, kind, backbone = detect(model, where)
    sites = list(surgery.walk(model))
    prefix = ""
    if backbone is not model:
        found = [s for s in sites if s.layer is backbone]
        if len(found) != 1:
            raise ValueError(
                f"{where}: cannot find the backbone of '{model.name}' among "
                "its layers."
            )
        prefix = found[0].path + "/"
    index = SiteIndex(sites)
    slots = {}
    for hf in arch.embeddings:
        slots[hf.name] = _slot(index, hf.name, None, hf, prefix, where)
    num_blocks = int(backbone.num_layers)
    for block in range(num_blocks):
        keras_block = prefix + arch.keras_block.format(block) + "/"
        for hf in arch.modules:
            module = f"{arch.hf_block.format(block)}.{hf.name}"
            slots[module] = _slot(index, module, block, hf, keras_block, where)
    return Layout(arch, kind, num_blocks, slots, sites)


def _slot(index, module, block, hf, prefix, where):
    """The `Slot` of HF module `module`, its parts under `prefix`."""
    part_sites = [index.site(prefix + part, where) for part in hf.parts]
    in_dims, out_dims = [], []
    for site in part_sites:
        cls = lora_class_of(site.layer)
        if cls is None:
            raise ValueError(
                f"{where}: layer '{site.path}' is a "
                f"{type(site.layer).__name__}, which keras_lora cannot adapt."
            )
        a_shape, b_shape = cls.adapter_shapes_for(base_of(site.layer), 1)
        in_dims.append(math.prod(a_shape[:-1]))
        out_dims.append(math.prod(b_shape[1:]))
    if len(set(in_dims)) != 1:
        raise ValueError(
            f"{where}: the layers of HF module '{module}' "
            f"({[s.path for s in part_sites]}) read inputs of different "
            f"sizes {in_dims}; they cannot be fused."
        )
    return Slot(module, block, hf, part_sites, in_dims[0], out_dims)


def tied_logits(slot):
    """True if the slot's layer is a token embedding tied to the logits."""
    site = slot.sites[0]
    cls = lora_class_of(site.layer)
    return bool(cls.describe(base_of(site.layer)).get("tied_logits"))


def hf_prefix(layout, task_type):
    """The module-name prefix of the HF model PEFT wraps for `task_type`."""
    if task_type is None:
        return ""
    return layout.architecture.hf_causal_lm_prefix
