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

from rftengine.methods.config_base import ConfigBase, LengthFields, LoopFields, OptimFields, option
from rftengine.methods.data_order import total_steps
from rftengine.methods.loop import Callback, CheckpointFn, train_loop
from rftengine.methods.optimization import (
    accumulated_step,
    global_count,
    make_train_state,
    micro_batch_rows,
    split_rows,
    validate_micro_batches,
)
from rftengine.methods.train_state import TrainState
from rftengine.methods.data import (
    PreferenceExample,
    SequenceBatch,
    collate_preferences,
    encode_preferences,
    encode_prompt,
    encode_response,
    make_sequence_batch,
    pad_token_id,
    pair_values,
    require_eos,
)
from rftengine.methods.modeling import (
    RewardModel,
    check_trainable_model,
    device_of,
    eval_mode,
    require_example_positions,
)
from rftengine.methods.packed import padding_fraction
from rftengine.methods.result import TrainResult


@dataclass
class RewardConfig(ConfigBase, LengthFields, LoopFields, OptimFields):
    """Options of ``train_reward_model`` (validated on construction; ``from_dict`` rejects
    unknown keys).

    batch_size counts preference pairs per optimizer step (2·batch_size sequences, per
    process), split into micro-batches of ``micro_batch_size`` pairs or into
    ``gradient_accumulation_steps`` equal ones. precision, gradient_checkpointing: see
    ``rftengine.methods.config_base.PRECISIONS`` and ``enable_gradient_checkpointing``.
    use_margin: subtract each pair's ``"margin"`` field inside the sigmoid (pairs without one
    get 0). center_coef: weight of the ``mean((r_c + r_r)²)`` centering term (None = off).
    The shared fields (optimizer, loop, precision, memory) are declared once in
    ``methods.config_base``; ``rftengine train --help-config METHOD`` lists every field.
    """

    use_margin: bool = option(False, "subtract each pair's \"margin\" field inside the sigmoid")
    center_coef: float | None = option(None, "weight of the mean((r_c + r_r)^2) centering term (null: off)",
                                       min=0.0)

    def validate(self):
        validate_micro_batches(self, self.batch_size)


def as_reward_model(model: nn.Module) -> RewardModel:
    """A RewardModel as is; a causal LM gets a value head; a classifier (num_labels=1) is wrapped."""
    return model if isinstance(model, RewardModel) else RewardModel(model)


def _margins(examples: Sequence[PreferenceExample], device) -> torch.Tensor:
    return torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32, device=device)


def reward_loss(
    model: RewardModel,
    batch: SequenceBatch,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
    packing: bool = False,
):
    """Bradley-Terry loss on a pair batch (rows ``[0:B]`` chosen, ``[B:2B]`` rejected);
    ``packing``: padding-free trunk forward.

    Returns ``(loss, stats)``; stats (detached) hold ``loss``, ``accuracy`` (fraction of pairs
    with r_c > r_r), ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and what the
    op reports.
    """
    from rftengine.ops import bradley_terry_loss

    scores = model(batch.input_ids, batch.attention_mask, packing=packing)
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
    state: TrainState | None = None,
) -> dict[str, float]:
    """One optimizer step of Bradley-Terry training; returns float metrics (plus grad_norm,
    ``train/skipped_steps``: a non-finite step is skipped and counted in ``state``, and
    ``train/padding_fraction`` of the padded batch)."""
    model.train()
    pairs = batch.num_rows // 2
    total = global_count(pairs)

    def micro_loss(rows: torch.Tensor):
        both = torch.cat([rows, rows + pairs]).to(batch.input_ids.device)
        mb_margin = margin[rows.to(margin.device)] if isinstance(margin, torch.Tensor) else margin
        loss, stats = reward_loss(model, batch.select(both), margin=mb_margin, center_coef=config.center_coef,
                                  packing=config.packing)
        share = len(rows) / total     # every term is a mean over pairs
        return loss * share, {k: v * share for k, v in stats.items()}

    stats = accumulated_step(split_rows(pairs, micro_batch_rows(config, pairs)), micro_loss, optimizer, scheduler,
                             config, device=batch.input_ids.device, state=state)
    stats["train/padding_fraction"] = float(padding_fraction(batch.attention_mask))
    return stats


@torch.no_grad()
def score_pairs(
    model: RewardModel, tokenizer, pairs: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
    max_prompt_length: int | None = None, max_response_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen [N], r_rejected [N])`` fp32 on CPU for preference pairs."""
    model = as_reward_model(model)
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=max_prompt_length,
                                  max_response_length=max_response_length)
    with eval_mode(model):
        scores = pair_values(examples, pad_token_id(tokenizer), lambda b: model(b.input_ids, b.attention_mask),
                             batch_size=batch_size, device=device_of(model))
    r_chosen, r_rejected = scores.T.contiguous()
    return r_chosen, r_rejected


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
    eval_data: Sequence[Mapping[str, Any]] | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a scalar reward model on ``[{"prompt", "chosen", "rejected"[, "margin"]}, ...]``.

    Args:
        model: a ``RewardModel``, a causal LM (gets a new value head) or an
            ``AutoModelForSequenceClassification`` with ``num_labels=1``; its trainable weights
            are first cast to the dtype of ``config.precision`` (fp32 under the mixed precisions).
        tokenizer: its tokenizer (needs an EOS token; chat-message pairs need a chat template).
        pairs: preference pairs, plain strings or chat messages.
        config: ``RewardConfig`` (defaults if None).
        eval_pairs: pairs for the final accuracy (default: ``eval_data``, else the training pairs).
        eval_data: held-out pairs: the loss and pair accuracy on them, without grad, as
            ``eval/loss``, ``eval/accuracy``, ``eval/rewards/margins`` ... every
            ``config.eval_every`` steps and after the last (``rftengine.methods.evaluation``).
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
    check_trainable_model(model, tokenizer, config.precision)
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=config.max_prompt_length,
                                  max_response_length=config.max_response_length)
    require_example_positions(model, examples)
    num_steps = total_steps(config, len(examples), config.batch_size)
    train_state = make_train_state("reward", model, config, num_steps, state)
    device, pad = device_of(model), pad_token_id(tokenizer)

    def run_step(idx: list[int]) -> dict[str, float]:
        chunk = [examples[i] for i in idx]
        margin = _margins(chunk, device) if config.use_margin else None
        return reward_step(model, train_state.optimizer, collate_preferences(chunk, pad).to(device), config,
                           scheduler=train_state.scheduler, margin=margin, state=train_state)

    evaluate = None
    if eval_data is not None:
        from rftengine.methods.evaluation import example_evaluator

        eval_examples = encode_preferences(tokenizer, eval_data, max_prompt_length=config.max_prompt_length,
                                           max_response_length=config.max_response_length)
        require_example_positions(model, eval_examples)

        def eval_stats(batch, idx):
            margin = _margins([eval_examples[i] for i in idx], device) if config.use_margin else None
            _, stats = reward_loss(model, batch, margin=margin, center_coef=config.center_coef, packing=config.packing)
            return {key: (value, len(idx)) for key, value in stats.items()}

        evaluate = example_evaluator(model, eval_examples, lambda ex: collate_preferences(ex, pad), config, eval_stats)

    history = train_loop(train_state, config, num_steps, len(examples), run_step, callback=callback,
                         checkpoint_fn=checkpoint_fn, progress=progress, desc="reward model",
                         postfix={"loss": "loss", "acc": "accuracy"}, evaluate=evaluate)
    model.eval()
    if eval_pairs is None:
        eval_pairs = eval_data if eval_data is not None else pairs
    accuracy = pairwise_accuracy(model, tokenizer, eval_pairs,
                                 max_prompt_length=config.max_prompt_length,
                                 max_response_length=config.max_response_length)
    return TrainResult(model=model, state=train_state, history=history, accuracy=accuracy)


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
        device, pad = device_of(self.model), pad_token_id(self.tokenizer)
        out = []
        with eval_mode(self.model):
            for start in range(0, len(prompts), self.batch_size):
                p = prompts[start:start + self.batch_size]
                r = responses[start:start + self.batch_size]
                prompt_ids = [encode_prompt(self.tokenizer, x, self.max_prompt_length) for x in p]
                response_ids = [encode_response(self.tokenizer, x, self.max_response_length) for x in r]
                batch = make_sequence_batch(prompt_ids, response_ids, pad).to(device)
                out.append(self.model(batch.input_ids, batch.attention_mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
