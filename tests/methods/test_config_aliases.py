"""TRL's names for config fields: taken with one notice each, converted where TRL counts
differently, refused where the meaning differs; and "did you mean" only for typos."""

import pytest

from rftengine.methods.cai import CAIConfig
from rftengine.methods.config_base import config_to_dict, unknown_key_hint
from rftengine.methods.dpo import DPOConfig
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig
from rftengine.methods.rlaif import RLAIFConfig


def grpo(**options):
    return PPOConfig.from_dict({"algorithm": "grpo", **options})


def test_a_trl_grpo_recipe_is_taken_with_one_notice_per_key(notices):
    recipe = {"num_generations": 4, "per_device_train_batch_size": 8, "beta": 0.04, "epsilon": 0.2,
              "epsilon_high": 0.28, "max_completion_length": 32, "lr_scheduler_type": "cosine",
              "warmup_ratio": 0.1, "max_steps": 25, "loss_type": "dr_grpo", "scale_rewards": "batch",
              "save_steps": 5, "num_iterations": 2}
    cfg = grpo(**recipe)
    assert (cfg.group_size, cfg.batch_size, cfg.kl_coef, cfg.clip_range, cfg.clip_range_high) == (4, 2, 0.04, 0.2, 0.28)
    assert (cfg.max_new_tokens, cfg.lr_scheduler, cfg.warmup_steps) == (32, "cosine", 3)
    assert cfg.aggregation == "token_sum_norm"
    assert (cfg.group_scale, cfg.save_every, cfg.ppo_epochs) == ("batch", 5, 2)
    lines = notices()
    assert "train.num_generations is TRL's name for train.group_size; using it" in lines
    assert "train.warmup_ratio is TRL's name for train.warmup_steps; using it as warmup_steps=3" in lines
    assert "train.per_device_train_batch_size is TRL's name for train.batch_size; using it as batch_size=2" in lines
    assert len(lines) == len(recipe) - 1            # max_steps is rftengine's name too
    assert grpo(**recipe) == cfg and len(notices()) == len(lines)   # once per key and process


def test_notices_come_from_rank_0_only(notices, monkeypatch):
    monkeypatch.setenv("RANK", "1")     # torchrun's ranks read the config before the process group starts
    assert grpo(num_generations=2).group_size == 2 and notices() == []


def test_per_device_batch_counts_completions_so_it_is_divided_by_the_group(monkeypatch):
    assert grpo(num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2).batch_size == 4
    with pytest.raises(ValueError, match=r"train.per_device_train_batch_size .*= 6 completions per step is not a "
                                         r"multiple of group_size=4: TRL counts completions"):
        grpo(group_size=4, per_device_train_batch_size=6)
    # DPO and the reward model: TRL counts pairs per micro-step, rftengine per optimizer step.
    assert DPOConfig.from_dict({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}).batch_size == 8
    assert RewardConfig.from_dict({"per_device_train_batch_size": 3}).batch_size == 3
    # TRL's is per device; rftengine's batch_size is the global batch, split over torchrun's ranks.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert grpo(group_size=4, per_device_train_batch_size=6).batch_size == 3


@pytest.mark.parametrize("trl_value, ours", [("grpo", "seq_mean_token_mean"), ("dr_grpo", "token_sum_norm"),
                                             ("dapo", "token_mean")])
def test_grpo_loss_types_with_the_same_normalisation_map_to_aggregations(trl_value, ours):
    assert grpo(group_size=2, loss_type=trl_value).aggregation == ours


@pytest.mark.parametrize("trl_value, message", [
    ("bnpo", "loss_type=.bnpo. divides by the tokens of each micro-batch .* use loss_type: dapo"),
    ("sapo", "loss_type='sapo' has no rftengine equivalent"),
])
def test_other_loss_types_are_refused_with_the_reason(trl_value, message):
    with pytest.raises(ValueError, match=r"train.loss_type \(TRL's name for train.aggregation\): " + message):
        grpo(group_size=2, loss_type=trl_value)


def test_scale_rewards_takes_trls_booleans_and_names():
    for trl_value, ours in ((True, "group"), (False, "none"), ("group", "group"), ("batch", "batch"), ("none", "none")):
        assert grpo(group_size=2, scale_rewards=trl_value).group_scale == ours
    with pytest.raises(ValueError, match="scale_rewards='mean' has no rftengine equivalent"):
        grpo(group_size=2, scale_rewards="mean")


def test_schedules_and_warmup_as_transformers_means_them():
    with_warmup = DPOConfig.from_dict({"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5})
    assert with_warmup.lr_scheduler == "constant"
    assert DPOConfig.from_dict({"lr_scheduler_type": "constant"}).lr_scheduler == "constant"
    with pytest.raises(ValueError, match="'constant' has no warmup in transformers, but warmup_steps=3"):
        DPOConfig.from_dict({"lr_scheduler_type": "constant", "warmup_ratio": 0.1, "max_steps": 30})
    with pytest.raises(ValueError, match="lr_scheduler_type='polynomial' has no rftengine equivalent"):
        DPOConfig.from_dict({"lr_scheduler_type": "polynomial"})
    with pytest.raises(ValueError, match="warmup_ratio=0.1 is a fraction of the run's steps, but max_steps is not set"):
        DPOConfig.from_dict({"warmup_ratio": 0.1})
    with pytest.raises(ValueError, match="adam_betas: \\[beta1, beta2\\]"):
        DPOConfig.from_dict({"adam_beta1": 0.9})


def test_an_alias_given_with_its_field_is_an_error():
    with pytest.raises(ValueError, match="train.num_generations is TRL's name for train.group_size; give only one of "
                                         "train.num_generations and train.group_size"):
        grpo(group_size=2, num_generations=4)
    with pytest.raises(ValueError, match="give only one of train.(epsilon|cliprange) and train.(epsilon|cliprange)"):
        grpo(group_size=2, epsilon=0.2, cliprange=0.3)


def test_each_config_maps_trls_name_to_its_own_field():
    dpo = DPOConfig.from_dict({"beta": 0.3, "max_completion_length": 40})
    assert (dpo.beta, dpo.max_response_length) == (0.3, 40)     # DPO's beta is its own field
    assert PPOConfig.from_dict({"beta": 0.3, "cliprange_value": 0.5}).kl_coef == 0.3
    assert PPOConfig.from_dict({"cliprange_value": 0.5}).value_clip == 0.5


def test_aliases_in_a_nested_stage(notices):
    cfg = CAIConfig.from_dict({"mode": "rl", "rl": {"beta": 0.2, "num_generations": 6}})
    assert (cfg.rl_config.kl_coef, cfg.rl_config.group_size) == (0.2, 6)
    assert "train.rl.num_generations is TRL's name for train.rl.group_size; using it" in notices()
    assert CAIConfig.from_dict(config_to_dict(cfg)).rl_config == cfg.rl_config


@pytest.mark.parametrize("cls, key, wrong", [
    (DPOConfig, "per_device_eval_batch_size", "batch_size"),
    (DPOConfig, "precompute_ref_batch_size", "ref_batch_size"),
    (DPOConfig, "adam_epsilon", "adam_betas"),
    (PPOConfig, "adam_epsilon", "clip_range"),
    (PPOConfig, "delta", "kl_coef"),
    (PPOConfig, "num_generations_eval", "group_size"),
    (DPOConfig, "epsilon", "precision"),
    (DPOConfig, "num_ppo_epochs", "num_epochs"),
    (PPOConfig, "eval_steps", "max_steps"),
])
def test_other_names_are_not_pointed_to_a_field_of_another_meaning(cls, key, wrong):
    assert f"'{wrong}'" not in unknown_key_hint(cls, key)


def test_the_names_once_pointed_wrong_now_resolve():
    cfg = PPOConfig.from_dict({"per_device_train_batch_size": 4, "cliprange_value": 0.3, "max_completion_length": 9})
    assert (cfg.batch_size, cfg.value_clip, cfg.max_new_tokens) == (4, 0.3, 9)


@pytest.mark.parametrize("typo, meant", [("learing_rate", "'learning_rate'"), ("group_szie", "'group_size'"),
                                         ("learningrate", "'learning_rate'"), ("kl_coeff", "'kl_coef'"),
                                         ("num_generation", "'group_size' (TRL: 'num_generations')")])
def test_typos_still_get_the_field(typo, meant):
    with pytest.raises(ValueError, match=f"unknown PPOConfig key '{typo}'; did you mean {meant}".replace("(", r"\(")
                       .replace(")", r"\)")):
        PPOConfig.from_dict({typo: 1})


def test_rlaif_num_samples_is_the_earlier_name_of_group_size(notices):
    cfg = RLAIFConfig.from_dict({"algorithm": "grpo", "num_samples": 3})
    assert cfg.group_size == 3 and cfg.ppo_config.group_size == 3
    assert notices() == ["train.num_samples is rftengine 0.1's name for train.group_size; using it"]
    assert RLAIFConfig.from_dict({"num_generations": 4}).group_size == 4     # TRL's name, as for PPO
    with pytest.raises(ValueError, match="give only one of train.num_samples and train.group_size"):
        RLAIFConfig.from_dict({"num_samples": 3, "group_size": 3})
