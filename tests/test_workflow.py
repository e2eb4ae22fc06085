"""The one-call library function and the CLI over it, on a saved tiny model: happy path and bad input."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from elasticlora import ElasticLoraConfig, at_ranks, elastic_layers, load_elastic, rank_advice
from elasticlora.cli import main
from elasticlora.data import eval_batches
from elasticlora.workflow import inspect_adapter, shrink_adapter

from conftest import char_tokenizer, fit, randomize_lora, tiny_llama

ROWS = [{"prompt": "define cat:", "completion": " a small animal."}, {"text": "the quick brown fox jumps."}] * 4


def save_adapter(path, config, train=True):
    """A tiny adapter; trained on ROWS so that it beats the base model on them (else shrink rightly drops it all)."""
    model = get_peft_model(tiny_llama(), config)
    if train:
        fit(model, eval_batches(char_tokenizer(), ROWS, batch_size=8), steps=20)
    else:
        randomize_lora(model)
    model.save_pretrained(path)
    return path


def tiny_widths() -> dict[str, int]:
    """in + out features of every module an elastic adapter of `tiny_llama` adapts (the saved base)."""
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    return {name: layer.in_features + layer.out_features for name, layer in elastic_layers(model).items()}


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    adapter = save_adapter(tmp_path / "adapter", ElasticLoraConfig(r=8))
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    snapshot = {p.name: p.read_bytes() for p in adapter.iterdir()}
    yield adapter, data, tmp_path / "out", tiny_model_dir
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == snapshot, "the source adapter was modified"


def test_shrink_adapter_writes_a_plain_adapter_and_report(setup):
    adapter, data, out, base = setup
    report = shrink_adapter(adapter, str(base), data, out, tolerance=0.01, progress=False)
    assert report["base_quality"] > report["full_quality"] * 1.05, "the trained adapter must matter on this data"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.json",
        "report.png",
    ]
    assert report["passes"] <= 12 and report["quality"] <= report["best_quality"] * 1.01
    saved = json.loads((out / "report.json").read_text())
    assert saved["ranks"] == report["ranks"] and saved["vllm_max_lora_rank"] in (1, 8)
    advice = saved["advice"]  # the r_max advice on the same ranks, and in the summary
    assert advice == rank_advice(
        report["ranks"], dict.fromkeys(report["ranks"], 8), tiny_widths(), advice["cut_cost_tolerances"]
    )
    assert f"r_max advice: {advice['message']}" in report["summary"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    plain = PeftModel.from_pretrained(tiny_llama(), out)
    assert type(plain.peft_config["default"]) is LoraConfig
    info = inspect_adapter(out)
    assert info["peft_loadable"] and info["vllm_loadable"] and not info["elastic"]
    assert info["ranks"] == {name: k for name, k in report["ranks"].items() if k > 0}


def test_plain_lora_is_svd_ordered_with_a_warning(setup, tmp_path):
    """A plain LoRA's export holds, for each module, the best rank-k approximation of its update (Eckart-Young)."""
    _, data, out, base = setup
    plain = save_adapter(tmp_path / "plain", LoraConfig(r=8, target_modules="all-linear"))
    with pytest.warns(UserWarning, match="plain LoRA adapter"):
        report = shrink_adapter(plain, str(base), data, out, tolerance=0.05, progress=False)
    assert not report["source_is_elastic"]
    source, exported = load_file(plain / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    config = json.loads((plain / "adapter_config.json").read_text())
    assert not config["use_rslora"]
    scaling = config["lora_alpha"] / config["r"]
    truncated = [(name, k) for name, k in report["ranks"].items() if 0 < k < 8]
    assert truncated, "the tolerance truncates some modules"
    for name, k in report["ranks"].items():
        key = f"base_model.model.{name}"
        if k == 0:
            assert f"{key}.lora_A.weight" not in exported
            continue
        update = (source[f"{key}.lora_B.weight"] @ source[f"{key}.lora_A.weight"]).double() * scaling
        u, s, vh = torch.linalg.svd(update)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        written = exported[f"{key}.lora_B.weight"].double() @ exported[f"{key}.lora_A.weight"].double()
        assert exported[f"{key}.lora_A.weight"].shape[0] == k
        assert torch.allclose(written, best, atol=1e-5), name


def test_cli_shrink_and_inspect(setup, capsys):
    adapter, data, out, base = setup
    args = ["shrink", str(adapter), "--base-model", str(base), "--data", str(data), "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    serve = f"vllm serve {base} --enable-lora --lora-modules out={out} --max-lora-rank {report['vllm_max_lora_rank']}"
    printed = capsys.readouterr().out
    assert f"serve: {serve}\n" in printed and f"r_max advice: {report['advice']['message']}\n" in printed
    assert main(args) == 2, "an existing --out is refused"
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--avg-rank", "2"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "plain PEFT can load it: yes" in capsys.readouterr().out


def corrupt(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")


def wrong_shapes(adapter):
    big = get_peft_model(tiny_llama(hidden=64), ElasticLoraConfig(r=8))
    big.save_pretrained(adapter)


BAD = [
    ("missing adapter dir", lambda a, d: a / "nope", "adapter_config.json is missing"),
    ("corrupt safetensors", corrupt, "not a readable safetensors"),
    ("shape mismatch", wrong_shapes, "different base model"),
]


@pytest.mark.parametrize("case,damage,message", BAD, ids=[b[0] for b in BAD])
def test_bad_adapters_are_refused_and_nothing_is_written(case, damage, message, tmp_path, tiny_model_dir):
    adapter = save_adapter(tmp_path / "adapter", ElasticLoraConfig(r=8), train=False)
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    target = damage(adapter, data) if case == "missing adapter dir" else (damage(adapter) or adapter)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        shrink_adapter(target, str(tiny_model_dir), data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "no rows"),
        (json.dumps({"prompt": "abc", "completion": ""}), "no tokens to score"),
        ("{oops", "not valid JSON"),
    ],
    ids=["empty", "nothing to score", "bad json"],
)
def test_bad_eval_data_is_refused(setup, content, message):
    adapter, data, out, base = setup
    data.write_text(content)
    with pytest.raises(ValueError, match=message):
        shrink_adapter(adapter, str(base), data, out, progress=False)
    assert not out.exists()


def test_out_equal_to_source_is_refused(setup):
    adapter, data, _, base = setup
    with pytest.raises(ValueError, match="must not be"):
        shrink_adapter(adapter, str(base), data, adapter, overwrite=True, progress=False)


@pytest.mark.parametrize("tolerance", [0.0, -1.0, float("nan"), 2.0])
def test_bad_tolerance_is_refused(setup, tolerance):
    adapter, data, out, base = setup
    with pytest.raises(ValueError, match="tolerance"):
        shrink_adapter(adapter, str(base), data, out, tolerance=tolerance, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--base-model", "./no/such/model"], "does not exist"),
        (["--base-model", "no-such-org/no-such-model"], "cannot load the base model"),
        (["--device", "cuda"], "sees no CUDA GPU"),
        (["--device", "gpu0"], "not a torch device"),
    ],
    ids=["missing path", "unreachable hub id", "cuda without cuda", "bad device"],
)
def test_bad_base_model_or_device_gives_one_line_and_writes_nothing(setup, flags, message, capsys, monkeypatch):
    adapter, data, out, base = setup
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail without network round trips
    args = ["shrink", str(adapter), "--base-model", str(base), "--data", str(data), "--out", str(out), "--quiet"]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_family_of_exports_equals_the_single_tolerance_runs(setup, tmp_path):
    adapter, data, out, base = setup
    tolerances = [0.005, 0.02, 0.04]
    family = shrink_adapter(adapter, str(base), data, out, tolerance=tolerances, progress=False)
    index = json.loads((out / "family.json").read_text())
    assert [entry["dir"] for entry in index["adapters"]] == ["tolerance-0.005", "tolerance-0.02", "tolerance-0.04"]
    assert index["passes_run"] == family["passes_run"] < sum(r["passes"] for r in family["family"])
    for entry, report in zip(index["adapters"], family["family"]):
        assert entry["advice"] == report["advice"]["message"]
        assert f"tolerance {entry['tolerance']:g}: r_max advice: {entry['advice']}" in family["summary"]
    for tolerance, entry in zip(tolerances, index["adapters"]):
        single = shrink_adapter(adapter, str(base), data, tmp_path / f"single-{tolerance}", tolerance=tolerance,
                                progress=False)  # fmt: skip
        member = out / entry["dir"]
        report = json.loads((member / "report.json").read_text())
        assert report["tolerance"] == tolerance and report["params"] == single["params"] == entry["params"]
        assert report["ranks"] == single["ranks"] and report["quality"] == single["quality"]
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (member / name).read_bytes() == (tmp_path / f"single-{tolerance}" / name).read_bytes(), name


def test_cli_family_and_cap(setup, capsys):
    adapter, data, out, base = setup
    args = ["shrink", str(adapter), "--base-model", str(base), "--data", str(data), "--out", str(out), "--quiet"]
    assert main([*args, "--tolerance", "0.005", "0.02", "--max-rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "tolerance 0.005:" in printed and "tolerance 0.02:" in printed and "family.json" in printed
    for member in ("tolerance-0.005", "tolerance-0.02"):
        report = json.loads((out / member / "report.json").read_text())
        assert report["rank_cap"] == 2 and max(report["ranks"].values()) <= 2 and report["vllm_max_lora_rank"] <= 8


@pytest.fixture(scope="module")
def wide_setup(tmp_path_factory):
    """A base wide enough for 4-bit blocks (64 weights), a trained elastic adapter, and eval data."""
    path = tmp_path_factory.mktemp("wide")
    tiny_llama(hidden=128).save_pretrained(path / "base")
    char_tokenizer().save_pretrained(path / "base")
    model = get_peft_model(tiny_llama(hidden=128), ElasticLoraConfig(r=8))
    fit(model, eval_batches(char_tokenizer(), ROWS, batch_size=8), steps=20)
    model.save_pretrained(path / "adapter")
    (path / "eval.jsonl").write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return path


# id -> (shrink_adapter options, the base precision it reports, how far its full-rank eval loss may be from fp32's)
PRECISIONS = {
    "float32": ({"dtype": "float32"}, "float32", 1e-6),
    "bfloat16": ({"dtype": "bfloat16"}, "bfloat16", 0.02),
    "8bit": ({"load_in_8bit": True}, "8bit", 0.05),
    "4bit": ({"load_in_4bit": True}, "4bit", 0.10),
    "device_map auto": ({"device_map": "auto", "dtype": "float32"}, "float32", 1e-6),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PRECISIONS))
def test_every_precision_exports_an_adapter_plain_peft_loads_on_the_fp32_base(case, wide_setup, tmp_path):
    pytest.importorskip("bitsandbytes") if "bit" in case else None
    options, precision, closeness = PRECISIONS[case]
    base, adapter, data = str(wide_setup / "base"), wide_setup / "adapter", wide_setup / "eval.jsonl"
    report = shrink_adapter(adapter, base, data, tmp_path / "out", avg_rank=2, progress=False, **options)
    reference = shrink_adapter(adapter, base, data, tmp_path / "ref", avg_rank=2, progress=False, dtype="float32")
    assert report["base_precision"] == precision
    assert report["full_quality"] == pytest.approx(reference["full_quality"], rel=closeness)
    # the export holds the fp32 adapter truncated to the chosen ranks, whatever precision measured it
    elastic = load_elastic(tiny_llama(hidden=128), adapter).eval()
    plain = PeftModel.from_pretrained(tiny_llama(hidden=128), tmp_path / "out").eval()
    ids = eval_batches(char_tokenizer(), ROWS, batch_size=8)[0]["input_ids"]
    with torch.no_grad(), at_ranks(elastic, report["ranks"]):
        expected = elastic(ids).logits
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--load-in-4bit", "--load-in-8bit"], "choose one of"),
        (["--max-rank", "0"], "must be a positive int"),
        (["--tolerance", "0.01", "0.02", "--max-params", "100"], "parameter budget gives one adapter"),
        (["--max-params", "100", "--avg-rank", "2"], "give one budget"),
        (["--device", "cpu", "--device-map", "auto"], "not both"),
        (["--tolerance", "0.01", "3"], "must be in (0, 1]"),
    ],
    ids=["4 and 8 bit", "rank cap 0", "family with a budget", "two budgets", "device and map", "bad member"],
)
def test_bad_option_combinations_give_one_line_and_write_nothing(setup, flags, message, capsys):
    adapter, data, out, base = setup
    args = ["shrink", str(adapter), "--base-model", str(base), "--data", str(data), "--out", str(out), "--quiet"]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
