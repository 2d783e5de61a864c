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

from rftengine.methods.config_base import (
    ConfigBase,
    LengthFields,
    LogprobFields,
    LoopFields,
    OptimFields,
    option,
)
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
from rftengine.methods.packed import padding_fraction
from rftengine.methods.result import TrainResult


@dataclass
class SFTConfig(ConfigBase, LogprobFields, LengthFields, LoopFields, OptimFields):
    """Options of ``train_sft`` (validated on construction; ``from_dict`` rejects unknown keys).

    batch_size counts (prompt, response) examples per optimizer step (per process), split into
    micro-batches of ``micro_batch_size`` or into ``gradient_accumulation_steps`` equal ones;
    the loss stays the token mean of the whole step. precision, gradient_checkpointing: see
    ``rftengine.methods.config_base.PRECISIONS`` and ``enable_gradient_checkpointing``.
    The shared fields (optimizer, loop, precision, memory) are declared once in
    ``methods.config_base``; ``rftengine train --help-config METHOD`` lists every field.
    """


    def validate(self):
        validate_micro_batches(self, self.batch_size)


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


def sft_loss(policy: nn.Module, batch: SequenceBatch, *, chunk_size: int | None = None, packing: bool = False):
    """Token-mean NLL of the response tokens of ``batch`` (``packing``: padding-free trunk).

    Returns ``(loss, stats)``; stats (detached): ``loss``, ``logps/mean`` (mean per-token
    log-prob), ``completions/mean_length`` (mean response tokens per row, TRL's name for the
    length of the completion part).
    """
    logp = response_logprobs(policy, batch, chunk_size=chunk_size, packing=packing)  # [N, T] fp32, 0 at pads
    mask = batch.response_mask
    n_tokens = mask.sum().clamp(min=1)
    loss = -(logp * mask).sum() / n_tokens
    stats = {
        "loss": loss.detach(),
        "logps/mean": -loss.detach(),
        "completions/mean_length": mask.sum(-1).float().mean(),
    }
    return loss, stats


def sft_step(
    policy: nn.Module, optimizer: torch.optim.Optimizer, batch: SequenceBatch, config: SFTConfig,
    *, scheduler=None, state: TrainState | None = None,
) -> dict[str, float]:
    """One optimizer step of SFT on ``batch``; returns float metrics (plus grad_norm,
    learning_rate, ``train/skipped_steps``: a non-finite step is skipped and counted in
    ``state``, and ``train/padding_fraction`` of the padded batch)."""
    policy.train()
    tokens = global_count(batch.response_mask.sum())
    rows_total = global_count(batch.num_rows)

    def micro_loss(rows: torch.Tensor):
        mb = batch.select(rows.to(batch.input_ids.device))
        loss, stats = sft_loss(policy, mb, chunk_size=config.logprob_chunk_size, packing=config.packing)
        # token-mean over the whole step: each micro-batch's mean weighted by its token share
        share = mb.response_mask.sum() / tokens.to(loss.device)
        stats = {k: v * share for k, v in stats.items() if k != "completions/mean_length"}
        stats["completions/mean_length"] = mb.response_mask.sum(-1).float().sum() / rows_total.to(loss.device)
        return loss * share, stats

    stats = accumulated_step(split_rows(batch.num_rows, micro_batch_rows(config, batch.num_rows)), micro_loss,
                             optimizer, scheduler, config, device=batch.input_ids.device, state=state)
    stats["train/padding_fraction"] = float(padding_fraction(batch.attention_mask))
    return stats


def train_sft(
    policy: nn.Module,
    tokenizer,
    data: Sequence[Mapping[str, Any]],
    config: SFTConfig | None = None,
    *,
    eval_data: Sequence[Mapping[str, Any]] | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> TrainResult:
    """Finetune ``policy`` in place on ``[{"prompt", "response"}, ...]``.

    Args:
        policy: causal LM (dropout switched off); its trainable weights are first cast to the
            dtype of ``config.precision`` (fp32 master weights under the mixed precisions).
        tokenizer: needs an EOS token (appended to every response).
        data: examples, plain strings or chat messages.
        config: ``SFTConfig`` (defaults if None).
        eval_data: held-out examples: the token-mean NLL on them, without grad, as
            ``eval/loss`` (and ``eval/logps/mean``) every ``config.eval_every`` steps and after
            the last (``rftengine.methods.evaluation``).
        callback: ``callback(step, metrics)`` after each step.
        state: a ``TrainState`` or its ``state_dict()`` to resume from.
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end.
        progress: show a tqdm bar.
    """
    config = config or SFTConfig()
    if not isinstance(config, SFTConfig):
        raise ValueError(f"config must be an SFTConfig, got {type(config).__name__}")
    require_eos(tokenizer)
    check_trainable_model(policy, tokenizer, config.precision)
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

    evaluate = None
    if eval_data is not None:
        from rftengine.methods.evaluation import example_evaluator

        eval_examples = encode_sft_examples(tokenizer, eval_data, max_prompt_length=config.max_prompt_length,
                                            max_response_length=config.max_response_length)
        require_example_positions(policy, eval_examples)

        def eval_stats(batch, idx):
            _, stats = sft_loss(policy, batch, chunk_size=config.logprob_chunk_size, packing=config.packing)
            tokens = batch.response_mask.sum()      # the loss is a token mean
            return {"loss": (stats["loss"], tokens), "logps/mean": (stats["logps/mean"], tokens)}

        evaluate = example_evaluator(
            policy, eval_examples, lambda ex: make_sequence_batch([e[0] for e in ex], [e[1] for e in ex], pad),
            config, eval_stats)

    history = train_loop(train_state, config, num_steps, len(examples), run_step, callback=callback,
                         checkpoint_fn=checkpoint_fn, progress=progress, desc="sft", postfix={"loss": "loss"},
                         evaluate=evaluate)
    policy.eval()
    return TrainResult(model=policy, state=train_state, history=history)
