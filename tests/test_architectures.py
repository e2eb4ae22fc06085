"""The whole route on every architecture family users fine-tune, as tiny random models built from configs: adapt,
train with Trainer, save, shrink, export, reload in plain PEFT, and ask `inspect` whether vLLM takes it.

Which modules `ElasticLoraConfig()` adapts: every `nn.Linear` / transformers `Conv1D` but the output head, PEFT's
"all-linear". Fused projections (Phi-3's `qkv_proj` / `gate_up_proj`, GPT-2's `c_attn`, GPT-NeoX's
`query_key_value`) are one module each, shrunk to one rank. Mixture-of-experts models in transformers v5 keep their
experts as 3-D parameters and their router as a non-linear module: the adapter covers attention, and the experts PEFT
would wrap with plain LoRA are left frozen with a warning.
"""

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from elasticlora import (
    ElasticLoraConfig,
    at_ranks,
    elastic_layers,
    export_peft_adapter,
    inspect_adapter,
    shrink_adapter,
)
from elasticlora.adapter_io import adapter_files, write_atomically
from elasticlora.data import tokenize_rows

from conftest import VOCAB, char_tokenizer

SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
TOKENS = dict(bos_token_id=None, eos_token_id=2, pad_token_id=1)
LLAMA = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]

# id -> (config, the module types ElasticLoraConfig() adapts, whether vLLM 0.33 takes LoRA on them)
ARCHITECTURES = {
    "llama": (lambda: transformers.LlamaConfig(**SIZES, **TOKENS), LLAMA, True),
    "qwen2": (lambda: transformers.Qwen2Config(**SIZES, **TOKENS), LLAMA, True),
    "qwen3": (lambda: transformers.Qwen3Config(**SIZES, **TOKENS, head_dim=8), LLAMA, True),
    "gemma2": (lambda: transformers.Gemma2Config(**SIZES, **TOKENS, head_dim=8), LLAMA, True),
    "gemma3": (lambda: transformers.Gemma3TextConfig(**SIZES, **TOKENS, head_dim=8), LLAMA, True),
    "mistral": (lambda: transformers.MistralConfig(**SIZES, **TOKENS), LLAMA, True),
    "phi3": (
        lambda: transformers.Phi3Config(**SIZES, **TOKENS),
        ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
        True,
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            **TOKENS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        ["c_attn", "c_fc", "c_proj"],
        False,
    ),  # fmt: skip
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **TOKENS,
        ),
        ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
        True,
    ),  # fmt: skip
    "mixtral": (
        lambda: transformers.MixtralConfig(**SIZES, **TOKENS, num_local_experts=4, num_experts_per_tok=2),
        ATTENTION,
        True,
    ),
    "qwen3_moe": (
        lambda: transformers.Qwen3MoeConfig(
            **SIZES, **TOKENS, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24
        ),
        ATTENTION,
        True,
    ),
}
MOE = {"mixtral", "qwen3_moe"}
ROWS = [{"prompt": f"define {w}:", "completion": f" a word of {len(w)} letters."} for w in ("cat", "sun", "tree")]


def build(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ARCHITECTURES[arch][0]()).eval()


FAST = {"llama", "phi3", "mixtral"}  # a plain, a fused and a mixture-of-experts layout in `pytest -m "not slow"`


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=() if a in FAST else pytest.mark.slow) for a in sorted(ARCHITECTURES)]
)
def test_adapt_train_shrink_export_reload_and_inspect(arch, tmp_path, recwarn):
    _, module_types, vllm_takes_it = ARCHITECTURES[arch]
    tokenizer = char_tokenizer()
    build(arch).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")

    model = get_peft_model(build(arch), ElasticLoraConfig(r=8))
    layers = elastic_layers(model)
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == module_types
    assert not [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n], "only LoRA trains"
    dropped = [w for w in recwarn if "left frozen" in str(w.message)]
    assert len(dropped) == (arch in MOE), "the experts PEFT would wrap are named in one warning"

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, max_steps=40, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=100, seed=0,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    Trainer(model=model, args=args, train_dataset=tokenize_rows(tokenizer, ROWS * 4), data_collator=collator).train()
    model.save_pretrained(tmp_path / "adapter")

    report = shrink_adapter(
        tmp_path / "adapter", str(tmp_path / "base"), ROWS, tmp_path / "out", tolerance=0.05, progress=False
    )
    assert set(report["ranks"]) == set(layers)
    assert report["quality"] <= report["best_quality"] * 1.05 and report["params"] < report["full_params"]

    # plain PEFT on the base computes what the elastic model computes at the chosen ranks, and at ranks that differ
    # from module to module, some modules dropped
    mixed = {name: i % 9 for i, name in enumerate(layers)}
    write_atomically(tmp_path / "mixed", adapter_files(*export_peft_adapter(model, mixed)))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    for out, ranks in ((tmp_path / "out", report["ranks"]), (tmp_path / "mixed", mixed)):
        plain = PeftModel.from_pretrained(build(arch), out).eval()
        with torch.no_grad(), at_ranks(model, ranks):
            assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4), out.name

        info = inspect_adapter(out)
        assert info["base_architecture"] == type(build(arch)).__name__
        assert info["peft_loadable"] and info["ranks"] == {name: k for name, k in ranks.items() if k > 0}
        assert info["vllm_loadable"] == vllm_takes_it, info["vllm_problems"]
        assert info["module_types_vllm_may_not_map"] == []


def test_a_mixture_of_experts_adapter_holds_no_plain_lora(tmp_path):
    """The experts PEFT would train with plain LoRA stay out of the saved adapter, so shrink sees all of it."""
    with pytest.warns(UserWarning, match="left frozen"):
        model = get_peft_model(build("mixtral"), ElasticLoraConfig(r=8))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not saved["target_parameters"]
    keys = [k for k in model.state_dict() if ".lora_" in k]
    assert keys and all(".self_attn." in k for k in keys)


def test_target_parameters_are_refused():
    with pytest.raises(ValueError, match="`target_parameters=.*` is not supported by ElasticLoraConfig"):
        ElasticLoraConfig(target_parameters=["mlp.experts.gate_up_proj"])


def test_a_plain_lora_on_expert_weights_is_refused_by_shrink(tmp_path):
    build("mixtral").save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    get_peft_model(build("mixtral"), LoraConfig(target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trains LoRA on 3-D parameters .*shrink truncates linear layers only"):
        shrink_adapter(tmp_path / "adapter", str(tmp_path / "base"), ROWS, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
