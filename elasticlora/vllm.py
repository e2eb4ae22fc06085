"""What vLLM (>= 0.32) accepts in a LoRA adapter: its `--max-lora-rank` buckets, the module names its Llama-family
models map, and the adapter settings it refuses. `scripts/check_vllm.py` runs vLLM's own loader on an adapter."""

from __future__ import annotations

# vLLM's --max-lora-rank choices; its punica kernels compute every adapter at the server's value, zero-padded
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# module names vLLM maps for Llama-family models (q/k/v into qkv_proj, gate/up into gate_up_proj)
VLLM_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
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


def unmapped_module_types(module_names) -> list[str]:
    """The module types (last name parts) that vLLM's Llama-family models do not map."""
    return sorted({name.rsplit(".", 1)[-1] for name in module_names} - VLLM_LLAMA_MODULES)


def vllm_serve_command(base_model: str, adapter_dir: str, max_lora_rank: int, name: str | None = None) -> str:
    """The `vllm serve` line that serves `adapter_dir` on `base_model` (vLLM's `--lora-modules NAME=PATH`)."""
    name = name or adapter_dir.rstrip("/").rsplit("/", 1)[-1] or "adapter"
    return f"vllm serve {base_model} --enable-lora --lora-modules {name}={adapter_dir} --max-lora-rank {max_lora_rank}"
