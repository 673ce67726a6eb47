"""`export_peft`: a keras_lora adapter as a PEFT adapter directory.

Every keras-hub layer's adapter becomes the adapter of the HF module that
computes the same thing (see `architecture.py` for the correspondence),
exactly (outputs agree to float32 rounding):

- Transposes and reshapes: keras `A (contracted..., r)` is PEFT's
  `lora_A.weight (r, in)` transposed, and keras `B (r, outputs...)` is
  `lora_B.weight (out, r)` transposed, axes flattened row-major.
- Fused modules (GPT-2's `c_attn` = query | key | value): the parts' A
  blocks are stacked (rank `r_q + r_k + r_v`; parts with identical A, as
  after `import_peft`, share one block) and B is block-structured, zero
  where a part has no adapter. If the parts' scales differ, B absorbs
  `s_part / s_module`, since PEFT has one scale per module.
- Per-module ranks and alphas go to `rank_pattern`/`alpha_pattern` (exact
  module paths); rsLoRA is kept when every layer uses it, otherwise the
  alphas carry the scale.
- Token embeddings (`wte`, `embed_tokens`) are written as PEFT embedding
  adapters (`lora_embedding_A (r, vocabulary)`, `lora_embedding_B (width,
  r)`, the same transposes). A tied embedding (GPT-2's) adapts the logits
  too in keras_lora, as in PEFT's *merged* model; PEFT's unmerged forward
  applies an embedding adapter to the input lookup only (its LM head is a
  separate module sharing the weight), so export warns about it.
- DoRA adapters (`use_dora=True`): each module's `lora_magnitude_vector`
  is its parts' magnitudes, concatenated like B's rows. A part of a fused
  module without the adapter gets its base kernel's norms, so PEFT's
  factor there is 1 and those rows keep their base output.
"""

import collections
import math
import os
import re
import warnings

import keras
import numpy as np

from keras_lora.files.paths import base_of, lora_class_of
from keras_lora.interop import peft_format
from keras_lora.interop.layout import hf_prefix, resolve, tied_logits
from keras_lora.layers.base import LoraLayer
from keras_lora.layers.dora import MAGNITUDE
from keras_lora.model.records import applied_config, check_portable
from keras_lora.version import VERSION

_AUTO = "auto"


def export_peft(
    model,
    directory,
    adapter_name="default",
    base_model_name_or_path=None,
    task_type=_AUTO,
):
    """Writes adapter `adapter_name` of a keras-hub model as a PEFT adapter.

    The directory (`adapter_config.json` + `adapter_model.safetensors`)
    loads with `peft.PeftModel.from_pretrained(hf_model, directory)` on the
    Hugging Face model with the same weights, and gives the same outputs.
    The write is atomic.

    Args:
        model: a keras-hub `GPT2Backbone`, `GPT2CausalLM`, `LlamaBackbone`
            or `LlamaCausalLM` (subclasses too) holding the adapter.
        directory: where to write.
        adapter_name: the keras_lora adapter to export.
        base_model_name_or_path: recorded in the config (the HF model id or
            directory PEFT should load the base model from).
        task_type: PEFT's task type. `"auto"`: `"CAUSAL_LM"` for a causal
            LM (keys for `GPT2LMHeadModel`/`LlamaForCausalLM`), `None` for
            a backbone (keys for `GPT2Model`/`LlamaModel`).

    Returns:
        The directory's absolute path.

    Raises:
        ValueError: the model is not a supported architecture, has no such
            adapter, or the adapter has what PEFT cannot hold here: a layer
            with no HF counterpart, trained biases, `modules_to_save`, or a
            PiSSA initialisation.

    Example:

    >>> kl.apply_lora(gpt2_lm, kl.LoraConfig(rank=4))    # doctest: +SKIP
    >>> kl.export_peft(gpt2_lm, "peft_adapter")          # doctest: +SKIP
    >>> PeftModel.from_pretrained(hf_gpt2, "peft_adapter")  # doctest: +SKIP
    """
    where = "export_peft"
    layout = resolve(model, where)
    if task_type == _AUTO:
        task_type = "CAUSAL_LM" if layout.kind == "causal_lm" else None
    if task_type not in (None, "CAUSAL_LM"):
        raise ValueError(
            f"{where}: task_type must be 'auto', 'CAUSAL_LM' or None, got "
            f"{task_type!r}."
        )
    adapted = _adapted_layers(model, layout, adapter_name, where)
    use_rslora = all(spec.use_rslora for _, spec in adapted.values())
    use_dora = _variant(adapted, adapter_name, where) == "dora"
    modules = {}
    for name, slot in layout.slots.items():
        parts = [adapted.get(site.path) for site in slot.sites]
        if any(parts):
            _check_embedding(slot, use_dora, where)
            modules[name] = _fuse(slot, parts, use_rslora, use_dora)
    dropouts = sorted({spec.dropout for _, spec in adapted.values()})
    if len(dropouts) > 1:
        warnings.warn(
            f"{where}: the layers of adapter {adapter_name!r} use dropouts "
            f"{dropouts}; PEFT has one lora_dropout, set to {dropouts[-1]} "
            "(outputs are unaffected; training would differ).",
            stacklevel=2,
        )
    config = _peft_config(layout, modules, use_rslora, dropouts[-1], task_type)
    config["base_model_name_or_path"] = base_model_name_or_path
    config["use_dora"] = use_dora
    prefix = peft_format.KEY_PREFIX + hf_prefix(layout, task_type)
    tensors = {}
    for name, (a, b, _, _, magnitude) in modules.items():
        key_a, key_b = peft_format.TENSOR_KEYS[layout.slots[name].hf.kind]
        tensors[f"{prefix}{name}.{key_a}"] = a
        tensors[f"{prefix}{name}.{key_b}"] = b
        if use_dora:
            suffix = peft_format.MAGNITUDE_SUFFIX
            tensors[f"{prefix}{name}.{suffix}"] = magnitude
    metadata = {
        "format": "pt",
        "exported_by": f"keras_lora {VERSION}",
        "keras_lora_adapter_name": adapter_name,
    }
    directory = os.path.abspath(os.fspath(directory))
    return peft_format.write(directory, config, tensors, metadata)


def _adapted_layers(model, layout, adapter_name, where):
    """`{path: (layer, spec)}` of the adapter; raises if PEFT can't hold it."""
    holders = [
        s
        for s in layout.sites
        if isinstance(s.layer, LoraLayer) and adapter_name in s.layer.adapters
    ]
    if not holders:
        raise ValueError(
            f"{where}: model '{model.name}' has no adapter named "
            f"{adapter_name!r}. Apply one with keras_lora.apply_lora(model, "
            "config, adapter_name=...)."
        )
    mappable = set(layout.keras_paths())
    arch = layout.architecture
    for site in holders:
        if site.path not in mappable:
            raise ValueError(
                f"{where}: layer '{site.path}' holds adapter "
                f"{adapter_name!r} but has no counterpart in Hugging Face "
                f"{arch.name} (PEFT can adapt {[m.name for m in arch.modules]}"
                f" in each block and {[m.name for m in arch.embeddings]}). "
                "Fix: apply the adapter without that layer "
                "(LoraConfig(exclude_modules=[...])), or delete it there."
            )
    check_portable(
        model,
        adapter_name,
        where,
        "export a merged model instead (keras_lora.save_merged_model)",
    )
    config = applied_config(model, adapter_name)
    if config is not None and config.modules_to_save:
        raise ValueError(
            f"{where}: adapter {adapter_name!r} saves whole modules "
            f"(modules_to_save={config.modules_to_save}), which export_peft "
            "does not map to HF modules. Fix: train without "
            "modules_to_save, or save them with keras_lora.save_adapter."
        )
    trained_bias = [s.path for s in holders if s.layer.bias_trainable]
    if (config is not None and config.bias != "none") or trained_bias:
        raise ValueError(
            f"{where}: adapter {adapter_name!r} trains biases "
            f"({trained_bias or 'bias=' + repr(config.bias)}); export_peft "
            "writes bias='none' adapters only. Fix: train with "
            "LoraConfig(bias='none'), or save with keras_lora.save_adapter."
        )
    result = {}
    for site in holders:
        result[site.path] = (site.layer, site.layer.adapter_spec(adapter_name))
    return result


def _check_embedding(slot, use_dora, where):
    """Refuses what PEFT's embedding adapters cannot hold; warns that a
    tied embedding's adapter reaches PEFT's logits only once merged."""
    if slot.hf.kind != "embedding":
        return
    if use_dora:
        raise ValueError(
            f"{where}: DoRA on the embedding '{slot.sites[0].path}' is not "
            "exported (its PEFT layout is not verified here). Fix: apply "
            "DoRA without the embedding, or save with keras_lora.save_adapter."
        )
    if tied_logits(slot):
        warnings.warn(
            f"{where}: the adapter on '{slot.sites[0].path}' also changes "
            "the tied logits, which PEFT's merged model reproduces "
            f"(merge_and_unload); PEFT's unmerged forward applies an "
            f"adapter on '{slot.hf.name}' to the input embeddings only.",
            stacklevel=3,
        )


def _variant(adapted, adapter_name, where):
    """The one variant of the adapter's layers (`"lora"` or `"dora"`)."""
    variants = sorted({spec.variant for _, spec in adapted.values()})
    if len(variants) > 1 or variants[0] not in ("lora", "dora"):
        raise ValueError(
            f"{where}: adapter {adapter_name!r} is a {variants} adapter; "
            "PEFT holds one of plain LoRA or DoRA per adapter. Fix: export "
            "the layers of each variant as their own adapter, or save with "
            "keras_lora.save_adapter."
        )
    return variants[0]


def _fuse(slot, parts, use_rslora, use_dora):
    """`(A, B, rank, alpha, magnitude)` in PEFT layout for one HF module
    (`magnitude` None unless `use_dora`).

    `parts[i]` is `(layer, spec)` for an adapted part, else None.
    """
    scales = [spec.scale for _, spec in filter(None, parts)]
    common = scales[0] if len(set(scales)) == 1 else 1.0
    blocks = []  # distinct A blocks, (in, r) each
    columns = []  # per part: the (start, stop) of its A block, or None
    bs = []
    for part in parts:
        if part is None:
            columns.append(None)
            bs.append(None)
            continue
        layer, spec = part
        a_var, b_var = layer.lora_weights(spec.name)
        a = _numpy(a_var).reshape(-1, spec.rank)  # (in, r)
        b = _numpy(b_var).reshape(spec.rank, -1)  # (r, out)
        start = 0
        for block in blocks:
            if block.shape == a.shape and np.array_equal(block, a):
                break
            start += block.shape[1]
        else:
            blocks.append(a)
        columns.append((start, start + spec.rank))
        bs.append(b * np.float32(spec.scale / common))
    rank = sum(block.shape[1] for block in blocks)
    lora_a = np.concatenate([block.T for block in blocks], axis=0)
    lora_b = np.zeros((sum(slot.out_dims), rank), "float32")
    row = 0
    for out, cols, b in zip(slot.out_dims, columns, bs, strict=True):
        if b is not None:
            lora_b[row : row + out, cols[0] : cols[1]] += b.T
        row += out
    specs = [spec for _, spec in filter(None, parts)]
    spec = specs[0]
    same = {(s.rank, s.alpha, s.use_rslora) for s in specs} == {
        (spec.rank, spec.alpha, use_rslora)
    }
    if same and rank == spec.rank:
        # One adapter (or copies sharing A): keep its own alpha.
        alpha = spec.alpha
    else:
        alpha = common * (math.sqrt(rank) if use_rslora else rank)
    magnitude = None
    if use_dora:
        magnitude = np.concatenate(
            [
                _magnitude(site, part)
                for site, part in zip(slot.sites, parts, strict=True)
            ]
        )
    return lora_a, lora_b, rank, _tidy(alpha), magnitude


def _magnitude(site, part):
    """A part's DoRA magnitude, flat; the base kernel's norms per output
    unit (a factor of 1) for a part without the adapter."""
    if part is not None:
        layer, spec = part
        return _numpy(layer.adapter_variables(spec.name)[MAGNITUDE]).ravel()
    cls, base = lora_class_of(site.layer), base_of(site.layer)
    kernel = _numpy(cls.kernel_of(base)).astype("float64")
    outputs = cls.kernel_output_axes(base)
    axes = tuple(i for i in range(kernel.ndim) if i not in outputs)
    return np.sqrt(np.sum(kernel**2, axis=axes)).astype("float32").ravel()


def _peft_config(layout, modules, use_rslora, dropout, task_type):
    arch = layout.architecture
    ranks = collections.Counter(m[2] for m in modules.values())
    alphas = collections.Counter(m[3] for m in modules.values())
    r = ranks.most_common(1)[0][0]
    lora_alpha = alphas.most_common(1)[0][0]
    blocks = collections.defaultdict(set)
    for name in modules:
        slot = layout.slots[name]
        blocks[slot.hf.name].add(slot.block)
    block_sets = {frozenset(b) for b in blocks.values()}
    layers_to_transform = layers_pattern = None
    # PEFT's compact form names modules inside blocks; a module outside
    # them (the token embedding) needs the explicit form.
    if len(block_sets) == 1 and None not in next(iter(block_sets)):
        # The same modules in every adapted block: PEFT's compact form.
        target_modules = sorted(blocks)
        chosen = sorted(next(iter(block_sets)))
        if len(chosen) != layout.num_blocks:
            layers_to_transform = chosen
            layers_pattern = arch.layers_pattern
    else:
        target_modules = sorted(modules)
    auto_mapping = None
    if task_type is None:
        cls, library = arch.hf_backbone
        auto_mapping = {"base_model_class": cls, "parent_library": library}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": auto_mapping,
        "revision": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
        "rank_pattern": {
            re.escape(name): m[2] for name, m in modules.items() if m[2] != r
        },
        "alpha_pattern": {
            re.escape(name): m[3]
            for name, m in modules.items()
            if m[3] != lora_alpha
        },
        "fan_in_fan_out": arch.fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype="float32")


def _tidy(alpha):
    """An integral float as an int, so JSON reads like PEFT's own."""
    if isinstance(alpha, float) and alpha.is_integer():
        return int(alpha)
    return alpha
