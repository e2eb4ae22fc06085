"""QLoRA: elastic training on a 4-bit (nf4) or 8-bit bitsandbytes base, shrink on that same base, export for any.

    python examples/qlora.py                    # packaged SmolLM2, quantized to nf4 on load
    python examples/qlora.py --bits 8 --model tiny --steps 4

bitsandbytes >= 0.50 runs 4-bit and 8-bit LoRA on CPU. `shrink_adapter(..., load_in_4bit=True)` (the CLI's
`--load-in-4bit`) measures on the base the adapter was trained on; the export targets the base model's own module
names, so it loads on the unquantized model (and in vLLM).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from elasticlora import ElasticLoraConfig, elastic_layers
from elasticlora.data import eval_batches, load_rows
from elasticlora.workflow import shrink_adapter

from common import DATA, load_model, train_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="path or hub id; 'tiny': a random test model")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("outputs/qlora"))
    args = parser.parse_args()

    # bitsandbytes quantizes on `from_pretrained`: save the full-precision base once, reload it quantized
    full, tokenizer = load_model(args.model)
    base_dir = Path(tempfile.mkdtemp(prefix="elasticlora-base-"))
    full.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    bits = {"load_in_4bit": args.bits == 4, "load_in_8bit": args.bits == 8}
    quantized, _ = load_model(str(base_dir), dtype="auto", **bits)
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    model = get_peft_model(quantized, ElasticLoraConfig(r=args.max_rank))
    print(f"elastic layers: {type(next(iter(elastic_layers(model).values()))).__name__}")

    train = eval_batches(tokenizer, DATA / "wordnet_train.jsonl", batch_size=16)
    desc = f"{args.bits}-bit training"
    train_steps(model, train, args.steps, args.lr, autocast_dtype=torch.bfloat16, desc=desc, max_grad_norm=1.0)
    adapter_dir = args.out / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)

    # shrink measures on the quantized base the adapter was trained on
    eval_rows = load_rows(DATA / "wordnet_eval.jsonl")[: args.eval_rows]
    shrunk = args.out / "shrunk"
    report = shrink_adapter(
        adapter_dir, str(base_dir), eval_rows, shrunk, tolerance=args.tolerance, overwrite=True, **bits
    )
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), shrunk)
    print("\n".join(report["summary"]))
    print(f"the export loads on the full-precision base: {type(plain).__name__}, {len(report['ranks'])} modules")
    shutil.rmtree(base_dir)


if __name__ == "__main__":
    main()
