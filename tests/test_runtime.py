"""The runtime of an elastic adapter (sampler, basis group, hooks) belongs to its model: how each way of building a
model finds the module that starts a pass, independence between models, detaching, copying, and the draw position.

Trainer, SFTTrainer, DDP and FSDP2 are the other ways in: tests/test_trainer.py and tests/test_distributed.py.
"""

import copy

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model

from elasticlora import ElasticLoraConfig, attach_sampler, elastic_layers, elastic_runtimes, load_elastic

from conftest import VOCAB, randomize_lora, tiny_llama


def batch(n: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 4), generator=torch.Generator().manual_seed(n))


def passes(model) -> int:
    return elastic_runtimes(model)["default"].sampler.passes


def last_draws(model) -> torch.Tensor:
    """(layers, examples) ranks of the last training pass."""
    return torch.stack([layer.drawn_ranks() for layer in elastic_layers(model).values()])


def via_get_peft_model():
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    return model, model


def via_load_elastic(tmp_path):
    get_peft_model(tiny_llama(), ElasticLoraConfig(r=8)).save_pretrained(tmp_path)
    model = load_elastic(tiny_llama(), tmp_path, is_trainable=True)
    return model, model


def via_inject_adapter_in_model():
    """PEFT's functional API drops the wrapper the layers were built in: the first training call hooks the module
    whose forward is outermost."""
    model = inject_adapter_in_model(ElasticLoraConfig(r=8), tiny_llama())
    return model, model


def via_an_inner_module():
    """A loop that calls the transformers model inside the PeftModel hooks it with `attach_sampler`."""
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    inner = attach_sampler(model.base_model.model)
    return model, inner


def via_an_inner_module_unhooked():
    """Without `attach_sampler`, the first call of the inner module hooks it."""
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    return model, model.base_model.model


WAYS_IN = {
    "get_peft_model": lambda tmp_path: via_get_peft_model(),
    "load_elastic": via_load_elastic,
    "inject_adapter_in_model": lambda tmp_path: via_inject_adapter_in_model(),
    "attach_sampler(inner module)": lambda tmp_path: via_an_inner_module(),
    "inner module, hooked at its first call": lambda tmp_path: via_an_inner_module_unhooked(),
}


@pytest.mark.parametrize("way", sorted(WAYS_IN))
def test_every_forward_of_the_module_the_loop_calls_is_one_pass(way, tmp_path):
    model, called = WAYS_IN[way](tmp_path)
    randomize_lora(model)
    model.train()
    seen = []
    for _ in range(3):
        before = passes(model)
        called(batch())
        assert passes(model) == before + 1, "one forward call, one pass of draws"
        seen.append(last_draws(model))
        assert (seen[-1] == seen[-1][0]).all(), "every layer ran at this pass's ranks"
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert called in elastic_runtimes(model)["default"].hooked


def test_two_models_from_one_config_have_their_own_runtime_and_draws():
    config = ElasticLoraConfig(r=8)
    first, second = get_peft_model(tiny_llama(), config), get_peft_model(tiny_llama(seed=1), config)
    assert elastic_runtimes(first)["default"] is not elastic_runtimes(second)["default"]
    assert "_rank_sampler" not in vars(config) and "_basis_group" not in vars(config), "the config holds no state"
    first.train(), second.train()
    first(batch()), first(batch())
    second(batch())
    assert (passes(first), passes(second)) == (2, 1)


def test_each_adapter_of_a_model_has_its_own_runtime():
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    model.add_adapter("other", ElasticLoraConfig(r=4))
    runtimes = elastic_runtimes(model)
    assert set(runtimes) == {"default", "other"} and runtimes["default"] is not runtimes["other"]
    assert model in runtimes["other"].hooked


def test_detach_removes_the_hooks_and_attach_restores_them():
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    runtime = elastic_runtimes(model)["default"]
    hooks = len(model._forward_pre_hooks), len(model._forward_hooks)
    runtime.detach()
    assert runtime.hooked == [] and (len(model._forward_pre_hooks), len(model._forward_hooks)) == (0, 0)
    attach_sampler(model)
    assert runtime.hooked == [model] and (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


def test_a_deep_copy_has_its_own_runtime_hooked_to_the_copy():
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8)).train()
    model(batch())
    copied = copy.deepcopy(model)
    runtime, copied_runtime = elastic_runtimes(model)["default"], elastic_runtimes(copied)["default"]
    assert copied_runtime is not runtime and copied_runtime.sampler is not runtime.sampler
    assert copied_runtime.hooked == [copied] and runtime.hooked == [model]
    assert copied_runtime.state_dict() == runtime.state_dict()
    copied(batch()), copied(batch())
    assert passes(copied) == 3 and passes(model) == 1
    assert all(layer.elastic_state["default"].runtime is copied_runtime for layer in elastic_layers(copied).values())
    copied_runtime.detach()  # the copy's handles point at the copy's hooks
    assert (len(copied._forward_pre_hooks), len(model._forward_pre_hooks)) == (0, 1)


def test_the_draw_position_round_trips_and_continues_the_sequence():
    """A model that loads another's draw position draws what that model draws next."""
    torch.manual_seed(0)
    first, second = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8)), None
    first.train()
    for _ in range(3):
        first(batch())
    state = elastic_runtimes(first)["default"].state_dict()
    assert state == {"passes": 3, "draws": 48}
    second = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8)).train()
    elastic_runtimes(second)["default"].load_state_dict(state)
    first(batch()), second(batch())
    assert torch.equal(last_draws(first), last_draws(second))
    with pytest.raises(ValueError, match="`draws` must be a non-negative int"):
        elastic_runtimes(second)["default"].load_state_dict({"passes": 1, "draws": -1})
