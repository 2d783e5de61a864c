"""Every metric a train_* function logs follows the naming scheme (TRL's name, or a namespace of
rftengine.methods.metric_names) and is listed in docs/metrics.md; every listed metric is logged
by some run; earlier names still read, with a warning."""

import re
import warnings
from pathlib import Path

import pytest

from rftengine.methods.cai import CAIConfig, train_cai
from rftengine.methods.constitution import Constitution
from rftengine.methods.dpo import DPOConfig, train_dpo
from rftengine.methods.judge import Judge
from rftengine.methods.metric_names import NAMESPACES, RENAMED, Metrics
from rftengine.methods.ppo import train_ppo
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig, train_reward_model
from rftengine.methods.rlaif import RLAIFConfig, train_rlaif
from rftengine.methods.sft import SFTConfig, train_sft
from rftengine.toy import vowel_fraction_reward

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
PROMPTS = ["ab> ", "cd> ", "efg> ", "h> "]
DATA = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, ["aei", "bo", "cu", "da"])]
PAIRS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, ["aei", "oa", "eu", "ia"],
                                                                        ["bcd", "tk", "pq", "xz"])]
ONE_STEP = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3, "eval_every": 1}


def documented() -> dict[str, bool]:
    """The metrics of docs/metrics.md's tables (``<name>`` a placeholder; the table of earlier
    names left out): name -> whether a TRL column says TRL logs it under that name."""
    text = DOC.read_text().split("## Earlier names")[0]
    names: dict[str, bool] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                names[name] = names.get(name, False) or cells[2].startswith("yes")
    return names


def matches(key: str, name: str) -> bool:
    return re.fullmatch(re.sub(r"<[^>]+>", "[^/]+", re.escape(name)), key) is not None


def is_documented(key: str, names) -> bool:
    """``eval/<metric>`` is documented when ``<metric>`` is."""
    return any(matches(key.removeprefix("eval/"), n) for n in names)


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict[str, set[str]]:
    """The metric names each method's runs logged, eval rows included (one or two tiny steps each,
    covering every variant that adds metrics: critic, KL in the loss, dual clip, fp16 loss scale,
    judges pointwise and pairwise, both CAI modes)."""
    from rftengine.toy import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()

    def lm(seed=0):
        return tiny_causal_lm(len(tok), "qwen2", seed=seed, hidden_size=32)

    judge = Judge(lm(7), tok, "rate {response} =", pairwise_template="1: {response_a} 2: {response_b} =",
                  choices=("1", "2"), batch_size=16)
    rl = {"max_steps": 1, "batch_size": 2, "group_size": 2, "max_new_tokens": 4, "learning_rate": 1e-3}
    runs = {
        "sft": lambda: train_sft(lm(), tok, DATA, SFTConfig(**ONE_STEP), eval_data=DATA),
        "sft fp16-mixed": lambda: train_sft(lm(), tok, DATA, SFTConfig(**ONE_STEP, precision="fp16-mixed")),
        "reward": lambda: train_reward_model(lm(), tok, PAIRS, RewardConfig(**ONE_STEP), eval_data=PAIRS),
        "dpo": lambda: train_dpo(lm(), tok, PAIRS, DPOConfig(**ONE_STEP), ref_model=lm(), eval_data=PAIRS),
        "ppo": lambda: train_ppo(lm(), tok, PROMPTS, PPOConfig(algorithm="ppo", adaptive_kl=True, eval_every=1, **rl),
                                 reward_fn=vowel_fraction_reward, eval_data=PROMPTS[:2]),
        "grpo": lambda: train_ppo(lm(), tok, PROMPTS, PPOConfig(algorithm="grpo", kl_in_loss=True, dual_clip=3.0, **rl),
                                  reward_fn=vowel_fraction_reward),
        "rloo": lambda: train_ppo(lm(), tok, PROMPTS, PPOConfig(algorithm="rloo", **rl),
                                  reward_fn=vowel_fraction_reward),
        "rlaif grpo": lambda: train_rlaif(lm(), tok, PROMPTS, judge, RLAIFConfig(
            algorithm="grpo", judge_mode="pointwise", group_size=2, batch_size=2, max_steps=1, max_new_tokens=4)),
        "rlaif dpo": lambda: train_rlaif(lm(), tok, PROMPTS, judge, RLAIFConfig(
            algorithm="dpo", judge_mode="pairwise", group_size=2, batch_size=2, max_steps=1, max_new_tokens=4)),
        "cai": lambda: train_cai(lm(), tok, PROMPTS, CAIConfig(
            max_new_tokens=4, critique_max_new_tokens=3, max_context_length=96, generation_batch_size=8,
            critique_template="{prompt}{response}|{critique_request}:",
            revision_template="{prompt}{response}|{critique_request}:{critique}|{revision_request}:",
            sft={"max_steps": 1, "batch_size": 2}, dpo={"max_steps": 1, "batch_size": 2}),
            constitution=Constitution.from_list([{"name": "v", "critique_request": "vowels?",
                                                  "revision_request": "more vowels"}])),
    }
    return {name: {key for row in run().history for key in row} for name, run in runs.items()}


def test_every_logged_metric_is_documented(logged):
    names = documented()
    for run, keys in logged.items():
        undocumented = sorted(k for k in keys if not is_documented(k, names))
        assert not undocumented, f"{run} logs metrics docs/metrics.md does not list: {undocumented}"


def test_every_documented_metric_is_logged(logged):
    everything = set().union(*logged.values())
    unused = [n for n in documented() if not any(matches(k, n) for k in everything)]
    assert not unused, f"docs/metrics.md lists metrics no run logs: {unused}"


def test_names_are_trl_or_namespaced():
    for name, trl in documented().items():
        assert trl or name.split("/", 1)[0] + "/" in NAMESPACES, \
            f"{name}: not one of TRL's names, and not in a namespace of {NAMESPACES}"


def test_renamed_metrics_are_documented_under_their_new_name():
    names = documented()
    earlier = DOC.read_text().split("## Earlier names")[1]
    for old, new in RENAMED.items():
        assert new in names and old not in names, (old, new)
        assert f"`{old}`" in earlier and f"`{new}`" in earlier, (old, new)


def test_earlier_names_still_read_with_a_warning():
    m = Metrics({"policy/approx_kl": 0.25, "loss": 1.0})
    with pytest.warns(DeprecationWarning, match="'approx_kl' is now called 'policy/approx_kl'"):
        assert m["approx_kl"] == 0.25
    with pytest.warns(DeprecationWarning):
        assert m.get("approx_kl") == 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m["loss"] == 1.0 and m.get("value_loss", -1.0) == -1.0   # not logged: no warning, the default
        assert "approx_kl" not in m and list(m) == ["policy/approx_kl", "loss"]
    with pytest.raises(KeyError):
        m["value_loss"]


def test_train_functions_return_metrics_that_read_the_earlier_names():
    from rftengine.toy import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    result = train_sft(tiny_causal_lm(len(tok), "qwen2", hidden_size=32), tok, DATA,
                       SFTConfig(max_steps=1, batch_size=2))
    with pytest.warns(DeprecationWarning, match="completions/mean_length"):
        assert result.history[0]["response_length"] == result.history[0]["completions/mean_length"]
