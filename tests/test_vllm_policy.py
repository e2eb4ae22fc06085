"""vLLM's rules for LoRA adapters, as elasticlora.vllm encodes them (no vLLM needed)."""

import pytest

from elasticlora.vllm import (
    architecture_problems,
    buckets_below,
    unmapped_module_types,
    vllm_max_lora_rank,
    vllm_problems,
)


@pytest.mark.parametrize("rank,bucket", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512)])
def test_vllm_rank_bucket(rank, bucket):
    assert vllm_max_lora_rank(rank) == bucket


def test_vllm_rank_bucket_too_large():
    with pytest.raises(ValueError, match="513"):
        vllm_max_lora_rank(513)


def test_buckets_below_a_rank_come_largest_first():
    assert buckets_below(64) == [32, 16, 8, 1]
    assert buckets_below(1) == []


@pytest.mark.parametrize(
    "raw,problem",
    [
        ({"use_dora": True}, "DoRA (use_dora=true)"),
        ({"lora_bias": True}, "LoRA bias (lora_bias=true)"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head", "score"]}, "modules_to_save ['lm_head']"),
    ],
)
def test_settings_vllm_refuses_are_named(raw, problem):
    assert vllm_problems({"bias": "none", **raw}, 8) == [problem]


def test_a_plain_lora_config_has_no_vllm_problem():
    assert vllm_problems({"bias": "none", "modules_to_save": ["score"]}, 512) == []
    assert vllm_problems({}, 513) == ["rank 513 > 512"]


def test_module_types_outside_llama_are_listed():
    assert unmapped_module_types(["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"]) == ["c_attn"]


@pytest.mark.parametrize(
    "architecture,modules,problems",
    [
        ("LlamaForCausalLM", ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"], []),
        ("Phi3ForCausalLM", ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"], []),
        ("Phi3ForCausalLM", ["layers.0.q_proj"], ["vLLM's Phi3ForCausalLM takes no LoRA on ['q_proj']"]),
        ("GPT2LMHeadModel", ["transformer.h.0.attn.c_attn"], ["vLLM's GPT2LMHeadModel does not support LoRA"]),
        ("SomeNewForCausalLM", ["model.layers.0.whatever"], []),  # unknown: inspect's Llama-family note instead
    ],
)
def test_architecture_problems_follow_vllms_model_classes(architecture, modules, problems):
    assert architecture_problems(architecture, modules) == problems
