"""What vLLM (>= 0.32) accepts in a LoRA adapter: its `--max-lora-rank` buckets, the module names each architecture
takes LoRA on, and the adapter settings it refuses. `scripts/check_vllm.py` runs vLLM's own loader on an adapter."""

from __future__ import annotations

import shlex

# vLLM's --max-lora-rank choices; its punica kernels compute every adapter at the server's value, zero-padded
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# module names vLLM maps for Llama-family models (q/k/v into qkv_proj, gate/up into gate_up_proj)
VLLM_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
# vLLM 0.33's LoRA support by transformers architecture (`config.architectures[0]`, the class PEFT records as
# `auto_mapping.base_model_class`): the module names its loader accepts (its linear layers, packed ones split as the
# model's `packed_modules_mapping` says, and a mixture-of-experts model's router `gate` and `experts`), or None where
# the model class does not implement `SupportsLoRA`. Read from vllm/model_executor/models/ (llama, mistral, qwen2,
# qwen3, gemma, gemma2, gemma3, phi3, mixtral, qwen3_moe, gpt2) and, for GPT-NeoX, the Transformers backend, which
# keeps the transformers module names.
VLLM_LORA_MODULES: dict[str, frozenset[str] | None] = {
    "LlamaForCausalLM": VLLM_LLAMA_MODULES,
    "MistralForCausalLM": VLLM_LLAMA_MODULES,
    "Qwen2ForCausalLM": VLLM_LLAMA_MODULES,
    "Qwen3ForCausalLM": VLLM_LLAMA_MODULES,
    "GemmaForCausalLM": VLLM_LLAMA_MODULES,
    "Gemma2ForCausalLM": VLLM_LLAMA_MODULES,
    "Gemma3ForCausalLM": VLLM_LLAMA_MODULES,
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "MixtralForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts"}),
    "Qwen3MoeForCausalLM": VLLM_LLAMA_MODULES | {"gate", "experts"},
    "GPTNeoXForCausalLM": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "GPT2LMHeadModel": None,
}
# modules_to_save entries vLLM accepts (sequence-classification heads)
VLLM_MODULES_TO_SAVE = frozenset({"classifier", "score"})


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`."""
    for bucket in VLLM_MAX_LORA_RANKS:
        if rank <= bucket:
            return bucket
    raise ValueError(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def buckets_below(rank: int) -> list[int]:
    """vLLM's buckets smaller than `rank`, largest first."""
    return [bucket for bucket in reversed(VLLM_MAX_LORA_RANKS) if bucket < rank]


def vllm_problems(raw_config: dict, max_rank: int) -> list[str]:
    """Why vLLM would refuse an adapter with this `adapter_config.json` and largest module rank (empty: none)."""
    problems = []
    if raw_config.get("use_dora"):
        problems.append("DoRA (use_dora=true)")
    if raw_config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias=true)")
    if raw_config.get("bias", "none") != "none":
        problems.append(f"bias={raw_config.get('bias')!r}")
    extra = set(raw_config.get("modules_to_save") or []) - VLLM_MODULES_TO_SAVE
    if extra:
        problems.append(f"modules_to_save {sorted(extra)}")
    if max_rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {max_rank} > {VLLM_MAX_LORA_RANKS[-1]}")
    return problems


def unmapped_module_types(module_names, accepted: frozenset[str] = VLLM_LLAMA_MODULES) -> list[str]:
    """The module types (last name parts) outside `accepted` (default: what vLLM's Llama-family models map)."""
    return sorted({name.rsplit(".", 1)[-1] for name in module_names} - accepted)


def architecture_problems(architecture: str | None, module_names) -> list[str]:
    """Why vLLM would refuse LoRA on these modules of a base of this architecture (empty: none, or an architecture
    `VLLM_LORA_MODULES` does not list, for which `unmapped_module_types` gives the Llama-family view)."""
    if architecture not in VLLM_LORA_MODULES:
        return []
    accepted = VLLM_LORA_MODULES[architecture]
    if accepted is None:
        return [f"vLLM's {architecture} does not support LoRA"]
    extra = unmapped_module_types(module_names, accepted)
    return [f"vLLM's {architecture} takes no LoRA on {extra}"] if extra else []


def vllm_serve_command(base_model: str, adapter_dir: str, max_lora_rank: int, name: str | None = None) -> str:
    """The `vllm serve` line that serves `adapter_dir` on `base_model` (vLLM's `--lora-modules NAME=PATH`)."""
    name = name or adapter_dir.rstrip("/").rsplit("/", 1)[-1] or "adapter"
    base, module = shlex.quote(base_model), shlex.quote(f"{name}={adapter_dir}")
    return f"vllm serve {base} --enable-lora --lora-modules {module} --max-lora-rank {max_lora_rank}"
