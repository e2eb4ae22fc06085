"""The package leaves the process as it found it: a quiet, cheap import, a CLI that parses before importing torch,
and the public names it promises."""

import subprocess
import sys

import pytest

import elasticlora

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "matplotlib")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_elasticlora_prints_nothing_and_imports_no_heavy_module():
    done = run_python(f"import sys, elasticlora; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY}))")
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "[]\n", done


@pytest.mark.parametrize("argv", [["--help"], ["shrink", "--help"], ["shrink", "adapter", "--tolerance", "x"]])
def test_the_cli_answers_help_and_argument_errors_before_importing_torch(argv):
    code = (
        "import sys\nfrom elasticlora.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {HEAVY}], sorted(sys.modules)"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "usage: elasticlora" in done.stdout + done.stderr


def test_every_public_name_resolves_and_internals_stay_internal():
    assert sorted(elasticlora.__all__) == sorted(elasticlora._EXPORTS)
    for name in elasticlora.__all__:
        assert getattr(elasticlora, name).__name__ == name
    for internal in ("ElasticVariant", "ElasticLayerMixin", "RankSampler"):
        with pytest.raises(AttributeError):
            getattr(elasticlora, internal)


def test_the_report_leaves_the_pyplot_backend_alone(tmp_path):
    code = (
        "import matplotlib\nmatplotlib.use('svg')\nfrom elasticlora.report import plot_report\n"
        "result = {'ranks': {'model.layers.0.q_proj': 2}, 'curve': [{'params': 10, 'quality': 1.0}],"
        " 'full_quality': 1.0, 'base_quality': 2.0, 'params': 10, 'quality': 1.0, 'full_params': 20,"
        " 'metric': 'eval_loss'}\n"
        f"plot_report(result, {str(tmp_path / 'r.png')!r})\n"
        "print(matplotlib.get_backend())"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_training_and_shrinking_never_change_the_thread_count(monkeypatch):
    import torch
    from peft import get_peft_model

    from elasticlora import ElasticLoraConfig, eval_batches
    from elasticlora.shrink import shrink
    from elasticlora.testing import char_tokenizer, tiny_llama

    def refuse(n):
        raise AssertionError(f"torch.set_num_threads({n}) was called")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8, basis_refresh_steps=1, full_rank_prob=0.0)).train()
    batches = eval_batches(char_tokenizer(), [{"text": "the quick brown fox"}] * 4, batch_size=4)
    for _ in range(2):  # the second pass refreshes every layer's basis in one batch
        model(**batches[0]).loss.backward()
    shrink(model, batches, tolerance=0.05, progress=False)
