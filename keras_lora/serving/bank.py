"""`AdapterBank`: many LoRA adapters for one model, routed per example.

Adapters are registered by name, from `save_adapter` directories or from a
LoRA model in memory, and kept on the host as numpy arrays (thousands fit).
The model gets a fixed number of device *slots* per adapted layer (see
`keras_lora.serving.routing`); `activate(names)` puts the adapters a batch needs
into slots, evicting the least recently used ones, by variable assignment:
nothing recompiles. `routing(names)` also routes batch row `i` to
`names[i]` (`None`: the base model) for the calls inside it.

The first adapter that targets a layer wraps that layer (as `apply_lora`
would, without adapters of its own) and gives it slots: a change of the
model's structure, after which compiled functions are rebuilt once. Later
adapters on the same layers change nothing but slot contents.

LoRA and DoRA adapters mix freely in one batch. A DoRA adapter's
per-output-unit factor `m / ||W + s A B||` depends only on the frozen
kernel, so it is computed when the adapter enters a slot; the first DoRA
adapter registered for a layer switches on that layer's rescaling (once,
like giving it slots).
"""

import collections
import contextlib
import dataclasses
import os
import re

import numpy as np

from keras_lora.files.adapter_files import collect_adapter, read_adapter
from keras_lora.files.loading import check_meta, check_tensors, plan_load
from keras_lora.files.paths import SiteIndex
from keras_lora.layers import AdapterSpec, LoraLayer
from keras_lora.layers.variants import get_variant
from keras_lora.model import surgery
from keras_lora.serving import routing
from keras_lora.serving.errors import UnknownAdapterError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_BANK_ATTRIBUTE = "_keras_lora_bank"
# `plan_load` refuses names the model's own LoRA layers use; bank names
# live apart from those, so it checks under a name nothing uses.
_PLAN_NAME = "__keras_lora_bank__"


@dataclasses.dataclass
class HostLayer:
    """One adapted layer of a registered adapter: its tensors (numpy
    float32, by name), scale and variant."""

    layer: LoraLayer
    values: dict
    scale: float
    variant: object

    def slot_contents(self):
        """`(A, B, scale, factor)` to write into a slot (now, since
        DoRA's factor reads the layer's current kernel)."""
        factor = self.variant.routed_factor(self.layer, self.values, self.scale)
        a, b = self.values["lora_a"], self.values["lora_b"]
        return a, b, self.scale, factor


@dataclasses.dataclass
class HostAdapter:
    """One registered adapter, held on the host."""

    name: str
    rank: int
    alpha: float
    source: str
    layers: list  # HostLayer per adapted layer

    def info(self, resident):
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "source": self.source,
            "resident": resident,
        }


class AdapterBank:
    """Registered adapters of `model`, device slots and per-row routing.

    Args:
        model: a built Keras model (a keras-hub `CausalLM` or backbone, or
            any model `apply_lora` handles). It may already hold LoRA
            layers; routed adapters add to what they compute.
        slots: adapters resident on the device at once (per layer).
        max_rank: the largest adapter rank the slots hold; adapters of
            lower rank are zero-padded (exact).
        max_batch: the largest routed batch.

    Example:

    >>> bank = AdapterBank(causal_lm, slots=4)        # doctest: +SKIP
    >>> bank.register("french", "adapters/french")    # doctest: +SKIP
    >>> with bank.routing(["french", None]):          # doctest: +SKIP
    ...     logits = causal_lm(batch_of_two)
    """

    def __init__(self, model, slots=8, max_rank=16, max_batch=32):
        if getattr(model, _BANK_ATTRIBUTE, None) is not None:
            raise ValueError(
                f"Model '{model.name}' already has an AdapterBank; use "
                "AdapterBank.of(model), or close() the old one first."
            )
        for value, what in (
            (slots, "slots"),
            (max_rank, "max_rank"),
            (max_batch, "max_batch"),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(
                    f"AdapterBank: `{what}` must be a positive integer, got "
                    f"{value!r}."
                )
            if value < 1:
                raise ValueError(
                    f"AdapterBank: `{what}` must be >= 1, got {value}."
                )
        self.model = model
        self.slots = slots
        self.max_rank = max_rank
        self.router = routing.Router(max_batch)
        self._adapters = {}
        self._resident = collections.OrderedDict()  # name -> slot, LRU first
        self._free = list(range(slots - 1, -1, -1))
        self._layers = []  # routed LoRA layers, in attach order
        self.slot_writes = 0  # adapters written into slots, ever
        self.structure_version = 0  # bumped when layers get slots
        object.__setattr__(model, _BANK_ATTRIBUTE, self)

    @classmethod
    def of(cls, model):
        """The bank attached to `model`, or None."""
        return getattr(model, _BANK_ATTRIBUTE, None)

    @property
    def max_batch(self):
        return self.router.max_batch

    # -- registry -------------------------------------------------------------

    def register(self, name, source, adapter_name=None):
        """Registers adapter `name`; returns its info dict.

        Args:
            name: the name requests use (letters, digits, `_.-`).
            source: a directory written by `keras_lora.save_adapter`, or a
                model holding LoRA adapters (in memory), or the
                `(config, tensors)` pair of `keras_lora.read_adapter`.
            adapter_name: with a model as `source`, which of its adapters
                (default: `"default"`).

        Raises:
            ValueError: bad or taken name, an adapter that does not fit the
                model, a rank above `max_rank`, or one that saves whole
                layers or biases (`modules_to_save`, `bias`), which cannot
                be routed per example.
            FileNotFoundError: a missing directory or file.
        """
        self._check_name(name)
        if name in self._adapters:
            raise ValueError(
                f"AdapterBank: an adapter named {name!r} is already "
                "registered. Unregister it first, or pick another name."
            )
        # Checked as files are (finite values, alpha and update in range).
        meta, tensors, where = _read_source(source, adapter_name)
        if meta["weights"] or meta["modules_to_save"]:
            raise ValueError(
                f"AdapterBank: {where} saves whole variables "
                f"({sorted(meta['weights'])[:3]}: modules_to_save or "
                "trained biases), which are shared by every row of a batch "
                "and cannot be routed per example. Serve it on its own "
                "model (keras_lora.load_adapter) instead."
            )
        target, prefix = self._target_for(meta)
        plan = plan_load(target, meta, tensors, _PLAN_NAME, where)
        too_big = [
            (path, spec["rank"])
            for path, spec, _ in plan.layers
            if spec["rank"] > self.max_rank
        ]
        if too_big:
            raise ValueError(
                f"AdapterBank: {where} has rank {too_big[0][1]} at layer "
                f"'{too_big[0][0]}', above the bank's max_rank "
                f"{self.max_rank}. Create the bank (or engine) with "
                f"max_rank>={max(r for _, r in too_big)}."
            )
        variants = [get_variant(s["variant"], where) for _, s, _ in plan.layers]
        unroutable = sorted({v.name for v in variants if not v.routable})
        if unroutable:
            raise ValueError(
                f"AdapterBank: {where} is a {unroutable} adapter, which "
                "the bank cannot route per example. Serve it on its own "
                "model (keras_lora.load_adapter) instead."
            )
        layers = []
        for (path, spec, values), variant in zip(
            plan.layers, variants, strict=True
        ):
            layer = self._routed_layer(target, path, prefix)
            slots = layer.routed_slots
            if variant.rescales_outputs and slots.enable_rescaling():
                self.structure_version += 1
                _reset_compiled(self.model)
            scale = AdapterSpec(
                rank=spec["rank"],
                alpha=spec["alpha"],
                use_rslora=bool(spec.get("use_rslora", False)),
            ).scale
            values = {k: np.array(v, "float32") for k, v in values.items()}
            layers.append(HostLayer(layer, values, scale, variant))
        first = plan.layers[0][1]
        adapter = HostAdapter(
            name=name,
            rank=max(spec["rank"] for _, spec, _ in plan.layers),
            alpha=first["alpha"],
            source=_describe(source),
            layers=layers,
        )
        self._adapters[name] = adapter
        return adapter.info(False)

    def unregister(self, name):
        """Drops adapter `name` from the host and frees its slot."""
        self._require(name)
        del self._adapters[name]
        slot = self._resident.pop(name, None)
        if slot is not None:
            for layer in self._layers:
                layer.routed_slots.clear(slot)
            self._free.append(slot)

    def __contains__(self, name):
        return name in self._adapters

    def __len__(self):
        return len(self._adapters)

    @property
    def names(self):
        """Registered adapter names, in registration order."""
        return list(self._adapters)

    @property
    def resident(self):
        """Names in device slots, least recently used first."""
        return list(self._resident)

    def info(self, name):
        self._require(name)
        return self._adapters[name].info(name in self._resident)

    def list(self):
        """Info dicts of all registered adapters."""
        return [
            a.info(a.name in self._resident) for a in self._adapters.values()
        ]

    # -- slots and routing ----------------------------------------------------

    def activate(self, names):
        """Makes `names` resident; returns their slot ids (`None` -> -1).

        Adapters already in slots stay; others take free slots or evict the
        least recently used adapter that this call does not need.
        """
        names = list(names)
        for name in names:
            if name is not None:
                self._require(name)
        needed = list(dict.fromkeys(n for n in names if n is not None))
        if len(needed) > self.slots:
            raise ValueError(
                f"AdapterBank: the batch uses {len(needed)} different "
                f"adapters, but the bank has {self.slots} slots. Split the "
                f"batch, or create the bank with slots>={len(needed)}."
            )
        for name in needed:
            if name in self._resident:
                self._resident.move_to_end(name)
            else:
                self._load(name, set(needed))
        return [-1 if n is None else self._resident[n] for n in names]

    def route(self, names):
        """Routes batch row `i` to adapter `names[i]` (`None`: base)."""
        self.router.set(self.activate(names))

    @contextlib.contextmanager
    def routing(self, names):
        """Context manager: `route(names)` inside, base model after."""
        self.route(names)
        try:
            yield self
        finally:
            self.router.clear()

    def close(self):
        """Detaches the slots from the model's layers and forgets the bank.

        The wrapping LoRA layers stay (they compute what the plain layers
        did); compiled functions are rebuilt.
        """
        for layer in self._layers:
            routing.detach(layer)
        self._layers = []
        self._adapters.clear()
        self._resident.clear()
        object.__setattr__(self.model, _BANK_ATTRIBUTE, None)
        _reset_compiled(self.model)

    # -- internals ------------------------------------------------------------

    def _load(self, name, keep):
        if self._free:
            slot = self._free.pop()
        else:
            victim = next(n for n in self._resident if n not in keep)
            slot = self._resident.pop(victim)
        adapter = self._adapters[name]
        targeted = {id(host.layer) for host in adapter.layers}
        for host in adapter.layers:
            host.layer.routed_slots.write(slot, *host.slot_contents())
        for layer in self._layers:
            if id(layer) not in targeted:
                layer.routed_slots.clear(slot)
        self._resident[name] = slot
        self.slot_writes += 1

    def _require(self, name):
        if name not in self._adapters:
            raise UnknownAdapterError(
                f"No adapter named {name!r} is registered. Registered: "
                f"{sorted(self._adapters)[:20] or 'none'}."
            )

    @staticmethod
    def _check_name(name):
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"AdapterBank: invalid adapter name {name!r}. Use 1-128 "
                "letters, digits, '_', '.' or '-'."
            )

    def _target_for(self, meta):
        """The (sub)model the adapter was saved from, and its path prefix.

        An adapter saved from a keras-hub backbone also fits the `CausalLM`
        around it.
        """
        saved = meta["base_model"].get("class")
        model = self.model
        backbone = getattr(model, "backbone", None)
        if (
            saved is not None
            and saved != type(model).__name__
            and backbone is not None
            and saved == type(backbone).__name__
        ):
            return backbone, backbone.name + "/"
        return model, ""

    def _routed_layer(self, target, path, prefix):
        index = SiteIndex(list(surgery.walk(target)))
        site = index.site(path, "AdapterBank")
        layer = site.layer
        changed = False
        if not isinstance(layer, LoraLayer):
            layer = routing.routable_layer(layer)
            surgery.replace(site, layer)
            changed = True
        if layer.routed_slots is None:
            routing.attach(layer, self.router, self.slots, self.max_rank)
            self._layers.append(layer)
            changed = True
        elif layer.routed_slots.router is not self.router:
            raise ValueError(
                f"AdapterBank: layer '{prefix}{path}' is routed by another "
                "bank. Close that bank first."
            )
        if changed:
            self.structure_version += 1
            _reset_compiled(self.model)
        return layer


def _read_source(source, adapter_name):
    """`(meta, tensors, description)` of an adapter source."""
    if isinstance(source, (str, os.PathLike)):
        directory = os.path.abspath(os.fspath(source))
        meta, tensors = read_adapter(directory)
        return meta, tensors, f"adapter '{directory}'"
    if isinstance(source, tuple) and len(source) == 2:
        meta, tensors = source
        where = "the given adapter"
    elif hasattr(source, "layers") or hasattr(source, "weights"):
        name = "default" if adapter_name is None else adapter_name
        tensors, meta = collect_adapter(source, name)
        where = f"adapter {name!r} of model '{source.name}'"
    else:
        raise TypeError(
            f"AdapterBank.register: `source` must be an adapter directory, "
            "a model with LoRA adapters or a (config, tensors) pair, got "
            f"{type(source).__name__}."
        )
    # The same checks as an adapter read from files: fields, shapes and
    # finite values, before anything is registered.
    check_meta(meta, f"{where} (config)")
    check_tensors(meta, tensors, f"{where} (tensors)", f"{where} (config)")
    return meta, tensors, where


def _describe(source):
    if isinstance(source, (str, os.PathLike)):
        return os.path.abspath(os.fspath(source))
    return "memory"


def _reset_compiled(model):
    surgery.reset_compiled_functions(model)
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None
