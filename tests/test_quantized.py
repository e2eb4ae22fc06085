"""QLoRA: elastic layers over 4-bit and 8-bit bitsandbytes bases (bitsandbytes >= 0.50 runs them on CPU)."""

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers

from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

pytestmark = pytest.mark.slow  # quantized bases


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden=128).save_pretrained(path)  # 4-bit blocks hold 64 weights: rows must be wider
    return path


QUANT = {
    "4bit": (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "ElasticLinear4bit",
    ),
    "8bit": (BitsAndBytesConfig(load_in_8bit=True), "ElasticLinear8bitLt"),
}


@pytest.mark.parametrize("bits", sorted(QUANT))
def test_quantized_base_trains_elastically(bits, tiny_llama_dir, input_ids):
    quantization_config, layer_type = QUANT[bits]
    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=quantization_config, dtype=torch.float32
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, ElasticLoraConfig(r=8))
    layers = elastic_layers(model)
    assert {type(layer).__name__ for layer in layers.values()} == {layer_type}
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    layer = layers["model.layers.0.self_attn.q_proj"]
    assert layer.drawn_ranks() is not None
    assert torch.isfinite(layer.lora_A["default"].weight.grad).all()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    model.eval()
    with torch.no_grad():
        full = model(input_ids).logits
        with at_ranks(model, 2):
            truncated = model(input_ids).logits
    assert torch.isfinite(truncated).all() and not torch.equal(full, truncated)
