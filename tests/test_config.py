import pytest
import torch
from peft import LoraConfig, get_peft_model

from elasticlora import ElasticLoraConfig, elastic_layers, get_elastic_model
from elasticlora.layer import ElasticLinear

from conftest import MODELS


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_no_argument_config_adapts_every_linear_layer(model_id):
    model = get_peft_model(MODELS[model_id](), ElasticLoraConfig())
    layers = elastic_layers(model)
    per_block = 7 if model_id == "llama" else 4  # q k v o gate up down / c_attn c_proj c_fc c_proj
    assert len(layers) == 2 * per_block
    assert all(isinstance(layer, ElasticLinear) for layer in layers.values())
    assert all(layer.r["default"] == 64 for layer in layers.values())
    assert not any("lm_head" in name for name in layers)


def test_config_is_a_lora_config_and_keeps_peft_type():
    config = ElasticLoraConfig()
    assert isinstance(config, LoraConfig)
    assert config.peft_type.value == "LORA"
    assert config.to_dict()["rank_sampler"] == "log2"


INVALID = [
    ("r", 0),
    ("r", -4),
    ("min_rank", 0),
    ("full_rank_prob", -0.1),
    ("full_rank_prob", 1.5),
    ("full_rank_prob", float("nan")),
    ("rank_sampler", "gaussian"),
    ("draw_per", "token"),
    ("shared_draw_prob", 1.5),
    ("shared_draw_prob", True),
    ("basis_refresh_steps", 0),
    ("basis_refresh_steps", 2.5),
    ("use_dora", True),
    ("lora_bias", True),
    ("bias", "all"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_values_raise_naming_the_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        ElasticLoraConfig(**{field: value})
    assert field in str(err.value)
    if not isinstance(value, bool):
        assert str(value) in str(err.value)


def test_min_rank_above_max_rank_raises():
    with pytest.raises(ValueError, match=r"`min_rank` \(16\) must not exceed the maximum rank `r` \(8\)"):
        ElasticLoraConfig(r=8, min_rank=16)


SUPPORTS = [
    ({"r": 64}, [1, 2, 4, 8, 16, 32, 64]),
    ({"r": 24}, [1, 2, 4, 8, 16, 24]),
    ({"r": 32, "min_rank": 4}, [4, 8, 16, 32]),
    ({"r": 6, "rank_sampler": "uniform", "min_rank": 2}, [2, 3, 4, 5, 6]),
    ({"r": 16, "rank_sampler": "none"}, [16]),
]


@pytest.mark.parametrize("kwargs,expected", SUPPORTS)
def test_rank_support(kwargs, expected):
    assert ElasticLoraConfig(**kwargs).rank_support() == expected


class NoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)


def test_get_elastic_model_matches_get_peft_model():
    model = get_elastic_model(MODELS["llama"]())
    assert len(elastic_layers(model)) == 14 and isinstance(model.peft_config["default"], ElasticLoraConfig)


def test_a_model_without_linear_layers_is_refused_with_its_layer_types():
    with pytest.raises(ValueError, match=r"no linear or Conv1D layers to adapt.*Embedding"):
        get_elastic_model(NoLinear())


def test_targets_that_match_nothing_are_refused_with_the_candidates():
    with pytest.raises(ValueError, match=r"match no module.*'q_proj'.*model\.layers\.0\.self_attn\.q_proj"):
        get_elastic_model(MODELS["llama"](), ElasticLoraConfig(target_modules=["qq_proj"]))
