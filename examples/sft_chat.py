"""TRL's SFTTrainer with an elastic adapter on chat data, the rank curve logged at every evaluation, and an estimate
of what `elasticlora shrink` will export logged as training goes (printed at the end).

    python examples/sft_chat.py                      # packaged SmolLM2-135M-Instruct, WordNet as chat turns
    python examples/sft_chat.py --model tiny --steps 4

`peft_config=ElasticLoraConfig()` is all SFTTrainer needs. SFTConfig's own defaults (bf16, gradient
checkpointing) are kept; loss is on assistant turns only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from elasticlora import ElasticLoraConfig
from elasticlora.callbacks import add_rank_curve, add_shrink_estimate
from elasticlora.data import load_rows

from common import DATA, load_model

# A chat template with generation markers, so TRL can score assistant turns only (`assistant_only_loss`).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)


def chats(path: Path, n: int) -> Dataset:
    rows = load_rows(path)[:n]
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": row["prompt"].replace("\nDefinition:", "")},
                    {"role": "assistant", "content": row["completion"].strip()},
                ]
            }
            for row in rows
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="path or hub id; 'tiny': a random test model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=640)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("outputs/sft_chat"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    tokenizer.chat_template = TINY_TEMPLATE if args.model == "tiny" else TEMPLATE
    config = SFTConfig(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=5e-4,
        assistant_only_loss=True,
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 4),
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=args.model == "tiny",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=chats(DATA / "wordnet_train.jsonl", args.train_rows),
        eval_dataset=chats(DATA / "wordnet_eval.jsonl", args.eval_rows),
        processing_class=tokenizer,
        peft_config=ElasticLoraConfig(r=args.max_rank),
    )
    add_rank_curve(trainer, ranks=(1, 4, 16, None))
    add_shrink_estimate(trainer, tolerance=0.01, every=0.5)  # halfway and at the end: eval_shrink_params, ...
    trainer.train()
    trainer.save_model(str(args.out / "adapter"))
    curves = [entry for entry in trainer.state.log_history if "eval_loss@full" in entry]
    for entry in curves:
        print({k: round(v, 4) for k, v in entry.items() if k.startswith("eval_loss@")} | {"step": entry["step"]})
    print(f"adapter: {args.out / 'adapter'}; shrink it with `elasticlora shrink {args.out / 'adapter'} ...`")


if __name__ == "__main__":
    main()
