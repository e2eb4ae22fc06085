"""Tiny random models and a character tokenizer, built offline in milliseconds: for tests, examples and smoke runs.

They learn nothing useful; they exercise every code path a real model does (Llama's linear layers, GPT-2's `Conv1D`).

    from elasticlora.testing import char_tokenizer, tiny_llama
    model, tokenizer = tiny_llama(), char_tokenizer()
"""

from __future__ import annotations

import torch

__all__ = ["CHARS", "VOCAB", "char_tokenizer", "tiny_gpt2", "tiny_llama"]

VOCAB = 64
CHARS = "abcdefghijklmnopqrstuvwxyz .,:'?!\n"


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32):
    """A random Llama (vocabulary of 64) whose rows fit the character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    """A random GPT-2 (transformers `Conv1D` layers), without dropout so that training passes are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def char_tokenizer():
    """A character-level tokenizer over lowercase text (37 tokens; others map to <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
