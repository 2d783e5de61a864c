"""Tiny models, a character tokenizer and a verifiable toy task, built locally (no downloads).

Used by the demo and the tests: everything here is created from a transformers config and the
`tokenizers` library, so a fresh machine without network access can run end to end.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?'-=+*/()[]<>|\n"
VOWELS = frozenset("aeiou")

# A plain role-tagged template so chat-formatted data can be rendered by the char tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """One token per character of CHARACTERS plus <pad>, <bos>, <eos>, <unk> (ids 0-3)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.padding_side = "left"
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    vocab_size: int,
    family: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 256,
    tie_word_embeddings: bool = True,
):
    """A transformers config of a small decoder (Llama / Qwen2 / Mistral family), GQA by default."""
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_causal_lm(vocab_size: int, family: str = "qwen2", seed: int = 0, **config_overrides):
    """A random-init causal LM from `tiny_config`, in eval mode (dropout off)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size, family, **config_overrides))
    return model.eval()


def vowel_fraction(text: str) -> float:
    """The fraction of a text's letters that are vowels, in [0, 1]; 0 without letters."""
    letters = [c for c in text if c.isalpha()]
    return sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0


def vowel_fraction_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Verifiable toy reward: `vowel_fraction` of each response.

    A random policy scores ~0.19 (5 of 26 letters), so improvement under RL is easy to measure.
    """
    return torch.tensor([vowel_fraction(r) for r in responses], dtype=torch.float32)
