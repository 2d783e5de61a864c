"""Supervised finetuning on (prompt, response) pairs: the SFT stage of Constitutional AI (on the
critiqued revisions) and of the demo.

Loss: the mean negative log-likelihood of the response tokens (EOS included), prompt and pad
positions masked out, through the fused lm-head op (no ``[N, T, V]`` logits stored)::

    loss = -Σ_{n,t} mask[n,t] · log p(y[n,t] | y[n,<t], x[n]) / Σ mask

Three lines::

    data = [{"prompt": "q: 2+2 =", "response": " 4"}, ...]
    result = train_sft(policy, tokenizer, data, SFTConfig(learning_rate=1e-4, num_epochs=2))
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
    config_from_dict,
    make_train_state,
    optimizer_step,
    require_int,
    total_steps,
    train_loop,
    validate_optim_fields,
)
from rftengine.methods.data import (
    SequenceBatch,
    encode_prompt,
    encode_response,
    make_sequence_batch,
    pad_token_id,
    render_response,
    require_eos,
)
from rftengine.methods.modeling import (
    check_trainable_model,
    device_of,
    disable_dropout,
    require_example_positions,
    response_logprobs,
)


@dataclass
class SFTConfig:
    """Options of ``train_sft`` (validated on construction; ``from_dict`` rejects unknown keys).

    batch_size counts (prompt, response) examples per optimizer step.
    max_skipped_steps: optimizer steps with a non-finite loss or gradient norm are skipped and
    counted (``train/skipped_steps``); this many in a row stop the run (``NonFiniteStepError``).
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    max_skipped_steps: int = 3
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    batch_size: int = 8
    num_epochs: int = 1
    max_steps: int | None = None
    shuffle: bool = True
    max_prompt_length: int | None = 256
    max_response_length: int | None = 256
    logprob_chunk_size: int | None = None
    seed: int = 0
    save_every: int = 0

    def __post_init__(self):
        owner = type(self).__name__
        validate_optim_fields(self)
        require_int(owner, "max_prompt_length", self.max_prompt_length, minimum=1, allow_none=True)
        require_int(owner, "max_response_length", self.max_response_length, minimum=1, allow_none=True)
        require_int(owner, "logprob_chunk_size", self.logprob_chunk_size, minimum=1, allow_none=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTConfig:
        return config_from_dict(cls, data)


@dataclass
class SFTResult:
    """What ``train_sft`` returns: the trained policy, the final state and per-step metrics."""

    policy: nn.Module
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)


def encode_sft_examples(
    tokenizer, data: Sequence[Mapping[str, Any]], *,
    max_prompt_length: int | None = None, max_response_length: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """``[{"prompt", "response"}, ...]`` (strings or chat messages) -> (prompt ids, response ids
    with EOS). Errors name the example index and the missing field."""
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise ValueError(f"SFT example {i} must be a dict with 'prompt' and 'response', got {type(item).__name__}")
        for key in ("prompt", "response"):
            if key not in item:
                raise ValueError(f"SFT example {i} has no {key!r} field (keys: {sorted(item)})")
        prompt = item["prompt"]
        out.append((
            encode_prompt(tokenizer, prompt, max_prompt_length),
            encode_response(tokenizer, render_response(tokenizer, prompt, item["response"]), max_response_length),
        ))
    if not out:
        raise ValueError("SFT data must hold at least one example, got 0")
    return out


def sft_loss(policy: nn.Module, batch: SequenceBatch, *, chunk_size: int | None = None):
    """Token-mean NLL of the response tokens of ``batch``.

    Returns ``(loss, stats)``; stats (detached): ``loss``, ``logps/mean`` (mean per-token
    log-prob), ``response_length`` (mean response tokens per row).
    """
    logp = response_logprobs(policy, batch, chunk_size=chunk_size)      # [N, T] fp32, 0 at pads
    mask = batch.response_mask
    n_tokens = mask.sum().clamp(min=1)
    loss = -(logp * mask).sum() / n_tokens
    stats = {
        "loss": loss.detach(),
        "logps/mean": -loss.detach(),
        "response_length": mask.sum(-1).float().mean(),
    }
    return loss, stats


def sft_step(
    policy: nn.Module, optimizer: torch.optim.Optimizer, batch: SequenceBatch, config: SFTConfig,
    *, scheduler=None, state: TrainState | None = None,
) -> dict[str, float]:
    """One optimizer step of SFT on ``batch``; returns float metrics (plus grad_norm,
    learning_rate and ``train/skipped_steps``: a non-finite step is skipped and counted in
    ``state``)."""
    policy.train()
    loss, stats = sft_loss(policy, batch, chunk_size=config.logprob_chunk_size)
    return optimizer_step(loss, stats, optimizer, scheduler, config.max_grad_norm, state=state,
                          max_skipped_steps=config.max_skipped_steps)


def train_sft(
    policy: nn.Module,
    tokenizer,
    data: Sequence[Mapping[str, Any]],
    config: SFTConfig | None = None,
    *,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> SFTResult:
    """Finetune ``policy`` in place on ``[{"prompt", "response"}, ...]``.

    Args:
        policy: causal LM (dropout switched off).
        tokenizer: needs an EOS token (appended to every response).
        data: examples, plain strings or chat messages.
        config: ``SFTConfig`` (defaults if None).
        callback: ``callback(step, metrics)`` after each step.
        state: a ``TrainState`` or its ``state_dict()`` to resume from.
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end.
        progress: show a tqdm bar.
    """
    config = config or SFTConfig()
    if not isinstance(config, SFTConfig):
        raise ValueError(f"config must be an SFTConfig, got {type(config).__name__}")
    require_eos(tokenizer)
    check_trainable_model(policy, tokenizer)
    disable_dropout(policy)
    examples = encode_sft_examples(tokenizer, data, max_prompt_length=config.max_prompt_length,
                                   max_response_length=config.max_response_length)
    require_example_positions(policy, examples)
    num_steps = total_steps(config, len(examples), config.batch_size)
    train_state = make_train_state("sft", policy, config, num_steps, state)
    device, pad = device_of(policy), pad_token_id(tokenizer)

    def run_step(idx: list[int]) -> dict[str, float]:
        batch = make_sequence_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad)
        return sft_step(policy, train_state.optimizer, batch.to(device), config, scheduler=train_state.scheduler,
                        state=train_state)

    history = train_loop(train_state, config, num_steps, len(examples), run_step, callback=callback,
                         checkpoint_fn=checkpoint_fn, progress=progress, desc="sft", postfix={"loss": "loss"})
    policy.eval()
    return SFTResult(policy=policy, state=train_state, history=history)
