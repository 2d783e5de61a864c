"""RLAIF: online sampling, judging and training with PPO/GRPO/RLOO or DPO."""

import pytest
import torch

from rftengine.generation import Generator
from rftengine.methods.config_base import config_to_dict
from rftengine.methods.dpo import DPOConfig
from rftengine.methods.judge import Judge
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.result import TrainResult
from rftengine.methods.rlaif import (
    RLAIFConfig,
    sample_responses,
    train_rlaif,
)

PROMPTS = ["ab> ", "cd> ", "efg> ", "h> ", "ijk> ", "lm> "]


@pytest.fixture
def judge(make_lm, tokenizer):
    return Judge(make_lm(seed=7), tokenizer, "rate {response} =", pairwise_template="1: {response_a} 2: {response_b} =",
                 choices=("1", "2"), batch_size=16)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sample_responses_groups_by_prompt(make_lm, tokenizer):
    policy = make_lm()
    gen = Generator(policy, max_batch_size=5, max_seq_len=16)   # 5 // 2 = 2 prompts per call
    out = sample_responses(gen, tokenizer, PROMPTS[:3], num_samples=2, max_new_tokens=6, seed=3)
    assert len(out) == 3 and all(len(g) == 2 and all(isinstance(r, str) for r in g) for g in out)
    again = sample_responses(gen, tokenizer, PROMPTS[:3], num_samples=2, max_new_tokens=6, seed=3)
    assert out == again
    with pytest.raises(ValueError, match="max_batch_size"):
        sample_responses(gen, tokenizer, PROMPTS[:1], num_samples=6, max_new_tokens=4)


@pytest.mark.parametrize("algorithm, judge_mode", [("grpo", "pointwise"), ("rloo", "pairwise")])
def test_rlaif_online_rl_end_to_end(make_lm, tokenizer, judge, algorithm, judge_mode):
    policy = make_lm(seed=1)
    before = _params(policy)
    steps, states = [], []
    config = RLAIFConfig(algorithm=algorithm, judge_mode=judge_mode, group_size=3, batch_size=2, max_steps=2,
                         max_new_tokens=6, save_every=1, ppo={"learning_rate": 1e-3, "ppo_epochs": 1})
    result = train_rlaif(policy, tokenizer, PROMPTS, judge, config,
                         callback=lambda step, m: steps.append((step, m)),
                         checkpoint_fn=lambda s: states.append(s.state_dict()))
    assert isinstance(result, TrainResult)
    assert [s for s, _ in steps] == [1, 2]
    metrics = steps[-1][1]
    for key in ("loss", "reward", "kl", "clip_ratio/region_mean", "entropy", "completions/mean_length"):
        assert key in metrics and metrics[key] == metrics[key]          # present, not NaN
    if judge_mode == "pairwise":
        assert metrics["reward"] == pytest.approx(0.5, abs=1e-5)  # group strengths average 1/2
    else:
        assert 1.0 <= metrics["reward"] <= 5.0
    assert _changed(before, policy)
    assert result.state.method == "rlaif" and result.state.step == 2
    assert [s["method"] for s in states] == ["rlaif", "rlaif"]
    assert states[-1]["extra"]["stage"] == algorithm


def test_rlaif_online_dpo_end_to_end(make_lm, tokenizer, judge):
    policy = make_lm(seed=2)
    before = _params(policy)
    history = []
    config = RLAIFConfig(algorithm="dpo", judge_mode="pairwise", group_size=2, batch_size=3, max_steps=2,
                         max_new_tokens=6, dpo={"beta": 0.1, "learning_rate": 1e-3})
    result = train_rlaif(policy, tokenizer, PROMPTS, judge, config, callback=lambda s, m: history.append(m))
    assert len(history) == 2 and result.state.step == 2 and result.state.data_position == 6
    m = history[0]
    assert 1 <= m["judge/pairs"] <= 3
    for key in ("loss", "rewards/accuracies", "rewards/margins", "judge/score", "judge/margin"):
        assert key in m
    assert m["judge/score"] == pytest.approx(0.5, abs=1e-5)
    assert _changed(before, policy)
    assert result.state.method == "rlaif" and result.state.extra["stage"] == "dpo"


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_rlaif_progress_bars_cover_steps_sampling_and_judging(make_lm, tokenizer, judge, capsys, algorithm,
                                                             terminal):
    config = RLAIFConfig(algorithm=algorithm, group_size=2, batch_size=2, max_steps=1, max_new_tokens=4)
    train_rlaif(make_lm(seed=2), tokenizer, PROMPTS, judge, config, progress=True)
    err = capsys.readouterr().err
    expected = ("rlaif-dpo", "rlaif sampling", "reference log-probs") if algorithm == "dpo" else ("grpo",)
    assert all(desc in err for desc in expected + ("judging",)), err


def test_rlaif_dpo_resume_continues_the_data_order(make_lm, tokenizer, judge):
    config = RLAIFConfig(algorithm="dpo", group_size=2, batch_size=2, max_steps=3, max_new_tokens=5,
                         dpo={"learning_rate": 1e-3})
    full_policy = make_lm(seed=4)
    ref = make_lm(seed=4)
    full = train_rlaif(full_policy, tokenizer, PROMPTS, judge, config, ref_model=ref)
    part_config = RLAIFConfig(algorithm="dpo", group_size=2, batch_size=2, max_steps=1, max_new_tokens=5,
                              dpo={"learning_rate": 1e-3})
    policy = make_lm(seed=4)
    first = train_rlaif(policy, tokenizer, PROMPTS, judge, part_config, ref_model=ref)
    rest = train_rlaif(policy, tokenizer, PROMPTS, judge, config, ref_model=ref, state=first.state.state_dict())
    assert len(rest.history) == 2 and rest.state.data_position == full.state.data_position
    assert rest.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="stage 'dpo'"):
        train_rlaif(make_lm(), tokenizer, PROMPTS, judge, RLAIFConfig(max_steps=1, max_new_tokens=4),
                    state=first.state.state_dict())
    with pytest.raises(ValueError, match="resuming needs ref_model"):
        train_rlaif(make_lm(), tokenizer, PROMPTS, judge, config, state=first.state.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    ({"group_size": 1}, "group_size must be an integer >= 2"),
    ({"algorithm": "a2c"}, "algorithm must be one of"),
    ({"judge_mode": "listwise"}, "judge_mode must be one of"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"algorithm": "dpo", "ppo": {"kl_coef": 0.1}}, "ppo is only used"),
    ({"algorithm": "grpo", "dpo": {"beta": 0.1}}, "dpo is only used"),
    ({"group_size": 4, "ppo": {"group_size": 3}}, "ppo.group_size=3 conflicts with RLAIFConfig.group_size=4"),
    ({"ppo": {"kl_coef": -1.0}}, "PPOConfig.kl_coef must be >= 0"),
    ({"ppo": {"kl_cof": 0.1}}, "did you mean 'kl_coef'"),
    ({"algorithm": "dpo", "dpo": {"beta": -0.1}}, "DPOConfig.beta must be"),
    ({"ppo": 3}, "must be a PPOConfig"),
])
def test_bad_rlaif_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLAIFConfig(**kwargs)


def test_rlaif_config_from_dict_and_nested_objects():
    with pytest.raises(ValueError, match=r"did you mean 'group_size' \(rftengine 0.1: 'num_samples'\)"):
        RLAIFConfig.from_dict({"num_sample": 2})
    cfg = RLAIFConfig.from_dict({"algorithm": "rloo", "group_size": 4, "ppo": {"learning_rate": 1e-5}})
    ppo = cfg.ppo_config
    assert isinstance(ppo, PPOConfig)
    assert (ppo.algorithm, ppo.group_size, ppo.learning_rate) == ("rloo", 4, 1e-5)
    assert ppo.kl_estimator == "k3" and ppo.kl_in_loss
    assert RLAIFConfig.from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="trains with ppo_config"):
        cfg.dpo_config
    # A PPOConfig object left at algorithm defaults follows the RLAIF algorithm, KL defaults included.
    ppo = RLAIFConfig(algorithm="grpo", group_size=2, ppo=PPOConfig(learning_rate=2e-5)).ppo_config
    assert (ppo.algorithm, ppo.kl_in_loss, ppo.learning_rate) == ("grpo", True, 2e-5)
    cfg = RLAIFConfig(algorithm="dpo", dpo=DPOConfig(beta=0.3))
    assert cfg.dpo_config.beta == 0.3 and cfg.dpo_config.max_response_length == cfg.max_new_tokens + 1


def test_train_rlaif_checks_arguments(make_lm, tokenizer, judge):
    with pytest.raises(ValueError, match="judge must be"):
        train_rlaif(make_lm(), tokenizer, PROMPTS, lambda p, r: [0.0] * len(p), RLAIFConfig())
    with pytest.raises(ValueError, match="at least one prompt"):
        train_rlaif(make_lm(), tokenizer, [], judge, RLAIFConfig())
    with pytest.raises(ValueError, match="config must be an RLAIFConfig"):
        train_rlaif(make_lm(), tokenizer, PROMPTS, judge, {"algorithm": "dpo"})


class _FixedJudge:
    def __init__(self, scores):
        self.scores = scores

    def candidate_scores(self, prompts, candidates, **_):
        return self.scores


def test_online_dpo_trains_the_sampled_ids_and_never_adds_an_eos(make_lm, tokenizer, monkeypatch):
    """Truncated responses keep no EOS; finished ones keep their one EOS; the trained ids are
    the sampled ids even where decoding + re-tokenising would give others (<unk> is dropped
    by decoding)."""
    from rftengine.methods import rlaif
    from rftengine.methods.modeling import Reference

    from .fakes import ScriptedGenerator

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
    rows = [ids("abc"), ids("x") + [eos], [unk] + ids("ef"), ids("o") + [eos]]   # max_new_tokens = 3
    gen = ScriptedGenerator(tokenizer, lambda k, prompts, n: rows)
    trained = []
    monkeypatch.setattr(rlaif, "dpo_step", lambda policy, opt, batch, cfg, **kw: trained.append(batch) or {})
    policy = make_lm()
    config = RLAIFConfig(algorithm="dpo", group_size=2, batch_size=2, max_new_tokens=3)
    _, pairs = rlaif.rlaif_dpo_round(
        policy, tokenizer, _FixedJudge([[1.0, 0.0], [0.0, 1.0]]), ["p:", "q:"], config, generator=gen,
        optimizer=None, reference=Reference(policy, make_lm(seed=1)))
    assert len(pairs) == 2
    (batch,) = trained
    got = [batch.response_ids[i][batch.response_mask[i]].tolist() for i in range(4)]
    assert got == [rows[0], rows[3], rows[1], rows[2]]           # chosen rows, then rejected rows
    assert got[0][-1] != eos and eos not in got[3]               # truncated: no EOS of their own
    assert got[1].count(eos) == 1 and got[2].count(eos) == 1     # finished: their EOS, once


def test_online_dpo_reports_response_length_in_sampled_tokens(make_lm, tokenizer, monkeypatch):
    """The response lengths count the sampled tokens (EOS included), under the names PPO-mode
    RLAIF logs them, not the characters of the decoded text (here 2.5 tokens against 1.75
    characters)."""
    from rftengine.methods import rlaif
    from rftengine.methods.modeling import Reference

    from .fakes import ScriptedGenerator

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
    rows = [ids("abc"), ids("x") + [eos], [unk] + ids("ef"), ids("o") + [eos]]   # 3, 2, 3, 2 tokens
    gen = ScriptedGenerator(tokenizer, lambda k, prompts, n: rows)
    monkeypatch.setattr(rlaif, "dpo_step", lambda *a, **kw: {})
    policy = make_lm()
    config = RLAIFConfig(algorithm="dpo", group_size=2, batch_size=2, max_new_tokens=3)
    metrics, _ = rlaif.rlaif_dpo_round(
        policy, tokenizer, _FixedJudge([[1.0, 0.0], [0.0, 1.0]]), ["p:", "q:"], config, generator=gen,
        optimizer=None, reference=Reference(policy, make_lm(seed=1)))
    assert "response_length" not in metrics
    assert metrics["completions/mean_length"] == 2.5
    assert (metrics["completions/min_length"], metrics["completions/max_length"]) == (2.0, 3.0)


def test_sample_responses_do_not_depend_on_the_chunking(make_lm, tokenizer):
    """Each response's noise is keyed by its global sequence index: prompts sampled in chunks of
    one, or from a later first index (a rank's share), get the responses of one call over all."""
    policy = make_lm()
    kwargs = dict(num_samples=2, max_new_tokens=6, seed=3, temperature=1.0)
    whole = sample_responses(Generator(policy, max_batch_size=8, max_seq_len=16), tokenizer, PROMPTS[:4], **kwargs)
    assert len({r for g in whole for r in g}) > 2                    # really sampled
    chunked = sample_responses(Generator(policy, max_batch_size=2, max_seq_len=16), tokenizer, PROMPTS[:4], **kwargs)
    assert chunked == whole
    tail = sample_responses(Generator(policy, max_batch_size=8, max_seq_len=16), tokenizer, PROMPTS[2:4],
                            first_index=2, **kwargs)
    assert tail == whole[2:]


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_dpo_step_padding_pairs_weigh_nothing(make_lm, tokenizer, micro_batch_size):
    """Online DPO under torchrun pads a rank's pairs (``real_pairs``): the step over 3 pairs of
    which 2 are real gives the loss, stats and gradient of the step over those 2 alone."""
    from rftengine.methods.data import collate_preferences, encode_preferences
    from rftengine.methods.dpo import dpo_step

    pairs = [{"prompt": f"q{i}>", "chosen": "ab" * (i + 1), "rejected": "c" * (i + 2)} for i in range(3)]
    examples = encode_preferences(tokenizer, pairs)
    ref = torch.tensor([[-9.0, -7.5], [-12.0, -11.0], [-5.0, -8.0]])
    config = DPOConfig(beta=0.5, batch_size=2 if micro_batch_size else 1, micro_batch_size=micro_batch_size)
    out = []
    for rows, real in ((examples[:2], None), (examples, 2)):
        policy = make_lm(seed=4)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        out.append(dpo_step(policy, opt, collate_preferences(rows, tokenizer.pad_token_id), config,
                            ref_logps=ref[:len(rows)], real_pairs=real))
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"):
        assert out[1][key] == pytest.approx(out[0][key], rel=1e-6), key
