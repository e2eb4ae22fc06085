"""Truncations keep the top singular directions of each layer's current update (basis.py)."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers, is_elastic_adapter, load_elastic
from elasticlora.basis import svd_bases, svd_basis
from elasticlora.layer import elastic_delta_weight, prefix_factors, truncate
from elasticlora.sampler import Truncation
from elasticlora.shrink import sensitivity, shrink

from conftest import randomize_lora, tiny_llama

Q_PROJ = "model.layers.0.self_attn.q_proj"


def svd_model(**kwargs):
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(**{"r": 8, **kwargs}))
    randomize_lora(model)
    return model


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double())
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_is_the_best_rank_k_approximation_of_the_update(k, input_ids):
    model = svd_model().eval()
    for layer in elastic_layers(model).values():
        full = elastic_delta_weight(layer, "default")
        assert torch.allclose(elastic_delta_weight(layer, "default", k), best_rank_k(full, k), atol=1e-5)
    # the forward pass at rank k is the base model plus that update, in every layer at once
    merged = tiny_llama()
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, layer in elastic_layers(model).items():
            modules[name].weight += best_rank_k(elastic_delta_weight(layer, "default"), k)
        with at_ranks(model, k):
            assert torch.allclose(model(input_ids).logits, merged(input_ids).logits, atol=1e-4)


def test_full_rank_is_plain_peft_lora(tmp_path, input_ids):
    model = svd_model().eval()
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, plain(input_ids).logits, atol=1e-6)
    plain_config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    reference = get_peft_model(tiny_llama(), plain_config)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_each_example_trains_its_own_drawn_rank():
    """In training mode example b sees the adapter truncated to its drawn rank; full-rank rows are plain LoRA."""
    layer = elastic_layers(svd_model(full_rank_prob=0.3))[Q_PROJ]
    x = torch.randn(32, 5, layer.in_features)
    layer.train()
    y = layer(x)
    ks = layer.drawn_ranks().tolist()
    assert 8 in ks and len(set(ks)) > 2
    layer.eval()
    for b, k in enumerate(ks):
        layer.set_elastic_rank(k, "default")
        expected = layer(x[b : b + 1])[0]
        assert torch.allclose(y[b], expected, atol=1e-6 if k == 8 else 1e-5)  # one row or a batch: BLAS rounding
    layer.set_elastic_rank(None, "default")


def test_full_rank_rows_of_a_mixed_batch_are_exactly_plain_lora():
    """The truncation touches the truncated rows only: the others' outputs and input gradients are bit for bit
    those of a plain LoRA layer, however the rest of the batch is drawn."""
    layer = elastic_layers(svd_model(full_rank_prob=0.5, lora_dropout=0.0))[Q_PROJ]
    x = torch.randn(16, 5, layer.in_features, requires_grad=True)
    layer.train()
    y = layer(x)
    full = layer.drawn_ranks() == 8
    assert 0 < full.sum() < len(full)
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    x_plain = x.detach().clone().requires_grad_(True)
    plain = layer.base_layer(x_plain) + lora_b(lora_a(x_plain)) * layer.scaling["default"]
    assert torch.equal(y[full], plain[full])
    weights = torch.randn_like(y) * full[:, None, None]
    (y * weights).sum().backward()
    (plain * weights).sum().backward()
    assert torch.equal(x.grad[full], x_plain.grad[full])


@pytest.mark.parametrize("ranks", [[1, 3, 4, 4, 4], [2, 2, 4, 2, 4], [1, 1, 1, 1, 1], [3, 1, 2, 3, 2]])
def test_the_truncation_op_has_the_gradient_of_its_formula(ranks):
    """`truncate`'s hand-written backward (one autograd node) matches autograd through the formula it computes:
    row b of h is kept when its rank is r, else replaced by N[:, :k_b] M[:k_b] h[b]; twice differentiable too."""
    r = 4
    ranks_t = torch.tensor(ranks)
    h = torch.randn(len(ranks), 3, r, dtype=torch.double, requires_grad=True)
    m, n = torch.randn(r, r, dtype=torch.double), torch.randn(r, r, dtype=torch.double)
    cut = Truncation(ranks_t, r, h)

    def reference(h):
        rows = [h[b] if k == r else h[b] @ m[:k].T @ n[:, :k].T for b, k in enumerate(ranks)]
        return torch.stack(rows)

    assert torch.allclose(truncate(h, cut, m, n), reference(h))
    assert torch.autograd.gradcheck(lambda h: truncate(h, cut, m, n), (h,))
    assert torch.autograd.gradgradcheck(lambda h: truncate(h, cut, m, n), (h,))


def test_a_mixed_batch_gets_each_examples_truncated_gradient():
    """Input and factor gradients of a training pass with mixed draws are the sums of each example's gradient at its
    own rank with the basis held fixed (what eval at that rank computes)."""
    layer = elastic_layers(svd_model(full_rank_prob=0.3, lora_dropout=0.0))[Q_PROJ]
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(12, 4, layer.in_features, requires_grad=True)
    weights = torch.randn(12, 4, layer.out_features)
    layer.train()
    (layer(x) * weights).sum().backward()
    ks = layer.drawn_ranks().tolist()
    assert 8 in ks and len(set(ks)) > 2
    got = [x.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = None
    layer.zero_grad()
    layer.eval()
    for b, k in enumerate(ks):
        layer.set_elastic_rank(k, "default")
        (layer(x[b : b + 1]) * weights[b : b + 1]).sum().backward()
    layer.set_elastic_rank(None, "default")
    expected = [x.grad] + [p.grad for p in params]
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-4) for g, e in zip(got, expected))  # fp32 sums of ~50


def test_a_truncated_example_trains_every_component():
    """Unlike masking stored components (dropped ones get zero gradient), a rank-1 draw moves all of A and B."""
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8, full_rank_prob=0.0, min_rank=1))
    randomize_lora(model)
    layer = elastic_layers(model)[Q_PROJ]
    x = torch.randn(1, 5, layer.in_features)
    layer.train()
    sampler = layer.elastic_state["default"].runtime.sampler
    for _ in range(50):  # until rank 1 is drawn
        sampler.new_pass()  # the layer is called directly, not through the model that starts passes
        layer.zero_grad()
        layer(x).sum().backward()
        if layer.drawn_ranks().tolist() == [1]:
            break
    else:
        pytest.fail("rank 1 never drawn")
    grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert (grad_a.abs().sum(1) > 0).all() and (grad_b.abs().sum(0) > 0).all()
    # and it is the gradient of the rank-1 truncation with the basis held fixed
    a = layer.lora_A["default"].weight.detach().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().requires_grad_(True)
    m, n = svd_basis(a, b)
    out = (x @ a.T @ m[:1].T @ n[:, :1].T @ b.T) * layer.scaling["default"]
    out.sum().backward()
    assert torch.allclose(grad_a, a.grad, atol=1e-5) and torch.allclose(grad_b, b.grad, atol=1e-5)


def test_basis_follows_the_optimizer(input_ids):
    """The cached basis is recomputed after a step changes the factors, so rank k stays the best rank-k update."""
    model = svd_model(lora_dropout=0.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        layer = elastic_layers(model)[Q_PROJ]
        full = elastic_delta_weight(layer, "default")
        assert torch.allclose(elastic_delta_weight(layer, "default", 2), best_rank_k(full, 2), atol=1e-5)


def test_the_basis_is_fp32_under_bf16_autocast():
    """Autocast must not reach the basis: from bf16 Gram matrices `N M` is the identity to 1e-2 only, and the rank-k
    truncations would not be the best rank-k ones."""
    layer = elastic_layers(svd_model())[Q_PROJ]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m, n = svd_basis(a, b)
        factor_a, factor_b = prefix_factors(layer, "default", 2)
    assert {m.dtype, n.dtype, factor_a.dtype, factor_b.dtype} == {torch.float32}
    assert torch.allclose(n @ m, torch.eye(8), atol=1e-5)
    delta = (b @ a).detach()
    assert torch.allclose(factor_b @ factor_a, best_rank_k(delta, 2), atol=1e-5)


@pytest.mark.parametrize("a_kind", ["rank-deficient", "ill-conditioned", "zero"])
def test_the_basis_of_a_degenerate_a_is_finite_and_still_the_best(a_kind):
    """The Cholesky factorisation of `A A^T` stays defined when A has null directions or a condition number of 1e3
    (its jitter is r * eps): `N M = I` and the rank-k truncations are the best ones to 1e-4 of the update."""
    torch.manual_seed(0)
    r, b = 16, torch.randn(48, 16)
    a = {
        "rank-deficient": torch.cat([torch.randn(8, 32), torch.zeros(8, 32)]),
        "ill-conditioned": (torch.linalg.qr(torch.randn(32, r))[0] * torch.logspace(0, -3, r)).T,
        "zero": torch.zeros(r, 32),
    }[a_kind]
    m, n = svd_basis(a, b)
    assert torch.isfinite(m).all() and torch.isfinite(n).all()
    assert torch.allclose(n @ m, torch.eye(r), atol=1e-3)
    delta = b @ a
    for k in (1, 4, 8):
        truncated = (b @ n[:, :k]) @ (m[:k] @ a)
        assert (truncated - best_rank_k(delta, k)).norm() <= 1e-4 * delta.norm() + 1e-30


def test_a_diverged_factor_gives_a_finite_basis():
    a, b = torch.randn(8, 32), torch.randn(48, 8)
    a[0, 0], b[1, 1] = float("inf"), float("nan")
    m, n = svd_basis(a, b)
    assert torch.isfinite(m).all() and torch.isfinite(n).all()


@pytest.mark.parametrize("update", ["in place", "untraced"])
def test_training_recomputes_the_basis_every_basis_refresh_steps_passes(update):
    """Between refreshes a truncated training example is projected with the basis of the last refresh, every
    micro-batch being a pass; eval always uses the current basis, also after an optimizer that leaves no trace on the
    factors' version counters (torch's fused AdamW, bitsandbytes' optimizers: emulated through `.data`)."""
    layer = elastic_layers(svd_model(basis_refresh_steps=3, full_rank_prob=0.2, lora_dropout=0.0))[Q_PROJ]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    optimizer = torch.optim.SGD([a, b], lr=0.5)
    x = torch.randn(16, 3, layer.in_features)
    passes = 0
    for step in range(5):
        layer.train()
        for _ in range(2):  # two micro-batches per optimizer step
            if passes % 3 == 0:
                m, n = svd_basis(a.detach(), b.detach())
            layer.elastic_state["default"].runtime.sampler.new_pass()
            y = layer(x)
            y.pow(2).mean().backward()
            passes += 1
            ks = layer.drawn_ranks().tolist()
            assert len(set(ks)) > 2
            with torch.no_grad():
                base = layer.base_layer(x)
                for i, k in enumerate(ks):
                    projector = n[:, :k] @ m[:k]
                    expected = base[i] + (x[i] @ a.T @ projector.T @ b.T) * layer.scaling["default"]
                    assert torch.allclose(y[i], expected, atol=1e-5), (step, k)
        if update == "in place":
            optimizer.step()
        else:
            for weight in (a, b):
                weight.data.add_(weight.grad, alpha=-0.5)
        optimizer.zero_grad()
        layer.eval()  # eval: the best rank-2 update of the current factors, stale training basis or not
        full = elastic_delta_weight(layer, "default")
        assert torch.allclose(elastic_delta_weight(layer, "default", 2), best_rank_k(full, 2), atol=1e-5)


def test_every_layer_of_an_adapter_refreshes_in_one_batch(monkeypatch, input_ids):
    """After the first pass, the first layer whose refresh falls due refreshes all of them with one `svd_bases`
    call (one host synchronisation on a GPU), and each gets the basis `svd_basis` gives its own factors."""
    calls = []

    def counted(factors):
        calls.append(len(factors))
        return svd_bases(factors)

    monkeypatch.setattr("elasticlora.basis.svd_bases", counted)
    model = svd_model(basis_refresh_steps=2, full_rank_prob=0.0, lora_dropout=0.0)
    layers = elastic_layers(model).values()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(5):
        calls.clear()
        model(input_ids, labels=input_ids).loss.backward()
        # the first pass refreshes each layer as it joins; then every second step refreshes all of them at once
        assert calls == {0: [1] * len(layers), 2: [len(layers)], 4: [len(layers)]}.get(step, []), step
        for layer in layers:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            m, n = layer.elastic_state["default"].basis.training(a, b, torch.float32, pass_index=step)
            expected_m, expected_n = svd_basis(a, b) if step % 2 == 0 else (m, n)
            assert torch.allclose(n[:, :2] @ m[:2], expected_n[:, :2] @ expected_m[:2], atol=1e-4)
        optimizer.step()
        optimizer.zero_grad()


def test_a_copied_model_refreshes_its_own_layers_only(input_ids):
    model = svd_model(basis_refresh_steps=1, full_rank_prob=0.0, lora_dropout=0.0).train()
    model(input_ids, labels=input_ids)
    copied = copy.deepcopy(model)
    before = [layer.elastic_state["default"].basis._training for layer in elastic_layers(model).values()]
    optimizer = torch.optim.SGD([p for p in copied.parameters() if p.requires_grad], lr=0.5)
    copied(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    copied(input_ids, labels=input_ids)  # due in every copied layer
    after = [layer.elastic_state["default"].basis._training for layer in elastic_layers(model).values()]
    assert all(b is a for a, b in zip(before, after))
    copied_caches = [layer.elastic_state["default"].basis for layer in elastic_layers(copied).values()]
    assert all(cache._training["pass"] == 2 for cache in copied_caches)
    for layer, cache in zip(elastic_layers(copied).values(), copied_caches):
        m, n = cache._training["basis"]
        expected_m, expected_n = svd_basis(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        assert torch.allclose(n[:, :2] @ m[:2], expected_n[:, :2] @ expected_m[:2], atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_recomputes_with_the_stale_basis(use_reentrant, input_ids):
    """Three steps with a basis refreshed every other step: checkpointed training ends at the same weights."""

    def train(checkpointing):
        model = svd_model(basis_refresh_steps=2, lora_dropout=0.0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        model.train()
        torch.manual_seed(7)
        for _ in range(3):
            model(input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in params]

    for plain, checkpointed in zip(train(False), train(True)):
        assert torch.allclose(plain, checkpointed, atol=1e-5)


def test_shrink_reads_the_singular_components_and_leaves_the_model_alone(tmp_path, input_ids):
    """Sensitivity costs equal those of the SVD-ordered factors; shrink modifies nothing; a reloaded adapter truncates
    the same way."""
    model = svd_model().eval()
    batches = [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}]
    ordered = copy.deepcopy(model)
    with torch.no_grad():  # store the factors in their singular basis: M A and B N
        for layer in elastic_layers(ordered).values():
            a, b = prefix_factors(layer, "default", 8)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    for layer in elastic_layers(ordered).values():  # ordered factors: the stored prefix is the truncation
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        sliced = (b[:, :2] @ a[:2]) * layer.scaling["default"]
        assert torch.allclose(sliced, elastic_delta_weight(layer, "default", 2), atol=1e-5)
    expected = sensitivity(ordered, batches, progress=False).costs
    before = {n: p.clone() for n, p in model.state_dict().items()}
    got = sensitivity(model, batches, progress=False).costs
    assert all(torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-12) for n in expected)
    shrink(model, batches, tolerance=0.05, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_elastic(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        for k in (1, 4, 8):
            assert torch.allclose(at_ranks_logits(reloaded, k, input_ids), at_ranks_logits(model, k, input_ids))


def at_ranks_logits(model, k, input_ids):
    with at_ranks(model, k):
        return model(input_ids).logits


def test_an_adapter_saved_by_an_earlier_version_loads_in_the_singular_basis(tmp_path, input_ids):
    """Adapters saved with the retired index-basis fields hold plain B and A; they load as elastic adapters and
    truncate to their best rank-k updates."""
    model = svd_model().eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    for name in ("rank_sampler", "min_rank", "full_rank_prob", "shared_draw_prob", "draw_per", "basis_refresh_steps"):
        del raw[name]
    raw.update(truncation_basis="index", truncation_scaling="component", truncation_scale_power=0.5)
    path.write_text(json.dumps(raw))
    assert is_elastic_adapter(tmp_path)
    reloaded = load_elastic(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        for k in (1, 3):
            assert torch.allclose(at_ranks_logits(reloaded, k, input_ids), at_ranks_logits(model, k, input_ids))
