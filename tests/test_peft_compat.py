"""Every PEFT internal elasticlora relies on (elasticlora/_peft_compat.py), checked on its own.

A PEFT release that changes one of them fails here first, with a message naming what changed.
"""

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from packaging.specifiers import SpecifierSet
from peft import LoraConfig, get_peft_model

from elasticlora import _peft_compat as compat


def test_the_installed_peft_is_a_supported_one_and_pyproject_pins_the_same_range():
    assert compat.peft_version() in SpecifierSet(compat.SUPPORTED_PEFT), (
        f"PEFT {compat.peft_version()} is outside {compat.SUPPORTED_PEFT}: run this file against it, then widen "
        "SUPPORTED_PEFT and pyproject.toml together"
    )
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (pin,) = re.findall(r'"peft([^"]*)"', pyproject)
    assert SpecifierSet(pin) == SpecifierSet(compat.SUPPORTED_PEFT)


class Recording(compat.LoraVariant):
    """A variant that records how PEFT calls it and adds 1 to the output."""

    calls: list = []

    @staticmethod
    def init(module, adapter_name, config, **kwargs):
        Recording.calls.append(("init", adapter_name, type(config).__name__, sorted(kwargs)))

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        Recording.calls.append(("forward", active_adapter, tuple(x.shape), tuple(result.shape)))
        return result + 1


class RecordingLinear(compat.LoraLinear):
    def resolve_lora_variant(self, *, config, **kwargs):
        return Recording()


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.second(self.first(x))


def test_custom_dispatch_builds_our_layers_and_calls_the_variant():
    made = []

    def factory(target, adapter_name, config, **kwargs):
        made.append((type(target).__name__, adapter_name, kwargs.get("target_name")))
        return RecordingLinear(target, adapter_name, config=config, **kwargs)

    Recording.calls.clear()
    config = LoraConfig(r=2, target_modules=["first", "second"])
    compat.register_custom_modules(config, {nn.Linear: factory})
    model = get_peft_model(TwoLinear(), config)
    assert made == [("Linear", "default", "first"), ("Linear", "default", "second")], (
        "LoraConfig._register_custom_module: PEFT no longer calls factory(target, adapter_name, config=, "
        "target_name=, ...) for a registered layer type"
    )
    assert Recording.calls[0][:3] == ("init", "default", "LoraConfig"), (
        "LoraLayer.update_layer no longer calls resolve_lora_variant(config=...) and variant.init(module, "
        "adapter_name=, config=, ...)"
    )
    layer = model.base_model.model.first
    with torch.no_grad():
        base = layer.base_layer(torch.ones(3, 4))
        out = layer(torch.ones(3, 4))
    assert Recording.calls[-1] == ("forward", "default", (3, 4), (3, 4)), (
        "LoRA Linear.forward no longer calls variant.forward(module, active_adapter=, x=, result=)"
    )
    assert torch.equal(out, base + 1), "LoRA Linear.forward no longer returns what the variant returns"


@pytest.mark.parametrize("name", ["init", "merge_safe", "merge_unsafe", "unmerge", "forward"])
def test_the_variant_interface_is_static_methods_with_the_module_first(name):
    method = inspect.getattr_static(compat.LoraVariant, name)
    assert isinstance(method, staticmethod), f"LoraVariant.{name} is no longer a staticmethod"
    params = list(inspect.signature(method.__func__).parameters)
    assert params[0] == "module", f"LoraVariant.{name}'s first parameter is now {params[0]!r}"
    if name == "forward":
        assert params[1:4] == ["active_adapter", "x", "result"], f"LoraVariant.forward takes {params} now"


def test_resolve_lora_variant_takes_the_config_by_keyword():
    params = inspect.signature(compat.LoraLayer.resolve_lora_variant).parameters
    assert params["config"].kind is inspect.Parameter.KEYWORD_ONLY, "resolve_lora_variant(*, config) changed"


def test_other_param_names_is_a_tuple_of_attribute_names():
    assert isinstance(compat.LoraLayer.other_param_names, tuple) and "r" in compat.LoraLayer.other_param_names


def test_transpose_and_target_matching_keep_their_signatures():
    assert list(inspect.signature(compat.transpose).parameters) == ["weight", "fan_in_fan_out"]
    assert list(inspect.signature(compat.check_target_module_exists).parameters)[:2] == ["config", "key"]
    config = LoraConfig(target_modules=["q_proj"])
    assert compat.check_target_module_exists(config, "model.layers.0.self_attn.q_proj")


@pytest.mark.skipif("4bit" not in compat.bnb_lora_layers(), reason="bitsandbytes without 4-bit layers")
def test_peft_builds_4bit_layers_with_the_arguments_we_pass():
    from peft.tuners.lora.bnb import dispatch_bnb_4bit

    weight = SimpleNamespace(compress_statistics=True, quant_type="nf4")
    ours = compat.bnb_4bit_kwargs(SimpleNamespace(compute_dtype=torch.bfloat16, weight=weight))
    source = inspect.getsource(dispatch_bnb_4bit)
    for name in ours:
        assert f'"{name}"' in source, f"PEFT's dispatch_bnb_4bit no longer passes {name} to Linear4bit"
