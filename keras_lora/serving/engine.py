"""`Engine`: batched, adapter-routed completions over a keras-hub CausalLM.

The HTTP server (`keras-lora serve`) calls an `Engine` from one worker
thread: `validate` each request as it arrives, then `complete` a batch of
them. `complete` groups requests by sampling options (one compiled generate
function per sampler, cached), pads each group to a bucketed batch size and
sequence length (so a handful of shapes compile, once each), and runs every
group as one routed pass: rows of different adapters share the pass.

Token accounting: `prompt_tokens` counts the prompt's tokens without the
start token the model adds; `completion_tokens` counts the returned tokens
(the stop token, when generated, ends the text and is not counted).
`finish_reason` is `"stop"` when the model produced its end token and
`"length"` when `max_tokens` ran out.
"""

import collections
import dataclasses
import math

import keras
import numpy as np

from keras_lora.serving.bank import AdapterBank
from keras_lora.serving.errors import (
    AdapterLoadError,
    RequestError,
    UnknownAdapterError,
)

_LENGTH_BUCKET = 16  # sequence lengths are rounded up to a multiple of this
_CACHED_SAMPLERS = 16


@dataclasses.dataclass
class CompletionRequest:
    """One prompt to complete, with its adapter and sampling options."""

    prompt: str
    adapter: str | None = None  # None = base model
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclasses.dataclass
class Completion:
    """The result of a `CompletionRequest`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    adapter: str | None


class Engine:
    """Serves completions for many adapters on one keras-hub `CausalLM`.

    Args:
        causal_lm: a keras-hub `CausalLM` with a preprocessor (GPT-2 and
            other models whose preprocessor packs a start token).
        slots: adapters resident on the device at once; a batch uses at
            most this many different adapters (larger ones are split).
        max_batch: the most rows in one pass.
        max_prompt_tokens: the longest prompt accepted, in tokens.
            Defaults to `max_total_tokens - 2`.
        max_total_tokens: the longest prompt plus completion (plus the
            start token). Defaults to the backbone's
            `max_sequence_length`, and cannot exceed it.
        max_rank: the largest adapter rank accepted.

    Example:

    >>> engine = Engine.from_preset("/models/gpt2_base_en")   # doctest: +SKIP
    >>> engine.load_adapter("pirate", "adapters/pirate")     # doctest: +SKIP
    >>> engine.complete([CompletionRequest("Ahoy", "pirate")])  # doctest: +SKIP
    """

    def __init__(
        self,
        causal_lm,
        slots=8,
        max_batch=32,
        max_prompt_tokens=None,
        max_total_tokens=None,
        max_rank=16,
    ):
        preprocessor = getattr(causal_lm, "preprocessor", None)
        if (
            preprocessor is None
            or getattr(preprocessor, "tokenizer", None) is None
        ):
            raise ValueError(
                "Engine: the CausalLM has no preprocessor with a tokenizer; "
                "load it with keras_hub.models.CausalLM.from_preset(...) or "
                "pass `preprocessor=` when building it."
            )
        self.causal_lm = causal_lm
        self.tokenizer = preprocessor.tokenizer
        self.end_token_id = int(self.tokenizer.end_token_id)
        limit = getattr(causal_lm.backbone, "max_sequence_length", None)
        if max_total_tokens is None:
            max_total_tokens = limit or preprocessor.sequence_length
        if limit is not None and max_total_tokens > limit:
            raise ValueError(
                f"Engine: max_total_tokens={max_total_tokens} exceeds the "
                f"model's max_sequence_length {limit}."
            )
        if max_prompt_tokens is None:
            max_prompt_tokens = max_total_tokens - 2
        if not 1 <= max_prompt_tokens <= max_total_tokens - 2:
            raise ValueError(
                f"Engine: max_prompt_tokens must be in [1, "
                f"{max_total_tokens - 2}] (max_total_tokens minus the start "
                f"token and one new token), got {max_prompt_tokens}."
            )
        self.max_total_tokens = int(max_total_tokens)
        self.max_prompt_tokens = int(max_prompt_tokens)
        bank = AdapterBank.of(causal_lm)
        if bank is None:
            bank = AdapterBank(
                causal_lm, slots=slots, max_rank=max_rank, max_batch=max_batch
            )
        self.bank = bank
        self.max_batch = bank.max_batch
        self._generators = collections.OrderedDict()

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """An engine over `keras_hub.models.CausalLM.from_preset(preset)`.

        `preset` is a keras-hub preset name or a local preset directory
        (no downloads happen for a directory). Other keyword arguments go
        to `Engine`.
        """
        import keras_hub

        return cls(keras_hub.models.CausalLM.from_preset(preset), **kwargs)

    # -- adapters -------------------------------------------------------------

    def list_adapters(self):
        """`[{"name", "rank", "alpha", "source", "resident"}, ...]`."""
        return self.bank.list()

    def load_adapter(self, name, directory):
        """Registers the adapter saved in `directory` under `name`.

        Raises:
            AdapterLoadError: a missing, corrupt or unfitting adapter
                directory, a bad name, or a name already in use. The
                message names the file and the fix.
        """
        if isinstance(name, str) and name in self.bank:
            raise AdapterLoadError(
                f"An adapter named {name!r} is already loaded. Unload it "
                f"first (DELETE /v1/adapters/{name}), or pick another name."
            )
        try:
            return self.bank.register(name, directory)
        except (ValueError, FileNotFoundError, TypeError, OSError) as error:
            raise AdapterLoadError(str(error)) from None

    def unload_adapter(self, name):
        """Unregisters adapter `name` (raises `UnknownAdapterError`)."""
        self.bank.unregister(name)

    # -- requests -------------------------------------------------------------

    def count_tokens(self, prompt):
        """The number of tokens in `prompt` (without the start token)."""
        if not prompt:
            return 0
        ids = keras.ops.convert_to_numpy(self.tokenizer(prompt))
        return int(np.asarray(ids).reshape(-1).shape[0])

    def validate(self, request):
        """Raises `RequestError` or `UnknownAdapterError` for a bad request."""
        if not isinstance(request, CompletionRequest):
            raise RequestError(
                f"Expected a CompletionRequest, got {type(request).__name__}."
            )
        if not isinstance(request.prompt, str):
            raise RequestError(
                f"'prompt' must be a string, got "
                f"{type(request.prompt).__name__}."
            )
        if request.adapter is not None:
            if not isinstance(request.adapter, str):
                raise RequestError(
                    f"'adapter' must be a string or null, got "
                    f"{type(request.adapter).__name__}."
                )
            if request.adapter not in self.bank:
                raise UnknownAdapterError(
                    f"Unknown adapter {request.adapter!r}. Loaded adapters: "
                    f"{self.bank.names[:20] or 'none'} (GET /v1/adapters; "
                    "load one with POST /v1/adapters)."
                )
        _check_int(request.max_tokens, "max_tokens", low=1)
        _check_number(request.temperature, "temperature", low=0.0)
        if request.top_k is not None:
            _check_int(request.top_k, "top_k", low=1)
        if request.top_p is not None:
            _check_number(request.top_p, "top_p", low=0.0)
            if not 0.0 < request.top_p <= 1.0:
                raise RequestError(
                    f"'top_p' must be in (0, 1], got {request.top_p}."
                )
        if request.seed is not None:
            _check_int(request.seed, "seed", low=0)
        prompt_tokens = self.count_tokens(request.prompt)
        if prompt_tokens > self.max_prompt_tokens:
            raise RequestError(
                f"The prompt has {prompt_tokens} tokens; the limit is "
                f"{self.max_prompt_tokens}. Shorten the prompt."
            )
        room = self.max_total_tokens - 1 - prompt_tokens
        if request.max_tokens > room:
            raise RequestError(
                f"'max_tokens' is {request.max_tokens}, but a "
                f"{prompt_tokens}-token prompt leaves room for at most "
                f"{room} new tokens (max_total_tokens "
                f"{self.max_total_tokens}). Lower max_tokens or shorten the "
                "prompt."
            )

    def complete(self, requests):
        """Completes `requests` (a list), batched and routed; in order.

        Requests with the same sampling options share a pass (up to
        `max_batch` rows and `slots` adapters); a request with a `seed`
        runs on its own, so its result does not depend on its neighbours.
        """
        requests = list(requests)
        for request in requests:
            self.validate(request)
        groups = collections.OrderedDict()
        for index, request in enumerate(requests):
            key = _sampling_key(request)
            if request.seed is not None and key[0] != "greedy":
                key = key + (index,)
            groups.setdefault(key, []).append(index)
        results = [None] * len(requests)
        for key, indices in groups.items():
            for chunk in self._chunks(indices, requests):
                outputs = self._run(key, [requests[i] for i in chunk])
                for i, completion in zip(chunk, outputs, strict=True):
                    results[i] = completion
        return results

    # -- internals ------------------------------------------------------------

    def _chunks(self, indices, requests):
        """Splits `indices` into runs of <= max_batch rows, <= slots names."""
        chunk, names = [], set()
        for i in indices:
            name = requests[i].adapter
            new = name is not None and name not in names
            if len(chunk) == self.max_batch or (
                new and len(names) == self.bank.slots
            ):
                yield chunk
                chunk, names = [], set()
            chunk.append(i)
            if name is not None:
                names.add(name)
        if chunk:
            yield chunk

    def _run(self, key, requests):
        rows = len(requests)
        batch = min(self.max_batch, 1 << (rows - 1).bit_length())
        prompt_tokens = [self.count_tokens(r.prompt) for r in requests]
        needed = max(
            p + 1 + r.max_tokens
            for p, r in zip(prompt_tokens, requests, strict=True)
        )
        length = min(
            self.max_total_tokens,
            _LENGTH_BUCKET * math.ceil(needed / _LENGTH_BUCKET),
        )
        prompts = [r.prompt for r in requests] + [""] * (batch - rows)
        adapters = [r.adapter for r in requests] + [None] * (batch - rows)
        preprocessor = self.causal_lm.preprocessor
        inputs = preprocessor.generate_preprocess(
            prompts, sequence_length=length
        )
        generate = self._generator(key, requests[0])
        with self.bank.routing(adapters):
            outputs = generate(inputs, stop_token_ids=(self.end_token_id,))
        token_ids = np.asarray(keras.ops.convert_to_numpy(outputs["token_ids"]))
        mask = np.asarray(keras.ops.convert_to_numpy(outputs["padding_mask"]))
        starts = np.asarray(
            keras.ops.convert_to_numpy(inputs["padding_mask"])
        ).sum(axis=1)
        results = []
        for row, request in enumerate(requests):
            start = int(starts[row])
            new = token_ids[row, start:][mask[row, start:].astype(bool)]
            new = [int(t) for t in new[: request.max_tokens]]
            reason = "length"
            if self.end_token_id in new:
                new = new[: new.index(self.end_token_id)]
                reason = "stop"
            results.append(
                Completion(
                    text=self._detokenize(new),
                    prompt_tokens=prompt_tokens[row],
                    completion_tokens=len(new),
                    finish_reason=reason,
                    adapter=request.adapter,
                )
            )
        return results

    def _detokenize(self, ids):
        if not ids:
            return ""
        text = self.tokenizer.detokenize(np.asarray(ids, "int32"))
        text = (
            keras.ops.convert_to_numpy(text) if hasattr(text, "numpy") else text
        )
        if isinstance(text, np.ndarray):
            text = text.item()
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def _generator(self, key, request):
        """The model's compiled generate function for sampling `key`."""
        lm = self.causal_lm
        entry = self._generators.get(key)
        version = self.bank.structure_version
        if entry is None or entry[2] != version:
            sampler = _make_sampler(request)
            initial = [
                np.array(v.numpy() if hasattr(v, "numpy") else v)
                for v in _seed_states(sampler)
            ]
            lm.sampler = sampler
            lm.generate_function = None
            entry = (sampler, lm.make_generate_function(), version, initial)
            self._generators[key] = entry
            while len(self._generators) > _CACHED_SAMPLERS:
                self._generators.popitem(last=False)
        else:
            self._generators.move_to_end(key)
        sampler, function, _, initial = entry
        lm.sampler = sampler
        lm.generate_function = function
        if request.seed is not None:
            # A seeded request gives the same text every time: rewind the
            # sampler's random state.
            for variable, value in zip(
                _seed_states(sampler), initial, strict=True
            ):
                variable.assign(value)
        return function


def _sampling_key(request):
    if request.temperature == 0:
        return ("greedy",)
    return (
        "sample",
        float(request.temperature),
        request.top_k,
        request.top_p,
        request.seed,
    )


def _make_sampler(request):
    import keras_hub

    samplers = keras_hub.samplers
    if request.temperature == 0:
        return samplers.GreedySampler()
    kwargs = dict(temperature=float(request.temperature), seed=request.seed)
    if request.top_p is not None:
        return samplers.TopPSampler(
            p=float(request.top_p), k=request.top_k, **kwargs
        )
    if request.top_k is not None:
        return samplers.TopKSampler(k=int(request.top_k), **kwargs)
    return samplers.RandomSampler(**kwargs)


def _seed_states(sampler):
    return list(getattr(sampler, "variables", []) or [])


def _check_int(value, field, low):
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(
            f"'{field}' must be an integer, got {type(value).__name__}."
        )
    if value < low:
        raise RequestError(f"'{field}' must be >= {low}, got {value}.")


def _check_number(value, field, low):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(
            f"'{field}' must be a number, got {type(value).__name__}."
        )
    if not math.isfinite(value) or value < low:
        raise RequestError(
            f"'{field}' must be a finite number >= {low}, got {value}."
        )


__all__ = [
    "AdapterLoadError",
    "Completion",
    "CompletionRequest",
    "Engine",
    "RequestError",
    "UnknownAdapterError",
]
