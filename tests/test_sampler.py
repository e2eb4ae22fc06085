"""The rank sampler: one draw per forward pass for every layer, replayed by gradient checkpointing."""

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers, elastic_runtimes
from elasticlora import sampler as sampler_module

from conftest import MODELS, VOCAB, randomize_lora, tiny_llama


def elastic_model(**kwargs):
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(**{"r": 8, **kwargs}))
    randomize_lora(model)
    return model


def draws(model) -> torch.Tensor:
    """(layers, examples) ranks of the last training pass."""
    return torch.stack([layer.drawn_ranks() for layer in elastic_layers(model).values()])


def test_one_pass_gives_every_layer_the_same_rank_per_example():
    model = elastic_model().train()  # shared_draw_prob=1: the whole model runs at one rank per example
    model(torch.randint(0, VOCAB, (64, 4)))
    ranks = draws(model)
    assert (ranks == ranks[0]).all()
    assert len(set(ranks[0].tolist())) > 1, "64 examples over 4 ranks should not all agree"


def test_each_forward_pass_draws_once():
    model = elastic_model().train()
    sampler = elastic_runtimes(model)["default"].sampler
    before = sampler.passes
    passes = []
    for _ in range(3):
        model(torch.randint(0, VOCAB, (64, 4)))
        passes.append(draws(model))
    assert sampler.passes == before + 3
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])


def test_ranks_follow_the_configured_distribution():
    model = elastic_model(r=32, full_rank_prob=0.5).train()
    torch.manual_seed(0)
    model(torch.randint(0, VOCAB, (6000, 2)))
    ranks = draws(model)[0]
    support = [1, 2, 4, 8, 16, 32]
    assert set(ranks.tolist()) == set(support)
    for k in support:  # full rank: 0.5 + 0.5 / 6; the others 0.5 / 6 each; 6000 draws give sd < 0.007
        expected = 0.5 / 6 + (0.5 if k == 32 else 0.0)
        assert abs((ranks == k).float().mean().item() - expected) < 0.03, k


@pytest.mark.parametrize("batch", [16, 4])
def test_every_pass_holds_each_rank_in_close_to_its_share(batch):
    """Consecutive draws are spread evenly (a low-discrepancy sequence): in each of 300 passes the full-rank count
    stays near its mean, far closer than independent draws keep it (binomial sd 1.97 at 16 and 0.99 at 4)."""
    model = elastic_model(r=32, full_rank_prob=0.5).train()
    torch.manual_seed(0)
    counts, total = [], torch.zeros(33)
    for _ in range(300):
        model(torch.randint(0, VOCAB, (batch, 2)))
        ranks = draws(model)[0]
        counts.append((ranks == 32).sum().item())
        total += torch.bincount(ranks, minlength=33)
    mean = batch * (0.5 + 0.5 / 6)
    assert all(abs(c - mean) < 1.5 for c in counts)
    assert torch.tensor(counts, dtype=torch.float).std() < 0.7
    shares = total[[1, 2, 4, 8, 16, 32]] / total.sum()  # and the configured distribution over the whole run
    assert torch.allclose(shares, torch.tensor([0.5 / 6] * 5 + [0.5 + 0.5 / 6]), atol=0.01)


@pytest.mark.parametrize("shared_draw_prob", [0.0, 0.5])
def test_unshared_draws_are_per_layer(shared_draw_prob):
    """A shared draw puts every layer of that example at one rank; the others draw per layer."""
    model = elastic_model(r=32, shared_draw_prob=shared_draw_prob).train()
    torch.manual_seed(0)
    model(torch.randint(0, VOCAB, (2000, 2)))
    ranks = draws(model)
    uniform = (ranks == ranks[0]).all(dim=0).float().mean().item()  # examples with one rank in every layer
    # by chance alone, 14 layers agree with probability under sum_k P(k)^14 < 0.001 here
    assert uniform < 0.01 if shared_draw_prob == 0 else abs(uniform - shared_draw_prob) < 0.05
    for row in ranks:  # every layer still draws from the whole support
        assert set(row.tolist()) == {1, 2, 4, 8, 16, 32}


def test_draw_per_batch_gives_one_rank_per_pass():
    model = elastic_model(draw_per="batch", full_rank_prob=0.0).train()
    model(torch.randint(0, VOCAB, (8, 6)))
    ranks = draws(model)
    assert ranks.shape[1] == 1 and (ranks == ranks[0]).all()


def test_draws_are_reproducible_and_differ_across_processes(monkeypatch, input_ids):
    def first_draws():
        model = elastic_model(shared_draw_prob=0.5).train()
        torch.manual_seed(123)
        model(input_ids)
        return draws(model)

    first, second = first_draws(), first_draws()
    assert torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) > 1, "unshared draws differ between layers"
    monkeypatch.setattr(sampler_module, "_process_rank", lambda: 1)
    assert not torch.equal(first_draws(), first)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_each_example_trains_at_its_drawn_rank(model_id):
    """Example b of a training pass computes what eval at its drawn rank computes (GPT-2: transformers `Conv1D`)."""
    model = get_peft_model(MODELS[model_id](), ElasticLoraConfig(r=8, full_rank_prob=0.3))
    randomize_lora(model)
    model.train()
    ids = torch.randint(0, VOCAB, (12, 6), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    ranks = draws(model)[0].tolist()
    assert len(set(ranks)) > 2
    model.eval()
    with torch.no_grad():
        for b, k in enumerate(ranks):
            with at_ranks(model, k):
                assert torch.allclose(logits[b], model(ids[b : b + 1]).logits[0], atol=1e-5), (b, k)


def grads(model, passes, checkpointing, use_reentrant=True) -> dict[str, torch.Tensor]:
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.enable_input_require_grads()
    model.train()
    torch.manual_seed(7)
    loss = sum(model(ids, labels=ids).loss for ids in passes)  # several passes before one backward
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("n_passes", [1, 2])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_each_pass_with_its_own_draws(use_reentrant, n_passes):
    passes = [torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(i)) for i in range(n_passes)]
    plain = grads(elastic_model(full_rank_prob=0.0, shared_draw_prob=0.5), passes, checkpointing=False)
    checkpointed = grads(
        elastic_model(full_rank_prob=0.0, shared_draw_prob=0.5),
        passes,
        checkpointing=True,
        use_reentrant=use_reentrant,
    )
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


class Twice(nn.Module):
    """One linear layer applied twice in a forward pass (weight sharing), and a rows-as-tokens call."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        y = self.proj(torch.relu(self.proj(x)))
        tokens = self.proj(y.reshape(-1, 16))  # rows are not the pass's examples (as for routed MoE experts)
        return y, tokens


def test_a_module_called_twice_in_a_pass_uses_the_same_ranks():
    torch.manual_seed(0)
    model = get_peft_model(Twice(), ElasticLoraConfig(r=8, full_rank_prob=0.0, target_modules=["proj"]))
    randomize_lora(model)
    x = torch.randn(16, 3, 16)
    model.train()
    y, tokens = model(x)
    (layer,) = elastic_layers(model).values()
    ranks = layer.drawn_ranks().tolist()
    assert len(ranks) == 16 and len(set(ranks)) > 1
    model.eval()
    with torch.no_grad():
        for b, k in enumerate(ranks):
            with at_ranks(model, k):
                assert torch.allclose(y[b], model(x[b : b + 1])[0][0], atol=1e-5), (b, k)
        with at_ranks(model, ranks[0]):  # a call whose rows are not examples runs at the pass's first rank
            assert torch.allclose(tokens, model.proj(y.reshape(-1, 16)), atol=1e-5)
