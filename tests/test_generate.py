"""Generation and the serving engine: per-prompt adapters in one batch."""

import os

import numpy as np
import pytest

import keras_lora as kl
from keras_lora.serving import (
    AdapterBank,
    AdapterLoadError,
    CompletionRequest,
    Engine,
    RequestError,
    UnknownAdapterError,
    generate,
)
from tests.tiny_lm import PROMPTS, gpt2_causal_lm

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


@pytest.mark.parametrize(
    "request_, message",
    [
        (CompletionRequest(3), "'prompt' must be a string"),
        (CompletionRequest("the", max_tokens=0), "'max_tokens' must be >= 1"),
        (CompletionRequest("the", max_tokens="2"), "must be an integer"),
        (CompletionRequest("the", temperature=-1.0), "'temperature'"),
        (CompletionRequest("the", top_p=0.0), r"'top_p' must be in \(0, 1\]"),
        (CompletionRequest("the", top_k=0), "'top_k' must be >= 1"),
        (CompletionRequest("the", seed=-2), "'seed' must be >= 0"),
        (CompletionRequest("the" * 12), "the limit is 10"),
        (CompletionRequest("the cat", max_tokens=20), "room for at most"),
    ],
)
def test_engine_validate(request_, message):
    engine = _small_engine()
    with pytest.raises(RequestError, match=message):
        engine.validate(request_)


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
