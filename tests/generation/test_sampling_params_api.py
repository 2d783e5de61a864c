"""The vLLM-shaped API: SamplingParams, stop strings cut exactly, per-prompt max_tokens, text in
and out, EOS ids from the generation config, and the methods' rollouts through it."""

import pytest
import torch

from rftengine.generation import Generator, SamplingParams, request_outputs
from rftengine.generation.params import model_eos_ids
from rftengine.generation.stop import StopChecker
from rftengine.toy import char_tokenizer, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_causal_lm(len(tok), hidden_size=32, max_positions=128)


def generator(model, tok=None, **kwargs):
    kwargs.setdefault("max_batch_size", 8)
    return Generator(model, tokenizer=tok, max_seq_len=96, **kwargs)


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.2),
    ("seed", -1), ("stop", ""), ("stop", ["ok", 3]), ("stop_token_ids", [1, -4]), ("max_tokens", 0),
    ("logprobs", 5), ("ignore_eos", 1), ("include_stop_str_in_output", "yes"),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


def test_vllm_spellings_map_to_the_sampler_settings():
    assert SamplingParams(top_k=-1).sampler_settings == SamplingParams(top_k=0).sampler_settings
    assert SamplingParams(top_k=-1).sampler_settings.top_k == 0
    greedy = SamplingParams(temperature=0, top_p=0.5).sampler_settings
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (1.0, 1, 1.0)
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(logprobs=0).logprobs == 0


def test_keyword_call_and_sampling_params_call_sample_the_same(model, tok):
    gen = generator(model)
    prompts = [[5, 6, 7, 8], [9, 10]]
    kw = gen.generate(prompts, num_samples=3, max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9,
                      min_p=0.05, eos_token_ids=[2], seed=11)
    sp = gen.generate(prompts, SamplingParams(n=3, max_tokens=10, temperature=0.8, top_k=20, top_p=0.9,
                                              min_p=0.05, seed=11))
    assert torch.equal(kw.sequences, sp.sequences) and torch.equal(kw.response_mask, sp.response_mask)
    torch.testing.assert_close(kw.logprobs, sp.logprobs, rtol=0, atol=0)
    assert kw.finish_reasons == sp.finish_reasons and sp.texts is None  # no tokenizer, no texts


def test_mixing_sampling_params_and_keywords_is_refused(model):
    gen = generator(model)
    with pytest.raises(ValueError, match="not both: got sampling_params and temperature, seed"):
        gen.generate([[5, 6]], SamplingParams(max_tokens=4), temperature=0.5, seed=3)
    with pytest.raises(ValueError, match=r"sampling_params\[1\].seed .* may differ in max_tokens only"):
        gen.generate([[5, 6], [7]], [SamplingParams(seed=1), SamplingParams(seed=2)])
    with pytest.raises(ValueError, match="one per prompt \\(2\\), got a list of 1"):
        gen.generate([[5, 6], [7]], [SamplingParams()])
    with pytest.raises(ValueError, match="max_new_tokens is required"):
        gen.generate([[5, 6]], eos_token_ids=[2])


# ----------------------------------------------------------------------------- stop strings


class PieceTokenizer:
    """A tokenizer stand-in whose tokens are multi-character pieces (``decode`` only)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


PIECES = ["The", " ans", "wer", " is", " 4", "2.\n\n", "Done"]


def feed(checker, ids, every=1):
    """Run the checker as the Generator does: at growing prefixes; the first cut wins."""
    for m in range(every, len(ids) + every, every):
        cut = checker([3], [ids[:m]])[0]
        if cut is not None:
            return cut, checker.cut(3)[1]
    return None


@pytest.mark.parametrize("stop,include,every,expected", [
    ("\n\n", False, 1, (6, "The answer is 42.")),           # starts mid-token: that token is kept
    ("\n\n", True, 1, (6, "The answer is 42.\n\n")),
    ("er is", False, 1, (3, "The answ")),                     # spans two tokens and two checks
    ("er is", True, 2, (4, "The answer is")),
    ("swer", False, 3, (2, "The an")),
    (" is", False, 7, (3, "The answer")),                     # at a token boundary: no extra token
    ("The", False, 1, (1, "")),                               # never cut to zero tokens
    ("nowhere", False, 1, None),
])
def test_stop_checker_cuts_exactly(stop, include, every, expected):
    checker = StopChecker(PieceTokenizer(PIECES), [stop, "zzz"], include_stop=include)
    assert feed(checker, list(range(len(PIECES))), every) == expected


def test_stop_strings_cut_generation_exactly(model, tok):
    """A stop string made of two response tokens: the text ends right before it (or after it),
    the kept ids and log-probs are the uncut run's prefix, the rest masked, reason "stop"."""
    gen = generator(model, tok)
    prompts = ["abc", "hello"]
    free = gen.generate(prompts, SamplingParams(n=2, max_tokens=24, seed=5, ignore_eos=True))
    row = 1
    text = free.texts[row]
    start = 4
    stop = text[start:start + 2]
    first = text.find(stop)
    for include, cut_chars in ((False, first), (True, first + 2)):
        out = gen.generate(prompts, SamplingParams(n=2, max_tokens=24, seed=5, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=include))
        kept = int(out.response_mask[row].sum())
        assert out.finish_reasons[row] == "stop" and out.texts[row] == text[:cut_chars]
        assert tok.decode(out.responses[row, :kept].tolist(), skip_special_tokens=True) == text[:cut_chars]
        assert torch.equal(out.responses[row, :kept], free.responses[row, :kept])
        torch.testing.assert_close(out.logprobs[row, :kept], free.logprobs[row, :kept], rtol=0, atol=0)
        assert not out.response_mask[row, kept:].any() and (out.logprobs[row, kept:] == 0).all()
        pad = tok.pad_token_id
        assert (out.responses[row, kept:] == pad).all()
        for r in range(4):  # every other row: cut at its own first occurrence, or untouched
            if stop in free.texts[r]:
                assert out.finish_reasons[r] == "stop" and stop not in out.texts[r][:-2]
            else:
                assert out.texts[r] == free.texts[r] and out.finish_reasons[r] == free.finish_reasons[r]


def test_a_stop_string_ends_decoding_at_the_next_done_check(model, tok):
    gen = generator(model, tok, done_check_interval=4)
    params = dict(temperature=0, max_tokens=48, ignore_eos=True)
    free = gen.generate(["abc"], SamplingParams(**params))
    out = gen.generate(["abc"], SamplingParams(stop=[free.texts[0][1:3]], **params))
    assert out.finish_reasons == ("stop",) and out.responses.shape[1] <= 8 < free.responses.shape[1]


# ----------------------------------------------------------------------------- lengths and EOS


def test_max_tokens_per_prompt(model):
    gen = generator(model, max_batch_size=4)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    limits = [3, 9, 1, 6]
    out = gen.generate(prompts, [SamplingParams(n=2, max_tokens=m, seed=1, ignore_eos=True) for m in limits])
    assert out.response_lengths.tolist() == [m for m in limits for _ in range(2)]
    assert set(out.finish_reasons) == {"length"}


def test_max_tokens_none_fills_the_sequence(model):
    gen = generator(model)
    out = gen.generate([[5, 6, 7]], SamplingParams(max_tokens=None, ignore_eos=True, seed=0))
    assert out.response_lengths.tolist() == [96 - 3]


def test_stop_token_ids_default_to_the_generation_config(model, tok):
    gen = generator(model)
    free = gen.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    target = int(free.responses[0, 5])
    first = free.responses[0].tolist().index(target)
    model.generation_config.eos_token_id = [target, 3]
    assert model_eos_ids(model) == [target, 3] and model_eos_ids(model, tok) == [target, 3, tok.eos_token_id]
    out = gen.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12))
    assert out.finish_reasons == ("eos",) and out.response_lengths.tolist() == [first + 1]
    # stop_token_ids add to the model's ids; ignore_eos drops the model's
    extra = int(free.responses[0, 2])
    out = gen.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[extra]))
    assert out.response_lengths.tolist() == [min(first, free.responses[0].tolist().index(extra)) + 1]
    out = gen.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out.finish_reasons == ("length",)


# ----------------------------------------------------------------------------- text in and out


def test_text_prompts_and_chat_messages_in_texts_out(model, tok):
    gen = generator(model, tok)
    chat = [{"role": "user", "content": "hi there"}]
    params = SamplingParams(n=2, max_tokens=8, seed=4, ignore_eos=True)
    out = gen.generate(["abc", chat], params)
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = [tok("abc")["input_ids"], tok(rendered, add_special_tokens=False)["input_ids"]]
    by_ids = generator(model).generate(ids, params)
    assert torch.equal(out.sequences, by_ids.sequences)
    assert out.texts == tuple(tok.decode(r[m].tolist(), skip_special_tokens=True)
                              for r, m in zip(out.responses, out.response_mask))
    # the keyword call with a tokenizer argument gives the same
    kw = generator(model).generate(["abc", chat], tokenizer=tok, num_samples=2, max_new_tokens=8, seed=4,
                                   eos_token_ids=None)
    assert torch.equal(kw.sequences, out.sequences) and kw.texts == out.texts
    grouped = request_outputs(out, 2, ["abc", chat])
    assert [len(g.outputs) for g in grouped] == [2, 2] and grouped[1].prompt_token_ids == ids[1]
    assert grouped[1].outputs[1].text == out.texts[3] and grouped[0].outputs[0].logprobs is None
    assert grouped[0].outputs[0].cumulative_logprob == pytest.approx(float(out.logprobs[0].sum()))
    listed = request_outputs(out, SamplingParams(n=2, logprobs=0))
    assert listed[1].outputs[0].logprobs == pytest.approx(out.logprobs[2][out.response_mask[2]].tolist())
    assert listed[1].prompt is None and listed[1].outputs[0].token_ids == grouped[1].outputs[0].token_ids


def test_text_errors_are_clear(model, tok):
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        generator(model).generate(["abc"], SamplingParams())
    with pytest.raises(ValueError, match="SamplingParams.stop needs a tokenizer"):
        generator(model).generate([[5, 6]], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="no chat template"):
        generator(model, char_tokenizer(chat_template=False)).generate([[{"role": "user", "content": "a"}]],
                                                                      SamplingParams())


# ----------------------------------------------------------------------------- the methods


def test_method_rollouts_train_on_stop_cut_responses(tok):
    from rftengine.methods.ppo import train_ppo
    from rftengine.methods.ppo_config import PPOConfig

    stops = list("aeiou")
    seen = []

    def reward(prompts, responses):
        seen.extend(responses)
        return torch.tensor([float(len(r)) for r in responses])

    config = PPOConfig(algorithm="grpo", group_size=4, batch_size=2, max_new_tokens=12, max_steps=1,
                       learning_rate=1e-3, stop=stops, min_p=0.02, seed=0)
    model = tiny_causal_lm(len(tok), hidden_size=32)
    result = train_ppo(model, tok, ["ab:", "cd:"], config, reward_fn=reward)
    cut = [r for r in seen if r and r[-1] in stops]
    assert len(seen) == 8 and cut  # stop strings ended some responses, kept at their end
    assert all(not any(s in r[:-1] for s in stops) for r in seen)
    assert torch.isfinite(torch.tensor(list(result.history[0].values()))).all()


def test_sample_rollout_keeps_the_stop_tokens_only(model, tok):
    from rftengine.methods.rollout import sample_rollout

    gen = generator(model, max_batch_size=16)
    ro = sample_rollout(gen, tok, ["ab:", "cd:"], num_samples=4, max_new_tokens=12, max_prompt_length=8,
                        stop=list("aeiou"), seed=0)
    lengths = ro.batch.response_mask.sum(1).tolist()
    texts = ro.sampled_texts()
    for i, text in enumerate(texts):
        assert tok.decode(list(text.token_ids), skip_special_tokens=True) == str(text)
        assert len(text.token_ids) == lengths[i]
        assert (ro.logprobs[i, lengths[i]:] == 0).all() and (ro.logprobs[i, :lengths[i]] != 0).all()
        if text and text[-1] in "aeiou":
            assert text.finished and bool(ro.eos[i])
