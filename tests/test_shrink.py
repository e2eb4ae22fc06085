import pytest
import torch
from peft import get_peft_model

from elasticlora import ElasticLoraConfig, adapter_param_count, at_ranks, elastic_layers
from elasticlora.data import eval_batches, make_batches
from elasticlora.evaluate import eval_loss
from elasticlora.sensitivity import allocation_path, sensitivity
from elasticlora.shrink import shrink, shrink_family, within_tolerance

from conftest import MODELS, VOCAB, char_tokenizer, peaked_elastic_model, randomize_lora, sample_batches, tiny_llama

SIGNAL = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def toy_task():
    """An adapter that matters only in two modules, and eval data sampled from base + that signal.

    The signal modules carry a strong rank-2 update in their first two components; every other module carries only
    small noise, which the data does not reward. Shrink must keep the signal (rank >= 2) and drop most of the rest.
    """
    model = peaked_elastic_model(r=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in elastic_layers(model).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=gen) * 0.02)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
            if name in SIGNAL:
                a[:2] = torch.randn(2, a.shape[1], generator=gen) * 1.5
                b[:, :2] = torch.randn(b.shape[0], 2, generator=gen) * 1.5
                a[2:] = 0
        teacher_ranks = {name: (8 if name in SIGNAL else 0) for name in elastic_layers(model)}
    with at_ranks(model.eval(), teacher_ranks):
        batches = sample_batches(model, seed=1)
    return model, batches


def test_shrink_keeps_the_modules_that_matter_and_drops_the_rest(toy_task):
    model, batches = toy_task
    result = shrink(model, batches, tolerance=0.01, progress=False)
    assert all(result.ranks[name] >= 2 for name in SIGNAL)
    others = [k for name, k in result.ranks.items() if name not in SIGNAL]
    assert sum(k == 0 for k in others) >= 7, "most of the 12 noise-only modules are dropped"
    assert result.params < result.full_params / 3
    # measured, and within tolerance of the best measured
    with at_ranks(model, result.ranks):
        assert eval_loss(model, batches) == pytest.approx(result.quality, rel=1e-6)
    assert result.quality <= result.best_quality * 1.01
    assert result.base_quality > result.quality
    assert result.passes <= 12


@pytest.mark.parametrize("tolerance", [0.005, 0.02])
def test_shrink_is_never_larger_than_the_smallest_good_uniform_rank(tolerance):
    """The search tries one rank for every module (r/2, r/4, ...) before per-module ranks, so a uniform truncation
    within tolerance of the best quality bounds the result's parameters."""
    base = tiny_llama(layers=2)
    with torch.no_grad():
        base.lm_head.weight.mul_(100)  # a peaked next-token distribution, so the adapter shows in the loss
    model = get_peft_model(base, ElasticLoraConfig(r=8)).eval()
    randomize_lora(model, seed=3)
    with torch.no_grad(), at_ranks(model, 2):  # data sampled from the adapter at uniform rank 2
        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (32, 1))
        for _ in range(11):
            logits = model(tokens).logits[:, -1]
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    batches = make_batches([{"input_ids": r.tolist(), "labels": r.tolist()} for r in tokens], 16, 0)
    result = shrink(model, batches, tolerance=tolerance, progress=False)
    good = []
    for k in (4, 2, 1):
        with at_ranks(model, k):
            if eval_loss(model, batches) <= result.best_quality * (1 + tolerance):
                good.append(k)
    assert 2 in good, "the teacher's own rank is within tolerance"
    assert 0 < result.params <= adapter_param_count(model, min(good))
    assert result.passes <= 12


def test_shrink_is_deterministic(toy_task):
    model, batches = toy_task
    first = shrink(model, batches, tolerance=0.02, progress=False)
    second = shrink(model, batches, tolerance=0.02, progress=False)
    assert first.ranks == second.ranks and first.quality == second.quality


def test_parameter_budget_is_respected(toy_task):
    model, batches = toy_task
    budget = 1000
    result = shrink(model, batches, max_params=budget, progress=False)
    assert 0 < result.params <= budget
    assert result.tolerance is None


def test_higher_is_better_metric(toy_task):
    model, batches = toy_task

    def neg_loss(m):
        return -eval_loss(m, batches)

    result = shrink(model, batches, tolerance=0.01, quality=neg_loss, higher_is_better=True, progress=False)
    assert result.metric == "neg_loss"
    assert result.quality >= result.best_quality * 1.01  # negative numbers: within 1% below the best
    assert all(result.ranks[name] >= 2 for name in SIGNAL)


@pytest.mark.parametrize("tolerance", [0, -0.1, float("nan"), 1.5, float("inf")])
def test_invalid_tolerance_raises(tolerance, toy_task):
    model, batches = toy_task
    with pytest.raises(ValueError, match="tolerance"):
        shrink(model, batches, tolerance=tolerance, progress=False)


def test_non_finite_loss_raises():
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=4))
    with torch.no_grad():
        elastic_layers(model)["model.layers.1.mlp.down_proj"].lora_B["default"].weight.fill_(float("nan"))
    batches = make_batches([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}], 1, 0)
    with pytest.raises(FloatingPointError):
        shrink(model, batches, progress=False)


@pytest.mark.parametrize(
    "quality,best,tol,mode,higher,expected",
    [
        (2.02, 2.0, 0.01, "relative", False, True),
        (2.03, 2.0, 0.01, "relative", False, False),
        (2.4, 2.0, 0.5, "absolute", False, True),
        (0.89, 0.9, 0.02, "relative", True, True),
        (0.87, 0.9, 0.02, "relative", True, False),
    ],
)
def test_within_tolerance(quality, best, tol, mode, higher, expected):
    assert within_tolerance(quality, best, tol, mode, higher) is expected


def test_allocation_path_is_monotone_and_orders_by_price():
    costs = {"cheap": torch.tensor([1.0, 0.5, 0.2, 0.0]), "dear": torch.tensor([100.0, 10.0, 1.0, 0.0])}
    path = allocation_path(costs, {"cheap": 10, "dear": 10})
    assert path[0] == {"cheap": 3, "dear": 3} and path[-1] == {"cheap": 0, "dear": 0}
    params = [sum(cfg.values()) for cfg in path]
    assert params == sorted(params, reverse=True)
    assert path[1]["cheap"] < 3 and path[1]["dear"] == 3  # the cheap module is cut first


@pytest.fixture(scope="module")
def rank4_task():
    """r = 32, every module's update lives in its first 4 components (the rest are zero), data sampled from it."""
    base = tiny_llama(layers=2)
    with torch.no_grad():
        base.lm_head.weight.mul_(100)
    model = get_peft_model(base, ElasticLoraConfig(r=32)).eval()
    randomize_lora(model, seed=5)
    with torch.no_grad():
        for layer in elastic_layers(model).values():
            layer.lora_A["default"].weight[4:] = 0
        torch.manual_seed(2)
        tokens = torch.randint(0, VOCAB, (32, 1))
        for _ in range(11):
            logits = model(tokens).logits[:, -1]
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return model, make_batches([{"input_ids": r.tolist(), "labels": r.tolist()} for r in tokens], 16, 0)


@pytest.mark.parametrize("cap", [1, 2, 8])
def test_a_capped_search_never_exceeds_its_cap(cap, rank4_task):
    model, batches = rank4_task
    result = shrink(model, batches, tolerance=0.01, max_rank=cap, progress=False)
    assert max(result.ranks.values()) <= cap and result.rank_cap == cap
    with at_ranks(model, cap):
        assert result.cap_quality == pytest.approx(eval_loss(model, batches), rel=1e-6)
    if cap == 8:  # the update is rank 4: the cap costs nothing and the search still goes below it
        assert result.cap_quality == pytest.approx(result.full_quality, rel=1e-5)
        assert result.quality <= result.best_quality * 1.01 and result.params < adapter_param_count(model, 8)
    else:  # the cap alone is beyond tolerance: the cap wins, and the result says what it cost
        assert result.ranks == dict.fromkeys(result.ranks, cap) and result.cap_quality > result.full_quality * 1.01
    budget = shrink(model, batches, max_params=10**9, max_rank=cap, progress=False)
    assert max(budget.ranks.values()) <= cap


def test_auto_cap_finds_the_smallest_vllm_bucket_within_tolerance(rank4_task):
    model, batches = rank4_task  # r = 32; buckets below it: 16, 8, 1; the update has rank 4
    result = shrink(model, batches, tolerance=0.01, max_rank="auto", progress=False)
    assert result.rank_cap == 8 and max(result.ranks.values()) <= 8
    with at_ranks(model, 1):
        assert eval_loss(model, batches) > result.best_quality * 1.01, "bucket 1 is rightly refused"
    assert result.passes <= 12
    free = shrink(model, batches, tolerance=0.01, progress=False)
    assert max(free.ranks.values()) <= 8 and result.params <= free.params, "below its bucket it halves as free does"


def test_a_family_equals_its_single_tolerance_runs_and_shares_passes(toy_task):
    model, batches = toy_task
    tolerances = [0.005, 0.02, 0.1]
    family = shrink_family(model, batches, tolerances, progress=False)
    singles = [shrink(model, batches, tolerance=t, progress=False) for t in tolerances]
    for got, expected in zip(family, singles):
        assert got.ranks == expected.ranks and got.tolerance == expected.tolerance
        assert got.quality == expected.quality and got.passes == expected.passes and got.curve == expected.curve
    assert family[0].passes_run == family[-1].passes_run < sum(s.passes for s in singles)
    assert [r.params for r in family] == sorted((r.params for r in family), reverse=True)


def test_sensitivity_freezes_everything_and_checkpointing_changes_nothing(input_ids):
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=6))  # trainable, as right after training
    randomize_lora(model)
    batches = make_batches([{"input_ids": row.tolist(), "labels": row.tolist()} for row in input_ids], 2, 0)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    calls = []
    layer = next(iter(elastic_layers(model).values()))
    handle = layer.lora_A["default"].register_forward_hook(lambda *args: calls.append(1))
    plain = sensitivity(model, batches, progress=False).costs
    plain_calls = len(calls)
    checkpointed = sensitivity(model, batches, progress=False, gradient_checkpointing=True).costs
    handle.remove()
    assert len(calls) - plain_calls == 2 * plain_calls, "checkpointing recomputes each block once in backward"
    assert any(c.abs().sum() > 0 for c in plain.values())
    for name in plain:
        assert torch.allclose(checkpointed[name], plain[name], rtol=1e-5, atol=1e-12), name
    assert all(p.grad is None for p in model.parameters()), "no weight gradients are computed"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_eval_loss_is_the_token_level_cross_entropy_of_the_full_logits(model_id):
    """Only the scored positions go through the output head; the loss is the mean cross-entropy over every scored
    token, computed here from the model's full logits (rows scoring different positions, padding included)."""
    model = MODELS[model_id]().eval()
    rows = [
        {"prompt": "define cat:", "completion": " a small animal."},
        {"text": "the fox"},
        {"prompt": "ab", "completion": "c"},
    ]
    batches = eval_batches(char_tokenizer(), rows, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            scored = targets != -100
            total += torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
            count += int(scored.sum())
    assert eval_loss(model, batches) == pytest.approx(total / count, rel=1e-6)
