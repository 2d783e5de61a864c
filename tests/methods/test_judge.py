"""The RLAIF Judge: expected ratings, order-symmetric pairwise preferences, pairs for DPO."""

import math

import pytest
import torch

from rftengine.methods import judge as judge_module
from rftengine.methods.judge import GroupReward, Judge

POINTWISE = "rate {response} for {prompt} ="
PAIRWISE = "pick 1: {response_a} 2: {response_b} for {prompt} ="


@pytest.fixture
def judge(make_lm, tokenizer):
    return Judge(make_lm(seed=3), tokenizer, POINTWISE, pairwise_template=PAIRWISE, choices=("1", "2"),
                 batch_size=4)


def test_expected_rating_from_forced_logits(make_lm, tokenizer, monkeypatch):
    """Hand-made case: the last hidden state is e_0 and the head rows of the rating tokens hold
    chosen logits, so p = softmax over the five rating logits and the score is Σ p_k·k."""
    model = make_lm()
    judge = Judge(model, tokenizer, POINTWISE, choices=("1", "2"))
    hidden_size = model.config.hidden_size

    def fake_final_hidden(_model, input_ids, attention_mask):
        h = torch.zeros(*input_ids.shape, hidden_size)
        h[..., 0] = 1.0
        return h

    monkeypatch.setattr(judge_module, "final_hidden", fake_final_hidden)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    weight, _ = judge_module.output_head(model)
    with torch.no_grad():
        weight[:, 0] = 50.0        # every other token is far more likely: it must not matter
        for tok_id, p in zip(judge.rating_ids, probs):
            weight[tok_id, 0] = math.log(p) + 7.0
    scores = judge.score(["a", "b", "c"], ["x", "yy", "zzz"])
    expected = 0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.2 * 4 + 0.2 * 5
    torch.testing.assert_close(scores, torch.full((3,), expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(judge.rating_logprobs(["a"], ["x"]).exp()[0], probs, rtol=0, atol=1e-6)


def test_custom_ratings_and_values(make_lm, tokenizer):
    judge = Judge(make_lm(), tokenizer, POINTWISE, ratings=[str(i) for i in range(10)], choices=("1", "2"))
    logp = judge.rating_logprobs(["p", "q"], ["r", "s"])
    assert logp.shape == (2, 10)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2))
    torch.testing.assert_close(judge.score(["p", "q"], ["r", "s"]), logp.exp() @ torch.arange(10.0))
    named = Judge(make_lm(), tokenizer, POINTWISE, ratings=["b", "g"], rating_values=[-1.0, 1.0], choices=("1", "2"))
    s = named.score(["p"], ["r"])
    assert -1.0 <= float(s) <= 1.0


def test_batched_scores_match_one_at_a_time(make_lm, tokenizer):
    """Left padding must not change a row's judgement (positions skip the pads)."""
    prompts = ["ab", "a much longer prompt", "c"]
    responses = ["xyz", "q", "a longer response here"]
    batched = Judge(make_lm(seed=1), tokenizer, POINTWISE, choices=("1", "2"), batch_size=8)
    single = Judge(batched.model, tokenizer, POINTWISE, choices=("1", "2"), batch_size=1)
    torch.testing.assert_close(batched.score(prompts, responses), single.score(prompts, responses),
                               rtol=1e-5, atol=1e-5)


def test_judge_is_a_reward_fn(judge):
    out = judge(["p1", "p2"], ["r1", "r2"], references=["x", "y"])
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert bool(((out >= 1) & (out <= 5)).all())


def test_pairwise_is_order_symmetric(judge):
    prompts = ["ab", "hello", "z", "same"]
    a = ["xyz", "aaa", "the first", "equal"]
    b = ["qq", "aab", "another one", "equal"]
    ab = judge.prefer(prompts, a, b)
    ba = judge.prefer(prompts, b, a)
    torch.testing.assert_close(ab + ba, torch.ones(4), rtol=0, atol=1e-6)
    assert float(ab[3]) == 0.5 and float(ba[3]) == 0.5
    assert bool(((ab > 0) & (ab < 1)).all())


def test_pairwise_position_bias_cancels(judge, monkeypatch):
    """A judge with a strong bias toward the first slot: both-order averaging leaves ties at 1/2
    and keeps the content preference."""
    quality = {"good": 1.0, "bad": -1.0, "meh": 0.0}

    def biased(texts, token_ids, *, batch_size=None, progress=None):
        rows = []
        for t in texts:
            first = t.split("1: ")[1].split(" 2: ")[0]
            second = t.split(" 2: ")[1].split(" for ")[0]
            rows.append([3.0 + quality[first], quality[second]])
        return torch.log_softmax(torch.tensor(rows), dim=-1)

    monkeypatch.setattr(judge, "token_logprobs", biased)
    p = judge.prefer(["q"] * 3, ["good", "meh", "bad"], ["bad", "meh", "good"])
    assert float(p[0]) > 0.5 and float(p[2]) < 0.5
    assert float(p[1]) == 0.5
    torch.testing.assert_close(p[0] + p[2], torch.tensor(1.0), rtol=0, atol=1e-6)


def test_preference_pairs_pointwise(judge, monkeypatch):
    table = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0, "e": 4.0}
    monkeypatch.setattr(judge, "score", lambda prompts, responses, **_: torch.tensor([table[r] for r in responses]))
    pairs = judge.preference_pairs(["p", "q", "r"], [["a", "b", "c"], ["d", "e"], ["c", "a"]], min_margin=0.5)
    assert pairs == [
        {"prompt": "p", "chosen": "b", "rejected": "a", "margin": 2.0},
        {"prompt": "r", "chosen": "c", "rejected": "a", "margin": 1.0},
    ]


def test_preference_pairs_pairwise(judge):
    candidates = [["aaa", "xyz", "eee"], ["k", "k"]]
    strengths = judge.candidate_scores(["p", "q"], candidates, mode="pairwise")
    assert abs(sum(strengths[0]) / 3 - 0.5) < 1e-6
    assert strengths[1] == [0.5, 0.5]
    pairs = judge.preference_pairs(["p", "q"], candidates, mode="pairwise")
    assert len(pairs) == 1                      # identical candidates give no pair
    pair = pairs[0]
    s = dict(zip(candidates[0], strengths[0]))
    assert pair["chosen"] == max(s, key=s.get) and pair["rejected"] == min(s, key=s.get)
    assert pair["margin"] == pytest.approx(s[pair["chosen"]] - s[pair["rejected"]])


def test_group_reward(judge):
    prompts = ["p", "p", "q", "q"]
    responses = ["aa", "bb", "cc", "cc"]
    reward = judge.group_reward(2)
    assert isinstance(reward, GroupReward)
    out = reward(prompts, responses)
    p = judge.prefer(["p"], ["aa"], ["bb"])
    torch.testing.assert_close(out, torch.tensor([float(p), 1 - float(p), 0.5, 0.5]), rtol=0, atol=1e-6)
    pointwise = judge.group_scores(prompts, responses, 2, mode="pointwise")
    torch.testing.assert_close(pointwise, judge.score(prompts, responses))
    with pytest.raises(ValueError, match="group_size"):
        judge.group_scores(prompts, responses, 3)


def test_as_reward_fn_and_progress(judge, capsys, terminal):
    prompts, responses = ["p", "p", "q", "q"], ["aa", "bb", "cc", "dd"]
    assert judge.as_reward_fn("pointwise") is judge
    shown = judge.as_reward_fn("pointwise", progress=True)
    torch.testing.assert_close(shown(prompts, responses, references=None), judge.score(prompts, responses))
    assert "judging" in capsys.readouterr().err
    pairwise = judge.as_reward_fn("pairwise", group_size=2, progress=True)
    torch.testing.assert_close(pairwise(prompts, responses), judge.group_scores(prompts, responses, 2))
    assert "judging" in capsys.readouterr().err
    judge.candidate_scores(["p"], [["aa", "bb"]], mode="pairwise")
    assert capsys.readouterr().err == ""                  # bars are off unless asked for
    quiet_default = Judge(judge.model, judge.tokenizer, POINTWISE, pairwise_template=PAIRWISE,
                          choices=("1", "2"), progress=True)
    quiet_default.score(["p"], ["aa"], progress=False)
    assert capsys.readouterr().err == ""
    quiet_default.score(["p"], ["aa"])
    assert "judging" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"template": "rate {prompt} ="}, "missing \\['response'\\]"),
    ({"template": "rate {response} {mood} ="}, "unknown placeholders \\['mood'\\]"),
    ({"template": "rate {} ="}, "named placeholders"),
    ({"pairwise_template": "pick {response_a} ="}, "missing \\['response_b'\\]"),
    ({"ratings": ["1"]}, "at least 2"),
    ({"ratings": ["10", "20"]}, "exactly one token"),
    ({"ratings": ["1", "X"]}, "not in the judge tokenizer's vocabulary"),
    ({"ratings": ["1", "2"], "rating_values": [1.0]}, "one value per rating"),
    ({"choices": ("1", "1")}, "two different tokens"),
    ({"choices": ("A", "B")}, "vocabulary"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_length": 0}, "max_length"),
])
def test_bad_judge_arguments(make_lm, tokenizer, kwargs, match):
    args = {"template": POINTWISE, "pairwise_template": PAIRWISE, "choices": ("1", "2"), **kwargs}
    with pytest.raises(ValueError, match=match):
        Judge(make_lm(), tokenizer, **args)


def test_bad_judge_calls(judge):
    with pytest.raises(ValueError, match="one entry per prompt"):
        judge.score(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="at least 2 responses"):
        judge.preference_pairs(["a"], [["only"]])
    with pytest.raises(ValueError, match="mode must be one of"):
        judge.preference_pairs(["a"], [["x", "y"]], mode="listwise")


@pytest.mark.parametrize("option, given, message", [
    ("choices", ("yes", "no"), r"choice 'yes' must encode to exactly one token .* got 3 tokens .*; "
                               r"use judge_options.choices=\['y', 'n'\] \(one token each for this tokenizer\)"),
    ("choices", ("option a", "option b"), r"use judge_options.choices=\['a', 'b'\]"),
    ("choices", ("A", "B"), r"choice 'A' is not in the judge tokenizer's vocabulary .*; set judge_options.choices to "
                            r"texts that this tokenizer keeps as one token each"),
    ("ratings", (" 1 ", " 2 "), r"rating ' 1 ' must .*; use judge_options.ratings=\['1', '2'\]"),
    # A rating's text is its value: "10" is never shortened to "1".
    ("ratings", ("10", "20"), r"set judge_options.ratings to texts that this tokenizer keeps as one token each"),
])
def test_multi_token_choices_and_ratings_get_a_single_token_spelling_to_use(make_lm, tokenizer, option, given,
                                                                           message):
    with pytest.raises(ValueError, match=message):
        Judge(make_lm(), tokenizer, POINTWISE, pairwise_template=PAIRWISE, **{option: given})
