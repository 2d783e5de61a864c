"""The declarative config base: one validator over annotations and field metadata, one
from_dict with "did you mean", one stage merger, the field listing, transformers' schedules."""

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from transformers.optimization import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from rftengine.methods.cai import CAIConfig
from rftengine.methods.config_base import (
    ConfigBase,
    LengthFields,
    LogprobFields,
    LoopFields,
    OptimFields,
    SamplingFields,
    config_from_dict,
    config_to_dict,
    describe_config,
    option,
)
from rftengine.methods.optimization import apply_optimizer_settings, make_optimizer, make_scheduler
from rftengine.methods.dpo import DPOConfig
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig
from rftengine.methods.rlaif import RLAIFConfig
from rftengine.methods.sft import SFTConfig

METHOD_CONFIGS = (PPOConfig, DPOConfig, SFTConfig, RewardConfig, RLAIFConfig, CAIConfig)


@dataclass
class Toy(ConfigBase):
    count: int = option(2, "an integer", min=1)
    ratio: float = option(0.5, "a fraction", min=0.0, max=1.0, exclusive_min=True, exclusive_max=True)
    scale: float | None = option(None, "optional positive", min=0.0, exclusive_min=True)
    mode: Literal["a", "b"] = option("a", "a choice")
    flag: bool = option(False, "a switch")
    maybe: bool | None = option(None, "a switch or null")
    name: str = option("x", "text")
    pair: tuple[float, float] = option((0.1, 0.2), "two numbers", items=(0, 1))
    group: int = option(3, "at least two", min=2, why="pairs need two")
    checked: int = option(0, "cross-field", min=0)

    def validate(self):
        if self.checked > self.count:
            raise ValueError(f"Toy.checked must be <= count ({self.count}), got {self.checked}")


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 1.5}, "Toy.count must be an integer, got 1.5"),
    ({"count": True}, "Toy.count must be an integer, got True"),
    ({"count": 0}, "Toy.count must be >= 1, got 0"),
    ({"ratio": 0.0}, "Toy.ratio must be > 0.0, got 0.0"),
    ({"ratio": 1.0}, "Toy.ratio must be < 1.0, got 1.0"),
    ({"ratio": math.nan}, "Toy.ratio must be a finite number, got nan"),
    ({"ratio": "0.3"}, "Toy.ratio must be a finite number, got '0.3'"),
    ({"scale": -math.inf}, "Toy.scale must be a finite number, got -inf"),
    ({"scale": 0}, "Toy.scale must be > 0.0, got 0"),
    ({"mode": "c"}, "Toy.mode must be one of 'a', 'b', got 'c'"),
    ({"flag": 1}, "Toy.flag must be true or false, got 1"),
    ({"maybe": "yes"}, "Toy.maybe must be true, false or null, got 'yes'"),
    ({"name": 3}, "Toy.name must be a string, got 3"),
    ({"pair": [0.1]}, r"Toy.pair must be 2 numbers in \[0, 1\), got \[0.1\]"),
    ({"pair": (0.1, 1.0)}, r"Toy.pair must be 2 numbers in \[0, 1\), got \(0.1, 1.0\)"),
    ({"group": 1}, r"Toy.group must be an integer >= 2 \(pairs need two\), got 1"),
    ({"group": "2"}, r"Toy.group must be an integer >= 2 \(pairs need two\), got '2'"),
    ({"checked": 5}, r"Toy.checked must be <= count \(2\), got 5"),     # the hook runs after the fields
    ({"checked": -1}, "Toy.checked must be >= 0, got -1"),
])
def test_declarative_rules_name_the_field_the_limit_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        Toy(**kwargs)


def test_valid_values_pass_and_lists_become_tuples():
    toy = Toy(count=4, ratio=0.9, scale=2, maybe=None, pair=[0.0, 0.5], checked=4)
    assert toy.pair == (0.0, 0.5) and isinstance(toy.pair, tuple)
    assert Toy.from_dict(config_to_dict(toy)) == toy
    with pytest.raises(ValueError, match="unknown Toy key 'cont'; did you mean 'count'"):
        Toy.from_dict({"cont": 3})


def test_every_field_of_every_method_config_has_help_and_a_listing_line():
    for cls in METHOD_CONFIGS:
        text = describe_config(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            assert f"\n  {f.name} " in text
    text = describe_config(DPOConfig)
    assert "loss_type" in text and "sigmoid|ipo|hinge|robust|simpo" in text
    assert "learning_rate" in text and "default 1e-06; > 0.0" in text
    assert "adam_betas" in text and "each in [0, 1)" in text


def test_field_groups_are_declared_once():
    """The shared fields come from the groups, with their limits, in every config using them."""
    pairs = (OptimFields, LoopFields, LengthFields)
    for cls, groups in ((PPOConfig, (OptimFields, LoopFields, SamplingFields, LogprobFields)),
                        (DPOConfig, (*pairs, LogprobFields)), (SFTConfig, (*pairs, LogprobFields)),
                        (RewardConfig, pairs), (RLAIFConfig, (LoopFields, SamplingFields)),
                        (CAIConfig, (SamplingFields,))):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for group in groups:
            assert issubclass(cls, group)
            for f in dataclasses.fields(group):
                assert fields[f.name].metadata == f.metadata, (cls.__name__, f.name)
    # the methods' own defaults survive
    assert PPOConfig().learning_rate == DPOConfig().learning_rate == 1e-6
    assert SFTConfig().learning_rate == RewardConfig().learning_rate == 1e-5


@pytest.mark.parametrize("cls, data, match", [
    (PPOConfig, {"learning_rat": 1e-5}, r"^unknown PPOConfig key 'learning_rat'; did you mean 'learning_rate'\?$"),
    (RLAIFConfig, {"ppo": {"clip_rnge": 0.1}},
     r"^RLAIFConfig.ppo: unknown PPOConfig key 'clip_rnge'; did you mean 'clip_range'\?$"),
    (RLAIFConfig, {"algorithm": "dpo", "dpo": {"bta": 0.1}},
     r"^RLAIFConfig.dpo: unknown DPOConfig key 'bta'; did you mean 'beta'\?$"),
    (CAIConfig, {"sft": {"num_epoch": 2}},
     r"^CAIConfig.sft: unknown SFTConfig key 'num_epoch'; did you mean 'num_epochs'\?$"),
    (CAIConfig, {"mode": "rl", "rl": {"group_sze": 4}},
     r"^CAIConfig.rl: unknown PPOConfig key 'group_sze'; did you mean 'group_size'\?$"),
    (CAIConfig, {"dpo": {"beta": 0}}, r"^CAIConfig.dpo: DPOConfig.beta must be > 0.0, got 0$"),
])
def test_unknown_and_invalid_keys_top_level_and_in_stages(cls, data, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(data)


ROUND_TRIPS = [
    PPOConfig(algorithm="grpo", group_size=4, adam_betas=(0.9, 0.95), micro_batch_size=8, precision="bf16-mixed"),
    PPOConfig(critic="separate", minibatch_size=4, gradient_accumulation_steps=2, warmup_steps=3,
              lr_scheduler="cosine"),
    DPOConfig(loss_type="ipo", length_normalized=True, max_response_length=None, packing=True),
    SFTConfig(learning_rate=3e-4, gradient_checkpointing=True, max_steps=7),
    RewardConfig(center_coef=0.01, use_margin=True, batch_size=4, micro_batch_size=2),
    RLAIFConfig(algorithm="grpo", group_size=4, ppo=PPOConfig(learning_rate=2e-5, kl_coef=0.2)),
    RLAIFConfig(algorithm="dpo", dpo={"beta": 0.3, "loss_type": "hinge"}),
    CAIConfig(mode="rl", sft=SFTConfig(num_epochs=2), rl={"learning_rate": 1e-5, "group_size": 2}),
    CAIConfig(dpo=DPOConfig(beta=0.2), revision_max_new_tokens=9),
]


@pytest.mark.parametrize("config", ROUND_TRIPS, ids=lambda c: type(c).__name__)
def test_every_method_config_round_trips_through_a_plain_dict(config):
    import yaml

    plain = config_to_dict(config)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain          # plain data only (no tuples, objects)
    again = type(config).from_dict(plain)
    assert config_to_dict(again) == plain
    if isinstance(config, CAIConfig):
        stages = config.stages
    elif isinstance(config, RLAIFConfig):
        stages = ("dpo",) if config.algorithm == "dpo" else ("ppo",)
    else:
        stages = ()
    for name in stages:                      # the merged stage configs are the same too
        assert getattr(again, f"{name}_config") == getattr(config, f"{name}_config")


def test_stage_objects_and_mappings_merge_the_same_way():
    """RLAIF binds its loop fields into the stage; a conflicting value names both fields."""
    as_object = RLAIFConfig(algorithm="rloo", group_size=3, batch_size=2, ppo=PPOConfig(kl_coef=0.2)).ppo_config
    as_mapping = RLAIFConfig(algorithm="rloo", group_size=3, batch_size=2, ppo={"kl_coef": 0.2}).ppo_config
    assert as_object == as_mapping
    merged = (as_object.algorithm, as_object.group_size, as_object.batch_size, as_object.kl_estimator)
    assert merged == ("rloo", 3, 2, "k3")
    with pytest.raises(ValueError, match=r"RLAIFConfig.ppo.batch_size=16 conflicts with RLAIFConfig.batch_size=8; "
                                         r"set RLAIFConfig.batch_size \(it drives the RLAIF loop\)"):
        RLAIFConfig(ppo={"batch_size": 16})
    # CAI sizes its stages by default, and what a stage gives wins.
    cai = CAIConfig(max_new_tokens=10, sft={"max_response_length": 5})
    assert cai.sft_config.max_response_length == 5 and cai.dpo_config.max_response_length == 11


# ----------------------------------------------------------------------------- schedules


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind, warmup, reference", [
    ("constant", 0, lambda opt, w, n: get_constant_schedule(opt)),
    ("constant", 3, lambda opt, w, n: get_constant_schedule_with_warmup(opt, w)),
    ("linear", 2, get_linear_schedule_with_warmup),
    ("cosine", 3, get_cosine_schedule_with_warmup),
    ("cosine", 0, get_cosine_schedule_with_warmup),
])
def test_schedules_are_transformers_get_scheduler(kind, warmup, reference):
    cfg = SFTConfig(learning_rate=0.1, warmup_steps=warmup, lr_scheduler=kind)
    ours = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    theirs = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    got = _lrs(make_scheduler(ours, cfg, 10), ours, 12)
    expected = _lrs(reference(theirs, warmup, 10), theirs, 12)
    assert got == expected


def test_schedule_state_round_trips_through_weights_only_and_takes_a_new_rate():
    """Exact resume: a LambdaLR made by make_scheduler saves as plain data, restores to the same
    next rates, and apply_optimizer_settings puts a changed learning rate under the schedule."""
    cfg = SFTConfig(learning_rate=0.1, warmup_steps=2, lr_scheduler="cosine")
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = make_scheduler(opt, cfg, 8)
    _lrs(sched, opt, 3)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    expected = _lrs(sched, opt, 4)

    opt2 = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched2 = make_scheduler(opt2, cfg, 8)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    apply_optimizer_settings(opt2, sched2, cfg)              # unchanged config: bit for bit
    assert _lrs(sched2, opt2, 4) == expected

    opt3 = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched3 = make_scheduler(opt3, cfg, 8)
    opt3.load_state_dict(saved["optimizer"])
    sched3.load_state_dict(saved["scheduler"])
    apply_optimizer_settings(opt3, sched3, dataclasses.replace(cfg, learning_rate=0.2))
    assert _lrs(sched3, opt3, 4) == pytest.approx([2 * x for x in expected])


def test_resume_may_change_the_fields_declared_resumable():
    from rftengine.config import RESUME_TRAIN_KEYS

    assert set(RESUME_TRAIN_KEYS) == {"max_steps", "num_epochs", "save_every", "learning_rate", "weight_decay",
                                      "adam_betas", "max_grad_norm", "warmup_steps", "lr_scheduler",
                                      "max_skipped_steps", "eval_every", "eval_batch_size", "logging_steps"}



@pytest.mark.parametrize("cls", [RewardConfig, PPOConfig, DPOConfig])
def test_unknown_key_suggests_closest(cls):
    with pytest.raises(ValueError, match=r"unknown \w+Config key 'learning_rat'.*did you mean 'learning_rate'"):
        cls.from_dict({"learning_rat": 1e-5})


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys: .*learning_rate"):
        RewardConfig.from_dict({"zzzzzz": 1})


def test_from_dict_roundtrip_and_validation():
    cfg = PPOConfig.from_dict({"algorithm": "grpo", "group_size": 4, "adam_betas": [0.9, 0.95]})
    assert cfg.kl_estimator == "k3" and cfg.kl_in_loss is True and cfg.adam_betas == (0.9, 0.95)
    assert PPOConfig.from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="RewardConfig.learning_rate must be > 0"):
        config_from_dict(RewardConfig, {"learning_rate": 0})
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        RewardConfig(lr_scheduler="step")
    with pytest.raises(ValueError, match="expects a mapping"):
        RewardConfig.from_dict([("learning_rate", 1.0)])
