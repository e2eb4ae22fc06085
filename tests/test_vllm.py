"""Opt-in (`make test-vllm`): exported adapters load in vLLM's own LoRA loader with the ranks and updates PEFT has."""

import importlib.util
import sys
from pathlib import Path

import pytest
from peft import get_peft_model

from elasticlora import ElasticLoraConfig, elastic_layers
from elasticlora.adapter_io import adapter_files, write_atomically
from elasticlora.export import export_peft_adapter

from conftest import randomize_lora, tiny_llama

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make test-vllm)"),
]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.parametrize("pad", [False, True], ids=["rank_pattern", "padded"])
def test_vllm_loads_the_export_with_per_module_ranks(pad, tmp_path):
    from check_vllm import check_with_vllm

    model = get_peft_model(tiny_llama(layers=12), ElasticLoraConfig(r=16))
    randomize_lora(model)
    # ranks that differ between layers 1 and 11, the case where a suffix-matched key would be misread
    ranks = {name: (i % 16) + 1 for i, name in enumerate(elastic_layers(model))}
    write_atomically(tmp_path / "out", adapter_files(*export_peft_adapter(model, ranks, pad_to_max_rank=pad)))
    result = check_with_vllm(tmp_path / "out")
    assert result["modules"] == len(ranks)
    assert result["ranks"] == (dict.fromkeys(ranks, 16) if pad else ranks)
    assert result["max_lora_rank"] == 16
