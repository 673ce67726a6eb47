"""`generate`: text generation with a different adapter per prompt.

Wraps a keras-hub `CausalLM`'s own `generate` (compiled with `jax.jit` or
`tf.function` as usual): the prompts go through in one batch while the
model's `AdapterBank` routes row `i` to `adapters[i]`, or in several
(`split_batch`) when they use more adapters than the bank has slots.
"""

import keras

from keras_lora.serving.bank import AdapterBank


def generate(
    causal_lm,
    prompts,
    adapters=None,
    max_length=None,
    sampler=None,
    bank=None,
    stop_token_ids="auto",
    strip_prompt=False,
):
    """Generates a completion per prompt, each with its own adapter.

    Args:
        causal_lm: a keras-hub `CausalLM` (e.g. `GPT2CausalLM`) with a
            preprocessor.
        prompts: a string or a list of strings.
        adapters: one adapter name per prompt (`None`: the base model), or
            one name (or `None`) for all. Names are those registered in
            the model's `AdapterBank`.
        max_length: as for `CausalLM.generate` (prompt plus completion).
        sampler: a keras-hub sampler or its name; by default the model's
            current one. A sampler whose config differs from the current
            one recompiles the generate function.
        bank: the `AdapterBank`; defaults to `AdapterBank.of(causal_lm)`.
        stop_token_ids, strip_prompt: as for `CausalLM.generate`.

    Returns:
        A string for a string prompt, else a list of strings, in order.
        A batch with more rows than the bank's `max_batch`, or more
        distinct adapters than its `slots`, runs in several passes
        (`split_batch`); each row's text is what it would be alone.

    Example:

    >>> bank = AdapterBank(gpt2_lm)                          # doctest: +SKIP
    >>> bank.register("pirate", "adapters/pirate")           # doctest: +SKIP
    >>> generate(gpt2_lm, ["Hello", "Hello"], adapters=["pirate", None],
    ...          max_length=32)                              # doctest: +SKIP
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if adapters is None or isinstance(adapters, str):
        adapters = [adapters] * len(prompts)
    adapters = list(adapters)
    if len(adapters) != len(prompts):
        raise ValueError(
            f"generate: {len(prompts)} prompts but {len(adapters)} adapters; "
            "pass one adapter name (or None) per prompt."
        )
    bank = AdapterBank.of(causal_lm) if bank is None else bank
    if bank is None:
        if any(a is not None for a in adapters):
            raise ValueError(
                "generate: the model has no AdapterBank. Create one with "
                "keras_lora.serving.AdapterBank(causal_lm) and register "
                "the adapters first."
            )
    if sampler is not None:
        use_sampler(causal_lm, sampler)
    kwargs = dict(
        max_length=max_length,
        stop_token_ids=stop_token_ids,
        strip_prompt=strip_prompt,
    )
    if bank is None:
        outputs = list(causal_lm.generate(prompts, **kwargs))
    else:
        outputs = [None] * len(prompts)
        for rows in split_batch(adapters, bank.slots, bank.max_batch):
            with bank.routing([adapters[i] for i in rows]):
                done = causal_lm.generate([prompts[i] for i in rows], **kwargs)
            for i, output in zip(rows, done, strict=True):
                outputs[i] = output
    outputs = [_to_str(o) for o in outputs]
    return outputs[0] if single else outputs


def split_batch(names, slots, max_batch):
    """Row indices of `names` in passes the bank can route.

    Each pass has at most `max_batch` rows and `slots` distinct adapter
    names (`None`, the base model, takes no slot). Adapters are taken in
    order of first use, `slots` at a time, and their rows keep their order;
    base-model rows join the first pass. Returns a list of index lists.

    >>> split_batch(["a", None, "b", "c", "a"], slots=2, max_batch=8)
    [[0, 1, 2, 4], [3]]
    """
    distinct = list(dict.fromkeys(n for n in names if n is not None))
    group = {name: i // slots for i, name in enumerate(distinct)}
    groups = [[] for _ in range(max(1, -(-len(distinct) // slots)))]
    for row, name in enumerate(names):
        groups[0 if name is None else group[name]].append(row)
    return [
        rows[start : start + max_batch]
        for rows in groups
        for start in range(0, len(rows), max_batch)
        if rows
    ]


def use_sampler(causal_lm, sampler):
    """Makes `sampler` the model's sampler, recompiling only on a change."""
    import keras_hub

    sampler = keras_hub.samplers.get(sampler)
    current = getattr(causal_lm, "sampler", None)
    if current is not None and _config(current) == _config(sampler):
        return current
    causal_lm.sampler = sampler
    causal_lm.generate_function = None
    return sampler


def _config(sampler):
    return keras.saving.serialize_keras_object(sampler)


def _to_str(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "numpy"):
        value = value.numpy()
        if isinstance(value, bytes):
            return value.decode("utf-8")
    return str(value)
