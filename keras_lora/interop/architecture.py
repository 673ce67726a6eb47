"""Which Hugging Face module each keras-hub layer corresponds to.

An `Architecture` is plain data: for one keras-hub model family, the HF
linear modules of a transformer block and the keras-hub layers each one
covers. A plain module (Llama's `q_proj`) covers one layer; a fused one
(GPT-2's `c_attn`, whose output is query | key | value) covers several, in
the order their outputs are concatenated. `resolve` finds those layers in
a model and returns a `Layout`: one `Slot` per HF module.

Kernels are compared as matrices: a keras kernel viewed as
`[contracted axes] x [output axes]` (flattened row-major, in kernel axis
order) is the transpose of the HF weight `(out_features, in_features)`
(Conv1D stores `(in, out)`, but PEFT's lora_A/lora_B are `nn.Linear` in
both cases). keras-hub's HF converters reshape weights exactly this way.
"""

import dataclasses
import math

from keras_lora import surgery
from keras_lora.adapter_paths import SiteIndex, expected_shapes


@dataclasses.dataclass(frozen=True)
class HfModule:
    """An HF linear module of a block and the keras-hub layers it covers.

    Attributes:
        name: the module's path inside a block, e.g. `"attn.c_attn"`.
        parts: keras-hub layer paths inside a block, in the order their
            outputs are concatenated in the HF module's output.
    """

    name: str
    parts: tuple


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How a keras-hub model family maps onto its Hugging Face modules.

    Attributes:
        name: a readable name, e.g. `"GPT-2"`.
        backbone_class, causal_lm_class: `keras_hub.models` class names.
        hf_backbone, hf_causal_lm: `(class, module)` of the matching
            transformers classes.
        hf_causal_lm_prefix: where the blocks sit in the HF causal LM
            (`"transformer."` for GPT-2); the bare HF model has none.
        keras_block: the keras-hub block path, `"transformer_layer_{}"`.
        hf_block: the HF block path, `"h.{}"`.
        layers_pattern: PEFT's `layers_pattern` for these blocks.
        fan_in_fan_out: PEFT's flag (True for GPT-2's Conv1D weights).
        modules: the `HfModule`s of a block.
    """

    name: str
    backbone_class: str
    causal_lm_class: str
    hf_backbone: tuple
    hf_causal_lm: tuple
    hf_causal_lm_prefix: str
    keras_block: str
    hf_block: str
    layers_pattern: str
    fan_in_fan_out: bool
    modules: tuple


@dataclasses.dataclass
class Slot:
    """One HF module of one block, resolved in a model.

    `sites[i]` is the keras-hub layer of `hf.parts[i]`, whose flattened
    output has `out_dims[i]` units; all parts read the same `in_dim` inputs.
    """

    module: str  # e.g. "h.0.attn.c_attn", relative to the bare HF model
    block: int
    hf: HfModule
    sites: list
    in_dim: int
    out_dims: list


@dataclasses.dataclass
class Layout:
    """Where every mappable HF module of a model sits."""

    architecture: Architecture
    kind: str  # "backbone" or "causal_lm"
    num_blocks: int
    slots: dict  # module name -> Slot
    sites: list  # every Site of the model (surgery.walk)

    def slot_of(self, path):
        """The `(slot, part index)` holding layer `path`, or None."""
        for slot in self.slots.values():
            for i, site in enumerate(slot.sites):
                if site.path == path:
                    return slot, i
        return None

    def keras_paths(self):
        return [s.path for slot in self.slots.values() for s in slot.sites]


def supported():
    from keras_lora.interop import gpt2, llama

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
    num_blocks = int(backbone.num_layers)
    for block in range(num_blocks):
        keras_block = prefix + arch.keras_block.format(block)
        for hf in arch.modules:
            part_sites = [
                index.site(f"{keras_block}/{part}", where) for part in hf.parts
            ]
            in_dims, out_dims = [], []
            for site in part_sites:
                a_shape, b_shape = expected_shapes(site.layer, 1)
                in_dims.append(math.prod(a_shape[:-1]))
                out_dims.append(math.prod(b_shape[1:]))
            module = f"{arch.hf_block.format(block)}.{hf.name}"
            if len(set(in_dims)) != 1:
                raise ValueError(
                    f"{where}: the layers of HF module '{module}' "
                    f"({[s.path for s in part_sites]}) read inputs of "
                    f"different sizes {in_dims}; they cannot be fused."
                )
            slots[module] = Slot(
                module, block, hf, part_sites, in_dims[0], out_dims
            )
    return Layout(arch, kind, num_blocks, slots, sites)


def hf_prefix(layout, task_type):
    """The module-name prefix of the HF model PEFT wraps for `task_type`."""
    if task_type is None:
        return ""
    return layout.architecture.hf_causal_lm_prefix
