"""Opt-in check: load an exported adapter with vLLM's own LoRA loader (CPU) and compare what vLLM reads.

vLLM is not a dependency: `make test-vllm` installs it (`--no-deps`, ~0.9 GB) into .vllm-site/ with the few
pure-Python packages its LoRA modules import, and runs this check through `pytest -m vllm`. By hand:

    PYTHONPATH=.vllm-site python scripts/check_vllm.py out/shrunk

It runs `PEFTHelper.from_local_dir`, `validate_legal` against the smallest `--max-lora-rank` bucket that fits, and
`LoRAModel.from_local_checkpoint`, then checks that for every module vLLM's rank equals the tensor rank and vLLM's
update `scaling * B @ A` equals PEFT's (so a misread `rank_pattern` cannot pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def check_with_vllm(adapter_dir: str | Path, expected_modules: set[str] = LLAMA_MODULES) -> dict:
    """Load `adapter_dir` with vLLM's loader; raise `AssertionError`/`ValueError` on any disagreement with PEFT."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from elasticlora.vllm import vllm_max_lora_rank

    adapter_dir = str(adapter_dir)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    helper = PEFTHelper.from_local_dir(adapter_dir, max_position_embeddings=None)
    bucket = vllm_max_lora_rank(max([config["r"], *config.get("rank_pattern", {}).values()]))
    helper.validate_legal(LoRAConfig(max_lora_rank=bucket))
    model = LoRAModel.from_local_checkpoint(adapter_dir, expected_modules, helper, device="cpu", dtype=torch.float32)
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    checked = {}
    for name, weights in model.loras.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        if weights.rank != a.shape[0]:
            raise AssertionError(f"vLLM reads rank {weights.rank} for {name}, the tensors have rank {a.shape[0]}")
        # PEFT's scale for this module: alpha_m / r_m from the patterns (the export makes it 1)
        r_m = config.get("rank_pattern", {}).get(name, config["r"])
        alpha_m = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        peft_delta = (alpha_m / r_m) * (b @ a)
        vllm_delta = weights.scaling * (weights.lora_b @ weights.lora_a)
        if not torch.allclose(vllm_delta, peft_delta, atol=1e-6):
            raise AssertionError(f"vLLM's update for {name} differs from PEFT's")
        checked[name] = weights.rank
    if len(checked) != len({k.rsplit(".lora_", 1)[0] for k in tensors}):
        raise AssertionError("vLLM loaded a different set of modules than the adapter holds")
    return {"max_lora_rank": bucket, "modules": len(checked), "ranks": checked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir")
    args = parser.parse_args()
    result = check_with_vllm(args.adapter_dir)
    print(f"vLLM loads {args.adapter_dir}: {result['modules']} modules, --max-lora-rank {result['max_lora_rank']}")
    sys.exit(0)


if __name__ == "__main__":
    main()
