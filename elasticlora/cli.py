"""`elasticlora` command line: a thin parser over `workflow.shrink_adapter` and `workflow.inspect_adapter`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

EPILOG = """examples:
  elasticlora shrink out/adapter --base-model meta-llama/Llama-3.1-8B --data eval.jsonl --out out/shrunk
  elasticlora shrink out/adapter --base-model smollm2 --data eval.jsonl --avg-rank 8 --out out/r8
  elasticlora inspect out/shrunk

eval data (jsonl): {"text": ...} | {"prompt": ..., "completion": ...} | {"messages": [...]}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elasticlora",
        description="Shrink a LoRA adapter to per-module ranks within a quality tolerance; export plain PEFT/vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "shrink",
        help="choose each module's smallest rank within a tolerance and export",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("adapter_dir", help="saved adapter (elastic or plain PEFT LoRA); it is never modified")
    s.add_argument("--base-model", required=True, help="local path or hub id; 'smollm2' = the packaged SmolLM2-135M")
    s.add_argument("--gguf-file", help="GGUF file name inside --base-model, for GGUF checkpoints")
    s.add_argument("--data", required=True, help="held-out eval data, jsonl")
    s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="allowed eval-loss increase over the best measured: relative (0.01 = 1%%) unless --absolute",
    )
    s.add_argument("--absolute", action="store_true", help="--tolerance is in loss units (nats/token)")
    budget = s.add_mutually_exclusive_group()
    budget.add_argument("--max-params", type=int, help="parameter budget instead of a tolerance")
    budget.add_argument("--avg-rank", type=float, help="budget as an average rank over modules")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-length", type=int, default=1024, help="tokens per eval row (longer rows are cut)")
    s.add_argument("--max-passes", type=int, default=12, help="passes over the eval data in all (>= 4)")
    s.add_argument("--pad-to-max-rank", action="store_true", help="zero-pad every module to one rank")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--device", help="e.g. cuda, cpu (default: where the model loads)")
    s.add_argument("--bf16", action="store_true", help="evaluate under bf16 autocast (faster, slightly less exact)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="ranks, parameters, vLLM rank bucket and loadability of an adapter")
    i.add_argument("adapter_dir")
    i.add_argument("--json", action="store_true", help="print the full report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .workflow import inspect_adapter, shrink_adapter

    try:
        if args.command == "shrink":
            report = shrink_adapter(
                args.adapter_dir,
                args.base_model,
                args.data,
                args.out,
                tolerance=args.tolerance,
                mode="absolute" if args.absolute else "relative",
                max_params=args.max_params,
                avg_rank=args.avg_rank,
                gguf_file=args.gguf_file,
                batch_size=args.batch_size,
                max_length=args.max_length,
                max_passes=args.max_passes,
                pad_to_max_rank=args.pad_to_max_rank,
                overwrite=args.overwrite,
                device=args.device,
                autocast_dtype=torch.bfloat16 if args.bf16 else None,
                progress=not args.quiet,
            )
            print("\n".join(report["summary"]))
            print(f"vLLM: --max-lora-rank {report['vllm_max_lora_rank']}")
            print(f"wrote {report['out']} (adapter_config.json, adapter_model.safetensors, report.json, report.png)")
        else:
            report = inspect_adapter(args.adapter_dir)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print(f"{report['path']}{' (elastic)' if report['elastic'] else ''}")
                print(
                    f"modules: {report['modules']}  max rank: {report['max_rank']}  "
                    f"mean rank: {report['mean_rank']:.2f}  parameters: {report['params']:,}"
                )
                print(f"vLLM --max-lora-rank: {report['vllm_max_lora_rank']}")
                peft_problems = report["peft_problems"]
                vllm_problems = peft_problems + report["vllm_problems"]
                print(f"plain PEFT can load it: {'yes' if not peft_problems else 'no: ' + '; '.join(peft_problems)}")
                print(f"vLLM can load it: {'yes' if not vllm_problems else 'no: ' + '; '.join(vllm_problems)}")
                if report["module_types_vllm_may_not_map"]:
                    print(f"note: vLLM's Llama-family models do not map {report['module_types_vllm_may_not_map']}")
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ModuleNotFoundError) as err:
        print(f"elasticlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
