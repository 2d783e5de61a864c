"""Tokenising prompts and preference pairs, chat rendering, batch layout and masks."""

import pytest
import torch

from rftengine.methods.data import (
    collate_preferences,
    decode_responses,
    encode_preferences,
    encode_prompt,
    encode_response,
    make_sequence_batch,
    render_prompt,
    render_response,
    require_eos,
    split_prompt_data,
)
from rftengine.toy import char_tokenizer


def test_batch_layout_left_padded_prompts_and_eos_in_mask(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [encode_prompt(tokenizer, "ab"), encode_prompt(tokenizer, "abcd")]
    responses = [encode_response(tokenizer, "xyz"), encode_response(tokenizer, "q")]
    assert responses[1] == tokenizer("q")["input_ids"] + [eos]
    b = make_sequence_batch(prompts, responses, pad)
    assert b.prompt_length == 4 and b.input_ids.shape == (2, 8)
    assert b.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert b.response_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert b.response_ids[0, 3] == eos and b.response_ids[1, 1] == eos  # EOS inside the mask
    assert decode_responses(tokenizer, b) == ["xyz", "q"]


def test_truncation_keeps_prompt_end_and_drops_eos_of_cut_response(tokenizer):
    assert tokenizer.decode(encode_prompt(tokenizer, "abcdef", max_length=3)) == "def"
    cut = encode_response(tokenizer, "abcdef", max_length=3)
    assert len(cut) == 3 and tokenizer.eos_token_id not in cut


def test_preference_pairs_collate_chosen_then_rejected(tokenizer):
    pairs = [{"prompt": "p", "chosen": "aa", "rejected": "b"},
             {"prompt": "pq", "chosen": "c", "rejected": "ddd", "margin": 2}]
    ex = encode_preferences(tokenizer, pairs)
    assert ex[1].margin == 2.0 and ex[0].margin is None
    b = collate_preferences(ex, tokenizer.pad_token_id)
    assert b.num_rows == 4
    assert decode_responses(tokenizer, b) == ["aa", "c", "b", "ddd"]
    assert torch.equal(b.input_ids[:2, :b.prompt_length], b.input_ids[2:, :b.prompt_length])


def test_missing_field_names_the_pair(tokenizer):
    with pytest.raises(ValueError, match="preference pair 1 has no 'rejected' field"):
        encode_preferences(tokenizer, [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                       {"prompt": "a", "chosen": "b"}])


def test_chat_messages_render_with_template(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert render_prompt(tokenizer, messages) == "user: hi\nassistant: "
    reply = [{"role": "assistant", "content": "yo"}]
    assert render_response(tokenizer, messages, reply) == "assistant: yo\n"[len("assistant: "):]
    ids = encode_prompt(tokenizer, messages)
    assert tokenizer.decode(ids) == "user: hi\nassistant: "


def test_chat_messages_without_template_raise(tokenizer):
    bare = char_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="has no chat template"):
        render_prompt(bare, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="has no chat template"):
        encode_preferences(bare, [{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}])
    assert render_prompt(bare, "plain text") == "plain text"


def test_tokenizer_without_eos_is_rejected(tokenizer):
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no EOS token"):
        require_eos(tokenizer)
    with pytest.raises(ValueError, match="tokenizer has no EOS token"):
        encode_response(tokenizer, "abc")


def test_prompt_data_with_references():
    prompts, refs = split_prompt_data([{"prompt": "a", "reference": "1"}, {"prompt": "b"}])
    assert prompts == ["a", "b"] and refs == ["1", None]
    assert split_prompt_data(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ValueError, match="prompt data item 0 has no 'prompt' field"):
        split_prompt_data([{"text": "a"}])
