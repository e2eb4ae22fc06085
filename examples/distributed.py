"""Elastic training with Trainer, accelerate or FSDP2: one process, or many through torchrun.

    python examples/distributed.py --mode trainer                            # one process: a plain Trainer run
    torchrun --nproc_per_node 2 examples/distributed.py --mode trainer      # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 2 examples/distributed.py --mode accelerate
    torchrun --nproc_per_node 2 examples/distributed.py --mode fsdp2

Note: on CPU, `accelerate launch --cpu --num_processes 2` silently runs one process, and accelerate's FSDP plugin
silently becomes DDP; torchrun gives real processes. Process 0 writes --report with what every process saw: the
world size, the wrapper it trained under, a hash of its final adapter weights and its last rank draws.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, set_seed

from elasticlora import ElasticLoraConfig, elastic_layers
from elasticlora.data import load_rows, tokenize_rows

from common import DATA, load_model

TRAIN = DATA / "wordnet_train.jsonl"


def adapter_hash(model) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def last_draws(model) -> list[int]:
    """The truncation ranks the first elastic layer drew in the last training step."""
    layer = next(iter(elastic_layers(model).values()))
    return layer.drawn_ranks().tolist()


def train(model, examples, collator, args) -> str:
    """Train `model` in place under the wrapper --mode names; returns that wrapper's class name."""
    if args.mode == "trainer":
        from transformers import Trainer, TrainingArguments

        training_args = TrainingArguments(
            output_dir=str(args.out), per_device_train_batch_size=8, max_steps=args.steps, learning_rate=5e-4,
            report_to=[], use_cpu=not torch.cuda.is_available(), save_strategy="no", disable_tqdm=True,
            ddp_backend="gloo" if "WORLD_SIZE" in os.environ and not torch.cuda.is_available() else None,
        )  # fmt: skip
        trainer = Trainer(model=model, args=training_args, train_dataset=examples, data_collator=collator)
        trainer.train()
        return type(trainer.model_wrapped).__name__
    if args.mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = accelerator.device
    else:
        from torch.distributed.fsdp import fully_shard

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
        model.to(device)
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    sampler = torch.utils.data.DistributedSampler(examples, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(examples, batch_size=8, sampler=sampler, collate_fn=collator)
    if args.mode == "accelerate":
        model, optimizer = accelerator.prepare(model, optimizer)
    wrapper = type(model).__name__
    if args.mode == "fsdp2":
        wrapper = type(model.get_base_model().model.layers[0]).__name__
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == args.steps:
                break
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("trainer", "accelerate", "fsdp2"), default="trainer")
    parser.add_argument("--model", default="smollm2", help="path or hub id; 'tiny': a random test model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("outputs/distributed"))
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "fsdp2" and "LOCAL_RANK" not in os.environ:
        parser.error("--mode fsdp2 needs a launcher: torchrun --nproc_per_node N examples/distributed.py ...")
    set_seed(0)  # the same seed on every process, as Trainer does; rank draws still differ per process

    model, tokenizer = load_model(args.model)
    rows = load_rows(TRAIN)[: args.rows]
    examples = tokenize_rows(tokenizer, rows, max_length=64)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    model = get_peft_model(model, ElasticLoraConfig(r=args.max_rank))
    wrapper = train(model, examples, collator, args)
    # The DDP wrapper is gone once train() returns; collect its reference cycles now. A DDP reducer that outlives
    # destroy_process_group() frees the gloo group while holding the GIL and can deadlock with gloo's worker thread.
    gc.collect()

    distributed = dist.is_available() and dist.is_initialized()
    report = {
        "rank": dist.get_rank() if distributed else 0,
        "world_size": dist.get_world_size() if distributed else 1,
        "wrapper": wrapper,
        "adapter_hash": adapter_hash(model),
        "last_draws": last_draws(model),
    }
    everyone = [report]
    if distributed:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, report)
    if report["rank"] == 0:
        print(json.dumps(everyone, indent=2))
        if args.report:
            args.report.write_text(json.dumps(everyone, indent=2))
    if distributed:
        # Free FSDP/DDP state (and the process-group references it holds) before the group goes: a gloo worker
        # thread still alive at interpreter exit aborts the process ("terminate called without an active exception").
        del model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
