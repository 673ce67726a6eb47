"""`import_peft`: a PEFT LoRA adapter into a keras-hub model.

The PEFT tensors are rearranged into keras_lora's own adapter layout (one
A/B pair per keras-hub layer; a fused module's A is copied to each part
and its B split by output rows), then checked and loaded by the same code
as `keras_lora.load_adapter`, so a failed import changes nothing. A DoRA
adapter (`use_dora=True`) brings one magnitude per output feature, split
by output rows like B: DoRA's norm is per output unit, so each part of a
fused module computes exactly its rows of the fused module's output.
"""

import os
import warnings

import numpy as np
from keras import ops

from keras_lora.files.loading import (
    adapter_names_in,
    execute_load_plan,
    plan_load,
)
from keras_lora.files.paths import base_of, lora_class_of
from keras_lora.interop import peft_format
from keras_lora.interop.layout import resolve, tied_logits
from keras_lora.layers.dora import MAGNITUDE, output_units_shape
from keras_lora.layers.spec import check_adapter_name


def import_peft(model, directory, adapter_name="default", is_trainable=True):
    """Loads a PEFT LoRA adapter into a keras-hub model, in place.

    The adapter must have been trained on the Hugging Face model whose
    weights the keras-hub model holds (same architecture and sizes). Each
    PEFT module's adapter goes to the keras-hub layers computing the same
    thing; a fused module (GPT-2's `c_attn`) gives query, key and value
    each a LoRA adapter of the module's rank with a copy of its A and their
    rows of its B. Outputs then match PEFT's to float32 rounding.

    Everything is checked before the model changes: a failed import leaves
    it as it was. Like `load_adapter`, the new adapter becomes active only
    in a model that had no adapters (`keras_lora.set_adapter` otherwise).

    Args:
        model: a keras-hub `GPT2Backbone`, `GPT2CausalLM`, `LlamaBackbone`
            or `LlamaCausalLM` (subclasses too).
        directory: a PEFT adapter directory (`PeftModel.save_pretrained`).
        adapter_name: the keras_lora adapter name to load it under.
        is_trainable: if False, the adapter's variables are frozen.

    Returns:
        `model`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the model is not a supported architecture; the adapter
            is neither plain LoRA nor DoRA (other PEFT variants, trained
            biases, `modules_to_save`, pickled weights); a module has no
            keras-hub counterpart; shapes do not fit the model; the name
            is taken.
    """
    where = f"import_peft('{directory}')"
    check_adapter_name(adapter_name, where)
    layout = resolve(model, where)
    if adapter_name in adapter_names_in(model):
        raise ValueError(
            f"{where}: model '{model.name}' already has an adapter named "
            f"{adapter_name!r}. Pass another name, e.g. import_peft(model, "
            f"directory, adapter_name='{adapter_name}_2'), or delete it "
            "first (keras_lora.delete_adapter)."
        )
    directory = os.path.abspath(os.fspath(directory))
    config, tensors = peft_format.read(directory, where)
    use_dora = bool(config.get("use_dora", False))
    tensors, base_weights = peft_format.split_base_weights(tensors)
    modules = peft_format.group_by_module(tensors, use_dora, where)
    kinds = peft_format.kind_of_module(tensors)
    for full_name, weight in base_weights.items():
        _check_saved_base(_slot_for(layout, full_name, where), weight, where)
    layers, kl_tensors = {}, {}
    for full_name, (a, b, magnitude) in modules.items():
        slot = _slot_for(layout, full_name, where)
        _check_kind(slot, full_name, kinds[full_name], use_dora, where)
        for path, spec, parts in _split(
            slot, full_name, a, b, magnitude, config, where
        ):
            layers[path] = spec
            for tensor, value in parts.items():
                kl_tensors[f"{path}.{tensor}"] = value
    meta = {
        "layers": layers,
        "modules_to_save": [],
        "weights": {},
        "base_model": {},
        "config": {"bias": "none"},
    }
    # The checks and the all-or-nothing load of keras_lora's own adapter
    # files apply unchanged once the tensors are in keras_lora's layout.
    plan = plan_load(model, meta, kl_tensors, adapter_name, directory)
    execute_load_plan(model, plan, adapter_name, is_trainable)
    return model


def _check_kind(slot, full_name, kind, use_dora, where):
    """The file's tensor names must fit the module (embedding or linear)."""
    if kind != slot.hf.kind:
        raise ValueError(
            f"{where}: module '{full_name}' holds {kind} LoRA tensors, but "
            f"it is a {slot.hf.kind} module in this model. The files are "
            "inconsistent."
        )
    if kind != "embedding":
        return
    if use_dora:
        raise ValueError(
            f"{where}: DoRA on the embedding '{full_name}' is not imported "
            "(its PEFT layout is not verified here). Fix: merge it in PEFT "
            "and convert the merged model."
        )
    if tied_logits(slot):
        warnings.warn(
            f"{where}: '{full_name}' is tied to the logits; keras_lora "
            "applies its adapter to both (as PEFT's merged model does), "
            "while PEFT's unmerged forward applies it to the input "
            "embeddings only.",
            stacklevel=3,
        )


def _check_saved_base(slot, weight, where):
    """A saved embedding weight must be the model's own (an adapter file
    changes only adapters): PEFT saves it in case the vocabulary was
    resized or trained."""
    site = slot.sites[0]
    cls, base = lora_class_of(site.layer), base_of(site.layer)
    table = np.asarray(ops.convert_to_numpy(cls.kernel_of(base)))
    if table.dtype.kind != "f":
        return  # a quantized base: nothing comparable
    if table.shape != weight.shape or not np.allclose(
        table, weight, rtol=1e-4, atol=1e-5
    ):
        raise ValueError(
            f"{where}: the adapter saves the whole weight of "
            f"'{slot.module}' ({tuple(weight.shape)}), and it differs from "
            f"this model's '{site.path}' {tuple(table.shape)}: the "
            "vocabulary was resized or trained. Fix: merge the adapter in "
            "PEFT (merge_and_unload) and convert the merged model."
        )


def _slot_for(layout, full_name, where):
    arch = layout.architecture
    prefixes = ("", arch.hf_causal_lm_prefix)
    for prefix in prefixes:
        if prefix and not full_name.startswith(prefix):
            continue
        slot = layout.slots.get(full_name[len(prefix) :])
        if slot is not None:
            return slot
    raise ValueError(
        f"{where}: the adapter adapts HF module '{full_name}', which has no "
        f"keras-hub counterpart in this {arch.name} model (keras_lora maps "
        f"{[m.name for m in arch.modules]} of blocks 0-"
        f"{layout.num_blocks - 1} and {[m.name for m in arch.embeddings]}). "
        "Fix: train the PEFT adapter without "
        "that module in target_modules, or merge it in PEFT and convert "
        "the merged model."
    )


def _split(slot, full_name, a, b, magnitude, config, where):
    """Yields `(path, spec, {tensor: value})` per keras layer of one PEFT
    module."""
    rank = a.shape[0] if a.ndim == 2 else None
    out = sum(slot.out_dims)
    if (
        rank is None
        or a.shape != (rank, slot.in_dim)
        or b.shape != (out, rank)
        or (magnitude is not None and magnitude.shape != (out,))
    ):
        got = f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}"
        want = f"(r, {slot.in_dim}) and ({out}, r)"
        if magnitude is not None:
            got += f" and {peft_format.MAGNITUDE_SUFFIX} {magnitude.shape}"
            want += f" and ({out},)"
        raise ValueError(
            f"{where}: module '{full_name}' has {got}, but this model "
            f"expects {want}. The adapter belongs to a different base model "
            "(other sizes)."
        )
    want = peft_format.pattern_value(
        config.get("rank_pattern"), full_name, config["r"]
    )
    if want != rank:
        raise ValueError(
            f"{where}: module '{full_name}' has rank {rank} in the weights, "
            f"but {want} by the config (r / rank_pattern). The files are "
            "inconsistent."
        )
    alpha = peft_format.pattern_value(
        config.get("alpha_pattern"), full_name, config["lora_alpha"]
    )
    row = 0
    for site, width in zip(slot.sites, slot.out_dims, strict=True):
        cls, base = lora_class_of(site.layer), base_of(site.layer)
        a_shape, b_shape = cls.adapter_shapes_for(base, rank)
        parts = {
            "lora_a": a.T.reshape(a_shape),
            "lora_b": b[row : row + width].T.reshape(b_shape),
        }
        if magnitude is not None:
            units = output_units_shape(cls, base)
            parts[MAGNITUDE] = magnitude[row : row + width].reshape(units)
        row += width
        parts = {k: np.ascontiguousarray(v) for k, v in parts.items()}
        spec = {
            **cls.describe(base),
            "variant": "lora" if magnitude is None else "dora",
            "rank": int(rank),
            "alpha": alpha,
            "dropout": config.get("lora_dropout", 0.0),
            "use_rslora": bool(config.get("use_rslora", False)),
            "tensors": {k: list(v.shape) for k, v in parts.items()},
        }
        yield site.path, spec, parts
