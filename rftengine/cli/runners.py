"""One runner per method: load the method's data and models from a `Run`, call its train_*
function, return the trained model and a summary. `METHOD_RUNNERS` maps each method to its
config class and runner."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from rftengine import distributed
from rftengine.checkpoint import check_model_dir
from rftengine.cli.rewards import is_reward_model_dir, make_judge, reward_functions
from rftengine.cli.run import Run
from rftengine.datasets import load_preferences, load_prompt_rows
from rftengine.errors import UserError, as_user_error


@dataclass
class MethodRunner:
    config_class: Callable[[], type]
    run: Callable[[Run], tuple[object, dict]]


def _run_reward(run: Run):
    from rftengine.methods.modeling import load_causal_lm
    from rftengine.methods.reward import RewardModel, as_reward_model, train_reward_model

    pairs = load_preferences(run.cfg.data, run.tokenizer, split=run.cfg.data_split)
    eval_pairs = eval_data(run, pairs=True)
    path = check_model_dir(run.policy_path(), "checkpoint" if run.policy_path() != run.cfg.model else "model")

    def load(device):
        if is_reward_model_dir(path):
            return RewardModel.from_pretrained(path, dtype=run.dtype, device=device)
        # A new value head draws from the global RNG: seeded alike on every rank and in rebuild().
        return as_reward_model(load_causal_lm(path, dtype=run.dtype, device=device))

    with as_user_error(f"model {path}"):
        model = load(run.device)
    model = run.shard(model, trained=True, rebuild=lambda: load("cpu"))
    with as_user_error("method reward"):
        result = train_reward_model(
            model, run.tokenizer, pairs, run.method_config, callback=run.callback, state=run.resume_state,
            checkpoint_fn=run.checkpoint_fn, progress=run.cfg.progress, eval_data=eval_pairs,
        )
    return result.model, {"steps": result.state.step, "pair_accuracy": result.accuracy}


def prompt_data(run: Run, source: tuple[str, str] | None = None) -> list:
    """The prompt data of `data` (or of `source`: (path or id, split)): the prompts, or rows
    {"prompt", <column>: ...} when the data has other columns (`answer`, `reference` ...), which
    reach the reward functions (methods.rewards)."""
    spec, split = source or (run.cfg.data, run.cfg.data_split)
    rows = load_prompt_rows(spec, run.tokenizer, split=split)
    if all(len(row) == 1 for row in rows):
        return [row["prompt"] for row in rows]
    return rows


def eval_data(run: Run, pairs: bool):
    """The held-out data of `eval_data`/`eval_split` (`RunConfig.eval_source`): preference
    pairs (`pairs`) or prompt data; None when the run has none."""
    source = run.cfg.eval_source
    if source is None:
        return None
    return load_preferences(source[0], run.tokenizer, split=source[1]) if pairs else prompt_data(run, source)


def _run_ppo(run: Run):
    """ppo, grpo and rloo: PPOConfig.algorithm is the method."""
    from rftengine.methods.ppo import train_ppo

    prompts = prompt_data(run)
    eval_prompts = eval_data(run, pairs=False)
    reward_fn = reward_functions(run)
    policy = run.load_policy()
    cfg = run.method_config
    ref_model = run.reference_model(cfg.kl_coef > 0 or cfg.adaptive_kl)
    critic = None
    if cfg.algorithm == "ppo" and (distributed.is_sharded(policy) or (run.resume and run.resume.sharded)):
        critic = _sharded_critic(run, policy, cfg, f"method {run.cfg.method}")
    with as_user_error(f"method {run.cfg.method}"):
        result = train_ppo(
            policy, run.tokenizer, prompts, cfg, reward_fn=reward_fn, ref_model=ref_model, critic=critic,
            callback=run.callback, state=run.resume_state, checkpoint_fn=run.checkpoint_fn,
            progress=run.cfg.progress, eval_data=eval_prompts,
        )
    run.critic = result.context.critic if result.context is not None else None  # exported with the policy
    return result.policy, _last_metrics(result, ("reward", "kl", "loss"))


def _run_dpo(run: Run):
    from rftengine.methods.dpo import train_dpo

    pairs = load_preferences(run.cfg.data, run.tokenizer, split=run.cfg.data_split)
    eval_pairs = eval_data(run, pairs=True)
    policy = run.load_policy()
    cfg = run.method_config
    # A resumed run with precomputed reference log-probs has them in its state (the eval pairs'
    # too, when it evaluated as many): no reference model.
    cached = (run.resume.state.get("extra") or {}).get("eval_ref_logps") if run.resume else None
    eval_cached = eval_pairs is None or (cached is not None and len(cached) == len(eval_pairs))
    ref_model = run.reference_model(cfg.uses_reference and not (run.resume and cfg.precompute_ref and eval_cached))
    with as_user_error("method dpo"):
        result = train_dpo(
            policy, run.tokenizer, pairs, cfg, ref_model=ref_model, callback=run.callback,
            state=run.resume_state, checkpoint_fn=run.checkpoint_fn, progress=run.cfg.progress,
            eval_data=eval_pairs,
        )
    return result.policy, _last_metrics(result, ("loss", "rewards/accuracies", "rewards/margins"))


def _sharded_critic(run: Run, policy, ppo_cfg, where: str):
    """PPO's critic under torchrun (or resuming a sharded checkpoint), built by the CLI (ppo,
    rlaif, cai's RL stage) rather than by the method: sharded like the policy, so that the checkpoint restores it with the policy
    (`Run.restore_with_modules`); a sharded policy cannot be copied, so a separate critic's
    trunk is loaded anew (`Run.load_initial_model`)."""
    from rftengine.methods.ppo import make_critic

    with as_user_error(where):
        critic = make_critic(policy, ppo_cfg, run.load_initial_model() if ppo_cfg.critic == "separate" else None)
    run.restore_with_modules(policy, {"critic": critic})
    return critic


def _run_rlaif(run: Run):
    from rftengine.methods.rlaif import train_rlaif

    prompts = prompt_data(run)
    eval_prompts = eval_data(run, pairs=False)
    # Under torchrun the judge is replicated, not sharded: each rank judges its own rollouts in
    # no-grad forwards whose number varies per rank (FSDP would need every rank in each one),
    # at the cost of one full judge per rank in its load dtype.
    judge = make_judge(run, run.cfg.judge)
    policy = run.load_policy()
    ref_model = run.reference_model()
    cfg = run.method_config
    critic = None
    if cfg.algorithm == "ppo" and (distributed.is_sharded(policy) or (run.resume and run.resume.sharded)):
        critic = _sharded_critic(run, policy, cfg.ppo_config, "method rlaif")
    with as_user_error("method rlaif"):
        result = train_rlaif(
            policy, run.tokenizer, prompts, judge, run.method_config, ref_model=ref_model, critic=critic,
            callback=run.callback, state=run.resume_state, checkpoint_fn=run.checkpoint_fn,
            progress=run.cfg.progress, eval_data=eval_prompts,
        )
    run.critic = result.critic  # exported with the policy (output_dir/final/critic)
    return result.policy, _last_metrics(result, ("judge/score", "reward", "kl", "loss"))


def _run_cai(run: Run):
    from rftengine.methods.cai import train_cai
    from rftengine.methods.constitution import load_constitution

    if run.cfg.eval_source is not None:
        raise UserError(f"{run.config_path}: eval_data / eval_split are not supported for method cai yet "
                        "(its stages have no held-out evaluation); remove them")
    prompts = prompt_data(run)
    with as_user_error("constitution"):
        constitution = load_constitution(run.cfg.constitution)
    cfg = run.method_config
    judge = None
    if "rl" in cfg.stages:
        # Always the configured judge (default: the initial policy), never a copy of a resumed policy.
        judge = make_judge(run, run.cfg.judge or run.cfg.model, constitution)
    for stage in cfg.stages if distributed.is_distributed() else ():
        with as_user_error(f"{run.config_path}: train.{stage}"):  # before any generation
            distributed.require_divisible(getattr(cfg, f"{stage}_config").batch_size)
    ref_model = run.load_reference() if run.cfg.reference else None
    policy = run.load_policy()
    critic = None
    if run.resume is not None and run.resume.state.get("sharded_modules"):
        # a checkpoint of the RL stage with PPO's critic: handed to that stage, restored
        critic = _sharded_critic(run, policy, cfg.rl_config, "method cai")
    with as_user_error("method cai"):
        result = train_cai(
            policy, run.tokenizer, prompts, cfg, constitution=constitution, judge=judge, ref_model=ref_model,
            # under torchrun the stages' frozen copies are loaded anew: a sharded policy cannot be copied
            load_model=run.load_initial_model, critic=critic,
            callback=run.callback, state=run.resume_state, checkpoint_fn=run.checkpoint_fn,
            progress=run.cfg.progress,
        )
    summary = _last_metrics(result, ("loss", "rewards/accuracies", "reward"))
    summary.update(examples=len(result.examples), pairs=len(result.pairs))
    return result.policy, summary


def _last_metrics(result, keys) -> dict:
    summary = {"steps": result.state.step}
    if result.history:
        summary.update({f"last {k}": result.history[-1][k] for k in keys if k in result.history[-1]})
    return summary


def method_keys(method: str) -> list[str]:
    from rftengine.methods.config_base import config_keys

    return config_keys(METHOD_RUNNERS[method].config_class())  # TRL's names too


def _module_attr(module: str, name: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(f"rftengine.methods.{module}"), name)


METHOD_RUNNERS: dict[str, MethodRunner] = {
    "reward": MethodRunner(_module_attr("reward", "RewardConfig"), _run_reward),
    "ppo": MethodRunner(_module_attr("ppo", "PPOConfig"), _run_ppo),
    "grpo": MethodRunner(_module_attr("ppo", "PPOConfig"), _run_ppo),
    "rloo": MethodRunner(_module_attr("ppo", "PPOConfig"), _run_ppo),
    "dpo": MethodRunner(_module_attr("dpo", "DPOConfig"), _run_dpo),
    "rlaif": MethodRunner(_module_attr("rlaif", "RLAIFConfig"), _run_rlaif),
    "cai": MethodRunner(_module_attr("cai", "CAIConfig"), _run_cai),
}
