"""One prompt encoder and one chat-template rule (rftengine.chat) for the generator's text API and
the methods: the same ids, the same refusals, naming where the prompt came from."""

import pytest

from rftengine.chat import encode_prompt
from rftengine.generation import Generator, SamplingParams
from rftengine.generation.text import request_outputs
from rftengine.methods.data import encode_prompt as methods_encode_prompt
from rftengine.toy import char_tokenizer, tiny_causal_lm

CHAT = [{"role": "user", "content": "hi"}]


def test_the_generator_and_the_methods_encode_prompts_alike():
    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), "qwen2", hidden_size=32)
    out = Generator(model, max_batch_size=2, max_seq_len=32, tokenizer=tok).generate(
        ["abc", CHAT], SamplingParams(max_tokens=2, temperature=0))
    assert [r.prompt_token_ids for r in request_outputs(out, 1)] == [methods_encode_prompt(tok, "abc"),
                                                                     methods_encode_prompt(tok, CHAT)]
    assert tok.decode(encode_prompt(tok, CHAT)) == "user: hi\nassistant: "


def test_prompts_are_cut_from_the_left():
    tok = char_tokenizer()
    full = encode_prompt(tok, "abcdef")
    assert encode_prompt(tok, "abcdef", max_length=3) == full[-3:]


@pytest.mark.parametrize("template", [None, ""])
def test_no_template_and_an_empty_one_are_refused_alike(template):
    tok = char_tokenizer()
    tok.chat_template = template
    with pytest.raises(ValueError, match=r"prompts\[1\] has chat messages but the tokenizer has no chat template"):
        Generator(tiny_causal_lm(len(tok), "qwen2", hidden_size=32), max_batch_size=2, max_seq_len=16,
                  tokenizer=tok).generate(["a", CHAT], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="prompt has chat messages but the tokenizer has no chat template"):
        methods_encode_prompt(tok, CHAT)


def test_malformed_messages_name_the_message():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match=r"prompt\[1\] must be a chat message with 'role' and 'content'"):
        encode_prompt(tok, [{"role": "user", "content": "a"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match="prompt must be a string or a list of"):
        encode_prompt(tok, 3)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_prompt(tok, "")
