"""Constitutional AI: the constitution, the three batched generation stages, the pairs, training."""

import copy

import pytest
import torch

from rftengine.methods.cai import (
    CAIConfig,
    generate_revisions,
    revision_pairs,
    revision_sft_data,
    train_cai,
)
from rftengine.methods.config_base import config_to_dict
from rftengine.methods.constitution import (
    Constitution,
    default_constitution_path,
    load_constitution,
    principle_judge,
)
from rftengine.methods.ppo_config import PPOConfig

from . import fakes

PROMPTS = ["ab> ", "cd> ", "efg> ", "h> "]
TOY = Constitution.from_list([
    {"name": "vowels", "critique_request": "enough vowels?", "revision_request": "use more vowels"},
    {"name": "short", "critique_request": "too long?", "revision_request": "make it short"},
])
CRITIQUE = "{prompt}{response}|{critique_request}:"
REVISION = "{prompt}{response}|{critique_request}:{critique}|{revision_request}:"


def small_config(**kwargs):
    base = {"max_new_tokens": 6, "critique_max_new_tokens": 5, "max_context_length": 96,
            "critique_template": CRITIQUE, "revision_template": REVISION, "generation_batch_size": 8}
    return CAIConfig(**{**base, **kwargs})


class ScriptedGenerator(fakes.ScriptedGenerator):
    """Stands in for the Generator: records the decoded prompts of every call and answers each
    stage with a fixed text per prompt ('resp<i>', 'crit<i>', 'rev<i>') ended by EOS."""

    def __init__(self, tokenizer):
        def script(call, prompts, max_new_tokens):
            stage = ("resp", "crit", "rev")[call]
            return [tokenizer(f"{stage}{i}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                    for i in range(len(prompts))]

        super().__init__(tokenizer, script)


def test_default_constitution_ships_and_loads():
    assert default_constitution_path().is_file()
    constitution = load_constitution()
    assert len(constitution) >= 6
    names = [p.name for p in constitution.principles]
    assert len(set(names)) == len(names)
    for p in constitution.principles:
        assert p.critique_request.strip() and p.revision_request.strip()
    assert constitution.sample(5, seed=1) == constitution.sample(5, seed=1)


@pytest.mark.parametrize("text, match", [
    ("principles: []\n", "at least one principle"),
    ("principles:\n  - critique_request: a\n", "non-empty string 'revision_request'"),
    ("principles:\n  - critique_request: a\n    revision_request: b\n    weight: 2\n", "unknown keys \\['weight'\\]"),
    ("rules: []\n", "unknown top-level keys \\['rules'\\]"),
    ("principles: [\n", "not valid YAML"),
    ("principles:\n  - {name: x, critique_request: a, revision_request: b}\n"
     "  - {name: x, critique_request: c, revision_request: d}\n", "repeated: \\['x'\\]"),
])
def test_bad_constitutions(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_constitution(path)


def test_constitution_missing_file(tmp_path):
    with pytest.raises(ValueError, match="constitution file not found"):
        load_constitution(tmp_path / "nope.yaml")


def test_three_stages_are_wired_in_order(tokenizer):
    """Each stage sees the previous stages' outputs and the sampled principle's requests."""
    gen = ScriptedGenerator(tokenizer)
    examples = generate_revisions(None, tokenizer, PROMPTS, TOY, small_config(), generator=gen, seed=5)
    principles = {p.name: p for p in TOY.principles}
    assert [len(c) for c in gen.calls] == [4, 4, 4]
    assert gen.calls[0] == PROMPTS
    for i, (e, prompt) in enumerate(zip(examples, PROMPTS)):
        pr = principles[e.principle]
        assert (e.prompt, e.response, e.critique, e.revision) == (prompt, f"resp{i}", f"crit{i}", f"rev{i}")
        assert gen.calls[1][i] == CRITIQUE.format(prompt=prompt, response=e.response,
                                                 critique_request=pr.critique_request)
        assert gen.calls[2][i] == REVISION.format(prompt=prompt, response=e.response,
                                                 critique_request=pr.critique_request, critique=e.critique,
                                                 revision_request=pr.revision_request)
    assert [e.principle for e in examples] == [p.name for p in TOY.sample(4, 5)]


def test_generation_stages_show_progress(tokenizer, capsys, terminal):
    generate_revisions(None, tokenizer, PROMPTS, TOY, small_config(), generator=ScriptedGenerator(tokenizer),
                       progress=True)
    err = capsys.readouterr().err
    assert all(f"cai {stage}" in err for stage in ("responses", "critiques", "revisions"))
    generate_revisions(None, tokenizer, PROMPTS, TOY, small_config(), generator=ScriptedGenerator(tokenizer))
    assert capsys.readouterr().err == ""


def test_chat_prompts_run_as_a_conversation(tokenizer):
    gen = ScriptedGenerator(tokenizer)
    prompt = [{"role": "user", "content": "hi"}]
    (e,) = generate_revisions(None, tokenizer, [prompt], TOY, small_config(), generator=gen, seed=0)
    pr = next(p for p in TOY.principles if p.name == e.principle)
    expected = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "resp0"}, {"role": "user", "content": pr.critique_request},
                  {"role": "assistant", "content": "crit0"}, {"role": "user", "content": pr.revision_request}],
        tokenize=False, add_generation_prompt=True)
    assert gen.calls[2][0] == expected


def test_generated_pairs_are_well_formed(make_lm, tokenizer):
    policy = make_lm(seed=2)
    examples = generate_revisions(policy, tokenizer, PROMPTS, TOY, small_config(), seed=1)
    again = generate_revisions(policy, tokenizer, PROMPTS, TOY, small_config(), seed=1)
    assert [e.as_dict() for e in examples] == [e.as_dict() for e in again]
    assert len(examples) == len(PROMPTS)
    for e, prompt in zip(examples, PROMPTS):
        assert e.prompt == prompt and e.principle in {"vowels", "short"}
        for text in (e.response, e.critique, e.revision):
            assert isinstance(text, str) and "<eos>" not in text and "<pad>" not in text
    pairs = revision_pairs(examples)
    by_prompt = {e.prompt: e for e in examples}
    assert pairs
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        e = by_prompt[pair["prompt"]]
        assert pair["chosen"] == e.revision and pair["rejected"] == e.response
        assert pair["chosen"].strip() and pair["chosen"].strip() != pair["rejected"].strip()
    assert revision_sft_data(examples) == [{"prompt": e.prompt, "response": e.revision}
                                            for e in examples if e.revision.strip()]


def test_revision_pairs_skip_unusable_revisions():
    from rftengine.methods.cai import CAIExample

    examples = [CAIExample("p", "same", "x", "c", " same "), CAIExample("q", "a", "x", "c", "  "),
                CAIExample("r", "a", "x", "c", "b")]
    assert revision_pairs(examples) == [{"prompt": "r", "chosen": "b", "rejected": "a"}]


def test_train_cai_sft_then_dpo(make_lm, tokenizer):
    policy = make_lm(seed=3)
    before = [p.detach().clone() for p in policy.parameters()]
    steps = []
    config = small_config(sft={"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
                          dpo={"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2})
    result = train_cai(policy, tokenizer, PROMPTS, config, constitution=TOY,
                       callback=lambda step, m: steps.append((step, m)))
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert [m["cai/stage"] for _, m in steps] == [0.0, 0.0, 1.0, 1.0]
    assert "rewards/accuracies" in steps[-1][1] and "logps/mean" in steps[0][1]
    assert set(result.stage_results) == {"sft", "dpo"}
    assert result.pairs == revision_pairs(result.examples)
    assert result.state.method == "cai" and result.state.step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_train_cai_resumes_in_the_dpo_stage(make_lm, tokenizer):
    config = small_config(sft={"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
                          dpo={"learning_rate": 1e-3, "max_steps": 3, "batch_size": 2, "save_every": 1})
    states = []
    full = train_cai(make_lm(seed=4), tokenizer, PROMPTS, config, constitution=TOY,
                     checkpoint_fn=lambda s: states.append(copy.deepcopy(s.state_dict())))  # as if saved
    assert [s["extra"]["stage"] for s in states] == ["sft", "dpo", "dpo", "dpo"]
    assert [s["step"] for s in states] == [2, 3, 4, 5]
    mid = states[1]                       # after one DPO step
    assert mid["method"] == "cai" and len(mid["extra"]["cai_examples"]) == len(PROMPTS)
    # Resume with the weights of that moment: rebuild them by replaying the run up to there.
    policy = make_lm(seed=4)
    short = small_config(sft={"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
                         dpo={"learning_rate": 1e-3, "max_steps": 1, "batch_size": 2})
    train_cai(policy, tokenizer, PROMPTS, short, constitution=TOY)
    steps = []
    resumed = train_cai(policy, tokenizer, PROMPTS, config, constitution=TOY, state=mid,
                        callback=lambda step, m: steps.append((step, m)))
    assert [e.as_dict() for e in resumed.examples] == mid["extra"]["cai_examples"]
    assert [s for s, _ in steps] == [4, 5] and set(resumed.stage_results) == {"dpo"}
    assert steps[-1][1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("mode, stage", [
    ("rl", {"rl": {"algorithm": "grpo", "group_size": 2, "batch_size": 2, "max_steps": 3, "max_new_tokens": 5,
                   "learning_rate": 1e-3, "kl_coef": 0.1, "save_every": 1}}),
    ("sft_dpo", {"dpo": {"precompute_ref": False, "learning_rate": 1e-3, "max_steps": 3, "batch_size": 2,
                         "save_every": 1}}),
])
def test_train_cai_resumes_exactly_against_the_stage_start_reference(make_lm, tokenizer, mode, stage):
    """Resumed mid-stage, the reference is still the policy at the start of the stage (after SFT),
    rebuilt from the checkpoint, not a copy of the resumed policy: the same steps follow."""
    config = small_config(mode=mode, sft={"learning_rate": 1e-3, "max_steps": 1, "batch_size": 2}, **stage)
    judge = None
    if mode == "rl":
        judge = principle_judge(make_lm(seed=9), tokenizer, TOY, choices=("1", "2"), max_length=128)
    saved = []
    full = train_cai(make_lm(seed=6), tokenizer, PROMPTS, config, constitution=TOY, judge=judge,
                     checkpoint_fn=lambda s: saved.append(copy.deepcopy((s.state_dict(), s.model.state_dict()))))
    assert [s["extra"]["stage"] for s, _ in saved] == ["sft"] + [("grpo" if mode == "rl" else "dpo")] * 3
    assert "stage_reference" not in saved[0][0]["extra"]
    state, weights = saved[1]                                   # after the first step of the second stage
    assert state["extra"]["stage_reference"].tensors.keys() == weights.keys()
    policy = make_lm(seed=6)
    policy.load_state_dict(weights)
    resumed = train_cai(policy, tokenizer, PROMPTS, config, constitution=TOY, judge=judge, state=state)
    assert resumed.history == full.history[2:]
    moved = "kl" if mode == "rl" else "rewards/margins"        # zero against a copy of the resumed policy
    assert abs(resumed.history[0][moved]) > 1e-6


def test_train_cai_resume_needs_the_initial_judge(make_lm, tokenizer):
    config = small_config(mode="rl", sft={"learning_rate": 1e-3, "max_steps": 1, "batch_size": 2})
    state = {"method": "cai", "step": 1, "data_position": 2,
             "extra": {"stage": "sft", "stage_offset": 0, "cai_examples": []}}
    with pytest.raises(ValueError, match="resuming mode='rl' needs judge or judge_model"):
        train_cai(make_lm(), tokenizer, PROMPTS, config, constitution=TOY, state=state)


def test_train_cai_rl_with_a_principle_judge(make_lm, tokenizer):
    judge = principle_judge(make_lm(seed=9), tokenizer, TOY, choices=("1", "2"), max_length=128)
    assert "enough vowels?" in judge.pointwise_text("p", "r")
    policy = make_lm(seed=5)
    history = []
    config = small_config(mode="rl", sft_before_rl=False, judge_mode="pairwise",
                          rl={"algorithm": "grpo", "group_size": 2, "batch_size": 2, "max_steps": 2,
                              "max_new_tokens": 5, "learning_rate": 1e-3})
    result = train_cai(policy, tokenizer, PROMPTS, config, constitution=TOY, judge=judge,
                       callback=lambda s, m: history.append(m))
    assert len(history) == 2 and set(result.stage_results) == {"rl"}
    assert history[0]["reward"] == pytest.approx(0.5, abs=1e-5)
    assert result.state.method == "cai" and result.state.extra["stage"] == "grpo"


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "ppo"}, "mode must be one of"),
    ({"critique_template": "{prompt}{response}:"}, "critique_template must use exactly"),
    ({"revision_template": "{prompt}{response}{critique}{critique_request}{revision_request}{x}"},
     "revision_template must use exactly"),
    ({"rl": {"learning_rate": 1e-5}}, "rl is not used with mode='sft_dpo'"),
    ({"mode": "rl", "sft_before_rl": False, "sft": {}}, "sft is not used with mode='rl' and sft_before_rl=False"),
    ({"mode": "dpo", "dpo": {"bta": 0.1}}, "did you mean 'beta'"),
    ({"mode": "rl", "judge_mode": "pairwise", "rl": PPOConfig(group_size=1)}, "group_size must be >= 2"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": -1.0}, "temperature must be > 0"),
])
def test_bad_cai_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAIConfig(**kwargs)


def test_cai_config_from_dict():
    with pytest.raises(ValueError, match="did you mean 'max_new_tokens'"):
        CAIConfig.from_dict({"max_new_token": 3})
    cfg = CAIConfig.from_dict({"mode": "rl", "rl": {"learning_rate": 1e-5}})
    assert cfg.stages == ("sft", "rl") and cfg.rl_config.algorithm == "grpo" and cfg.rl_config.group_size == 4
    assert CAIConfig.from_dict(config_to_dict(cfg)) == cfg


def test_train_cai_checks_arguments(make_lm, tokenizer):
    with pytest.raises(ValueError, match="only used with mode=.rl."):
        train_cai(make_lm(), tokenizer, PROMPTS, small_config(), constitution=TOY, judge=object())
    with pytest.raises(ValueError, match="at least one prompt"):
        train_cai(make_lm(), tokenizer, [], small_config(), constitution=TOY)
    with pytest.raises(ValueError, match="checkpoint state is from method 'dpo'"):
        train_cai(make_lm(), tokenizer, PROMPTS, small_config(), constitution=TOY,
                  state={"method": "dpo", "step": 1, "data_position": 2, "extra": {}})


def test_revisions_train_on_their_sampled_ids(tokenizer):
    """A revision cut at revision_max_new_tokens is trained without an EOS it never produced; a
    finished response keeps its one EOS; the ids survive the checkpoint records."""
    from rftengine.methods.cai import CAIExample
    from rftengine.methods.data import encode_preferences
    from rftengine.methods.sft import encode_sft_examples

    eos = tokenizer.eos_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    answers = {0: ids("ab") + [eos], 1: ids("crit"), 2: ids("revision")}         # revision: 8 tokens, cut
    gen = fakes.ScriptedGenerator(tokenizer, lambda k, prompts, n: [answers[k]] * len(prompts))
    config = small_config(revision_max_new_tokens=4)
    (e,) = generate_revisions(None, tokenizer, ["p> "], TOY, config, generator=gen, seed=0)
    assert e.revision == "revi" and e.revision.token_ids == tuple(ids("revi")) and not e.revision.finished
    assert e.response.token_ids == tuple(ids("ab") + [eos]) and e.response.finished
    (sft,) = encode_sft_examples(tokenizer, revision_sft_data([e]))
    assert sft[1] == ids("revi")                                                 # no EOS appended
    (pair,) = encode_preferences(tokenizer, revision_pairs([e]))
    assert pair.chosen_ids == ids("revi") and pair.rejected_ids == ids("ab") + [eos]
    again = CAIExample.from_dict(e.as_dict())
    assert again.revision.token_ids == e.revision.token_ids and again.response.finished
    assert again.as_dict() == e.as_dict()
