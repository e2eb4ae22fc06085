"""Training overhead of ElasticLoRA against PEFT LoRA at the same maximum rank: step time and memory.

Both arms hold the same base model, rank, targets and batch; their steps alternate, so load on the machine hits
both alike. A step is forward + backward + AdamW + zero_grad. Memory is measured as the bytes autograd saves for
backward (unique storages, through `saved_tensors_hooks`): the part of peak memory an adapter changes, since
weights and optimizer state are identical. On CUDA the peak allocated memory of a step is reported too.

    python scripts/bench_overhead.py                      # tiny model and SmolLM2-135M, CPU
    python scripts/bench_overhead.py --models smollm2 --device cuda --batch-size 16 --seq-len 512
    python scripts/bench_overhead.py --truncation-only    # the truncation op alone, against separate autograd ops
    python scripts/bench_overhead.py --basis-only         # the singular-basis refresh, per layer
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from recipe_study import parse_arm

from elasticlora import ElasticLoraConfig
from elasticlora.basis import svd_bases, svd_basis
from elasticlora.layer import truncate
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.sampler import Truncation


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def saved_bytes(model, batch, autocast) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def run(name: str, base: torch.nn.Module, args, device: torch.device) -> dict:
    arms = {}
    for arm, config in (
        ("peft_lora", LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
        ("elastic", ElasticLoraConfig(r=args.rank, **parse_arm(args.arm))),
    ):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), config).to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        arms[arm] = (model, optimizer)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    dtype = torch.bfloat16 if args.bf16 else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step(model, optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {arm: [] for arm in arms}
    peak = {}
    for i in range(args.warmup + args.steps):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for arm in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            elapsed = step(*arms[arm])
            if i >= args.warmup:
                times[arm].append(elapsed)
                if device.type == "cuda":
                    peak[arm] = max(peak.get(arm, 0), torch.cuda.max_memory_allocated())
    result = {"model": name, "rank": args.rank, "batch": [args.batch_size, args.seq_len], "bf16": args.bf16}
    result["arm"] = args.arm
    for arm, (model, _) in arms.items():
        result[arm] = {
            "step_s_median": statistics.median(times[arm]),
            "step_s_mean": statistics.fmean(times[arm]),  # with the steps that refresh the singular basis
            "saved_activation_bytes": saved_bytes(model, batch, autocast),
        }
        if arm in peak:
            result[arm]["cuda_peak_bytes"] = peak[arm]
    result["step_time_ratio"] = result["elastic"]["step_s_median"] / result["peft_lora"]["step_s_median"]
    result["mean_step_time_ratio"] = result["elastic"]["step_s_mean"] / result["peft_lora"]["step_s_mean"]
    result["saved_activation_ratio"] = (
        result["elastic"]["saved_activation_bytes"] / result["peft_lora"]["saved_activation_bytes"]
    )
    if peak:
        result["cuda_peak_ratio"] = result["elastic"]["cuda_peak_bytes"] / result["peft_lora"]["cuda_peak_bytes"]
    return result


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU x{torch.get_num_threads()}"


def truncate_by_ops(h: torch.Tensor, cut: Truncation, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The library's `truncate` written as separate autograd ops: the reference it is timed against."""
    rows = h if cut.rows is None else h.index_select(0, cut.rows)
    z = torch.nn.functional.linear(rows, m[: cut.k])
    if cut.keep is not None:
        z = z * cut.keep
    rows = torch.nn.functional.linear(z, n[:, : cut.k])
    return rows if cut.rows is None else h.index_put((cut.rows,), rows)


def bench_truncation(args, device: torch.device) -> dict:
    """Forward + backward of one layer's truncation, the library's op against `truncate_by_ops`, alternating, on
    (batch, seq, rank) activations with half the rows at full rank and the rest drawn at 1, 2, 4 and 16."""
    torch.manual_seed(0)
    r = args.rank
    m, n = torch.randn(r, r, device=device), torch.randn(r, r, device=device)
    h = torch.randn(args.batch_size, args.seq_len, r, device=device, requires_grad=True)
    grad = torch.randn_like(h)
    ranks = torch.tensor([r, 1, r, 4, r, 16, r, 2] * (args.batch_size // 8 or 1))[: args.batch_size]
    cut = Truncation(ranks, r, h)
    ops = {"library": truncate, "separate_ops": truncate_by_ops}
    assert torch.allclose(truncate(h, cut, m, n), truncate_by_ops(h, cut, m, n))
    times = {name: [] for name in ops}
    for i in range(args.warmup + args.steps):
        for name in list(ops) if i % 2 == 0 else list(reversed(ops)):
            start = time.perf_counter()
            for _ in range(50):
                ops[name](h, cut, m, n).backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) / 50)
    result = {"batch": [args.batch_size, args.seq_len], "rank": r}
    result.update({f"{name}_us_median": statistics.median(t) * 1e6 for name, t in times.items()})
    result["ratio"] = result["library_us_median"] / result["separate_ops_us_median"]
    return result


def bench_basis(args, device: torch.device) -> dict:
    """The singular-basis refresh that training runs every `basis_refresh_steps` steps, per layer: `svd_basis` on one
    layer, and `svd_bases` on 28 layers at once (the tiny model's count), at the layer shapes of the tiny model
    (256 x 256) and of SmolLM2-135M's MLP (576 x 1536)."""
    result = {"rank": args.rank}
    for fan_in, fan_out in ((256, 256), (576, 1536)):
        generator = torch.Generator().manual_seed(0)
        factors = [
            (
                (torch.randn(args.rank, fan_in, generator=generator) / fan_in**0.5).to(device),
                (torch.randn(fan_out, args.rank, generator=generator) * 0.01).to(device),
            )
            for _ in range(28)
        ]
        for name, call, call_args, layers in (
            ("one_layer", svd_basis, factors[0], 1),
            ("28_layers_batched", svd_bases, (factors,), 28),
        ):
            times = []
            for i in range(args.warmup + args.steps):
                start = time.perf_counter()
                for _ in range(50 // layers + 1):
                    call(*call_args)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append((time.perf_counter() - start) / ((50 // layers + 1) * layers))
            result[f"{fan_in}x{fan_out}_{name}_us_per_layer"] = statistics.median(times) * 1e6
    return result


def write_report(args, device: torch.device, result: dict) -> dict:
    """`result` with the date, machine and torch version, written to `--out`."""
    report = {"date": str(date.today()), "machine": machine_name(device), "torch": torch.__version__, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--arm", default="default", help="ElasticLoraConfig fields, 'a=1,b=2' (default: the defaults)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_overhead.json"))
    parser.add_argument("--truncation-only", action="store_true", help="time the truncation op alone")
    parser.add_argument("--basis-only", action="store_true", help="time the basis refresh per layer")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.basis_only:
        print(json.dumps(write_report(args, device, bench_basis(args, device)), indent=2))
        return
    if args.truncation_only:
        result = bench_truncation(args, device)
        print(json.dumps(write_report(args, device, result), indent=2))
        print(
            f"truncation, fwd + bwd: {result['library_us_median']:.0f} us (one op) against "
            f"{result['separate_ops_us_median']:.0f} us (separate ops), {result['ratio']:.3f}x"
        )
        return
    results = []
    for name in args.models:
        base = tiny_model() if name == "tiny" else load_model_and_tokenizer(name)[0]
        results.append(run(name, base, args, device))
        print(json.dumps(results[-1], indent=2), flush=True)
    report = write_report(args, device, {"results": results})
    print("\n| model | rank | batch | step time elastic / LoRA, median | mean | saved activations elastic / LoRA |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['rank']} | {r['batch'][0]}x{r['batch'][1]} | {r['step_time_ratio']:.3f} "
            f"({r['elastic']['step_s_median']:.3f} s / {r['peft_lora']['step_s_median']:.3f} s) | "
            f"{r['mean_step_time_ratio']:.3f} | "
            f"{r['saved_activation_ratio']:.4f} |"
        )
    print(f"\n{report['machine']}, {report['date']}, torch {report['torch']}")


if __name__ == "__main__":
    main()
