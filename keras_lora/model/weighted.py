"""`add_weighted_adapter`: a new adapter from a weighted mix of others.

PEFT's `add_weighted_adapter` semantics on keras_lora's `A @ B` convention
(A: `(contracted axes..., r)`, B: `(r, output axes...)`, delta
`s * A @ B` with `s = alpha / r`):

- `"cat"`: the ranks are stacked, so the new delta is *exactly*
  `sum_i w_i * s_i * A_i @ B_i`.
- `"linear"`: `A = sum_i sign(w_i) sqrt(|w_i| s_i) A_i`,
  `B = sum_i sqrt(|w_i| s_i) B_i` (equal ranks only). This is PEFT's
  linear mix; it is exact for one adapter, an approximation in general
  (it adds the cross terms `A_i @ B_j`).
- `"svd"`: the best rank-`r` approximation of the exact weighted delta.

DoRA adapters (`keras_lora.layers.dora`) rescale the kernel per output
unit: adapter `i` computes with `f_i * (W + s_i A_i B_i)`, `f_i = m_i /
||W + s_i A_i B_i||` (`f_i = 1` for plain LoRA). The weighted sum of their
changes, `W + sum_i w_i (f_i (W + s_i A_i B_i) - W)`, is
`g * (W + sum_i (w_i s_i f_i / g) A_i B_i)` with `g = 1 + sum_i w_i (f_i
- 1)`: a DoRA adapter whose B rows are scaled by `f_i / g` per output unit
and whose magnitude makes its factor `g`. So `"cat"` is exact for any mix
of LoRA and DoRA adapters (the result is a DoRA adapter), `"svd"` truncates
that low-rank part, and `"linear"` (whose cross terms have no such form) is
refused for DoRA adapters.
"""

import dataclasses
import math
import numbers
import re

import numpy as np
from keras import ops

from keras_lora.layers import AdapterSpec, LoraLayer
from keras_lora.layers.spec import check_adapter_name
from keras_lora.model import surgery
from keras_lora.model.config import LoraConfig
from keras_lora.model.records import applied_config, record_config
from keras_lora.model.transaction import transaction

COMBINATIONS = ("cat", "linear", "svd")
_WHAT = "add_weighted_adapter"


@dataclasses.dataclass
class _Plan:
    """What one layer gets: the new adapter's rank, dropout and factors."""

    path: str
    layer: LoraLayer
    rank: int
    dropout: float
    a: np.ndarray = None
    b: np.ndarray = None
    factor: np.ndarray = None  # DoRA's `g` per output unit, or None


def add_weighted_adapter(
    model, adapters, weights, adapter_name, combination="cat", rank=None
):
    """Adds adapter `adapter_name`, a weighted combination of `adapters`.

    Every LoRA layer that holds all of `adapters` gets the new adapter
    (layers holding none of them are left alone). It is created with
    `alpha = rank` (scale 1, no rsLoRA), the dropout of `adapters[0]` on
    that layer, and is *not* activated: call
    `keras_lora.set_adapter(model, adapter_name)` to use it.

    With `delta_i = s_i * A_i @ B_i` (what `layer.delta_weight(name)`
    returns) the new adapter's delta is:

    - `"cat"` (default): exactly `sum_i w_i * delta_i`. A is the
      concatenation of `w_i * s_i * A_i` along A's last (rank) axis and B
      that of the `B_i` along B's first axis; the new rank is the sum of
      the ranks.
    - `"linear"`: PEFT's linear mix, `A = sum_i sign(w_i) c_i A_i` and
      `B = sum_i c_i B_i` with `c_i = sqrt(|w_i| * s_i)`. Needs adapters
      of equal rank, which the new one keeps. Exact for one adapter (or
      adapters in disjoint rank slots); in general it also adds the cross
      terms `c_i c_j sign(w_i) A_i @ B_j` (i != j), even when the adapters
      share A, so prefer `"cat"` or `"svd"` for an exact mix.
    - `"svd"`: the weighted delta `sum_i w_i * delta_i`, viewed as a
      `(contracted, outputs)` matrix, is factored by a truncated SVD
      `U_r S_r V_r^T`; `A = U_r S_r`, `B = V_r^T`, reshaped to the adapter
      shapes. `rank` defaults to the largest rank of `adapters` on each
      layer; with `rank >=` the sum of their ranks the result is exact,
      otherwise it is the best rank-`rank` approximation. Each delta is
      computed in float32 (as `delta_weight`), then summed and decomposed
      in float64 with numpy on the host; A and B are stored as float32.

    Everything is validated before any layer changes, so a `ValueError`
    leaves the model as it was.

    Args:
        model: a Keras model with LoRA layers (`apply_lora`).
        adapters: list of adapter names to combine.
        weights: one real number per adapter (may be negative).
        adapter_name: name of the new adapter; must not exist yet.
        combination: `"cat"`, `"linear"` or `"svd"`.
        rank: target rank for `"svd"` only; `None` for the default.

    Returns:
        `model`, changed in place.

    Example:

    >>> kl.add_weighted_adapter(model, ["fr", "de"], [0.7, 0.3], "mix")
    ... # doctest: +SKIP
    >>> kl.set_adapter(model, "mix")  # doctest: +SKIP
    """
    adapters, weights = _check_arguments(
        adapters, weights, adapter_name, combination, rank
    )
    plans = _plan_layers(model, adapters, adapter_name, combination, rank)
    for plan in plans:
        _compute_factors(plan, adapters, weights, combination)
    with transaction(model):
        for plan in plans:
            layer = plan.layer
            layer.add_adapter(
                adapter_name,
                rank=plan.rank,
                alpha=plan.rank,
                dropout=plan.dropout,
                use_dora=plan.factor is not None,
            )
            a_var, b_var = layer.lora_weights(adapter_name)
            a_var.assign(plan.a.astype("float32").reshape(a_var.shape))
            b_var.assign(plan.b.astype("float32").reshape(b_var.shape))
            if plan.factor is not None:
                adapter = layer.adapter(adapter_name)
                adapter.variant.set_factor(layer, adapter, plan.factor)
        _record_config(model, adapters, adapter_name, plans)
        surgery.reset_compiled_functions(model)
    return model


# -- validation ----------------------------------------------------------------


def _check_arguments(adapters, weights, adapter_name, combination, rank):
    if isinstance(adapters, str):
        raise ValueError(
            f"{_WHAT}: `adapters` must be a list of adapter names, got the "
            f"string {adapters!r}. Pass e.g. [{adapters!r}]."
        )
    try:
        adapters = list(adapters)
    except TypeError:
        raise ValueError(
            f"{_WHAT}: `adapters` must be a list of adapter names, got "
            f"{adapters!r}."
        ) from None
    if not adapters:
        raise ValueError(f"{_WHAT}: `adapters` is empty; name at least one.")
    bad = [a for a in adapters if not isinstance(a, str)]
    if bad:
        raise ValueError(
            f"{_WHAT}: adapter names must be strings, got {bad[0]!r}."
        )
    if isinstance(weights, (str, bytes)) or isinstance(weights, numbers.Real):
        raise ValueError(
            f"{_WHAT}: `weights` must be a list with one number per adapter, "
            f"got {weights!r}."
        )
    try:
        weights = list(weights)
    except TypeError:
        raise ValueError(
            f"{_WHAT}: `weights` must be a list with one number per adapter, "
            f"got {weights!r}."
        ) from None
    if len(weights) != len(adapters):
        raise ValueError(
            f"{_WHAT}: got {len(weights)} weights for {len(adapters)} "
            f"adapters {adapters}; give exactly one weight per adapter."
        )
    for i, weight in enumerate(weights):
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
        ):
            raise ValueError(
                f"{_WHAT}: weights[{i}] (for adapter {adapters[i]!r}) must "
                f"be a finite real number, got {weight!r}."
            )
    weights = [float(w) for w in weights]
    if combination not in COMBINATIONS:
        raise ValueError(
            f"{_WHAT}: unknown combination {combination!r}. Use one of "
            f"{COMBINATIONS}."
        )
    if rank is not None:
        if combination != "svd":
            raise ValueError(
                f"{_WHAT}: `rank` applies to combination='svd' only (the "
                f"rank of '{combination}' follows from the adapters); got "
                f"rank={rank!r}. Leave it as None."
            )
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(
                f"{_WHAT}: `rank` must be a positive integer, got {rank!r}."
            )
        if rank <= 0:
            raise ValueError(
                f"{_WHAT}: `rank` must be a positive integer, got {rank!r}."
            )
    check_adapter_name(adapter_name, _WHAT, "adapter_name")
    return adapters, weights


def _plan_layers(model, adapters, adapter_name, combination, rank):
    sites = [s for s in surgery.walk(model) if isinstance(s.layer, LoraLayer)]
    if not sites:
        raise ValueError(
            f"{_WHAT}: model '{model.name}' has no LoRA layers. Call "
            "keras_lora.apply_lora(model, config) first."
        )
    known = {n for s in sites for n in s.layer.adapters}
    for name in adapters:
        if name not in known:
            raise ValueError(
                f"{_WHAT}: model '{model.name}' has no adapter {name!r}. "
                f"Its adapters are: {_ordered(sites)}."
            )
    existing = [s.path for s in sites if adapter_name in s.layer.adapters]
    if existing:
        raise ValueError(
            f"{_WHAT}: model '{model.name}' already has an adapter named "
            f"{adapter_name!r} (in {existing}). Pick another `adapter_name`"
            ", or `delete_adapter` it first."
        )
    full, partial = [], []
    for site in sites:
        held = [n for n in adapters if n in site.layer.adapters]
        if len(held) == len(adapters):
            full.append(site)
        elif held:
            missing = [n for n in adapters if n not in held]
            partial.append(f"'{site.path}' lacks {missing}")
    if not full:
        where = {
            n: [s.path for s in sites if n in s.layer.adapters]
            for n in adapters
        }
        raise ValueError(
            f"{_WHAT}: no LoRA layer of model '{model.name}' holds all of "
            f"the adapters {adapters}, so there is nothing to combine. "
            f"Layers per adapter: {where}."
        )
    if partial:
        raise ValueError(
            f"{_WHAT}: adapters {adapters} of model '{model.name}' do not "
            f"target the same layers: {'; '.join(partial)}. Combine "
            "adapters that were applied to the same layers."
        )
    plans = []
    for site in full:
        layer = site.layer
        if not layer.built:
            raise ValueError(
                f"{_WHAT}: layer '{site.path}' of model '{model.name}' is "
                "not built yet, so its adapters have no weights. Build the "
                "model (call it on data) first."
            )
        for name in adapters:
            variant = layer.adapter(name).variant
            if not variant.combinable:
                raise ValueError(
                    f"{_WHAT}: adapter {name!r} at layer '{site.path}' is a "
                    f"{variant.name!r} adapter, which cannot be combined "
                    "linearly (its effect is not a sum of low-rank "
                    "products). Combine plain LoRA adapters only."
                )
            if variant.rescales_outputs and combination == "linear":
                raise ValueError(
                    f"{_WHAT}: adapter {name!r} at layer '{site.path}' is a "
                    f"{variant.name!r} adapter, which also rescales the "
                    "kernel per output unit; combination='linear' mixes "
                    "A and B across adapters (cross terms A_i @ B_j) and "
                    "has no such rescaled form. Use combination='cat' "
                    "(exact) or 'svd'."
                )
        ranks = {n: layer.adapter_spec(n).rank for n in adapters}
        if combination == "cat":
            new_rank = sum(ranks[n] for n in adapters)
        elif combination == "linear":
            if len(set(ranks.values())) != 1:
                raise ValueError(
                    f"{_WHAT}: combination='linear' needs adapters of equal "
                    f"rank, but layer '{site.path}' has ranks {ranks}. Use "
                    "combination='cat' (exact) or 'svd' instead."
                )
            new_rank = ranks[adapters[0]]
        else:
            new_rank = max(ranks.values()) if rank is None else int(rank)
            rows, cols = _matrix_dims(layer, adapters[0])
            if new_rank > min(rows, cols):
                given = "" if rank is not None else " (the default, max rank)"
                raise ValueError(
                    f"{_WHAT}: svd rank {new_rank}{given} is too large for "
                    f"layer '{site.path}', whose delta is a {rows}x{cols} "
                    f"matrix of rank at most {min(rows, cols)}. Pass "
                    f"rank <= {min(rows, cols)}."
                )
        dropout = layer.adapter_spec(adapters[0]).dropout
        AdapterSpec(
            adapter_name, rank=new_rank, alpha=new_rank, dropout=dropout
        ).validate(site.path)
        plans.append(_Plan(site.path, layer, new_rank, dropout))
    return plans


def _ordered(sites):
    names = {}
    for site in sites:
        names.update(dict.fromkeys(site.layer.adapters))
    return list(names)


def _matrix_dims(layer, name):
    a, b = layer.lora_weights(name)
    rows = int(np.prod(tuple(a.shape)[:-1]))
    cols = int(np.prod(tuple(b.shape)[1:]))
    return rows, cols


# -- the math ------------------------------------------------------------------


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _compute_factors(plan, adapters, weights, combination):
    factors = _rescalings(plan, adapters, weights)
    if factors is not None:
        _compute_rescaled(plan, adapters, weights, combination, factors)
        return
    layer = plan.layer
    if combination == "svd":
        delta = None
        for name, weight in zip(adapters, weights, strict=True):
            kernel = ops.convert_to_numpy(layer.delta_weight(name))
            term = weight * _numpy(layer.kernel_matrix(kernel))
            delta = term if delta is None else delta + term
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        r = plan.rank
        plan.a = u[:, :r] * s[:r]  # (contracted, r)
        plan.b = vt[:r]  # (r, outputs)
        return
    a_terms, b_terms = [], []
    for name, weight in zip(adapters, weights, strict=True):
        a_var, b_var = layer.lora_weights(name)
        a, b = _numpy(a_var), _numpy(b_var)
        scale = layer.adapter_spec(name).scale
        if combination == "cat":
            a_terms.append(weight * scale * a)
            b_terms.append(b)
        else:
            root = math.sqrt(abs(weight) * scale)
            a_terms.append(math.copysign(root, weight) * a)
            b_terms.append(root * b)
    if combination == "cat":
        plan.a = np.concatenate(a_terms, axis=-1)  # A's rank axis is last
        plan.b = np.concatenate(b_terms, axis=0)  # B's rank axis is first
    else:
        plan.a = np.sum(a_terms, axis=0)
        plan.b = np.sum(b_terms, axis=0)


def _rescalings(plan, adapters, weights):
    """`[f_i / g]` per adapter (per-output-unit numpy arrays), with `g` in
    `plan.factor`, when any adapter rescales the kernel (DoRA); else None."""
    layer = plan.layer
    factors = []
    for name in adapters:
        adapter = layer.adapter(name)
        values = {
            t: ops.convert_to_numpy(v) for t, v in adapter.variables.items()
        }
        factor = adapter.variant.routed_factor(
            layer, values, adapter.spec.scale
        )
        factors.append(None if factor is None else _numpy(factor))
    if all(f is None for f in factors):
        return None
    units = next(f for f in factors if f is not None)
    factors = [np.ones_like(units) if f is None else f for f in factors]
    g = 1.0 + sum(w * (f - 1.0) for w, f in zip(weights, factors, strict=True))
    if np.abs(g).min() <= 1e-6 * max(np.abs(g).max(), 1.0):
        raise ValueError(
            f"{_WHAT}: at layer '{plan.path}' the weights {weights} cancel "
            "the base kernel of some output units (1 + sum_i w_i (f_i - 1) "
            "is 0 there, f_i the DoRA factors), which no adapter can "
            "express. Use other weights."
        )
    plan.factor = g.astype("float32")
    return [f / g for f in factors]


def _compute_rescaled(plan, adapters, weights, combination, factors):
    """`"cat"`/`"svd"` of adapters that rescale the kernel (see the module
    docstring): B's output units scaled by `f_i / g`."""
    layer = plan.layer
    a_terms, b_terms = [], []
    for name, weight, factor in zip(adapters, weights, factors, strict=True):
        a_var, b_var = layer.lora_weights(name)
        a, b = _numpy(a_var), _numpy(b_var)
        scale = layer.adapter_spec(name).scale
        a_terms.append((weight * scale * a).reshape(-1, a.shape[-1]))
        b_terms.append((b * factor).reshape(b.shape[0], -1))
    a = np.concatenate(a_terms, axis=-1)  # (contracted, sum of ranks)
    b = np.concatenate(b_terms, axis=0)  # (sum of ranks, outputs)
    if combination == "cat":
        plan.a, plan.b = a, b
        return
    u, s, vt = np.linalg.svd(a @ b, full_matrices=False)
    plan.a = u[:, : plan.rank] * s[: plan.rank]
    plan.b = vt[: plan.rank]


# -- bookkeeping ---------------------------------------------------------------


def _record_config(model, adapters, adapter_name, plans):
    """Records a `LoraConfig` that recreates the new adapter's shapes.

    It targets exactly the combined layers, with their ranks (alpha = rank),
    and keeps `adapters[0]`'s other settings (bias, modules_to_save), as
    PEFT does, so `applied_configs(model)[adapter_name]` (and an adapter
    file saved from it) describes the new adapter.
    """
    base = applied_config(model, adapters[0]) or LoraConfig()
    first = plans[0].rank
    pattern = {re.escape(p.path): p.rank for p in plans if p.rank != first}
    try:
        config = dataclasses.replace(
            base,
            rank=first,
            alpha=first,
            dropout=plans[0].dropout,
            target_modules=[re.escape(p.path) for p in plans],
            exclude_modules=None,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            layers_to_transform=None,
            layers_pattern=None,
            use_rslora=False,
            use_dora=any(p.factor is not None for p in plans),
            init="default",
        )
    except ValueError:  # pragma: no cover - unusual layer names
        return
    record_config(model, adapter_name, config)
