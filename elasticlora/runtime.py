"""The runtime state of one elastic adapter in one model: its rank sampler, its basis group and its hooks.

Building an elastic adapter (`get_peft_model(model, ElasticLoraConfig())`, `add_adapter`, `load_elastic`, which
is `PeftModel.from_pretrained` with an `ElasticLoraConfig`) gives it one `ElasticRuntime`, held by every layer of
that adapter (`layer.elastic_state[adapter].runtime`), so the model owns it: a deep copy of the model gets its own,
and two models built from one config draw independently. The config stays a plain dataclass.

The runtime starts a new training pass (`RankSampler.new_pass`) whenever a module it hooks starts a forward pass:

- the `PeftModel` being built when the layers are built (found on the Python call stack, `_module_on_stack`: PEFT
  offers no other way from a layer to its model); a DDP, FSDP2 or accelerate wrapper calls it, so its passes start
  there too;
- the module whose `forward` is outermost when a training layer call finds that no hooked module started the pass:
  a loop that calls an inner module, or a model PEFT's `inject_adapter_in_model` adapted (it drops the wrapper the
  layers were built in). Its first call draws as one pass too;
- any module given to `attach` (`elasticlora.attach_sampler`), ahead of its first call.

Gradient checkpointing re-runs blocks during the backward pass but not the hooked module; a hook on each pass's
outputs puts that pass's draws back as soon as the backward pass reaches them, before any of its blocks are
recomputed, also when several passes run before one backward.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn
from peft import PeftModel

from .basis import BasisGroup
from .sampler import RankSampler, Truncation


class ElasticRuntime:
    """The rank sampler, the basis group and the forward hooks of one elastic adapter in one model."""

    def __init__(self, config):
        self.sampler = RankSampler.from_config(config)
        self.bases = BasisGroup()
        self._hooks: list[tuple[weakref.ref, list[torch.utils.hooks.RemovableHandle]]] = []
        self._opened = False  # whether a hooked module started the pass the next draw is for

    def register(self, r: int) -> int:
        """A layer of maximum rank `r` joins; returns its column in the sampler's draws."""
        return self.sampler.register(r)

    @property
    def hooked(self) -> list[nn.Module]:
        """The live modules whose forward passes start new draws."""
        return [module for ref, _ in self._hooks if (module := ref()) is not None]

    def attach(self, module: nn.Module) -> None:
        """Start a new pass of draws whenever `module` starts a forward pass (once per module)."""
        if any(hooked is module for hooked in self.hooked):
            return
        handles = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]
        self._hooks.append((weakref.ref(module), handles))

    def detach(self) -> None:
        """Remove every hook: no module starts passes until `attach` (or the first training call) hooks one."""
        for _, handles in self._hooks:
            for handle in handles:
                handle.remove()
        self._hooks = []

    def truncation(self, column: int, h: torch.Tensor) -> Truncation | None:
        """The current pass's truncation of one layer call (see `RankSampler.truncation`). A pass that no hooked
        module started (the loop calls another module) hooks the module whose `forward` is outermost now, so that
        its next calls start their passes."""
        if self.sampler.current_pass is None:
            if not self._opened:
                root = _module_on_stack(forward_only=True)
                if root is not None:
                    self.attach(root)
            self._opened = False
        return self.sampler.truncation(column, h)

    def state_dict(self) -> dict[str, int]:
        """Where the run is in the draw sequence (see `RankSampler.state_dict`)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)

    def _begin(self, module: nn.Module, args) -> None:
        self.sampler.new_pass()
        self._opened = True

    def _end(self, module: nn.Module, args, output) -> None:
        current = self.sampler.current_pass
        if current is None or not torch.is_grad_enabled():
            return
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, current=current: self.sampler.new_pass(current))

    def __deepcopy__(self, memo) -> ElasticRuntime:
        """The copy keeps the draw position and hooks the copies of the hooked modules copied with it (a copied
        model's hooks call the copied runtime); its basis group starts empty."""
        clone = ElasticRuntime.__new__(ElasticRuntime)
        memo[id(self)] = clone
        clone.sampler = copy.deepcopy(self.sampler, memo)
        clone.bases = copy.deepcopy(self.bases, memo)
        clone._opened = False
        clone._hooks = [
            (weakref.ref(memo[id(module)]), copy.deepcopy(handles, memo))
            for ref, handles in self._hooks
            if (module := ref()) is not None and id(module) in memo
        ]
        return clone


def runtime_for_new_layer(config, adapter_name: str) -> ElasticRuntime:
    """The runtime of the adapter a layer is being built for: one per (model being built, adapter, config), kept
    on that model, which it hooks. A layer built outside any module gets its own runtime."""
    owner = _module_on_stack(forward_only=False)
    if owner is None:
        return ElasticRuntime(config)
    runtimes = owner.__dict__.setdefault("_elastic_runtimes", {})
    key = (adapter_name, id(config))
    if key not in runtimes:
        runtimes[key] = ElasticRuntime(config)
        runtimes[key].attach(owner)
    return runtimes[key]


def _module_on_stack(forward_only: bool) -> nn.Module | None:
    """The outermost `PeftModel` among the modules whose method (only `forward`, if `forward_only`) is running,
    else the outermost such module; None when none is."""
    outermost = outermost_peft = None
    frame = inspect.currentframe()
    while frame is not None:
        module = frame.f_locals.get("self") if not forward_only or frame.f_code.co_name == "forward" else None
        if isinstance(module, nn.Module):
            outermost = module
            if isinstance(module, PeftModel):
                outermost_peft = module
        frame = frame.f_back
    return outermost_peft or outermost


def _tensors(output) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):  # transformers' ModelOutput too
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)
