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


# ----------------------------------------------------------------------------- a real ChatML tokenizer


def test_qwen_tokenizer_gives_qwen2_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok("Hello, world", add_special_tokens=False)["input_ids"] == [9707, 11, 1879]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.eos_token_id == 151645
    prompt = render_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert tok(prompt, add_special_tokens=False)["input_ids"] == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]


def test_chat_pair_has_exactly_one_end_of_turn(qwen_tokenizer):
    tok = qwen_tokenizer
    prompt = [{"role": "user", "content": "What colour is the sky?"}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}]}
    (ex,) = encode_preferences(tok, [pair])
    for ids, text in ((ex.chosen_ids, "Blue."), (ex.rejected_ids, "Green.")):
        assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
        assert tok.decode(ids) == text + "<|im_end|>"
    assert tok.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")


def test_response_end_of_turn_rules(qwen_tokenizer):
    tok = qwen_tokenizer
    eos = tok.eos_token_id
    assert encode_response(tok, "Blue.") == [10331, 13, eos]                      # text: EOS appended
    assert encode_response(tok, "Blue.<|im_end|>") == [10331, 13, eos]            # already ended
    assert encode_response(tok, "Blue.<|im_end|>\n") == [10331, 13, eos]          # the template's tail is not trained
    assert encode_response(tok, "a<|im_end|>b")[-1] == eos                          # text after the end: a new end
    assert encode_response(tok, "a<|im_end|>b").count(eos) == 2
    assert encode_response(tok, "Blue.", append_eos=False) == [10331, 13]


def test_chat_template_without_end_token_gets_eos(tokenizer):
    # The char tokenizer's template ends a turn with a newline only: EOS is appended, as for text.
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
            "rejected": "no"}
    (ex,) = encode_preferences(tokenizer, [pair])
    assert ex.chosen_ids[-1] == tokenizer.eos_token_id and ex.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ex.chosen_ids[:-1]) == "yo\n"
