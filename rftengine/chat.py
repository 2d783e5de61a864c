"""Prompts as text or chat messages, and the one chat-template rule, for every layer that turns
a prompt into token ids: the generator's text API (`rftengine.generation.text`), the methods'
data (`rftengine.methods.data`) and the data loaders' checks (`rftengine.datasets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Message = Mapping[str, str]
PromptLike = str | Sequence[Message]


def is_messages(value) -> bool:
    """A non-empty list of mappings: chat messages (``check_messages`` says whether each is
    well formed)."""
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(m, Mapping) for m in value))


def check_messages(value, where: str) -> None:
    """ValueError naming ``where`` unless ``value`` is a list of ``{"role", "content"}``
    messages."""
    if not is_messages(value):
        raise ValueError(f"{where} must be a string or a list of {{'role', 'content'}} messages, got {value!r:.80}")
    for i, message in enumerate(value):
        if "role" not in message or "content" not in message:
            raise ValueError(f"{where}[{i}] must be a chat message with 'role' and 'content', "
                             f"got keys {sorted(message)}")


def has_chat_template(tokenizer) -> bool:
    """The one chat-template rule: a tokenizer has a chat template when
    ``tokenizer.chat_template`` is a non-empty string. None and "" are none (an empty template
    renders every chat as nothing)."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, what: str) -> None:
    """ValueError unless ``has_chat_template(tokenizer)``: ``what`` (a field, or a data file's
    record) holds chat messages, which need the template to become text."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"{what} has chat messages but the tokenizer has no chat template ({name!r}: chat_template is "
            f"{getattr(tokenizer, 'chat_template', None)!r}); give plain text, or a tokenizer with a chat "
            "template (tokenizer_config.json 'chat_template')"
        )


def render_prompt(tokenizer, prompt: PromptLike, where: str = "prompt") -> str:
    """Plain text stays as is; a chat-message list is rendered with the chat template and the
    generation prompt (``add_generation_prompt=True``)."""
    if isinstance(prompt, str):
        return prompt
    check_messages(prompt, where)
    require_chat_template(tokenizer, where)
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: PromptLike, max_length: int | None = None, where: str = "prompt") -> list[int]:
    """Token ids of a prompt, cut from the left to ``max_length`` (its end is kept). Plain text
    gets the tokenizer's special tokens (e.g. BOS); chat-rendered text already has those the
    template wants. A prompt of no tokens is a ValueError naming ``where``."""
    text = render_prompt(tokenizer, prompt, where)
    ids = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[len(ids) - max_length:]
    if not ids:
        raise ValueError(f"{where} encodes to no tokens, got {prompt!r:.80}")
    return list(ids)
