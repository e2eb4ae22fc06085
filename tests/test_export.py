import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers
from elasticlora.adapter_io import adapter_files, write_atomically
from elasticlora.export import export_peft_adapter

from conftest import MODELS, randomize_lora


def mixed_ranks(model):
    """Per-module ranks covering 0 (dropped), 1, a middle value and full rank."""
    choices = [0, 1, 3, 8, 5, 2, 8]
    return {name: choices[i % len(choices)] for i, name in enumerate(elastic_layers(model))}


@pytest.mark.parametrize("pad", [False, True], ids=["rank_pattern", "padded"])
@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_export_reloads_in_plain_peft_with_identical_outputs(model_id, pad, tmp_path, input_ids):
    model = get_peft_model(MODELS[model_id](), ElasticLoraConfig(r=8))
    randomize_lora(model)
    ranks = mixed_ranks(model)
    with torch.no_grad(), at_ranks(model.eval(), ranks):
        expected = model(input_ids).logits
    config, tensors = export_peft_adapter(model, ranks, pad_to_max_rank=pad)
    write_atomically(tmp_path / "out", adapter_files(config, tensors))

    plain = PeftModel.from_pretrained(MODELS[model_id](), tmp_path / "out").eval()
    with torch.no_grad():
        got = plain(input_ids).logits
    assert (got - expected).abs().max() <= 1e-5
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    kept = {name: k for name, k in ranks.items() if k > 0}
    assert saved["r"] == saved["lora_alpha"] == 8
    assert saved["use_rslora"] is False
    assert saved["rank_pattern"] == saved["alpha_pattern"] == ({} if pad else kept)
    assert sorted(saved["target_modules"]) == sorted(kept)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in tensors)
    # dropped modules are absent: plain PEFT does not adapt them
    reloaded = dict(plain.get_base_model().named_modules())
    assert all(hasattr(reloaded[name], "lora_A") == (k > 0) for name, k in ranks.items())


def test_export_refuses_an_empty_adapter():
    model = get_peft_model(MODELS["llama"](), ElasticLoraConfig(r=4))
    with pytest.raises(ValueError, match="every module is at rank 0"):
        export_peft_adapter(model, 0)
