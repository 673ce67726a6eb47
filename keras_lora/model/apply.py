"""`apply_lora`: put LoRA layers into a whole model, in place."""

import difflib
import math
import re
import warnings

import keras

import keras_lora._keras_internals as internals
from keras_lora.layers import (
    LoraLayer,
    lora_class_for,
    refusal_for,
    supported_layer_types,
)
from keras_lora.layers.loftq import check_loftq_target, plan_loftq
from keras_lora.layers.spec import AdapterSpec, check_adapter_name
from keras_lora.model import surgery
from keras_lora.model.config import (
    DEFAULT_LAYERS_PATTERNS,
    LoraConfig,
    preset_category,
)
from keras_lora.model.matching import matches, path_matches
from keras_lora.model.records import applied_configs, record_config
from keras_lora.model.transaction import transaction

# MultiHeadAttention's query/value projections: the default targets.
_DEFAULT_ATTRIBUTES = ("_query_dense", "_value_dense")


def apply_lora(model, config=None, adapter_name="default"):
    """Adds LoRA adapter `adapter_name` to the layers `config` targets.

    In place: matching layers (`Dense`, `EinsumDense`, ...: every type
    with a registered LoRA class) are swapped for their LoRA class
    (`LoraDense`, `LoraEinsumDense`, ...) sharing their weights; layers that are
    already LoRA layers get a new named adapter. Everything else is frozen
    (except biases per `config.bias` and `config.modules_to_save`).
    Call `model.compile(...)` afterwards, as after any change of what trains.

    Args:
        model: any Keras model (Sequential, Functional, subclassed, keras-hub
            backbone or task), built or not (layers created in `build`, such
            as MultiHeadAttention's projections, need a built model).
        config: a `LoraConfig`; defaults to rank 8 on attention query/value.
        adapter_name: name of the new adapter.

    Returns:
        `model`.

    Example:

    >>> import keras, keras_lora as kl
    >>> inputs = keras.Input((4, 8))
    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> model = keras.Model(inputs, mha(inputs, inputs))
    >>> _ = kl.apply_lora(model, kl.LoraConfig(rank=2))
    >>> [w.name for w in model.trainable_weights][:2]
    ['lora_a_default', 'lora_b_default']
    """
    config = LoraConfig() if config is None else config
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"apply_lora: `config` must be a keras_lora.LoraConfig, got "
            f"{type(config).__name__}."
        )
    check_adapter_name(adapter_name, "apply_lora")
    config.validate()  # fields may have been changed after construction
    sites = list(surgery.walk(model))
    targets = find_targets(model, config, sites)
    for site in targets:
        _check_target(site, config, adapter_name)
    _warn_left_out(sites, targets)
    # LoftQ's quantized bases and adapters, computed before any change.
    loftq = _plan_loftq(targets, config) if config.init == "loftq" else {}
    with transaction(model) as txn:
        if config.init == "pissa":
            txn.protect(
                _lora_class(s.layer).kernel_of(_base(s.layer)) for s in targets
            )
        for site in targets:
            _adapt(txn, site, config, adapter_name, loftq.get(site.path))
        freeze_non_lora(model, config)
        record_config(model, adapter_name, config)
        surgery.reset_compiled_functions(model)
    return model


def _check_target(site, config, adapter_name):
    """Raises if `site` cannot take the adapter; changes nothing."""
    layer = site.layer
    if isinstance(layer, LoraLayer) and adapter_name in layer.adapters:
        raise ValueError(
            f"Layer '{site.path}' already has an adapter named "
            f"'{adapter_name}'. Choose another `adapter_name`, or "
            "`delete_adapter` first."
        )
    cls = _lora_class(layer)
    base = _base(layer)
    if not isinstance(layer, LoraLayer):
        cls.check_wrappable(base, require_built=False)
    if config.init == "loftq" and isinstance(layer, LoraLayer):
        raise ValueError(
            f"apply_lora: init='loftq' quantizes the float layers it "
            f"adapts, but layer '{site.path}' already holds adapters "
            f"{layer.adapters}. Apply LoftQ first, or to other layers."
        )
    if not base.built:
        if config.init in ("pissa", "loftq"):
            raise ValueError(
                f"apply_lora: layer '{site.path}' is not built, so "
                f"init={config.init!r} has no kernel to decompose. Build "
                "the model first (call it on data)."
            )
        return
    rank = config.rank_for(site.path)
    a_shape, b_shape = cls.adapter_shapes_for(base, rank)
    rows, cols = math.prod(a_shape[:-1]), math.prod(b_shape[1:])
    if config.init == "pissa":
        if rank > min(rows, cols):
            raise ValueError(
                f"apply_lora: init='pissa' needs rank <= {min(rows, cols)} "
                f"at layer '{site.path}' (its kernel is a {rows}x{cols} "
                f"matrix), got rank {rank}. Lower the rank there "
                "(rank_pattern) or exclude the layer."
            )
        cls.check_mergeable_kernel(base, site.path)
    elif config.init == "loftq":
        check_loftq_target(cls, base, rank, "apply_lora")
    elif rank > min(rows, cols):
        warnings.warn(
            f"apply_lora: rank {rank} at layer '{site.path}' exceeds the "
            f"rank a {rows}x{cols} kernel can have ({min(rows, cols)}); "
            "the extra rank adds parameters but no expressiveness.",
            stacklevel=3,
        )


def _warn_left_out(sites, targets):
    """Warnings the LoRA classes give about layers left unwrapped."""
    chosen = {id(s.layer) for s in targets}
    for site in sites:
        if id(site.layer) in chosen or isinstance(site.layer, LoraLayer):
            continue
        cls = lora_class_for(site.layer)
        message = cls.left_out_warning(site.layer) if cls else None
        if message:
            warnings.warn(f"apply_lora: {message}", stacklevel=3)


def _lora_class(layer):
    return (
        type(layer) if isinstance(layer, LoraLayer) else lora_class_for(layer)
    )


def _base(layer):
    return layer.base_layer if isinstance(layer, LoraLayer) else layer


def find_targets(model, config, sites=None):
    """The `Site`s that `config` targets in `model` (raises if none)."""
    sites = list(surgery.walk(model)) if sites is None else sites
    candidates = []
    for site in sites:
        if isinstance(site.layer, LoraLayer) or lora_class_for(site.layer):
            candidates.append(site)
        elif _names(site, config) and refusal_for(site.layer):
            raise ValueError(f"apply_lora: {refusal_for(site.layer)}")
    matched = [s for s in candidates if _is_target(s, config)]
    if config.exclude_modules is not None:
        matched = [
            s for s in matched if not matches(config.exclude_modules, s.path)
        ]
    if config.layers_to_transform is not None:
        matched = [
            s
            for s in matched
            if _block_index(s.path, config.layers_pattern)
            in config.layers_to_transform
        ]
    if not matched:
        raise ValueError(_no_match_message(model, config, sites))
    return matched


def _is_target(site, config):
    targets = config.target_modules
    if targets is None:
        return (
            isinstance(site.parent, keras.layers.MultiHeadAttention)
            and site.attribute in _DEFAULT_ATTRIBUTES
        )
    if _names(site, config):
        return True
    patterns = [targets] if isinstance(targets, str) else targets
    return any(_in_preset(site, preset_category(p)) for p in patterns)


def _names(site, config):
    """True if `config.target_modules` names `site` (a path pattern, not a
    preset)."""
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return preset_category(targets) is None and matches(targets, site.path)
    return any(
        preset_category(p) is None and path_matches(p, site.path)
        for p in targets
    )


def _in_preset(site, category):
    """True if `site` belongs to preset `all-<category>`: its LoRA class
    has that category and accepts it ("all-linear" leaves out the model's
    output layer, as PEFT's does)."""
    if category is None or _category(site.layer) != category:
        return False
    if category == "linear" and _is_output_layer(site):
        return False
    try:
        _lora_class(site.layer).check_factorable(_base(site.layer))
    except ValueError:
        return False  # e.g. a grouped convolution: skipped by presets
    return True


def _category(layer):
    return _lora_class(layer).category


def _is_output_layer(site):
    return site.in_graph and internals.is_model_output(site.parent, site.layer)


def _block_index(path, layers_pattern):
    patterns = [layers_pattern] if layers_pattern else DEFAULT_LAYERS_PATTERNS
    for component in path.split("/"):
        for pattern in patterns:
            match = re.fullmatch(rf"(?:{pattern})_?(\d+)", component)
            if match:
                return int(match.group(1))
    return None


def _no_match_message(model, config, sites):
    names = sorted({s.path for s in sites} | {s.layer.name for s in sites})
    wanted = config.target_modules
    if wanted is None:
        what = "the query/value projections of MultiHeadAttention layers"
        hint = (
            "The model has no built MultiHeadAttention layer (its "
            "projections are created when it is first called): build the "
            "model first, or set target_modules."
        )
        queries = ["query", "value"]
    else:
        what = f"target_modules={wanted!r}"
        hint = "Check the names against the model's layer paths."
        if any(preset_category(p) for p in _as_list(wanted)):
            hint = (
                "Presets select layers by kind ('all-linear' leaves out "
                "the model's output layer); name layers to add others."
            )
        queries = [wanted] if isinstance(wanted, str) else list(wanted)
    close = []
    for query in queries:
        close += difflib.get_close_matches(query, names, n=5, cutoff=0.3)
    close = list(dict.fromkeys(close))[:8] or names[:8]
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" (restricted to blocks {config.layers_to_transform})"
    return (
        f"apply_lora: no {'/'.join(supported_layer_types())} layer in model "
        f"'{model.name}' "
        f"matches {what}{extra}. {hint} Closest layer names: {close}."
    )


def _as_list(patterns):
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _plan_loftq(targets, config):
    """`{path: LoftqPlan}` for the targets (float layers, checked)."""
    plans = {}
    for site in targets:
        spec = AdapterSpec(
            rank=config.rank_for(site.path),
            alpha=config.alpha_for(site.path),
            use_rslora=config.use_rslora,
        )
        plans[site.path] = plan_loftq(
            lora_class_for(site.layer),
            site.layer,
            spec,
            config.loftq_mode,
            config.loftq_iterations,
        )
    return plans


def _adapt(txn, site, config, adapter_name, loftq=None):
    rank = config.rank_for(site.path)
    alpha = config.alpha_for(site.path)
    kwargs = dict(
        rank=rank,
        alpha=alpha,
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )
    if config.init == "gaussian":
        kwargs["a_initializer"] = keras.initializers.RandomNormal(
            stddev=1.0 / rank
        )
    # LoftQ: the layer's quantized copy replaces it.
    layer = site.layer if loftq is None else loftq.base
    if isinstance(layer, LoraLayer):
        layer.add_adapter(adapter_name, **kwargs)
        lora = layer
    else:
        lora = lora_class_for(layer).wrap(
            layer,
            adapter_name=adapter_name,
            bias_trainable=config.bias == "lora_only",
            **kwargs,
        )
        txn.replace(site, lora)
    if config.init == "pissa":
        lora.pissa_init(adapter_name)
    if loftq is not None:
        a_var, b_var = lora.lora_weights(adapter_name)
        a_var.assign(loftq.a)
        b_var.assign(loftq.b)


def freeze_non_lora(model, config):
    """Freezes every layer that is not LoRA or in `modules_to_save`."""
    # Modules saved by any adapter applied so far stay trainable.
    saved = list(config.modules_to_save or [])
    for earlier in applied_configs(model).values():
        saved += [m for m in earlier.modules_to_save or [] if m not in saved]
    for site in surgery.walk(model):
        layer = site.layer
        if isinstance(layer, LoraLayer):
            layer.trainable = True
            layer.apply_freeze()
            continue
        if saved and matches(saved, site.path):
            layer.trainable = True
            continue
        if _owns_variables(layer):
            layer.trainable = False
    if config.bias == "all":
        for site in surgery.walk(model):
            layer = site.layer
            bias = getattr(layer, "bias", None)
            if bias is None or isinstance(layer, LoraLayer):
                continue
            if not layer.trainable:
                layer.trainable = True
                for variable in layer.weights:
                    variable.trainable = variable is bias
        for layer in lora_layers(model):
            layer.bias_trainable = True
            layer.apply_freeze()


def _owns_variables(layer):
    children = set()
    for site in surgery.children(layer):
        children.update(id(w) for w in site.layer.weights)
    return any(id(w) not in children for w in layer.weights)


def lora_layers(model):
    """All LoRA layers in `model`, in walk order."""
    return [
        s.layer for s in surgery.walk(model) if isinstance(s.layer, LoraLayer)
    ]
