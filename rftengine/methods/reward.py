"""Reward-model training on preference pairs (Bradley-Terry) and the scorer that turns a trained
reward model into a ``reward_fn`` for PPO/GRPO/RLOO.

Loss (Ouyang et al. 2022, eq. 1): ``-log σ(r_c - r_r - margin)``, optionally plus the centering
term ``c·mean((r_c + r_r)²)`` that keeps scores near zero; computed by
``rftengine.ops.bradley_terry_loss``.

Three lines::

    config = RewardConfig(learning_rate=1e-4, num_epochs=3)
    result = train_reward_model(causal_lm, tokenizer, pairs, config)
    reward_fn = RewardScorer(result.model, tokenizer)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rftengine.methods.common import (
    Callback,
    CheckpointFn,
    TrainState,
    batch_indices,
    clip_and_step,
    config_from_dict,
    make_optimizer,
    make_scheduler,
    require_float,
    require_int,
    resume_state,
    should_checkpoint,
    to_floats,
    total_steps,
    validate_optim_fields,
)
from rftengine.methods.data import (
    PreferenceExample,
    SequenceBatch,
    collate_preferences,
    encode_preferences,
    encode_prompt,
    encode_response,
    make_sequence_batch,
    pad_token_id,
    require_eos,
)
from rftengine.methods.modeling import RewardModel


@dataclass
class RewardConfig:
    """Options of ``train_reward_model`` (validated on construction; ``from_dict`` rejects
    unknown keys).

    batch_size counts preference pairs per optimizer step (2·batch_size sequences).
    use_margin: subtract each pair's ``"margin"`` field inside the sigmoid (pairs without one
    get 0). center_coef: weight of the ``mean((r_c + r_r)²)`` centering term (None = off).
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    batch_size: int = 8
    num_epochs: int = 1
    max_steps: int | None = None
    max_prompt_length: int | None = 256
    max_response_length: int | None = 256
    use_margin: bool = False
    center_coef: float | None = None
    shuffle: bool = True
    seed: int = 0
    save_every: int = 0

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        validate_optim_fields(self)
        owner = type(self).__name__
        require_int(owner, "batch_size", self.batch_size, minimum=1)
        require_int(owner, "max_prompt_length", self.max_prompt_length, minimum=1, allow_none=True)
        require_int(owner, "max_response_length", self.max_response_length, minimum=1, allow_none=True)
        require_float(owner, "center_coef", self.center_coef, minimum=0.0, allow_none=True)
        if not isinstance(self.use_margin, bool):
            raise ValueError(f"{owner}.use_margin must be true or false, got {self.use_margin!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardConfig:
        return config_from_dict(cls, data)


@dataclass
class RewardResult:
    """What ``train_reward_model`` returns: the trained model, the final state (for resuming),
    per-step metrics and the pairwise accuracy on ``eval_pairs`` (or the training pairs)."""

    model: RewardModel
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)
    accuracy: float = float("nan")


def as_reward_model(model: nn.Module) -> RewardModel:
    """A RewardModel as is; a causal LM gets a value head; a classifier (num_labels=1) is wrapped."""
    return model if isinstance(model, RewardModel) else RewardModel(model)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _margins(examples: Sequence[PreferenceExample], device) -> torch.Tensor:
    return torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32, device=device)


def reward_loss(
    model: RewardModel,
    batch: SequenceBatch,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
):
    """Bradley-Terry loss on a pair batch (rows ``[0:B]`` chosen, ``[B:2B]`` rejected).

    Returns ``(loss, stats)``; stats (detached) hold ``loss``, ``accuracy`` (fraction of pairs
    with r_c > r_r), ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and what the
    op reports.
    """
    from rftengine.ops import bradley_terry_loss

    scores = model(batch.input_ids, batch.attention_mask)
    half = scores.shape[0] // 2
    r_chosen, r_rejected = scores[:half], scores[half:]
    loss, op_stats = bradley_terry_loss(r_chosen, r_rejected, margin=margin, center_coef=center_coef)
    stats = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in dict(op_stats).items()}
    with torch.no_grad():
        stats.update({
            "loss": loss.detach(),
            "accuracy": (r_chosen > r_rejected).float().mean(),
            "rewards/chosen": r_chosen.mean(),
            "rewards/rejected": r_rejected.mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
        })
    return loss, stats


def reward_step(
    model: RewardModel,
    optimizer: torch.optim.Optimizer,
    batch: SequenceBatch,
    config: RewardConfig,
    *,
    scheduler=None,
    margin: torch.Tensor | None = None,
) -> dict[str, float]:
    """One optimizer step of Bradley-Terry training; returns float metrics (plus grad_norm)."""
    model.train()
    loss, stats = reward_loss(model, batch, margin=margin, center_coef=config.center_coef)
    loss.backward()
    grad_norm = clip_and_step(
        [p for g in optimizer.param_groups for p in g["params"]], optimizer, scheduler, config.max_grad_norm
    )
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    stats["learning_rate"] = optimizer.param_groups[0]["lr"]
    return to_floats(stats)


@torch.no_grad()
def score_pairs(
    model: RewardModel, tokenizer, pairs: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
    max_prompt_length: int | None = None, max_response_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen [N], r_rejected [N])`` fp32 on CPU for preference pairs."""
    model = as_reward_model(model)
    was_training = model.training
    model.eval()
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=max_prompt_length,
                                  max_response_length=max_response_length)
    device, pad = _device(model), pad_token_id(tokenizer)
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_preferences(chunk, pad).to(device)
        scores = model(batch.input_ids, batch.attention_mask).float().cpu()
        chosen.append(scores[:len(chunk)])
        rejected.append(scores[len(chunk):])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def pairwise_accuracy(model: RewardModel, tokenizer, pairs: Sequence[Mapping[str, Any]], **kwargs) -> float:
    """Fraction of pairs the reward model ranks correctly (r_chosen > r_rejected)."""
    r_c, r_r = score_pairs(model, tokenizer, pairs, **kwargs)
    return float((r_c > r_r).float().mean())


def train_reward_model(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[Mapping[str, Any]],
    config: RewardConfig | None = None,
    *,
    eval_pairs: Sequence[Mapping[str, Any]] | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> RewardResult:
    """Train a scalar reward model on ``[{"prompt", "chosen", "rejected"[, "margin"]}, ...]``.

    Args:
        model: a ``RewardModel``, a causal LM (gets a new value head) or an
            ``AutoModelForSequenceClassification`` with ``num_labels=1``.
        tokenizer: its tokenizer (needs an EOS token; chat-message pairs need a chat template).
        pairs: preference pairs, plain strings or chat messages.
        config: ``RewardConfig`` (defaults if None).
        eval_pairs: pairs for the final accuracy (default: the training pairs).
        callback: ``callback(step, metrics)`` after each step (``loss``, ``accuracy``,
            ``rewards/chosen``, ``rewards/margins``, ...).
        state: a ``TrainState`` or its ``state_dict()`` to resume from (the model passed must
            hold the checkpoint's weights).
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end.
        progress: show a tqdm bar.
    """
    config = config or RewardConfig()
    require_eos(tokenizer)
    model = as_reward_model(model)
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=config.max_prompt_length,
                                  max_response_length=config.max_response_length)
    num_steps = total_steps(config, len(examples), config.batch_size)
    optimizer = make_optimizer(model.parameters(), config)
    scheduler = make_scheduler(optimizer, config, num_steps)
    train_state = resume_state(
        TrainState("reward", model=model, optimizer=optimizer, scheduler=scheduler), state
    )
    device, pad = _device(model), pad_token_id(tokenizer)
    history: list[dict[str, float]] = []
    bar = _progress(progress, num_steps, train_state.step, "reward model")
    while train_state.step < num_steps:
        idx = batch_indices(len(examples), config.batch_size, train_state.data_position,
                            config.seed, config.shuffle)
        chunk = [examples[i] for i in idx]
        batch = collate_preferences(chunk, pad).to(device)
        margin = _margins(chunk, device) if config.use_margin else None
        metrics = reward_step(model, optimizer, batch, config, scheduler=scheduler, margin=margin)
        train_state.step += 1
        train_state.data_position += len(idx)
        history.append(metrics)
        if callback is not None:
            callback(train_state.step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
        if checkpoint_fn is not None and should_checkpoint(config, train_state.step, num_steps):
            checkpoint_fn(train_state)
    if bar is not None:
        bar.close()
    model.eval()
    accuracy = pairwise_accuracy(model, tokenizer, eval_pairs if eval_pairs is not None else pairs,
                                 max_prompt_length=config.max_prompt_length,
                                 max_response_length=config.max_response_length)
    return RewardResult(model=model, state=train_state, history=history, accuracy=accuracy)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


class RewardScorer:
    """A trained reward model as a ``reward_fn(prompts, responses) -> Tensor[B]`` (fp32, CPU).

    Texts are tokenised with the reward model's own tokenizer, so the policy may use another.
    Extra keyword arguments (e.g. ``references=``) are accepted and ignored.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, batch_size: int = 16,
        max_prompt_length: int | None = None, max_response_length: int | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        require_eos(tokenizer)
        self.model = as_reward_model(model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], **_: Any) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"responses must have one entry per prompt ({len(prompts)}), got {len(responses)}")
        was_training = self.model.training
        self.model.eval()
        device, pad = _device(self.model), pad_token_id(self.tokenizer)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            p = prompts[start:start + self.batch_size]
            r = responses[start:start + self.batch_size]
            prompt_ids = [encode_prompt(self.tokenizer, x, self.max_prompt_length) for x in p]
            response_ids = [encode_response(self.tokenizer, x, self.max_response_length) for x in r]
            batch = make_sequence_batch(prompt_ids, response_ids, pad).to(device)
            out.append(self.model(batch.input_ids, batch.attention_mask).float().cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)
