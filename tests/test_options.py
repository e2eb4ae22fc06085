"""Shrink options (one definition for the API and the CLI) and how the base model's precision is chosen."""

import argparse
import dataclasses

import pytest
import torch

from elasticlora import loading
from elasticlora.cli import build_parser
from elasticlora.options import ShrinkOptions, add_cli_flags, options_from_args

from conftest import tiny_llama


def test_every_cli_option_is_a_field_and_parses_back():
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    args = parser.parse_args(
        ["--tolerance", "0.02", "0.01", "--max-rank", "auto", "--bf16", "--quiet", "--load-in-4bit", "--absolute"]
    )
    options = options_from_args(args)
    assert options.tolerance == [0.01, 0.02] and options.tolerances == [0.01, 0.02]
    assert options.max_rank == "auto" and options.autocast_dtype is torch.bfloat16 and not options.progress
    assert options.load_in_4bit and options.mode == "absolute"
    defaults = options_from_args(parser.parse_args([]))
    with_cli = {f.name for f in dataclasses.fields(ShrinkOptions) if "cli" in f.metadata}
    assert {name: getattr(defaults, name) for name in with_cli} == {
        name: getattr(ShrinkOptions(), name) for name in with_cli
    }
    shrink_help = build_parser()._subparsers._group_actions[0].choices["shrink"].format_help()
    for flag in ("--dtype", "--load-in-4bit", "--load-in-8bit", "--device-map", "--max-rank", "--tolerance"):
        assert flag in shrink_help


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_rank": 0}, "positive int or 'auto'"),
        ({"max_rank": "big"}, "positive int or 'auto'"),
        ({"dtype": "int4"}, "`dtype` must be one of"),
        ({"tolerance": [0.01, 0.02], "avg_rank": 4}, "parameter budget gives one adapter"),
        ({"max_rank": "auto", "max_params": 10}, "with a parameter budget give a number"),
        ({"tolerance": []}, "a number or a list"),
        ({"tolerance": 0}, "must be > 0"),
    ],
)
def test_bad_options_are_refused_before_anything_loads(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShrinkOptions(**kwargs)


@pytest.mark.parametrize(
    "faster,available,n_params,expected",
    [
        (False, 64 * 2**30, 10**9, torch.float32),  # fp32 fits and bf16 is slower: fp32
        (True, 64 * 2**30, 10**9, torch.bfloat16),  # AMX-like CPU: bf16
        (False, 16 * 2**30, 8 * 10**9, torch.bfloat16),  # an 8B base in fp32 (32 GB) does not fit in 16 GiB
        (False, None, 8 * 10**9, torch.float32),  # memory unknown: by speed
    ],
)
def test_auto_dtype_on_cpu(faster, available, n_params, expected, monkeypatch):
    monkeypatch.setattr(loading, "bf16_is_faster_on_cpu", lambda: faster)
    monkeypatch.setattr(loading, "_available_memory_bytes", lambda: available)
    assert loading.resolve_dtype("auto", torch.device("cpu"), n_params) is expected
    assert loading.resolve_dtype("float16", torch.device("cpu"), n_params) is torch.float16


def test_auto_dtype_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert loading.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert loading.resolve_dtype("auto", torch.device("cuda")) is torch.float32


def test_quantization_follows_qlora(monkeypatch):
    pytest.importorskip("bitsandbytes")
    config = loading.quantization_config(True, False, torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype is torch.bfloat16
    assert loading.quantization_config(False, True, torch.float32).load_in_8bit
    assert loading.quantization_config(False, False, torch.float32) is None
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="--load-in-4bit needs bitsandbytes"):
        loading.quantization_config(True, False, torch.float32)


def test_parameters_are_counted_from_the_config_alone(tiny_model_dir):
    assert loading.count_parameters(str(tiny_model_dir)) == sum(p.numel() for p in tiny_llama().parameters())


def test_quantizing_a_gguf_checkpoint_is_refused():
    with pytest.raises(ValueError, match="needs a safetensors checkpoint"):
        loading.load_model_and_tokenizer("some/dir", gguf_file="model.gguf", load_in_8bit=True)


def test_weights_load_straight_in_the_asked_dtype(tiny_model_dir):
    model, _ = loading.load_model_and_tokenizer(str(tiny_model_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
