"""One call per CLI subcommand: `shrink_adapter` (adapter dir -> shrunk standard adapter) and `inspect_adapter`."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .adapter_io import (
    adapter_files,
    config_fields,
    is_elastic_config,
    load_elastic,
    read_adapter_config,
    read_adapter_shapes,
    write_atomically,
)
from .data import eval_batches
from .export import export_peft_adapter
from .loading import load_model_and_tokenizer, release_host_memory
from .options import ShrinkOptions
from .ranks import module_shapes
from .report import plot_report, summary_lines
from .shrink import shrink_family
from .vllm import (
    VLLM_LORA_MODULES,
    VLLM_MAX_LORA_RANKS,
    architecture_problems,
    unmapped_module_types,
    vllm_max_lora_rank,
    vllm_problems,
)


def _check_shapes_match(model: torch.nn.Module, shapes: dict[str, dict[str, tuple[int, ...]]], source: str) -> None:
    named = dict(model.named_modules())
    for name, tensors in shapes.items():
        if name == "(other tensors)":
            continue
        module = named.get(name)
        if module is None:
            raise ValueError(
                f"the adapter adapts {name!r}, which the base model does not have: wrong base_model (--base-model)?"
            )
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        out_f, in_f = (
            (module.out_features, module.in_features) if hasattr(module, "in_features") else weight.shape[::-1]
        )
        a, b = tensors.get("lora_A"), tensors.get("lora_B")
        if a is None or b is None or a[1] != in_f or b[0] != out_f:
            raise ValueError(
                f"{source}: {name} has lora_A {a} / lora_B {b}, but the base model's layer is {in_f} -> {out_f}: "
                "the adapter was trained on a different base model"
            )


def shrink_adapter(
    adapter_dir: str | Path,
    base_model: str,
    data,
    out_dir: str | Path,
    *,
    options: ShrinkOptions | None = None,
    **kwargs,
) -> dict:
    """Shrink a saved adapter per module and write a standard PEFT LoRA adapter plus its report to `out_dir`.

    `data`: a jsonl path, a list of rows or a `datasets.Dataset` (see `data.py`). Options: a `ShrinkOptions`, or its
    fields as keywords (`tolerance=0.02, dtype="bfloat16", max_rank="auto"`). The source adapter is only read;
    `out_dir` appears complete or not at all. Returns the report (also written as `report.json`).

    Several tolerances (`tolerance=[0.005, 0.01, 0.02]`) share one search and write one adapter per tolerance, in
    `out_dir/tolerance-<value>/`, plus `out_dir/family.json`; the return value then holds their reports under
    "family".
    """
    options = ShrinkOptions(**kwargs) if options is None else replace(options, **kwargs)
    source, out = Path(adapter_dir).resolve(), Path(out_dir).resolve()
    if out == source or source in out.parents:
        raise ValueError(f"out_dir (--out) {out} must not be (inside) the source adapter directory {source}")
    if out.exists() and not options.overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another output directory or pass overwrite=True (--overwrite)"
        )
    raw_config = read_adapter_config(source)
    if raw_config.get("target_parameters"):
        raise ValueError(
            f"{source} trains LoRA on 3-D parameters ({sorted(raw_config['target_parameters'])}, PEFT's "
            "`target_parameters`: mixture-of-experts experts or routers); shrink truncates linear layers only"
        )
    shapes = read_adapter_shapes(source)
    elastic = is_elastic_config(raw_config)

    device = options.device
    if device is None and options.device_map is None and torch.cuda.is_available():
        device = "cuda"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_model_and_tokenizer(
        base_model,
        gguf_file=options.gguf_file,
        dtype=options.dtype,
        device=device,
        device_map=options.device_map,
        load_in_4bit=options.load_in_4bit,
        load_in_8bit=options.load_in_8bit,
    )
    _check_shapes_match(model, shapes, str(source))
    batches = eval_batches(tokenizer, data, batch_size=options.batch_size, max_length=options.max_length)
    model = load_elastic(model, source)
    if not elastic:
        warnings.warn(
            f"{source} is a plain LoRA adapter: the search truncates it to its top singular directions",
            stacklevel=2,
        )
    release_host_memory()  # the adapter file and PEFT's initial weights, freed while loading
    max_params = options.max_params
    if options.avg_rank is not None:
        widths = sum(layer_in + layer_out for layer_in, layer_out in module_shapes(model).values())
        max_params = int(options.avg_rank * widths)
    results = shrink_family(
        model,
        batches,
        options.tolerances,
        mode=options.mode,
        max_params=max_params,
        quality=options.quality,
        higher_is_better=options.higher_is_better,
        max_passes=options.max_passes,
        max_rank=options.max_rank,
        progress=options.progress,
        autocast_dtype=options.autocast_dtype,
        gradient_checkpointing=options.gradient_checkpointing,
    )
    precision = "4bit" if options.load_in_4bit else "8bit" if options.load_in_8bit else str(model.dtype)
    common = {
        "source": str(source),
        "source_is_elastic": elastic,
        "base_model": str(base_model),
        "base_precision": precision.removeprefix("torch."),
        "eval_rows": sum(len(batch["input_ids"]) for batch in batches),
    }
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        common["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    files, reports = {}, []
    family = len(results) > 1
    for result in results:
        config, tensors = export_peft_adapter(model, result.ranks, pad_to_max_rank=options.pad_to_max_rank)
        config.base_model_name_or_path = (
            f"{base_model} ({options.gguf_file})" if options.gguf_file else str(base_model)
        )
        report = {**result.to_dict(), **common}
        report.update(vllm_max_lora_rank=vllm_max_lora_rank(config.r), export_max_rank=config.r)
        prefix = f"tolerance-{result.tolerance:g}/" if family else ""
        files.update({prefix + name: blob for name, blob in _adapter_dir_files(config, tensors, report).items()})
        report["out"] = str(out / prefix)
        report["summary"] = summary_lines(report)
        reports.append(report)
    if not family:
        write_atomically(out, files, overwrite=options.overwrite)
        return reports[0]
    index = [
        {key: report[key] for key in ("tolerance", "params", "quality", "export_max_rank", "vllm_max_lora_rank")}
        | {"dir": Path(report["out"]).name, "advice": report["advice"]["message"]}
        for report in reports
    ]
    passes_run = results[0].passes_run
    files["family.json"] = (json.dumps({"adapters": index, "passes_run": passes_run}, indent=2) + "\n").encode()
    write_atomically(out, files, overwrite=options.overwrite)
    summary = [
        f"tolerance {entry['tolerance']:g}: {entry['params']:,} parameters, {reports[0]['metric']} "
        f"{entry['quality']:.4f}, max rank {entry['export_max_rank']} (vLLM --max-lora-rank "
        f"{entry['vllm_max_lora_rank']}) -> {entry['dir']}/"
        for entry in index
    ]
    summary += [f"tolerance {entry['tolerance']:g}: r_max advice: {entry['advice']}" for entry in index]
    summary.append(f"passes over the eval data: {passes_run} for {len(index)} adapters")
    return {"family": reports, "out": str(out), "passes_run": passes_run, "summary": summary}


def _adapter_dir_files(config, tensors, report: dict) -> dict[str, bytes]:
    files = adapter_files(config, tensors)
    files["report.json"] = (json.dumps(report, indent=2) + "\n").encode()
    png = io.BytesIO()
    plot_report(report, png)
    files["report.png"] = png.getvalue()
    return files


def inspect_adapter(adapter_dir: str | Path) -> dict:
    """Ranks, parameter count, vLLM rank bucket and whether plain PEFT and vLLM can load a saved adapter."""
    from peft import LoraConfig

    raw = read_adapter_config(adapter_dir)
    shapes = read_adapter_shapes(adapter_dir)
    problems_peft, problems_vllm = [], []
    ranks, params = {}, 0
    for name, tensors in shapes.items():
        if name == "(other tensors)":
            problems_vllm.append(f"non-LoRA tensors: {sorted(tensors)[:3]}")
            continue
        a, b = tensors.get("lora_A"), tensors.get("lora_B")
        if a is None or b is None or a[0] != b[1]:
            problems_peft.append(f"{name}: lora_A {a} and lora_B {b} do not pair up")
            continue
        ranks[name] = a[0]
        params += a[0] * (a[1] + b[0])
    try:
        LoraConfig(**config_fields(raw, LoraConfig))
    except (TypeError, ValueError) as err:
        problems_peft.append(f"adapter_config.json is not a valid LoraConfig: {err}")
    max_rank = max(ranks.values(), default=0)
    problems_vllm += vllm_problems(raw, max_rank)
    architecture = (raw.get("auto_mapping") or {}).get("base_model_class")
    problems_vllm += architecture_problems(architecture, ranks)
    return {
        "path": str(Path(adapter_dir).resolve()),
        "elastic": is_elastic_config(raw),
        "modules": len(ranks),
        "ranks": ranks,
        "max_rank": max_rank,
        "mean_rank": sum(ranks.values()) / max(1, len(ranks)),
        "params": params,
        "vllm_max_lora_rank": vllm_max_lora_rank(max_rank) if 0 < max_rank <= VLLM_MAX_LORA_RANKS[-1] else None,
        "peft_loadable": not problems_peft,
        "peft_problems": problems_peft,
        "vllm_loadable": not problems_peft and not problems_vllm,
        "vllm_problems": problems_vllm,
        "base_architecture": architecture,
        "module_types_vllm_may_not_map": [] if architecture in VLLM_LORA_MODULES else unmapped_module_types(ranks),
    }
