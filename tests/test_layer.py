import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers, load_elastic, set_ranks
from elasticlora.layer import elastic_delta_weight

from conftest import MODELS, randomize_lora, tiny_llama

Q_PROJ = "model.layers.0.self_attn.q_proj"


def elastic_model(model_id="llama", **kwargs):
    model = get_peft_model(MODELS[model_id](), ElasticLoraConfig(**{"r": 8, **kwargs}))
    randomize_lora(model)
    return model


def plain_copy(elastic, r=8, lora_alpha=16):
    """A plain PEFT LoRA holding the elastic model's weights."""
    model_id = "gpt2" if "GPT2" in type(elastic.get_base_model()).__name__ else "llama"
    plain = get_peft_model(
        MODELS[model_id](), LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=True, target_modules="all-linear")
    )
    plain.load_state_dict(elastic.state_dict())
    return plain.eval()


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_disabled_adapter_equals_base_model(model_id, input_ids):
    model = elastic_model(model_id).eval()
    base = MODELS[model_id]()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_full_rank_eval_equals_plain_peft_lora(model_id, input_ids):
    """At full rank the elastic layer is exactly the PEFT LoRA layer holding its state dict."""
    model = elastic_model(model_id).eval()
    plain = plain_copy(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, plain(input_ids).logits)
        assert not torch.equal(model(input_ids).logits, MODELS[model_id]()(input_ids).logits)


def test_rank_zero_drops_the_adapter(input_ids):
    model = elastic_model().eval()
    with torch.no_grad(), at_ranks(model, 0):
        assert torch.equal(model(input_ids).logits, tiny_llama()(input_ids).logits)


@pytest.mark.parametrize("k", [2, 8])
def test_merge_and_unload_at_a_truncation(k, input_ids):
    model = elastic_model().eval()
    with torch.no_grad(), at_ranks(model, k):
        expected = model(input_ids).logits
    set_ranks(model, k)
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids).logits, expected, atol=1e-5)


def test_merge_then_unmerge_restores_base_weights():
    model = elastic_model().eval()
    before = copy.deepcopy(model.get_base_model().state_dict())
    set_ranks(model, 3)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        set_ranks(model, 5)
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_save_then_plain_peft_load_gives_identical_outputs(model_id, tmp_path, input_ids):
    model = elastic_model(model_id).eval()
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="rank_sampler"):
        plain = PeftModel.from_pretrained(MODELS[model_id](), tmp_path)
    assert type(plain.peft_config["default"]) is LoraConfig
    with torch.no_grad():
        assert torch.allclose(plain(input_ids).logits, model(input_ids).logits, atol=1e-6)


def test_save_then_elastic_reload_keeps_ranks_and_resumes_training(tmp_path, input_ids):
    model = elastic_model(full_rank_prob=0.1, shared_draw_prob=0.5).eval()
    model.save_pretrained(tmp_path)
    reloaded = load_elastic(tiny_llama(), tmp_path, is_trainable=True)
    config = reloaded.peft_config["default"]
    assert (config.full_rank_prob, config.shared_draw_prob) == (0.1, 0.5)
    with torch.no_grad(), at_ranks(model, 2), at_ranks(reloaded, 2):
        assert torch.allclose(reloaded.eval()(input_ids).logits, model(input_ids).logits, atol=1e-6)
    reloaded.train()
    reloaded(input_ids, labels=input_ids).loss.backward()
    layer = elastic_layers(reloaded)[Q_PROJ]
    assert layer.drawn_ranks() is not None
    assert layer.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_full_rank_training_has_plain_peft_loras_gradients(model_id, input_ids):
    """With every draw at full rank, a training step is plain LoRA's, `Conv1D` (fan_in_fan_out) included; the
    truncated rows are checked against eval at their ranks in tests/test_sampler.py."""
    model = elastic_model(model_id, full_rank_prob=1.0).train()
    plain = plain_copy(model).train()
    if model_id == "gpt2":
        assert elastic_layers(model)["transformer.h.0.attn.c_attn"].fan_in_fan_out
    for m in (model, plain):
        m(input_ids, labels=input_ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(
        torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in model.named_parameters() if n in grads
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(grads)


def test_a_plain_lora_loaded_elastically_truncates_to_its_top_singular_directions(tmp_path, input_ids):
    plain = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    randomize_lora(plain)
    plain.save_pretrained(tmp_path)
    elastic = load_elastic(tiny_llama(), tmp_path)
    assert elastic.peft_config["default"].rank_sampler == "none"
    layer = elastic_layers(elastic)[Q_PROJ]
    update = elastic_delta_weight(layer, "default", 3).double()
    u, s, vh = torch.linalg.svd(elastic_delta_weight(layer, "default").double())
    assert torch.allclose(update, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)  # Eckart-Young: the best rank-3 update
