"""r_max advice and the early shrink estimate, on elastic and plain PEFT LoRA models."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from elasticlora import at_ranks, elastic_layers, estimate_shrink, load_elastic, rank_advice
from elasticlora.advice import CAPACITY_LIMIT, TRAINING_BYTES_PER_PARAM
from elasticlora.data import make_batches
from elasticlora.evaluate import eval_loss
from elasticlora.ranks import truncated
from elasticlora.sensitivity import allocation_path, sensitivity
from elasticlora.shrink import shrink

from conftest import peaked_elastic_model, randomize_lora, sample_batches, tiny_llama

SIGNAL = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def teacher_task(r: int, signal_rank: int, seed: int = 0, noise: float = 0.0):
    """An elastic adapter of rank `r` whose only non-zero modules carry a rank-`signal_rank` update (plus `noise` in
    every factor), and eval data sampled from base + that adapter: shrink should keep `signal_rank` components in
    those modules, and drop the rest when there is no noise."""
    model = peaked_elastic_model(r)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in elastic_layers(model).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.zero_()
            b.zero_()
            if name in SIGNAL:
                a[:signal_rank] = torch.randn(signal_rank, a.shape[1], generator=gen) * 1.5
                b[:, :signal_rank] = torch.randn(b.shape[0], signal_rank, generator=gen) * 1.5
            a.add_(torch.randn(a.shape, generator=gen) * noise)
            b.add_(torch.randn(b.shape, generator=gen) * noise)
    return model, sample_batches(model.eval(), seed=seed + 1)


def widths_of(model):
    return {name: layer.in_features + layer.out_features for name, layer in elastic_layers(model).items()}


def test_rank_advice_rule():
    full = {"a": 16, "b": 16, "c": 8}
    widths = {"a": 100, "b": 50, "c": 30}
    over = rank_advice({"a": 3, "b": 0, "c": 1}, full, widths, room=2, capacity_share=2)
    assert over["verdict"] == "oversized" and over["needed_rank"] == 3 and over["advised_r"] == 8  # 2 * 3 -> 8
    # memory: every module trained at half its rank, 16 bytes per parameter
    assert over["training_memory_saved_bytes"] == (16 * 100 + 16 * 50 + 8 * 30) // 2 * TRAINING_BYTES_PER_PARAM
    assert rank_advice({"a": 3, "b": 0, "c": 1}, full, widths, room=4)["verdict"] == "fits"  # 4 * 3 -> 16
    # a and c kept their full rank; halving them is cheap, so they count at half: a needs 8
    fits = rank_advice({"a": 16, "b": 5, "c": 8}, full, widths, cut_cost=CAPACITY_LIMIT / 2, capacity_share=1)
    assert fits["verdict"] == "fits" and fits["needed_rank"] == 8 and fits["full_rank_modules"] == ["a", "c"]
    half = rank_advice({"a": 16, "b": 5, "c": 8}, full, widths, cut_cost=CAPACITY_LIMIT / 2, capacity_share=2)
    assert half["verdict"] == "capacity-limited" and half["advised_r"] == 32  # 8 reaches r_max / 2
    for share in (1, 2):
        limited = rank_advice(
            {"a": 16, "b": 5, "c": 8}, full, widths, cut_cost=CAPACITY_LIMIT * 3, capacity_share=share
        )
        assert limited["verdict"] == "capacity-limited" and limited["advised_r"] == 32
        assert limited["training_memory_saved_bytes"] < 0 and "3.00 tolerances" in limited["message"]
        unmeasured = rank_advice({"a": 16, "b": 5, "c": 8}, full, widths, capacity_share=share)
        assert unmeasured["verdict"] == "capacity-limited", "unmeasured, the full-rank modules count at full rank"


def test_an_oversized_run_gets_a_smaller_r():
    model, batches = teacher_task(r=16, signal_rank=2)
    result = shrink(model, batches, tolerance=0.01, progress=False)
    assert {name for name, k in result.ranks.items() if k} == set(SIGNAL)
    largest = max(result.ranks.values())
    assert largest <= 2
    assert result.advice["verdict"] == "oversized"
    assert result.advice["advised_r"] == (4 if largest == 2 else 2)
    assert result.cut_quality is None and result.passes_run == result.passes  # no module at full rank: no extra pass


def test_a_capacity_limited_run_is_told_and_the_cut_cost_is_measured():
    model, batches = teacher_task(r=2, signal_rank=2)  # the signal needs every component the adapter has
    result = shrink(model, batches, tolerance=0.01, progress=False)
    assert all(result.ranks[name] == 2 for name in SIGNAL)
    advice = result.advice
    assert advice["verdict"] == "capacity-limited" and advice["advised_r"] == 4
    assert set(advice["full_rank_modules"]) == set(SIGNAL)
    halved = {name: k // 2 for name, k in result.ranks.items()}
    with at_ranks(model, halved):
        assert eval_loss(model, batches) == pytest.approx(result.cut_quality, rel=1e-6)
    slack = 0.01 * result.best_quality
    assert advice["cut_cost_tolerances"] == pytest.approx((result.cut_quality - result.quality) / slack)
    assert result.passes_run == result.passes + 1


def plain_and_elastic(tmp_path, r=8):
    """A plain PEFT LoRA model with random factors, and the same adapter loaded elastically."""
    torch.manual_seed(0)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(plain)
    plain.save_pretrained(tmp_path / "plain")
    return plain.eval(), load_elastic(tiny_llama(), tmp_path / "plain").eval()


def test_truncating_a_plain_lora_is_its_svd_truncation_and_restores_it(tmp_path, input_ids):
    plain, _ = plain_and_elastic(tmp_path)
    reference = tiny_llama().eval()  # base + each module's rank-3 SVD truncation, merged by hand
    with torch.no_grad():
        named = dict(reference.named_modules())
        for name, module in plain.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                u, s, vh = torch.linalg.svd(delta.double())
                cut = (u[:, :3] * s[:3]) @ vh[:3]
                named[name.removeprefix("base_model.model.")].weight += cut.float()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with torch.no_grad(), truncated(plain, 3):
        got = plain(input_ids).logits
    torch.testing.assert_close(got, reference(input_ids).logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items()), "the factors are restored exactly"


def test_sensitivity_and_estimate_of_a_plain_lora_equal_the_elastic_loads(tmp_path, input_ids):
    plain, elastic = plain_and_elastic(tmp_path)
    batches = make_batches([{"input_ids": row.tolist(), "labels": row.tolist()} for row in input_ids], 2, 0)
    a, b = sensitivity(plain, batches, progress=False), sensitivity(elastic, batches, progress=False)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.tokens == b.tokens
    assert all(torch.allclose(a.costs[n], b.costs[n], rtol=1e-4, atol=1e-12) for n in b.costs)
    x, y = estimate_shrink(plain, batches), estimate_shrink(elastic, batches)
    assert x.ranks == y.ranks and x.probe_loss == pytest.approx(y.probe_loss, rel=1e-6)


def uniform(model, k):
    return {name: min(k, layer.r["default"]) for name, layer in elastic_layers(model).items()}


def test_the_estimate_keeps_a_uniform_rank_measured_within_tolerance():
    model, batches = teacher_task(r=8, signal_rank=2)  # rank 2 carries everything: uniform 2 costs nothing
    estimate = estimate_shrink(model, batches, tolerance=0.01)
    assert estimate.ranks == uniform(model, 2) and estimate.max_rank == 2
    with at_ranks(model, 2):
        assert eval_loss(model, batches) == pytest.approx(estimate.probe_loss, rel=1e-6)
    assert estimate.predicted_loss == estimate.probe_loss  # measured, not predicted
    result = shrink(model, batches, tolerance=0.01, progress=False)
    assert estimate.max_rank == max(result.ranks.values())  # shrink then drops the modules that carry nothing
    assert estimate.advice["verdict"] == result.advice["verdict"] == "oversized"


def test_the_estimate_scales_its_prediction_by_the_probe_and_follows_the_allocation_path():
    model, batches = teacher_task(r=8, signal_rank=2, noise=0.1)  # every component matters a little: a path to trade
    estimate = estimate_shrink(model, batches, tolerance=0.01)
    measured = sensitivity(model, batches, progress=False)
    widths = widths_of(model)
    assert estimate.full_loss == pytest.approx(eval_loss(model, batches), rel=1e-5)

    # the documented prediction: full loss + scale * sum_m c_m(k_m) / (2 N)
    def predicted(ranks, scale):
        increase = sum(float(measured.costs[n][k].clamp_min(0)) for n, k in ranks.items()) / (2 * measured.tokens)
        return estimate.full_loss + scale * increase

    def within(ranks, scale):
        return predicted(ranks, scale) <= estimate.full_loss * 1.01

    def smallest_uniform_within(scale):  # halving from r/2 while the prediction stays within tolerance
        return next((k for k in (8, 4, 2) if not within(uniform(model, k // 2), scale)), 1)

    # the probe: the smallest uniform rank predicted within tolerance at scale 1 (r/2 when none is), measured
    # outside tolerance here
    probe = min(smallest_uniform_within(1.0), 4)
    with at_ranks(model, probe):
        assert eval_loss(model, batches) == pytest.approx(estimate.probe_loss, rel=1e-6)
    assert estimate.probe_loss > estimate.full_loss * 1.01
    assert predicted(uniform(model, probe), estimate.scale) == pytest.approx(estimate.probe_loss, rel=1e-6)
    assert predicted(estimate.ranks, estimate.scale) == pytest.approx(estimate.predicted_loss, rel=1e-9)
    # at that scale, as shrink searches: the smallest uniform rank predicted within tolerance, then the path below
    anchor = smallest_uniform_within(estimate.scale)
    below = allocation_path({n: c[: anchor + 1] for n, c in measured.costs.items()}, widths)
    index = below.index(estimate.ranks)
    assert within(below[index], estimate.scale)
    assert index + 1 == len(below) or not within(below[index + 1], estimate.scale)
    assert all(estimate.ranks[name] >= 2 for name in SIGNAL)
    result = shrink(model, batches, tolerance=0.01, progress=False)
    assert 0.5 * result.params <= estimate.params <= 2 * result.params
    assert estimate.max_rank == max(result.ranks.values())
