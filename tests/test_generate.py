"""Generation and the serving engine: per-prompt adapters in one batch."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lora as kl
from benchmarks.hostile_clients import count_compilations
from benchmarks.hostile_requests import broken_adapter_copies
from keras_lora.serving import (
    AdapterBank,
    AdapterLoadError,
    CompletionRequest,
    Engine,
    RequestError,
    UnknownAdapterError,
    generate,
)
from tests.tiny_lm import PROMPTS, VOCABULARY, gpt2_causal_lm

CONFIGS = {
    "a1": kl.LoraConfig(rank=2, alpha=4, target_modules=["query", "value"]),
    "a2": kl.LoraConfig(
        rank=4, target_modules=["query", "value", "feedforward_output_dense"]
    ),
}


# Models built in one process get numbered names (`gpt2_backbone_3`);
# loading matches them and warns, which is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*automatic numbering")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(7)
    paths = {}
    for name, config in CONFIGS.items():
        source = gpt2_causal_lm()
        kl.apply_lora(source, config)
        for variable in source.trainable_weights:
            variable.assign(rng.normal(0.0, 0.5, variable.shape))
        paths[name] = kl.save_adapter(source, os.path.join(directory, name))
    return paths


@pytest.fixture(scope="module")
def alone(adapters):
    """Greedy text of each prompt generated alone (batch of one) by a plain
    model holding only that adapter (`None`: the base model)."""
    references = {None: gpt2_causal_lm()}
    for name, path in adapters.items():
        references[name] = kl.load_adapter(gpt2_causal_lm(), path)
    for lm in references.values():
        lm.compile(sampler="greedy")

    cache = {}

    def run(prompt, name, max_length=14):
        key = (prompt, name, max_length)
        if key not in cache:
            cache[key] = references[name].generate(
                [prompt], max_length=max_length, stop_token_ids=None
            )[0]
        return cache[key]

    return run


def test_generate_mixed_batch_equals_each_prompt_alone(adapters, alone):
    lm = gpt2_causal_lm()
    bank = AdapterBank(lm, slots=2, max_rank=4, max_batch=8)
    for name, path in adapters.items():
        bank.register(name, path)
    names = ["a1", None, "a2", "a1", None]
    prompts = PROMPTS[:5]
    texts = generate(
        lm,
        prompts,
        adapters=names,
        max_length=14,
        sampler="greedy",
        stop_token_ids=None,
    )
    expected = [alone(p, n) for p, n in zip(prompts, names, strict=True)]
    assert texts == expected
    # The adapters change the text (else the test could not fail).
    assert len({alone(prompts[0], n) for n in (None, "a1", "a2")}) == 3
    # Other routes, same compiled function: still each prompt alone.
    again = generate(
        lm,
        prompts[:2],
        adapters=["a2", "a2"],
        max_length=14,
        stop_token_ids=None,
    )
    assert again == [alone(p, "a2") for p in prompts[:2]]
    assert generate(lm, prompts[0], max_length=14, stop_token_ids=None) == (
        alone(prompts[0], None)
    )


def test_generate_errors():
    lm = gpt2_causal_lm()
    with pytest.raises(ValueError, match="no AdapterBank"):
        generate(lm, ["the"], adapters=["x"])
    AdapterBank(lm)
    with pytest.raises(ValueError, match="2 prompts but 1 adapters"):
        generate(lm, ["the", "a"], adapters=["x"])
    with pytest.raises(UnknownAdapterError, match="'x'"):
        generate(lm, ["the"], adapters=["x"])


def test_generate_splits_more_adapters_than_slots(adapters, alone):
    """One slot, two adapters and the base model in one call: several
    passes, each row as it would be alone."""
    lm = gpt2_causal_lm()
    bank = AdapterBank(lm, slots=1, max_rank=4, max_batch=2)
    for name, path in adapters.items():
        bank.register(name, path)
    names = ["a1", "a2", None, "a2", "a1"]
    prompts = PROMPTS[:5]
    texts = generate(
        lm,
        prompts,
        adapters=names,
        max_length=14,
        sampler="greedy",
        stop_token_ids=None,
    )
    assert texts == [alone(p, n) for p, n in zip(prompts, names, strict=True)]


def test_engine_complete_equals_alone(adapters, alone):
    engine = Engine(gpt2_causal_lm(), slots=2, max_batch=4)
    assert engine.max_total_tokens == 32 and engine.max_prompt_tokens == 30
    for name, path in adapters.items():
        info = engine.load_adapter(name, path)
        assert info["name"] == name and info["resident"] is False
    names = ["a1", None, "a2", "a1", "a2"]
    requests = [
        CompletionRequest(p, n, max_tokens=6)
        for p, n in zip(PROMPTS[:5], names, strict=True)
    ]
    results = engine.complete(requests)
    for request, result in zip(requests, results, strict=True):
        # Greedy, without stopping, 20 tokens: the engine's text (cut at
        # 6 tokens or at the end token) starts it.
        full = alone(request.prompt, request.adapter, 20)
        assert result.prompt_tokens == engine.count_tokens(request.prompt)
        assert result.adapter == request.adapter
        assert full.startswith(request.prompt + result.text)
        if result.finish_reason == "length":
            assert result.completion_tokens == 6
        else:
            assert result.finish_reason == "stop"
            assert result.completion_tokens < 6
    assert {a["name"]: a["resident"] for a in engine.list_adapters()} == {
        "a1": True,
        "a2": True,
    }
    seeded = CompletionRequest("the", "a1", 5, temperature=0.8, seed=3)
    assert engine.complete([seeded]) == engine.complete([seeded])
    engine.unload_adapter("a1")
    assert [a["name"] for a in engine.list_adapters()] == ["a2"]
    with pytest.raises(UnknownAdapterError, match="'a1'"):
        engine.validate(CompletionRequest("the", "a1"))
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("a1")


def test_engine_splits_more_adapters_than_slots(adapters, alone):
    engine = Engine(gpt2_causal_lm(), slots=1, max_batch=4)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    names = ["a1", "a2", None, "a2", "a1", None]
    requests = [
        CompletionRequest(p, n, max_tokens=6)
        for p, n in zip(PROMPTS, names, strict=True)
    ]
    results = engine.complete(requests)
    for request, result in zip(requests, results, strict=True):
        full = alone(request.prompt, request.adapter, 20)
        assert result.adapter == request.adapter
        assert full.startswith(request.prompt + result.text)
        assert result.completion_tokens == 6 or result.finish_reason == "stop"


@pytest.fixture(scope="module")
def sampling_engine(adapters):
    engine = Engine(gpt2_causal_lm(), slots=2, max_batch=4)
    engine.load_adapter("a1", adapters["a1"])
    return engine


def test_sampling_options_never_recompile(sampling_engine):
    engine = sampling_engine
    counts = count_compilations(engine.causal_lm)

    def sampled(i, **options):
        return CompletionRequest("the cat", "a1", 4, seed=i, **options)

    # Warm-up: the first pass of each kind builds and compiles its function.
    engine.complete([sampled(0, temperature=0.7)])
    engine.complete([sampled(0, temperature=0.7, top_k=3, top_p=0.9)])
    warm = dict(counts)
    assert warm["builds"] == 2
    texts = set()
    for i in range(1, 7):
        temperature = 0.2 + 0.3 * i
        plain = engine.complete([sampled(i, temperature=temperature)])
        cut = engine.complete(
            [sampled(i, temperature=temperature, top_k=i, top_p=0.5 + i / 20)]
        )
        texts.add(plain[0].text)
        texts.add(cut[0].text)
    assert counts["builds"] == warm["builds"]
    if keras.backend.backend() != "torch":
        assert counts["traces"] == warm["traces"]
    # The options did reach the sampler: seeds and temperatures vary the text.
    assert len(texts) > 3


def test_a_seeded_request_ignores_what_shares_its_pass(sampling_engine):
    engine = sampling_engine
    seeded = CompletionRequest("the", "a1", 8, temperature=1.5, seed=2**40 + 3)
    alone = engine.complete([seeded])[0]
    neighbours = [
        CompletionRequest("hello world", None, 3, temperature=0.5),
        CompletionRequest("a bed", "a1", 6, temperature=2.0, top_p=0.8),
    ]
    # The same text wherever it sits, with whatever unseeded company.
    for position in range(3):
        batch = list(neighbours)
        batch.insert(position, seeded)
        assert engine.complete(batch)[position] == alone
    other = CompletionRequest("the", "a1", 8, temperature=1.5, seed=3)
    assert engine.complete([other])[0].text != alone.text


_TOO_MANY_BYTES = "<|endoftext|>" * 11  # 11 tokens, but 143 bytes


@pytest.mark.parametrize(
    "request_, message, param",
    [
        (CompletionRequest(3), "'prompt' must be a string", "prompt"),
        (CompletionRequest("a\ud800b"), "lone surrogate", "prompt"),
        (CompletionRequest("the", "a\udfff"), "lone surrogate", "adapter"),
        (
            CompletionRequest("the", max_tokens=0),
            "'max_tokens' must be >= 1",
            "max_tokens",
        ),
        (
            CompletionRequest("the", max_tokens="2"),
            "must be an integer",
            "max_tokens",
        ),
        (
            CompletionRequest("the", max_tokens=2**64),
            "room for at most 19",
            "max_tokens",
        ),
        (
            CompletionRequest("the", temperature=-1.0),
            "'temperature'",
            "temperature",
        ),
        (
            CompletionRequest("the", temperature=float("nan")),
            r"'temperature' must be in \[0, 100\]",
            "temperature",
        ),
        (
            CompletionRequest("the", temperature=101),
            "'temperature'",
            "temperature",
        ),
        (
            CompletionRequest("the", top_p=0.0),
            r"'top_p' must be in \(0, 1\]",
            "top_p",
        ),
        (CompletionRequest("the", top_k=0), "'top_k' must be >= 1", "top_k"),
        (
            CompletionRequest("the", top_k=len(VOCABULARY) + 1),
            f"'top_k' must be <= {len(VOCABULARY)}",
            "top_k",
        ),
        (CompletionRequest("the", top_k=2**64), "'top_k' must be <=", "top_k"),
        (CompletionRequest("the", seed=-2), "'seed' must be >= 0", "seed"),
        (
            CompletionRequest("the", seed=2**63),
            r"'seed' must be <= 9223372036854775807",
            "seed",
        ),
        (CompletionRequest("the" * 12), "the limit is 10", "prompt"),
        (CompletionRequest(_TOO_MANY_BYTES), "143 bytes long", "prompt"),
        (
            CompletionRequest("the cat", max_tokens=18),
            "room for at most",
            "max_tokens",
        ),
        (CompletionRequest("the", "nope"), "Unknown adapter 'nope'", "adapter"),
    ],
)
def test_engine_validate(request_, message, param):
    engine = _small_engine()
    assert engine.max_prompt_bytes == 10 * len("<|endoftext|>")
    error = RequestError if param != "adapter" else (RequestError, KeyError)
    with pytest.raises(error, match=message) as caught:
        engine.validate(request_)
    assert caught.value.param == param
    # Within every limit: accepted, whatever the sizes of the numbers.
    engine.validate(
        CompletionRequest(
            "the",
            max_tokens=5,
            temperature=100,
            top_k=len(VOCABULARY),
            top_p=1.0,
            seed=2**63 - 1,
        )
    )


def test_engine_load_errors(adapters, tmp_path):
    engine = _small_engine()
    engine.load_adapter("a1", adapters["a1"])
    with pytest.raises(AdapterLoadError, match="already loaded"):
        engine.load_adapter("a1", adapters["a2"])
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        engine.load_adapter("empty", tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        engine.load_adapter("bad", bad)
    assert [a["name"] for a in engine.list_adapters()] == ["a1"]


def test_engine_refuses_non_finite_adapters(adapters, tmp_path):
    engine = _small_engine()
    before = engine.bank.structure_version
    for what, path in broken_adapter_copies(adapters["a1"], tmp_path).items():
        with pytest.raises(AdapterLoadError) as caught:
            engine.load_adapter(what, path)
        message = str(caught.value)
        assert caught.value.param == "path"
        assert path in message, (what, message)
        assert any(w in message for w in ("finite", "NaN", "float32")), (
            what,
            message,
        )
        assert engine.list_adapters() == []
    assert engine.bank.structure_version == before
    json.dumps(engine.list_adapters(), allow_nan=False)


_ENGINE = {}


def _small_engine():
    if "engine" not in _ENGINE:
        _ENGINE["engine"] = Engine(
            gpt2_causal_lm(), max_prompt_tokens=10, max_total_tokens=20
        )
    engine = _ENGINE["engine"]
    for adapter in engine.list_adapters():
        engine.unload_adapter(adapter["name"])
    return engine


def test_model_ops_after_generate_take_effect(adapters, alone):
    # keras-hub caches its compiled generate function; model-level ops must
    # drop it, or the adapter state it was traced with stays in effect.
    lm = kl.load_adapter(gpt2_causal_lm(), adapters["a1"])
    lm.compile(sampler="greedy")
    prompt = PROMPTS[0]

    def text():
        return lm.generate([prompt], max_length=14, stop_token_ids=None)[0]

    assert text() == alone(prompt, "a1")
    with kl.disable_adapters(lm):
        assert text() == alone(prompt, None)
    kl.merge_adapters(lm)
    assert text() == alone(prompt, "a1")
    kl.unmerge_adapters(lm)
    kl.unload(lm)
    assert text() == alone(prompt, None)
