"""transformers Trainer and TRL SFTTrainer run elastic models unchanged, with the rank-curve and shrink-estimate
callbacks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from elasticlora import ElasticLoraCallback, ElasticLoraConfig, elastic_layers, elastic_runtimes, estimate_shrink
from elasticlora.callbacks import add_rank_curve, add_shrink_estimate, rank_curve
from elasticlora.data import tokenize_rows
from elasticlora.layer import ElasticLinear

from conftest import char_tokenizer, tiny_llama

pytestmark = pytest.mark.slow  # Trainer and SFTTrainer runs

ROWS = [
    {"prompt": f"define {w}:", "completion": f" a word of {len(w)} letters."} for w in ("cat", "sun", "tree", "moon")
]


def dataset():
    return tokenize_rows(char_tokenizer(), ROWS * 4)


def trainer_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def make_trainer(tmp_path, **kwargs):
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, **kwargs),
        train_dataset=dataset(),
        eval_dataset=dataset()[:8],
        data_collator=DataCollatorForSeq2Seq(char_tokenizer(), padding=True),
    )
    add_rank_curve(trainer, ranks=(1, 4, None))
    return trainer


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_trainer_trains_saves_resumes_and_logs_the_rank_curve(tmp_path, checkpointing):
    trainer = make_trainer(tmp_path, gradient_checkpointing=checkpointing)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_loss@r1" in entry]
    assert len(logged) == 2 and {"eval_loss@r4", "eval_loss@full"} <= logged[-1].keys()
    # the last evaluation ran on the final weights: Trainer's own eval_loss (one batch of 8) is the full-rank point,
    # and the truncated points are what eval at those ranks gives now
    trainers_own = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert logged[-1]["eval_loss@full"] == pytest.approx(trainers_own[-1], rel=1e-5)
    batches = list(trainer.get_eval_dataloader())
    assert rank_curve(trainer.model, batches, ranks=(1, 4)) == pytest.approx(
        {"eval_loss@r1": logged[-1]["eval_loss@r1"], "eval_loss@r4": logged[-1]["eval_loss@r4"]}, rel=1e-5
    )
    assert logged[-1]["eval_loss@r1"] != logged[-1]["eval_loss@full"]
    final = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}

    resumed = make_trainer(tmp_path, gradient_checkpointing=checkpointing, max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    layers = elastic_layers(resumed.model)
    assert all(isinstance(layer, ElasticLinear) for layer in layers.values())
    assert resumed.state.global_step == 6
    assert all(layer.drawn_ranks() is not None for layer in layers.values())
    changed = [k for k, v in resumed.model.state_dict().items() if "lora_" in k and not torch.equal(v, final[k])]
    assert changed, "training continued from the checkpoint"


def test_a_resumed_run_continues_the_draw_sequence(tmp_path):
    """With `ElasticLoraCallback` (add_rank_curve adds it), 4 steps, a checkpoint and 2 resumed steps end with the
    adapter and the draw position of 6 uninterrupted steps; without it, the resumed run replays the first draws."""

    def run(out, callback: bool, resume_from=None):
        model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
        trainer = Trainer(
            model=model,
            args=trainer_args(out, max_steps=6, eval_strategy="no", save_steps=4),
            train_dataset=dataset(),
            data_collator=DataCollatorForSeq2Seq(char_tokenizer(), padding=True),
            callbacks=[ElasticLoraCallback()] if callback else None,
        )
        trainer.train(resume_from_checkpoint=resume_from)
        weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
        return weights, elastic_runtimes(model)["default"].state_dict()

    for callback in (True, False):
        straight, straight_draws = run(tmp_path / f"straight-{callback}", callback)
        assert straight_draws == {"passes": 12, "draws": 48}  # 6 steps of 2 micro-batches of 4
        checkpoint = tmp_path / f"straight-{callback}" / "run" / "checkpoint-4"
        resumed, resumed_draws = run(tmp_path / f"resumed-{callback}", callback, resume_from=str(checkpoint))
        same = all(torch.equal(resumed[k], straight[k]) for k in straight)
        if callback:
            assert resumed_draws == straight_draws and same
        else:
            assert resumed_draws == {"passes": 4, "draws": 16} and not same


@pytest.mark.parametrize("kind", ["elastic", "plain"])
def test_the_shrink_estimate_logs_during_training_and_changes_nothing(tmp_path, kind, capsys):
    """`add_shrink_estimate` logs eval_shrink_* every `every` steps (what `estimate_shrink` gives on the weights of
    that step) and prints the last at the end; a run with it trains exactly as one without."""
    config = ElasticLoraConfig(r=8) if kind == "elastic" else LoraConfig(r=8, target_modules="all-linear")

    def run(out, estimate: bool):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), config)
        trainer = Trainer(
            model=model,
            args=trainer_args(out, max_steps=4, eval_strategy="no", save_strategy="no"),
            train_dataset=dataset(),
            eval_dataset=dataset()[:8],
            data_collator=DataCollatorForSeq2Seq(char_tokenizer(), padding=True),
        )
        callback = add_shrink_estimate(trainer, every=0.5, max_rows=8) if estimate else None
        trainer.train()
        return trainer, callback, {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    trainer, callback, weights = run(tmp_path / "with", estimate=True)
    _, _, plain_weights = run(tmp_path / "without", estimate=False)
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights), "the estimate leaves training alone"
    logged = [entry for entry in trainer.state.log_history if "eval_shrink_params" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert {"eval_shrink_max_rank", "eval_shrink_vllm_max_lora_rank", "eval_shrink_advised_r"} <= logged[-1].keys()
    again = estimate_shrink(trainer.model, callback.batches)  # on the final weights
    assert logged[-1]["eval_shrink_params"] == again.params and logged[-1]["eval_shrink_max_rank"] == again.max_rank
    assert sum(len(batch["input_ids"]) for batch in callback.batches) == 8
    assert "shrink estimate at tolerance 0.01" in capsys.readouterr().out


def test_sft_trainer_with_an_elastic_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    chats = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in ROWS * 4
    ]
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        assistant_only_loss=True,
        eval_strategy="steps",
        eval_steps=2,
        disable_tqdm=True,
    )  # SFTConfig's own defaults: bf16 and gradient checkpointing
    trainer = trl.SFTTrainer(
        model=tiny_llama(),
        args=config,
        train_dataset=Dataset.from_list(chats),
        eval_dataset=Dataset.from_list(chats[:4]),
        processing_class=tokenizer,
        peft_config=ElasticLoraConfig(r=8),
    )
    add_rank_curve(trainer, ranks=(2, None))
    trainer.train()
    assert all(isinstance(layer, ElasticLinear) for layer in elastic_layers(trainer.model).values())
    assert any("eval_loss@r2" in entry for entry in trainer.state.log_history)
    trainer.save_model(str(tmp_path / "sft" / "final"))
    assert (tmp_path / "sft" / "final" / "adapter_model.safetensors").is_file()
