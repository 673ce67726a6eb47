import pytest

import keras_lora as kl
from keras_lora.model.matching import path_matches


def test_defaults_and_json_round_trip():
    config = kl.LoraConfig(
        rank=4,
        target_modules=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={".*query": 16},
        layers_to_transform=1,
        bias="lora_only",
        modules_to_save=("head",),
    )
    assert config.alpha == 4
    assert config.layers_to_transform == [1]
    assert kl.LoraConfig.from_json(config.to_json()) == config
    assert config.rank_for("block_1/attn/value") == 2
    assert config.rank_for("block_1/attn/query") == 4
    assert config.alpha_for("block_1/attn/query") == 16
    assert config.alpha_for("block_1/attn/value") == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "LoraConfig.rank must be a positive integer"),
        ({"alpha": -2}, "LoraConfig.alpha must be > 0, got -2"),
        ({"dropout": 1.5}, r"LoraConfig.dropout must be in \[0, 1\)"),
        ({"target_modules": []}, "target_modules is an empty list"),
        ({"target_modules": [3]}, "target_modules must be None"),
        ({"target_modules": "(["}, "not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be"),
        ({"alpha_pattern": {"q": "x"}}, r"alpha_pattern\['q'\] must be"),
        ({"layers_to_transform": [-1]}, "layers_to_transform must be"),
        ({"bias": "some"}, "LoraConfig.bias must be one of"),
        ({"init": "olora"}, "LoraConfig.init must be one of"),
        ({"use_rslora": "yes"}, "use_rslora must be True or False"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kl.LoraConfig(**kwargs)


def test_unknown_json_field_is_rejected():
    with pytest.raises(ValueError, match="unknown fields \\['r'\\]"):
        kl.LoraConfig.from_dict({"r": 4})


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("query", "transformer_layer_0/self_attention/query", True),
        ("self_attention/query", "t_0/self_attention/query", True),
        ("query", "t_0/self_attention/query_norm", False),
        (r".*_1/.*/value", "transformer_layer_1/self_attention/value", True),
        (r".*_1/.*/value", "transformer_layer_0/self_attention/value", False),
    ],
)
def test_path_matching(pattern, path, expected):
    assert path_matches(pattern, path) is expected
