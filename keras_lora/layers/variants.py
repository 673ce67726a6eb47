"""The variant seam: how one kind of adapter computes.

An adapter is a named set of tensors on a LoRA layer (`Adapter`). What the
tensors are and how they change the layer's output is its *variant*'s
business; the shared mechanism in `LoraLayer` (naming, freezing,
merge/unmerge bookkeeping, serialization) and everything above it (adapter
files, weighting, serving) ask the variant instead of assuming a pair
`(A, B)`. Plain LoRA is `LoraVariant`; another variant (DoRA, ...) is one
subclass in its own file, registered with `register_variant`.

The hooks (PEFT's `LoraVariant` seam, in Keras terms):

- `tensor_shapes(lora_class, base_layer, spec)`: `{tensor name: shape}`
  of one adapter on `base_layer` (asked before any layer is wrapped, when
  a file is checked against a model).
- `initializer(tensor, spec)`: the Keras initializer of each tensor.
- `initialize(layer, adapter)`: runs once the variables exist (e.g. a
  magnitude vector read off the base kernel).
- `forward(layer, adapter, inputs, outputs, training)`: the layer's
  pre-activation output with this adapter applied.
- `delta(layer, adapter)`: the kernel-shaped float32 change of the base
  kernel that the adapter amounts to, where one exists.
- `merge(layer, adapter)` / `unmerge(layer, adapter)`: fold the adapter
  into the base kernel and take it out again; `unmerged_kernel(layer,
  adapter, kernel)`: what `unmerge` would leave of a (float32) `kernel`,
  without assigning it.
- `routed_factor(layer, values, scale)`: for serving many adapters in one
  batch (`keras_lora.serving.routing`), the per-output-unit factor a
  routed slot applies for this adapter (`values`: its tensors as numpy),
  or None for a plain low-rank term.
"""

from keras import ops

_VARIANTS = {}
# Adapter variables carry their tensor name, so code that sees only
# variables (an optimizer: LoRA+ trains B faster) can tell them apart.
_TENSOR_ATTRIBUTE = "_keras_lora_tensor"


def mark_tensor(variable, tensor):
    """Records that `variable` holds adapter tensor `tensor`."""
    setattr(variable, _TENSOR_ATTRIBUTE, tensor)


def tensor_of(variable):
    """The adapter tensor `variable` holds (`"lora_a"`, `"lora_b"`,
    `"lora_magnitude"`, ...), or None for any other variable."""
    return getattr(variable, _TENSOR_ATTRIBUTE, None)


def register_variant(variant):
    """Registers a `LoraVariant` instance under `variant.name`."""
    _VARIANTS[variant.name] = variant
    return variant


def get_variant(name, where="keras_lora"):
    """The registered variant called `name`; raises `ValueError` if none."""
    variant = _VARIANTS.get(name)
    if variant is None:
        raise ValueError(
            f"{where}: unknown adapter variant {name!r}. Known variants: "
            f"{sorted(_VARIANTS)}."
        )
    return variant


def variant_names():
    return sorted(_VARIANTS)


class LoraVariant:
    """Textbook LoRA: `y = base(x) + s * ((dropout(x) @ A) @ B)`."""

    name = "lora"
    # add_weighted_adapter may mix adapters of this variant (their deltas
    # are `s * A @ B`, linear in each factor).
    combinable = True
    # AdapterBank can route it per example (`routed_factor`), and whether
    # its routed slots rescale the layer's output per unit (DoRA).
    routable = True
    rescales_outputs = False

    def tensor_shapes(self, lora_class, base_layer, spec):
        a_shape, b_shape = lora_class.adapter_shapes_for(base_layer, spec.rank)
        return {"lora_a": tuple(a_shape), "lora_b": tuple(b_shape)}

    def initializer(self, tensor, spec):
        return spec.a_init() if tensor == "lora_a" else spec.b_init()

    def initialize(self, layer, adapter):
        """Nothing to do: A and B come from their initializers."""

    def forward(self, layer, adapter, inputs, outputs, training):
        return outputs + self.branch(layer, adapter, inputs, training)

    def branch(self, layer, adapter, inputs, training):
        """`s * ((dropout(x) @ A) @ B)`, never building `A @ B`."""
        x = layer.branch_inputs(inputs, adapter.spec.dropout, training)
        return self.low_rank(layer, adapter, x)

    def low_rank(self, layer, adapter, x):
        """`s * ((x @ A) @ B)` (no dropout)."""
        spec = adapter.spec
        a, b = layer.branch_factors(
            x, adapter.variables["lora_a"], adapter.variables["lora_b"]
        )
        hidden = layer.project_down(x, a) * spec.scale  # (..., r)
        return layer.project_up(hidden, b)

    def delta(self, layer, adapter):
        a = ops.cast(adapter.variables["lora_a"], "float32")
        b = ops.cast(adapter.variables["lora_b"], "float32")
        return layer.kernel_delta(a, b) * adapter.spec.scale

    def merge(self, layer, adapter):
        layer.add_to_kernel(self.delta(layer, adapter), +1.0)

    def unmerge(self, layer, adapter):
        layer.add_to_kernel(self.delta(layer, adapter), -1.0)

    def unmerged_kernel(self, layer, adapter, kernel):
        return kernel - self.delta(layer, adapter)

    def routed_factor(self, layer, values, scale):
        return None


register_variant(LoraVariant())
