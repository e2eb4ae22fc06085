import copy

import pytest
import torch
from conftest import MODELS, randomize_lora, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers, load_elastic, set_ranks

Q_PROJ = "model.layers.0.self_attn.q_proj"
INDEX = dict(truncation_basis="index")  # the earlier recipe: truncation keeps the first k stored components
COMPONENT = dict(truncation_scaling="component", truncation_scale_power=0.5, **INDEX)


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


@pytest.mark.parametrize(
    "scaling",
    [{}, {"truncation_scaling": "prefix", **INDEX}, COMPONENT],
    ids=["svd", "index-prefix", "index-component"],
)
@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_full_rank_eval_equals_plain_peft_lora(model_id, scaling, input_ids):
    """At full rank the elastic layer is the PEFT LoRA layer holding its state dict (exactly, unless component
    weights multiply h)."""
    model = elastic_model(model_id, **scaling).eval()
    plain = plain_copy(model)
    with torch.no_grad():
        if scaling == COMPONENT:  # the weights multiply h rather than sit in B: other fp32 rounding
            assert torch.allclose(model(input_ids).logits, plain(input_ids).logits, atol=1e-6)
        else:
            assert torch.equal(model(input_ids).logits, plain(input_ids).logits)
        assert not torch.equal(model(input_ids).logits, MODELS[model_id]()(input_ids).logits)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_equals_peft_lora_sliced_to_k(k, power, input_ids):
    model = elastic_model(truncation_scale_power=power, truncation_scaling="prefix", **INDEX).eval()
    # a rank-k rsLoRA with the same scale: alpha_k / sqrt(k) == 16 / sqrt(8) * (8 / k) ** power
    alpha_k = 16 / 8**0.5 * (8 / k) ** power * k**0.5
    plain = get_peft_model(
        tiny_llama(), LoraConfig(r=k, lora_alpha=alpha_k, use_rslora=True, target_modules="all-linear")
    )
    sliced = {
        name: (param[:k] if "lora_A" in name else param[:, :k]) if "lora_" in name else param
        for name, param in model.state_dict().items()
    }
    plain.load_state_dict(sliced)
    with torch.no_grad(), at_ranks(model, k):
        assert torch.allclose(model(input_ids).logits, plain.eval()(input_ids).logits, atol=1e-6)


def test_rank_zero_drops_the_adapter(input_ids):
    model = elastic_model().eval()
    with torch.no_grad(), at_ranks(model, 0):
        assert torch.equal(model(input_ids).logits, tiny_llama()(input_ids).logits)


@pytest.mark.parametrize(
    "scaling", [{"truncation_scaling": "prefix", **INDEX}, COMPONENT], ids=["prefix", "component"]
)
def test_each_example_trains_its_own_drawn_rank(scaling):
    """In training mode example b of a batch sees exactly the adapter truncated to its drawn rank k_b."""
    model = elastic_model(full_rank_prob=0.0, **scaling)
    layer = elastic_layers(model)[Q_PROJ]
    state = layer.elastic_state["default"]
    x = torch.randn(16, 5, layer.in_features)
    layer.train()
    y = layer(x)
    ks = state.drawn_ranks()
    assert len(set(ks.tolist())) > 1, "16 draws over 4 ranks should not all agree"
    layer.eval()
    for b, k in enumerate(ks.tolist()):
        layer.set_elastic_rank(k, "default")
        assert torch.allclose(y[b], layer(x[b : b + 1])[0], atol=1e-6)
    layer.set_elastic_rank(None, "default")


def test_masked_components_receive_zero_gradient():
    config = ElasticLoraConfig(r=8, full_rank_prob=0.0, init_lora_weights=False, **INDEX)
    model = get_peft_model(tiny_llama(), config)
    layer = elastic_layers(model)[Q_PROJ]
    x = torch.randn(1, 5, layer.in_features)
    layer.train()
    for _ in range(20):  # until a truncated rank is drawn
        layer.zero_grad()
        layer(x).sum().backward()
        (k,) = layer.elastic_state["default"].drawn_ranks().tolist()
        if k < 8:
            break
    grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert torch.all(grad_a[k:] == 0) and torch.all(grad_b[:, k:] == 0)
    assert grad_a[:k].abs().sum() > 0 and grad_b[:, :k].abs().sum() > 0


def test_batch_and_shared_draws():
    model = elastic_model(draw_per="batch", shared_draw_prob=1.0).train()
    model(torch.randint(0, 64, (8, 6)))
    draws = [layer.elastic_state["default"].drawn_ranks() for layer in elastic_layers(model).values()]
    assert all(d.numel() == 1 for d in draws)
    assert len({int(d) for d in draws}) == 1, "shared_draw_prob=1 shares one rank across layers"


@pytest.mark.parametrize("shared_draw_prob", [0.0, 0.5])
def test_shared_draws_give_whole_model_configurations(shared_draw_prob):
    """A shared draw puts every layer of that example at one rank; the others draw per layer."""
    model = elastic_model(r=32, shared_draw_prob=shared_draw_prob).train()
    torch.manual_seed(0)
    model(torch.randint(0, 64, (2000, 2)))
    draws = torch.stack([layer.elastic_state["default"].drawn_ranks() for layer in elastic_layers(model).values()])
    assert draws.shape[0] >= 8
    uniform = (draws == draws[0]).all(dim=0).float().mean().item()  # examples with one rank in every layer
    # by chance alone, 8 or more layers agree with probability under sum_k P(k)^8 < 0.001 here
    assert uniform < 0.01 if shared_draw_prob == 0 else abs(uniform - shared_draw_prob) < 0.05
    for row in draws:  # every layer still draws from the whole support, full rank most often
        assert set(row.tolist()) == {1, 2, 4, 8, 16, 32}


def test_independent_layer_draws_differ_and_are_reproducible(input_ids):
    def draws():
        model = elastic_model(shared_draw_prob=0.5).train()
        torch.manual_seed(123)
        model(input_ids)
        return [layer.elastic_state["default"].drawn_ranks() for layer in elastic_layers(model).values()]

    first, second = draws(), draws()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({tuple(d.tolist()) for d in first}) > 1


@pytest.mark.parametrize("recipe", [{}, {"shared_draw_prob": 0.5, **INDEX}], ids=["svd", "index"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_the_same_draws(use_reentrant, recipe, input_ids):
    def grads(checkpointing):
        model = elastic_model(**recipe)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(7)
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


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


@pytest.mark.parametrize("scaling", [{}, COMPONENT], ids=["svd", "index-component"])
@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_save_then_plain_peft_load_gives_identical_outputs(model_id, scaling, tmp_path, input_ids):
    model = elastic_model(model_id, **scaling).eval()
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="rank_sampler"):
        plain = PeftModel.from_pretrained(MODELS[model_id](), tmp_path)
    assert type(plain.peft_config["default"]) is LoraConfig
    with torch.no_grad():
        assert torch.allclose(plain(input_ids).logits, model(input_ids).logits, atol=1e-6)


def test_component_weights_fold_into_the_saved_b_and_unfold_on_reload(tmp_path, input_ids):
    """Component j weighs c_j; the parameter holds B / c, the state dict B, and a reload restores the parameter."""
    model = elastic_model(**COMPONENT).eval()
    layer = elastic_layers(model)[Q_PROJ]
    weights = torch.tensor(ElasticLoraConfig(r=8, **COMPONENT).component_weights())
    assert weights[0] == pytest.approx(8**0.5) and weights.sum() == pytest.approx(8)
    param = layer.lora_B["default"].weight
    saved = model.state_dict()[f"base_model.model.{Q_PROJ}.lora_B.default.weight"]
    assert torch.allclose(saved, param * weights, atol=1e-7)
    model.save_pretrained(tmp_path)
    reloaded = load_elastic(tiny_llama(), tmp_path, is_trainable=True)
    assert torch.allclose(elastic_layers(reloaded)[Q_PROJ].lora_B["default"].weight, param, atol=1e-7)
    for k in (1, 3, 8):  # equal up to the fp32 rounding of B * c / c
        with torch.no_grad(), at_ranks(model, k), at_ranks(reloaded.eval(), k):
            assert torch.allclose(reloaded(input_ids).logits, model(input_ids).logits, atol=1e-5)


def test_component_scaling_keeps_the_update_peft_initialised(input_ids):
    """A non-zero init (here random B) means the same adapter under component weights as in plain PEFT."""
    torch.manual_seed(0)
    plain = get_peft_model(
        tiny_llama(),
        LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", init_lora_weights=False),
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8, init_lora_weights=False, **COMPONENT))
    expected = plain.state_dict()
    assert all(torch.allclose(v, expected[n], atol=1e-6) for n, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids).logits, plain.eval()(input_ids).logits, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_component_scaling_rank_k_is_the_plain_sum_of_saved_components(k, input_ids):
    """Under component scaling the rank-k adapter is the saved B[:, :k] A[:k] at the full-rank scale."""
    model = elastic_model(**COMPONENT).eval()
    plain = get_peft_model(
        tiny_llama(), LoraConfig(r=k, lora_alpha=16 / 8**0.5 * k**0.5, use_rslora=True, target_modules="all-linear")
    )
    plain.load_state_dict(
        {n: (p[:k] if "lora_A" in n else p[:, :k]) if "lora_" in n else p for n, p in model.state_dict().items()}
    )
    with torch.no_grad(), at_ranks(model, k):  # the weights multiply h, not the output: other fp32 rounding
        assert torch.allclose(model(input_ids).logits, plain.eval()(input_ids).logits, atol=1e-5)


def test_save_then_elastic_reload_keeps_ranks_and_resumes_training(tmp_path, input_ids):
    model = elastic_model(full_rank_prob=0.1, truncation_scale_power=0.5).eval()
    model.save_pretrained(tmp_path)
    reloaded = load_elastic(tiny_llama(), tmp_path, is_trainable=True)
    config = reloaded.peft_config["default"]
    assert (config.full_rank_prob, config.truncation_scale_power) == (0.1, 0.5)
    with torch.no_grad(), at_ranks(model, 2), at_ranks(reloaded, 2):  # up to the rounding of B * c / c
        assert torch.allclose(reloaded.eval()(input_ids).logits, model(input_ids).logits, atol=1e-5)
    reloaded.train()
    reloaded(input_ids, labels=input_ids).loss.backward()
    layer = elastic_layers(reloaded)[Q_PROJ]
    assert layer.elastic_state["default"].drawn_ranks() is not None
    assert layer.lora_A["default"].weight.grad is not None


def test_conv1d_gpt2_trains(input_ids):
    model = elastic_model("gpt2").train()
    layer = elastic_layers(model)["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = layer.lora_B["default"].weight.detach().clone()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    assert not torch.equal(before, layer.lora_B["default"].weight)


def test_a_plain_lora_loaded_elastically_truncates_without_rescaling(tmp_path, input_ids):
    plain = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    randomize_lora(plain)
    plain.save_pretrained(tmp_path)
    elastic = load_elastic(tiny_llama(), tmp_path)
    assert elastic.peft_config["default"].truncation_scale_power == 0.0
    sliced = get_peft_model(tiny_llama(), LoraConfig(r=3, lora_alpha=16 * 3**0.5 / 8**0.5, use_rslora=True,
                                                     target_modules="all-linear"))  # fmt: skip
    sliced.load_state_dict(
        {n: (p[:3] if "lora_A" in n else p[:, :3]) if "lora_" in n else p for n, p in plain.state_dict().items()}
    )
    with torch.no_grad(), at_ranks(elastic.eval(), 3):
        assert torch.allclose(elastic(input_ids).logits, sliced.eval()(input_ids).logits, atol=1e-6)


def test_component_weights_fold_a_row_sharded_dtensor():
    """FSDP2 shards lora_B by rows: save/load hooks scale each shard and keep the DTensor layout."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from elasticlora.layer import _scale_columns

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight, weights = torch.randn(6, 4), torch.tensor([2.0, 1.0, 0.5, 0.25])
        folded = _scale_columns(distribute_tensor(weight, mesh, [Shard(0)]), weights, inverse=False)
        assert folded.placements == (Shard(0),)
        assert torch.allclose(folded.full_tensor(), weight * weights)
        assert torch.allclose(_scale_columns(folded, weights, inverse=True).full_tensor(), weight)
        with pytest.raises(NotImplementedError, match="rank dimension"):
            _scale_columns(distribute_tensor(weight, mesh, [Shard(1)]), weights, inverse=False)
    finally:
        dist.destroy_process_group()
