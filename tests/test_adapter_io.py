"""Adapter directories: adapters saved by earlier versions (tests/data/README.md), elastic detection, atomic
writes."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from elasticlora import ElasticLoraConfig, elastic_layers, eval_loss, is_elastic_adapter, load_elastic
from elasticlora.adapter_io import elastic_config_from_dir, read_adapter_config, write_atomically
from elasticlora.data import eval_batches
from elasticlora.shrink import shrink

from conftest import VOCAB, char_tokenizer, randomize_lora, tiny_llama

DATA = Path(__file__).resolve().parent / "data"
PRE_REDESIGN = DATA / "pre_redesign_adapter"
RELEASE_2026_11_28 = DATA / "release_2026_11_28_adapter"


def test_an_adapter_saved_before_the_redesign_shrinks_to_the_same_ranks():
    """Saved and shrunk with the library at commit d6061fc (tests/data/README.md)."""
    expected = json.loads((PRE_REDESIGN / "expected_shrink.json").read_text())
    assert is_elastic_adapter(PRE_REDESIGN)
    model = load_elastic(tiny_llama(), PRE_REDESIGN)
    batches = eval_batches(char_tokenizer(), expected["rows"], batch_size=8)
    result = shrink(model, batches, tolerance=expected["tolerance"], progress=False)
    assert result.ranks == expected["ranks"]
    assert result.quality == pytest.approx(expected["quality"], rel=1e-5)


def test_the_2026_11_28_release_adapter_loads_and_shrinks_within_tolerance():
    """Saved and shrunk by the 2026-11-28 release (tests/data/README.md), whose truncations scaled components
    (`truncation_scaling="component"`, retired): today it loads as the same full-rank adapter, and shrinks to one
    within the tolerance of it. The release's own shrink (its truncation, which today's SVD-ordered one replaced) is
    in expected_shrink.json; docs/results.md compares the two."""
    expected = json.loads((RELEASE_2026_11_28 / "expected_shrink.json").read_text())
    assert is_elastic_adapter(RELEASE_2026_11_28)
    model = load_elastic(tiny_llama(), RELEASE_2026_11_28)
    batches = eval_batches(char_tokenizer(), expected["rows"], batch_size=8)
    assert eval_loss(model, batches) == pytest.approx(expected["full_quality"], rel=1e-6)
    result = shrink(model, batches, tolerance=expected["tolerance"], progress=False)
    assert result.quality <= expected["full_quality"] * (1 + expected["tolerance"])
    assert result.params < result.full_params


def test_a_plain_lora_is_not_elastic_and_loads_without_draws(tmp_path):
    """A plain LoRA loaded with `load_elastic` trains at full rank only: in training mode it computes exactly what
    PEFT's own LoRA layers compute, and its layers never draw."""
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    randomize_lora(plain)
    plain.save_pretrained(tmp_path)
    assert not is_elastic_adapter(tmp_path)
    assert elastic_config_from_dir(tmp_path).rank_sampler == "none"
    model = load_elastic(tiny_llama(), tmp_path, is_trainable=True).train()
    plain.train()
    input_ids = torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(input_ids).logits, plain(input_ids).logits, atol=1e-6)
    assert all(layer.drawn_ranks() is None for layer in elastic_layers(model).values())


def test_an_elastic_config_keeps_its_fields_and_takes_overrides(tmp_path):
    get_peft_model(tiny_llama(), ElasticLoraConfig(r=4, full_rank_prob=0.25)).save_pretrained(tmp_path)
    assert read_adapter_config(tmp_path)["full_rank_prob"] == 0.25
    config = elastic_config_from_dir(tmp_path, shared_draw_prob=0.5)
    assert (config.r, config.full_rank_prob, config.shared_draw_prob) == (4, 0.25, 0.5)


@pytest.mark.parametrize(
    "content,message",
    [(None, "adapter_config.json is missing"), ("{", "not valid JSON"), ('{"peft_type": "IA3"}', "not a LoRA")],
)
def test_unreadable_adapter_configs_are_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_adapter_config(tmp_path)


def test_write_atomically_refuses_existing_and_replaces_with_overwrite(tmp_path):
    out = tmp_path / "adapter"
    write_atomically(out, {"a.txt": b"one"})
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_atomically(out, {"a.txt": b"two"})
    assert (out / "a.txt").read_bytes() == b"one"
    write_atomically(out, {"b.txt": b"three"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary directories are left behind"
