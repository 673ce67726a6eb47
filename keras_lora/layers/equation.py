"""Factoring an `EinsumDense` equation into textbook LoRA projections.

An EinsumDense kernel is a matrix in disguise: its axes are either
*contracted* with the input (they appear in the input and the kernel but not
in the output) or *output* axes (they appear in the kernel and the output but
not in the input). Textbook LoRA views the kernel as
`[contracted axes] x [output axes]` and factors the update as `A @ B` with

    A: (contracted axes..., r)        B: (r, output axes...)

so the unmerged branch is two einsums that never build `A @ B`:

    h = einsum(down, x, A)            # (..., r)
    y = einsum(up, h, B)              # same shape as the base output

A kernel axis that is shared by input and output (a batched or grouped
kernel) or that appears only in the kernel cannot be factored this way, and
gets a `ValueError` naming the axis.
"""

import dataclasses
import re
import string

_EQUATION = re.compile(
    r"^(?P<inp>[a-zA-Z.]+),(?P<ker>[a-zA-Z]+)->(?P<out>[a-zA-Z.]+)$"
)


@dataclasses.dataclass(frozen=True)
class Factorization:
    """The einsum strings and axes of a LoRA factorization of a kernel.

    Attributes:
        equation: the base layer's equation.
        contracted: kernel letters contracted with the input, kernel order.
        outputs: kernel letters that reach the output, kernel order.
        rank_letter: the letter used for the rank axis.
        down: `x, A -> h` equation.
        up: `h, B -> y` equation.
        delta: `A, B -> kernel` equation (used by merge).
        flat: True when the input is `[kept axes][contracted axes]` and the
            output `[kept axes][output axes]`, both in kernel order (every
            MultiHeadAttention projection and `...b,bc->...c`): the branch
            is then two 2-D matrix products on reshaped views.
    """

    equation: str
    contracted: str
    outputs: str
    rank_letter: str
    down: str
    up: str
    delta: str
    flat: bool = False

    def adapter_shapes(self, kernel_shape, rank):
        """Returns `(a_shape, b_shape)` for a kernel of `kernel_shape`."""
        kernel = self.equation.split(",")[1].split("->")[0]
        dims = dict(zip(kernel, kernel_shape, strict=True))
        a_shape = tuple(dims[c] for c in self.contracted) + (rank,)
        b_shape = (rank,) + tuple(dims[c] for c in self.outputs)
        return a_shape, b_shape


def factor_equation(equation, layer_name="EinsumDense"):
    """Factors `equation` (as accepted by `EinsumDense`) for LoRA.

    Args:
        equation: an einsum string such as `"abc,cde->abde"` or
            `"...b,bc->...c"`.
        layer_name: used in error messages.

    Returns:
        A `Factorization`.

    Raises:
        ValueError: if the equation is malformed or its kernel cannot be
            viewed as a `[contracted] x [output]` matrix.
    """
    spaced = equation.replace(" ", "")
    match = _EQUATION.match(spaced)
    if not match:
        raise ValueError(
            f"Layer '{layer_name}': cannot parse einsum equation "
            f"'{equation}'. Expected the form 'input,kernel->output', "
            "for example 'abc,cde->abde' or '...b,bc->...c'."
        )
    inp, ker, out = match.group("inp"), match.group("ker"), match.group("out")
    for part in (inp, out):
        if part.replace("...", "").count(".") or part.count("...") > 1:
            raise ValueError(
                f"Layer '{layer_name}': malformed ellipsis in '{equation}'."
            )
    inp_letters = inp.replace("...", "")
    out_letters = out.replace("...", "")
    shared = [c for c in ker if c in inp_letters and c in out_letters]
    if shared:
        raise ValueError(
            f"Layer '{layer_name}': equation '{equation}' cannot be "
            f"factored for LoRA: kernel axis '{shared[0]}' appears in the "
            "input, the kernel and the output (a batched or grouped kernel), "
            "so the kernel is not a single [input] x [output] matrix. Use "
            "LoRA on a layer with a plain projection, or exclude this layer."
        )
    orphan = [c for c in ker if c not in inp_letters and c not in out_letters]
    if orphan:
        raise ValueError(
            f"Layer '{layer_name}': equation '{equation}' cannot be "
            f"factored for LoRA: kernel axis '{orphan[0]}' is summed away "
            "without touching the input or the output."
        )
    contracted = "".join(c for c in ker if c in inp_letters)
    outputs = "".join(c for c in ker if c in out_letters)
    if not contracted:
        raise ValueError(
            f"Layer '{layer_name}': equation '{equation}' cannot be "
            "factored for LoRA: no kernel axis is contracted with the input."
        )
    used = set(inp_letters + ker + out_letters)
    r = next(c for c in string.ascii_letters if c not in used)
    # The intermediate keeps the input axes that survive to the output, in
    # input order, with the ellipsis where it was, and the rank axis last.
    hidden = "".join(
        c for c in inp.replace("...", "0") if c == "0" or c in out_letters
    ).replace("0", "...")
    kept = hidden
    hidden += r
    return Factorization(
        equation=spaced,
        contracted=contracted,
        outputs=outputs,
        rank_letter=r,
        down=f"{inp},{contracted}{r}->{hidden}",
        up=f"{hidden},{r}{outputs}->{out}",
        delta=f"{contracted}{r},{r}{outputs}->{ker}",
        flat=inp == kept + contracted and out == kept + outputs,
    )
