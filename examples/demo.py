"""The main job: train ElasticLoRA once, shrink it per module at a tolerance, export, reload in plain PEFT.

    make demo                                   # SmolLM2-135M-Instruct (packaged, offline) on WordNet definitions
    python examples/demo.py --model PATH_OR_ID --data train.jsonl --eval-data eval.jsonl --max-rank 64 --steps 500

Everything lands under --out (default outputs/demo/): the trained adapter, the shrunk export with report.json and
report.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from elasticlora import ElasticLoraConfig
from elasticlora.data import eval_batches, load_rows
from elasticlora.evaluate import eval_loss, model_device
from elasticlora.loading import resolve_dtype
from elasticlora.workflow import shrink_adapter

from common import DATA, base_model_dir, load_model, train_steps


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="smollm2",
        help="base model path or hub id ('smollm2', 'gemma3-270m': packaged; 'tiny': a random test model)",
    )
    parser.add_argument("--gguf-file")
    parser.add_argument("--data", default=str(DATA / "wordnet_train.jsonl"))
    parser.add_argument("--eval-data", default=str(DATA / "wordnet_eval.jsonl"))
    parser.add_argument("--eval-rows", type=int, default=96)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in fp32 (by default bf16 autocast where it is faster: GPUs with bf16, CPUs with AMX/AVX512-BF16)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args()

    args.model = base_model_dir(args.model)  # shrink loads the base by name or path
    base, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    # bf16 only where the hardware computes it: emulated (CPUs without AVX512-BF16/AMX) it ran 30-50x slower than fp32
    bf16 = not args.no_bf16 and resolve_dtype("auto", model_device(base)) == torch.bfloat16
    autocast = torch.bfloat16 if bf16 else None
    eval_rows = load_rows(args.eval_data)[: args.eval_rows]
    prompts = [row["prompt"] for row in eval_rows[:3] if "prompt" in row]
    before = generate(base, tokenizer, prompts)

    torch.manual_seed(0)  # the adapter's initialisation; training seeds its own data order and draws
    model = get_peft_model(base, ElasticLoraConfig(r=args.max_rank))
    train = eval_batches(tokenizer, args.data, batch_size=args.batch_size)
    train_steps(model, train, args.steps, args.lr, autocast_dtype=autocast, desc="elastic training", max_grad_norm=1.0)
    adapter_dir = args.out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(adapter_dir)

    shrunk_dir = args.out / "shrunk"
    report = shrink_adapter(
        adapter_dir,
        args.model,
        eval_rows,
        shrunk_dir,
        tolerance=args.tolerance,
        gguf_file=args.gguf_file,
        overwrite=True,
        autocast_dtype=autocast,
        dtype="auto" if bf16 else "float32",  # auto may pick bf16 weights; without bf16, fp32 throughout
    )

    plain_base, _ = load_model(args.model, gguf_file=args.gguf_file)
    plain = PeftModel.from_pretrained(plain_base, shrunk_dir).eval()
    reloaded_loss = eval_loss(plain, eval_batches(tokenizer, eval_rows), autocast_dtype=autocast)
    after = generate(plain, tokenizer, prompts)

    print("\n== ElasticLoRA demo")
    print("\n".join(report["summary"]))
    print(f"shrunk export reloaded in plain PEFT: eval loss {reloaded_loss:.4f}")
    print(f"vLLM: --max-lora-rank {report['vllm_max_lora_rank']}")
    for prompt, old, new in zip(prompts, before, after):
        print(f"\n{prompt}\n  base:       {old}\n  fine-tuned: {new}")
    summary = {k: report[k] for k in ("base_quality", "full_quality", "quality", "params", "full_params", "passes")}
    (args.out / "summary.json").write_text(json.dumps({**summary, "reloaded_quality": reloaded_loss}, indent=2))
    print(f"\noutputs: {adapter_dir}, {shrunk_dir} (report.json, report.png), {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
