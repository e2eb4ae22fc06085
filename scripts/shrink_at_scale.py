"""`elasticlora shrink` at Llama-3-8B scale: passes, wall time and peak memory against the issue's target.

A Llama-3-8B-shaped base (hidden 4096, 32 layers, FFN 14336, 32/8 heads, vocab 128256: 8.03 B parameters) gets
random bf16 weights from its config, written once as safetensors shards (16 GB; no download), with SmolLM2's
tokenizer (its ids fit the vocabulary). A random elastic adapter of rank 64 covers all 224 linear modules. Then:

1. `elasticlora shrink` (the CLI, `--dtype auto`) in a child process on a short eval set: passes, wall time, peak
   resident memory (`os.wait4`), the precision `auto` chose;
2. one training step of the same adapter on the same base and batch, in another child: the memory its forward adds
   over the loaded model, once a no-grad forward has paged every weight in (its activations), and its peak;
3. target: shrink's peak <= 1.1 x (base weights in the chosen dtype + that step's activations).

    python scripts/shrink_at_scale.py                          # ~25 min on 2 CPU cores, 24 GiB RAM, 20 GB disk
    python scripts/shrink_at_scale.py --device cuda            # the same on a GPU (peak GPU memory in the report)
    python scripts/shrink_at_scale.py --device cuda --flags --load-in-4bit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "outputs" / "shrink_at_scale"
LLAMA3_8B = dict(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 2 * 1024**3


def write_base(path: Path, seed: int = 0) -> int:
    """Random bf16 weights for the Llama-3-8B shape, shard by shard (never the whole model in memory)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from elasticlora.loading import packaged_smollm2_path

    config = LlamaConfig(**LLAMA3_8B, dtype="bfloat16")
    with init_empty_weights():
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            weight_map[name] = file
            total += tensors[name].numel()
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        print(f"wrote {file}", flush=True)
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(path)
    smollm2_dir, gguf = packaged_smollm2_path()
    AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=gguf).save_pretrained(path)
    return total


def write_adapter(path: Path, r: int = 64, seed: int = 0) -> int:
    """A random elastic adapter of rank `r` on every linear module of the 32 blocks (224 modules)."""
    from safetensors.torch import save_file

    from elasticlora import ElasticLoraConfig

    hidden, ffn, kv = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"], 1024
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LLAMA3_8B["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    ElasticLoraConfig(r=r, target_modules=MODULES, task_type="CAUSAL_LM").save_pretrained(str(path))
    return sum(t.numel() for t in tensors.values())


def child_peak(command: list[str]) -> tuple[float, str]:
    """(peak RSS in GiB, stdout) of a child process, from `os.wait4`; raises with its stderr if it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: pipes can fill up
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return usage.ru_maxrss / 1024**2, stdout


def rss_gib() -> float:
    """This process's resident memory now (Linux), GiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def training_step(base: Path, adapter: Path, data: Path, batch_size: int, device: str | None) -> None:
    """Child mode: one forward + backward of the adapter (trainable) on the base; prints memory as JSON."""
    from elasticlora import load_elastic
    from elasticlora.data import eval_batches
    from elasticlora.evaluate import batch_loss_sum, model_device
    from elasticlora.loading import load_model_and_tokenizer, release_host_memory

    model, tokenizer = load_model_and_tokenizer(str(base), dtype="auto", device=device)
    model = load_elastic(model, adapter, is_trainable=True)
    batch = eval_batches(tokenizer, data, batch_size=batch_size)[0]
    with torch.no_grad():  # pages every (memory-mapped) weight in, so what the step adds is its activations
        batch_loss_sum(model.eval(), batch, model_device(model))
    release_host_memory()
    loaded = rss_gib()
    if torch.cuda.is_available() and device:
        torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated() / 1024**3
    start = time.time()
    loss, _ = batch_loss_sum(model.train(), batch, model_device(model))
    after_forward = rss_gib()  # the activations autograd keeps for the backward pass, and the logits
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    step = {"loaded_rss_gib": loaded, "after_forward_rss_gib": after_forward, "peak_rss_gib": peak,
            "seconds": time.time() - start, "dtype": str(model.dtype)}  # fmt: skip
    if torch.cuda.is_available() and device:
        step.update(loaded_gpu_gib=loaded_gpu, peak_gpu_gib=torch.cuda.max_memory_allocated() / 1024**3)
    print(json.dumps(step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="eval rows (WordNet prompt/completion)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="passed to the CLI, e.g. cuda")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more `elasticlora shrink` flags")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "shrink_at_scale.json")
    parser.add_argument("--keep", action="store_true", help="keep the 16 GB base in outputs/ afterwards")
    parser.add_argument("--training-step-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    base, adapter, data = WORK / "base", WORK / "adapter", WORK / "eval.jsonl"
    if args.training_step_child:
        training_step(base, adapter, data, args.batch_size, args.device)
        return

    from elasticlora.data import load_rows

    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    if not (base / "model.safetensors.index.json").exists():
        start = time.time()
        results["base_params"] = write_base(base)
        print(f"base written in {time.time() - start:.0f} s", flush=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    results.setdefault("base_params", index["metadata"]["total_size"] // 2)
    if not (adapter / "adapter_model.safetensors").exists():
        results["adapter_params"] = write_adapter(adapter)
    rows = load_rows(ROOT / "examples" / "data" / "wordnet_eval.jsonl")[: args.rows]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    device = ["--device", args.device] if args.device else []

    out = WORK / "shrunk"
    command = [sys.executable, "-m", "elasticlora", "shrink", str(adapter), "--base-model", str(base), "--data",
               str(data), "--out", str(out), "--overwrite", "--quiet", "--batch-size", str(args.batch_size),
               *device, *args.flags]  # fmt: skip
    start = time.time()
    peak, _ = child_peak(command)
    wall = time.time() - start
    report = json.loads((out / "report.json").read_text())
    step_peak, printed = child_peak(
        [sys.executable, __file__, "--training-step-child", "--batch-size", str(args.batch_size), *device]
    )
    step = json.loads(printed.strip().splitlines()[-1])
    bytes_per_weight = {"bfloat16": 2, "float16": 2, "float32": 4, "4bit": 0.5, "8bit": 1}[report["base_precision"]]
    weights_gib = bytes_per_weight * results["base_params"] / 1024**3
    activations_gib = step["after_forward_rss_gib"] - step["loaded_rss_gib"]
    target = 1.1 * (weights_gib + activations_gib)
    run = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "flags": device + args.flags,
        "eval_rows": report["eval_rows"],
        "eval_tokens_scored_note": "WordNet prompt/completion rows, ~30 tokens each",
        "base_precision": report["base_precision"],
        "modules": len(report["ranks"]),
        "passes": report["passes"],
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 2),
        "weights_gib": round(weights_gib, 2),
        "training_step": step | {"activations_rss_gib": round(activations_gib, 2)},
        "target_gib": round(target, 2),
        "target_met": peak <= target,
        "params": report["params"],
        "full_params": report["full_params"],
        "peak_gpu_memory_gib": report.get("peak_gpu_memory_gib"),
    }
    results["runs"].append(run)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(run, indent=1))
    if not args.keep:
        for file in base.glob("*.safetensors"):
            file.unlink()
        (base / "model.safetensors.index.json").unlink()


if __name__ == "__main__":
    main()
