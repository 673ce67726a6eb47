"""`Engine`: batched, adapter-routed completions over a keras-hub CausalLM.

The HTTP server (`keras-lora serve`) calls an `Engine` from one worker
thread: `validate` each request as it arrives, then `complete` a batch of
them. `complete` groups the requests as greedy, sampled, or sampled with
top-k/top-p, and runs each group in passes of at most `max_batch` rows and
`slots` adapters, padded to a bucketed batch size and sequence length (so
a handful of shapes compile, once each): rows of different adapters share
a pass. Sampling options are per-row runtime inputs of the group's one
compiled function (`keras_lora.serving.sampling.RowSampler`): no
temperature, top-k, top-p or seed value recompiles anything, rows with
different options share a pass, and a seeded row gives the same text
whatever shares its pass.

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

from keras_lora.serving import checks
from keras_lora.serving.bank import AdapterBank
from keras_lora.serving.errors import (
    AdapterLoadError,
    RequestError,
    UnknownAdapterError,
)
from keras_lora.serving.generation import split_batch

_LENGTH_BUCKET = 16  # sequence lengths are rounded up to a multiple of this
MAX_TEMPERATURE = 100.0
_GREEDY = ("greedy",)


@dataclasses.dataclass
class CompletionRequest:
    """One prompt to complete, with its adapter and sampling options."""

    prompt: str
    adapter: str | None = None  # None = base model
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy; at most MAX_TEMPERATURE
    top_k: int | None = None  # 1 .. the vocabulary size
    top_p: float | None = None  # (0, 1]
    seed: int | None = None  # 0 .. 2**63 - 1


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

    Prompts longer in UTF-8 than `max_prompt_bytes` (`max_prompt_tokens`
    times the longest vocabulary entry's UTF-8 length: with byte-level
    BPE no token stands for more text than that) are refused before they
    are tokenized, so a huge prompt costs the worker nothing.

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
        self.max_prompt_bytes = _max_prompt_bytes(
            self.tokenizer, self.max_prompt_tokens
        )
        self.vocabulary_size = int(
            getattr(causal_lm.backbone, "vocabulary_size", None)
            or self.tokenizer.vocabulary_size()
        )
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
                f"first (DELETE /v1/adapters/{name}), or pick another name.",
                "name",
            )
        try:
            return self.bank.register(name, directory)
        except (ValueError, TypeError, OSError) as error:
            raise AdapterLoadError(str(error), "path") from None
        except Exception as error:  # noqa: BLE001 - a hostile file
            # Whatever else a crafted file makes the reader raise, it is
            # still a file that cannot be loaded; the bank registered
            # nothing (it registers last).
            raise AdapterLoadError(
                f"The adapter in '{directory}' cannot be loaded "
                f"({type(error).__name__}: {error}).",
                "path",
            ) from None

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
        """Raises `RequestError` or `UnknownAdapterError` for a bad request.

        The errors' `param` names the field. Cheap checks come first: a
        prompt is tokenized only once everything else is known to be fine.
        """
        if not isinstance(request, CompletionRequest):
            raise RequestError(
                f"Expected a CompletionRequest, got {type(request).__name__}."
            )
        checks.check_text(request.prompt, "prompt")
        if request.adapter is not None:
            checks.check_text(request.adapter, "adapter")
        checks.check_int(request.max_tokens, "max_tokens", low=1)
        most = self.max_total_tokens - 1
        if request.max_tokens > most:
            raise RequestError(
                f"'max_tokens' is {checks.show(request.max_tokens)}, but "
                f"there is room for at most {most} new tokens "
                f"(max_total_tokens {self.max_total_tokens}, even with an "
                "empty prompt). Lower max_tokens.",
                "max_tokens",
            )
        checks.check_number(
            request.temperature, "temperature", 0.0, MAX_TEMPERATURE
        )
        if request.top_k is not None:
            checks.check_int(request.top_k, "top_k", 1, self.vocabulary_size)
        if request.top_p is not None:
            checks.check_number(request.top_p, "top_p", 0, 1, low_open=True)
        if request.seed is not None:
            checks.check_int(request.seed, "seed", 0, checks.MAX_SEED)
        size = len(request.prompt.encode("utf-8"))
        if self.max_prompt_bytes is not None and size > self.max_prompt_bytes:
            raise RequestError(
                f"The prompt is {size} bytes long: more than the "
                f"{self.max_prompt_tokens}-token limit can hold with this "
                f"tokenizer ({self.max_prompt_bytes} bytes at most). "
                "Shorten the prompt.",
                "prompt",
            )
        if request.adapter is not None and request.adapter not in self.bank:
            raise UnknownAdapterError(
                f"Unknown adapter {checks.show(request.adapter, 140)}. "
                f"Loaded adapters: {self.bank.names[:20] or 'none'} (GET "
                "/v1/adapters; load one with POST /v1/adapters).",
                "adapter",
            )
        prompt_tokens = self.count_tokens(request.prompt)
        if prompt_tokens > self.max_prompt_tokens:
            raise RequestError(
                f"The prompt has {prompt_tokens} tokens; the limit is "
                f"{self.max_prompt_tokens}. Shorten the prompt.",
                "prompt",
            )
        room = self.max_total_tokens - 1 - prompt_tokens
        if request.max_tokens > room:
            raise RequestError(
                f"'max_tokens' is {request.max_tokens}, but a "
                f"{prompt_tokens}-token prompt leaves room for at most "
                f"{room} new tokens (max_total_tokens "
                f"{self.max_total_tokens}). Lower max_tokens or shorten the "
                "prompt.",
                "max_tokens",
            )

    def complete(self, requests):
        """Completes `requests` (a list), batched and routed; in order.

        Greedy requests share passes, and so do sampled ones (of any
        temperature, top-k, top-p and seed), up to `max_batch` rows and
        `slots` distinct adapters a pass; more adapters than slots take
        several passes.
        """
        requests = list(requests)
        for request in requests:
            self.validate(request)
        groups = collections.OrderedDict()
        for index, request in enumerate(requests):
            groups.setdefault(_sampling_key(request), []).append(index)
        results = [None] * len(requests)
        for key, indices in groups.items():
            names = [requests[i].adapter for i in indices]
            for batch in split_batch(names, self.bank.slots, self.max_batch):
                rows = [indices[j] for j in batch]
                outputs = self._run(key, [requests[i] for i in rows])
                for i, completion in zip(rows, outputs, strict=True):
                    results[i] = completion
        return results

    # -- internals ------------------------------------------------------------

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
        sampler, generate = self._generator(key)
        if key != _GREEDY:
            sampler.set_rows(
                (r.temperature, r.top_k, r.top_p, r.seed) for r in requests
            )
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
        if isinstance(text, bytes):
            # Byte-level tokens can end inside a UTF-8 character.
            return text.decode("utf-8", errors="replace")
        return str(text)

    def _generator(self, key):
        """The sampler and compiled generate function of sampling `key`.

        One of each per key (greedy, sampled, sampled with top-k/top-p),
        built again only when the bank changed the model's structure.
        """
        lm = self.causal_lm
        entry = self._generators.get(key)
        version = self.bank.structure_version
        if entry is None or entry[2] != version:
            sampler = self._make_sampler(key)
            lm.sampler = sampler
            lm.generate_function = None
            entry = (sampler, lm.make_generate_function(), version)
            self._generators[key] = entry
        sampler, function, _ = entry
        lm.sampler = sampler
        lm.generate_function = function
        return sampler, function

    def _make_sampler(self, key):
        import keras_hub

        from keras_lora.serving.sampling import RowSampler

        if key == _GREEDY:
            return keras_hub.samplers.GreedySampler()
        return RowSampler(self.max_batch, self.vocabulary_size, key[1])


def _sampling_key(request):
    if request.temperature == 0:
        return _GREEDY
    return ("sample", request.top_k is not None or request.top_p is not None)


def _max_prompt_bytes(tokenizer, max_prompt_tokens):
    """The longest prompt, in UTF-8 bytes, that can fit `max_prompt_tokens`.

    None when the tokenizer does not list its vocabulary.
    """
    try:
        vocabulary = tokenizer.get_vocabulary()
    except Exception:  # noqa: BLE001 - no bound, prompts are tokenized
        return None
    longest = max(
        (len(str(t).encode("utf-8", "surrogatepass")) for t in vocabulary),
        default=0,
    )
    return longest * max_prompt_tokens if longest else None


__all__ = [
    "AdapterLoadError",
    "Completion",
    "CompletionRequest",
    "Engine",
    "RequestError",
    "UnknownAdapterError",
]
