"""Which Hugging Face module each keras-hub layer corresponds to.

An `Architecture` is plain data: for one keras-hub model family, the HF
linear modules of a transformer block and the keras-hub layers each one
covers. A plain module (Llama's `q_proj`) covers one layer; a fused one
(GPT-2's `c_attn`, whose output is query | key | value) covers several, in
the order their outputs are concatenated. `layout.resolve` finds those
layers in a model and returns a `Layout`: one `Slot` per HF module.

Kernels are compared as matrices: a keras kernel viewed as
`[contracted axes] x [output axes]` (flattened row-major, in kernel axis
order) is the transpose of the HF weight `(out_features, in_features)`
(Conv1D stores `(in, out)`, but PEFT's lora_A/lora_B are `nn.Linear` in
both cases). keras-hub's HF converters reshape weights exactly this way.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class HfModule:
    """An HF linear module of a block and the keras-hub layers it covers.

    Attributes:
        name: the module's path inside a block, e.g. `"attn.c_attn"` (or
            in the model, for `Architecture.embeddings`: `"wte"`).
        parts: keras-hub layer paths inside a block (or the backbone), in
            the order their outputs are concatenated in the HF module's
            output.
        kind: `"linear"` (PEFT keys `lora_A.weight`/`lora_B.weight`) or
            `"embedding"` (`lora_embedding_A`/`lora_embedding_B`; the same
            transposed layout: A `(r, vocabulary)`, B `(width, r)`).
    """

    name: str
    parts: tuple
    kind: str = "linear"


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
        embeddings: `HfModule`s outside the blocks (the token embedding),
            their parts relative to the backbone.
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
    embeddings: tuple = ()


@dataclasses.dataclass
class Slot:
    """One HF module of one block, resolved in a model.

    `sites[i]` is the keras-hub layer of `hf.parts[i]`, whose flattened
    output has `out_dims[i]` units; all parts read the same `in_dim` inputs.
    """

    module: str  # e.g. "h.0.attn.c_attn", relative to the bare HF model
    block: int  # None outside the blocks (the token embedding)
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
