"""Direct Preference Optimization on offline preference pairs (Rafailov et al. 2023) and its
variants (IPO, hinge, robust/cDPO label smoothing, length-normalised SimPO-style), all through
the fused head ``rftengine.ops.fused_dpo_loss``: chosen and rejected responses of a pair batch in
one call, no ``[2B, T, V]`` logits stored.

``loss = -log σ(β·[(π_c - ref_c) - (π_r - ref_r)])`` for loss_type "sigmoid", with sequence
log-probs summed over response tokens (EOS included).

Reference log-probs are precomputed once before training (``precompute_ref=True``, the
default: the reference model is then not needed during training and the cache is kept in the
TrainState, so a resumed run needs no reference at all) or computed on the fly from the frozen
reference each step.

Three lines::

    result = train_dpo(policy, tokenizer, pairs, DPOConfig(beta=0.1, learning_rate=5e-6))
    print(result.history[-1]["rewards/accuracies"])
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
    require_choice,
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
    pad_token_id,
    require_eos,
)
from rftengine.methods.modeling import Reference, disable_dropout, output_head, response_hidden, response_logprobs
from rftengine.ops.preference import DPO_LOSS_TYPES


def dpo_loss_types() -> tuple[str, ...]:
    """The loss_type values ``rftengine.ops.dpo_loss`` / ``fused_dpo_loss`` accept."""
    return tuple(DPO_LOSS_TYPES)


@dataclass
class DPOConfig:
    """Options of ``train_dpo`` (validated on construction; ``from_dict`` rejects unknown keys).

    beta: β > 0, the inverse temperature of the implicit reward ``β·(π - ref)``.
    loss_type: one of ``dpo_loss_types()`` (sigmoid, ipo, hinge, robust, simpo).
    label_smoothing: the assumed label-noise rate ε: [0, 0.5] for "sigmoid"/"simpo" (cDPO),
    [0, 0.5) for "robust", 0 for "ipo"/"hinge".
    simpo_gamma: the target margin γ of the length-normalised "simpo" loss (ignored otherwise).
    length_normalized: divide sequence log-probs by their token counts (None: True for
    "simpo" only; "ipo" accepts either, TRL's IPO uses True).
    precompute_ref: cache reference sequence log-probs once before training (True) or run
    the reference every step (False).
    batch_size: pairs per optimizer step.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    length_normalized: bool | None = None
    precompute_ref: bool = True
    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    # data and loop
    batch_size: int = 8
    num_epochs: int = 1
    max_steps: int | None = None
    shuffle: bool = True
    max_prompt_length: int | None = 256
    max_response_length: int | None = 256
    ref_batch_size: int = 16
    logprob_chunk_size: int | None = None
    seed: int = 0
    save_every: int = 0

    def __post_init__(self):
        owner = type(self).__name__
        self.adam_betas = tuple(self.adam_betas)
        require_float(owner, "beta", self.beta, minimum=0.0, strict_min=True)
        require_choice(owner, "loss_type", self.loss_type, dpo_loss_types())
        require_float(owner, "label_smoothing", self.label_smoothing, minimum=0.0, maximum=0.5)
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing != 0:
            raise ValueError(
                f"{owner}.label_smoothing must be 0 for loss_type={self.loss_type!r}, got {self.label_smoothing}"
            )
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise ValueError(f"{owner}.label_smoothing must be < 0.5 for loss_type='robust', got {self.label_smoothing}")
        require_float(owner, "simpo_gamma", self.simpo_gamma, minimum=0.0)
        validate_optim_fields(self)
        require_int(owner, "batch_size", self.batch_size, minimum=1)
        require_int(owner, "ref_batch_size", self.ref_batch_size, minimum=1)
        require_int(owner, "max_prompt_length", self.max_prompt_length, minimum=1, allow_none=True)
        require_int(owner, "max_response_length", self.max_response_length, minimum=1, allow_none=True)
        require_int(owner, "logprob_chunk_size", self.logprob_chunk_size, minimum=1, allow_none=True)
        if self.length_normalized is not None:
            if not isinstance(self.length_normalized, bool):
                raise ValueError(f"{owner}.length_normalized must be true, false or null, got {self.length_normalized!r}")
            if self.length_normalized != (self.loss_type == "simpo") and self.loss_type != "ipo":
                raise ValueError(
                    f"{owner}.length_normalized={self.length_normalized} is not available for "
                    f"loss_type={self.loss_type!r} (only 'ipo' accepts both)"
                )
        for name in ("precompute_ref", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DPOConfig:
        return config_from_dict(cls, data)

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"


@dataclass
class DPOResult:
    """What ``train_dpo`` returns: the trained policy, the final state (reference cache
    included) and per-step metrics."""

    policy: nn.Module
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def precompute_reference_logps(
    reference: Reference,
    examples: Sequence[PreferenceExample],
    pad_id: int,
    *,
    batch_size: int = 16,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Reference sequence log-probs of every pair: ``[N, 2]`` fp32 on CPU, columns (chosen,
    rejected), each the sum over response tokens (EOS included)."""
    device = _device(reference.model)
    out = []
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch", dynamic_ncols=True)
    for start in starts:
        chunk = examples[start:start + batch_size]
        batch = collate_preferences(chunk, pad_id).to(device)
        seq = reference.logprobs(batch, chunk_size=chunk_size).sum(-1).float().cpu()
        out.append(torch.stack([seq[:len(chunk)], seq[len(chunk):]], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def dpo_batch_loss(
    policy: nn.Module,
    batch: SequenceBatch,
    config: DPOConfig,
    *,
    ref_logps: torch.Tensor | None = None,
    reference: Reference | None = None,
):
    """DPO loss of a pair batch (rows ``[0:B]`` chosen, ``[B:2B]`` rejected).

    The reference comes from ``ref_logps`` (``[B, 2]`` cached sequence log-probs) or from
    ``reference`` (its hidden states go to the fused op, computed without grad); "simpo" needs
    neither. Returns ``(loss, stats)`` with ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``loss``.
    """
    from rftengine.ops import fused_dpo_loss

    hidden = response_hidden(policy, batch)
    weight, bias = output_head(policy)
    kwargs: dict[str, Any] = {}
    if config.uses_reference:
        if ref_logps is not None:
            ref = ref_logps.to(hidden.device, torch.float32)
            kwargs["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        elif reference is not None:
            ref_hidden, ref_weight, ref_bias = reference.hidden_and_head(batch)
            kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        else:
            raise ValueError(f"loss_type={config.loss_type!r} needs ref_logps or a reference model")
    loss, op_stats = fused_dpo_loss(
        hidden, weight, batch.response_ids, batch.response_mask,
        bias=bias, beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
        gamma=config.simpo_gamma if config.loss_type == "simpo" else 0.0,
        length_normalized=config.length_normalized,
        **({"chunk_size": config.logprob_chunk_size} if config.logprob_chunk_size else {}),
        **kwargs,
    )
    stats = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in dict(op_stats).items()}
    stats["loss"] = loss.detach()
    return loss, stats


def dpo_step(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: SequenceBatch,
    config: DPOConfig,
    *,
    ref_logps: torch.Tensor | None = None,
    reference: Reference | None = None,
    scheduler=None,
) -> dict[str, float]:
    """One optimizer step of DPO on a pair batch; returns float metrics (see
    ``dpo_batch_loss``) plus ``grad_norm`` and ``learning_rate``."""
    policy.train()
    loss, stats = dpo_batch_loss(policy, batch, config, ref_logps=ref_logps, reference=reference)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = clip_and_step(params, optimizer, scheduler, config.max_grad_norm)
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    stats["learning_rate"] = optimizer.param_groups[0]["lr"]
    return to_floats(stats)


def train_dpo(
    policy: nn.Module,
    tokenizer,
    pairs: Sequence[Mapping[str, Any]],
    config: DPOConfig | None = None,
    *,
    ref_model: nn.Module | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> DPOResult:
    """Train ``policy`` in place with DPO on ``[{"prompt", "chosen", "rejected"}, ...]``.

    Args:
        policy: causal LM (dropout switched off).
        tokenizer: needs an EOS token; chat-message pairs need a chat template.
        pairs: preference pairs, plain strings or chat messages.
        config: ``DPOConfig`` (defaults if None).
        ref_model: the reference; default a frozen copy of ``policy`` as given (adapters off
            for PEFT). Not needed when resuming a run with ``precompute_ref`` (the cache is in
            the state).
        callback: ``callback(step, metrics)`` after each step.
        state: a ``TrainState`` or its ``state_dict()`` to resume from.
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end.
        progress: tqdm bars for the reference pass and the steps.
    """
    config = config or DPOConfig()
    require_eos(tokenizer)
    disable_dropout(policy)
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=config.max_prompt_length,
                                  max_response_length=config.max_response_length)
    num_steps = total_steps(config, len(examples), config.batch_size)
    optimizer = make_optimizer(policy.parameters(), config)
    scheduler = make_scheduler(optimizer, config, num_steps)
    train_state = resume_state(
        TrainState("dpo", model=policy, optimizer=optimizer, scheduler=scheduler), state
    )
    pad = pad_token_id(tokenizer)
    ref_logps = train_state.extra.get("ref_logps")
    if ref_logps is not None and tuple(ref_logps.shape) != (len(examples), 2):
        raise ValueError(
            f"the resumed state caches reference log-probs for {ref_logps.shape[0]} pairs, "
            f"but {len(examples)} pairs were given"
        )
    reference = None
    if config.uses_reference and (ref_logps is None or not config.precompute_ref):
        reference = Reference(policy, ref_model)
        if config.precompute_ref:
            ref_logps = precompute_reference_logps(
                reference, examples, pad, batch_size=config.ref_batch_size,
                chunk_size=config.logprob_chunk_size, progress=progress,
            )
            train_state.extra["ref_logps"] = ref_logps
            reference = None  # the copy is no longer needed; free it
    device = _device(policy)
    history: list[dict[str, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=train_state.step, desc="dpo", unit="step", dynamic_ncols=True)
    while train_state.step < num_steps:
        idx = batch_indices(len(examples), config.batch_size, train_state.data_position,
                            config.seed, config.shuffle)
        batch = collate_preferences([examples[i] for i in idx], pad).to(device)
        metrics = dpo_step(
            policy, optimizer, batch, config, scheduler=scheduler, reference=reference,
            ref_logps=ref_logps[idx] if (ref_logps is not None and config.uses_reference) else None,
        )
        train_state.step += 1
        train_state.data_position += len(idx)
        history.append(metrics)
        if callback is not None:
            callback(train_state.step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies', 0):.2f}")
        if checkpoint_fn is not None and should_checkpoint(config, train_state.step, num_steps):
            checkpoint_fn(train_state)
    if bar is not None:
        bar.close()
    policy.eval()
    return DPOResult(policy=policy, state=train_state, history=history)


@torch.no_grad()
def sequence_logps(
    model: nn.Module, tokenizer, pairs: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
    max_prompt_length: int | None = None, max_response_length: int | None = None,
) -> torch.Tensor:
    """``[N, 2]`` fp32 CPU summed log-probs of (chosen, rejected) under ``model``."""
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=max_prompt_length,
                                  max_response_length=max_response_length)
    device, pad = _device(model), pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_preferences(chunk, pad).to(device)
        seq = response_logprobs(model, batch).sum(-1).float().cpu()
        out.append(torch.stack([seq[:len(chunk)], seq[len(chunk):]], dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def preference_accuracy(
    policy: nn.Module, tokenizer, pairs: Sequence[Mapping[str, Any]], *,
    ref_model: nn.Module | None = None, **kwargs,
) -> float:
    """Fraction of pairs the policy prefers correctly.

    With ``ref_model``: the DPO implicit reward, ``(π_c - ref_c) > (π_r - ref_r)`` (strict:
    a policy equal to its reference scores 0). Without: ``π_c > π_r`` on summed log-probs.
    """
    pol = sequence_logps(policy, tokenizer, pairs, **kwargs)
    margin = pol[:, 0] - pol[:, 1]
    if ref_model is not None:
        ref = sequence_logps(ref_model, tokenizer, pairs, **kwargs)
        margin = margin - (ref[:, 0] - ref[:, 1])
    return float((margin > 0).float().mean())
