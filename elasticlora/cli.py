"""`elasticlora` command line: a thin parser over `workflow.shrink_adapter` and `workflow.inspect_adapter`."""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_cli_flags

EPILOG = """examples:
  elasticlora shrink out/adapter --base-model meta-llama/Llama-3.1-8B --data eval.jsonl --out out/shrunk
  elasticlora shrink out/adapter --base-model smollm2 --data eval.jsonl --avg-rank 8 --out out/r8
  elasticlora shrink out/qlora --base-model meta-llama/Llama-3.1-8B --load-in-4bit --data eval.jsonl \\
      --tolerance 0.005 0.01 0.02 --max-rank auto --out out/family
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
    s.add_argument(
        "--base-model",
        required=True,
        help="local path or hub id; 'smollm2' / 'gemma3-270m': the packaged SmolLM2-135M-Instruct / Gemma 3 270M",
    )
    s.add_argument("--data", required=True, help="held-out eval data, jsonl")
    s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    add_cli_flags(s)

    i = sub.add_parser("inspect", help="ranks, parameters, vLLM rank bucket and loadability of an adapter")
    i.add_argument("adapter_dir")
    i.add_argument("--json", action="store_true", help="print the full report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .options import options_from_args
    from .vllm import vllm_serve_command
    from .workflow import inspect_adapter, shrink_adapter

    try:
        if args.command == "shrink":
            report = shrink_adapter(
                args.adapter_dir, args.base_model, args.data, args.out, options=options_from_args(args)
            )
            print("\n".join(report["summary"]))
            if "family" not in report:
                base = report["base_model"]
                print(f"serve: {vllm_serve_command(base, report['out'].rstrip('/'), report['vllm_max_lora_rank'])}")
                print(
                    f"wrote {report['out']} (adapter_config.json, adapter_model.safetensors, report.json, report.png)"
                )
            else:
                print(f"wrote {report['out']} (one adapter directory per tolerance, and family.json)")
        else:
            report = inspect_adapter(args.adapter_dir)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                base = f" on {report['base_architecture']}" if report["base_architecture"] else ""
                print(f"{report['path']}{' (elastic)' if report['elastic'] else ''}{base}")
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
