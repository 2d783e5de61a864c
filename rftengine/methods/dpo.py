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
from typing import Any, Literal

import torch
from torch import nn

from rftengine.methods.config_base import (
    ConfigBase,
    LengthFields,
    LogprobFields,
    LoopFields,
    OptimFields,
    option,
    redefault,
)
from rftengine.methods.data_order import total_steps
from rftengine.methods.loop import Callback, CheckpointFn, track, train_loop
from rftengine.methods.optimization import (
    accumulated_step,
    global_count,
    make_train_state,
    micro_batch_rows,
    split_rows,
    validate_micro_batches,
)
from rftengine.methods.precision import frozen_dtype
from rftengine.methods.train_state import TrainState
from rftengine.methods.data import (
    PreferenceExample,
    SequenceBatch,
    collate_preferences,
    encode_preferences,
    pad_token_id,
    pair_values,
    require_eos,
)
from rftengine.methods.modeling import (
    Reference,
    check_trainable_model,
    device_of,
    disable_dropout,
    eval_mode,
    output_head,
    require_example_positions,
    response_hidden,
    response_logprobs,
)
from rftengine.methods.packed import padding_fraction
from rftengine.methods.result import TrainResult
from rftengine.ops.preference import DPO_LOSS_TYPES


def dpo_loss_types() -> tuple[str, ...]:
    """The loss_type values ``rftengine.ops.dpo_loss`` / ``fused_dpo_loss`` accept."""
    return tuple(DPO_LOSS_TYPES)


@dataclass
class DPOConfig(ConfigBase, LogprobFields, LengthFields, LoopFields, OptimFields):
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
    batch_size: pairs per optimizer step (per process), split into micro-batches of
    ``micro_batch_size`` pairs or into ``gradient_accumulation_steps`` equal ones.
    precision, gradient_checkpointing: see ``rftengine.methods.config_base.PRECISIONS`` and
    ``enable_gradient_checkpointing``.
    The shared fields (optimizer, loop, precision, memory) are declared once in
    ``methods.config_base``; ``rftengine train --help-config METHOD`` lists every field.
    """

    beta: float = option(0.1, "inverse temperature β of the implicit reward", min=0.0, exclusive_min=True)
    loss_type: Literal[DPO_LOSS_TYPES] = option("sigmoid", "the preference loss")
    label_smoothing: float = option(0.0, "assumed label-noise rate ε (cDPO, robust)", min=0.0, max=0.5)
    simpo_gamma: float = option(0.5, "SimPO target margin γ", min=0.0)
    length_normalized: bool | None = option(None, "divide sequence log-probs by their token counts "
                                            "(null: true for simpo only)")
    precompute_ref: bool = option(True, "cache reference log-probs once before training")
    learning_rate: float = redefault(OptimFields, "learning_rate", 1e-6)
    ref_batch_size: int = option(16, "pairs per reference forward when precomputing", min=1)

    def validate(self):
        owner = type(self).__name__
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing != 0:
            raise ValueError(
                f"{owner}.label_smoothing must be 0 for loss_type={self.loss_type!r}, got {self.label_smoothing}"
            )
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise ValueError(
                f"{owner}.label_smoothing must be < 0.5 for loss_type='robust', got {self.label_smoothing}"
            )
        validate_micro_batches(self, self.batch_size)
        if self.length_normalized is not None and (
                self.length_normalized != (self.loss_type == "simpo") and self.loss_type != "ipo"):
            raise ValueError(
                f"{owner}.length_normalized={self.length_normalized} is not available for "
                f"loss_type={self.loss_type!r} (only 'ipo' accepts both)"
            )

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"


@torch.no_grad()
def precompute_reference_logps(
    reference: Reference,
    examples: Sequence[PreferenceExample],
    pad_id: int,
    *,
    batch_size: int = 16,
    chunk_size: int | None = None,
    progress: bool = False,
    packing: bool = False,
) -> torch.Tensor:
    """Reference sequence log-probs of every pair: ``[N, 2]`` fp32 on CPU, columns (chosen,
    rejected), each the sum over response tokens (EOS included); ``packing``: padding-free
    reference forwards (``modeling.final_hidden``)."""
    return pair_values(
        examples, pad_id, lambda batch: reference.logprobs(batch, chunk_size=chunk_size, packing=packing).sum(-1),
        batch_size=batch_size, device=device_of(reference.model), progress=progress, desc="reference log-probs",
    )


@torch.no_grad()
def shared_reference_logps(
    reference: Reference,
    examples: Sequence[PreferenceExample],
    pad_id: int,
    *,
    batch_size: int = 16,
    chunk_size: int | None = None,
    progress: bool = False,
    packing: bool = False,
) -> torch.Tensor:
    """``precompute_reference_logps`` of every pair, ``[N, 2]`` fp32 on CPU, the same on every
    rank: under torchrun each rank computes only its contiguous share of the reference batches
    (``distributed.even_share`` of the ``ceil(N / batch_size)`` batches one process runs) and
    the shares are gathered. Each pair goes through the very batch it has in one process, so
    the cache is one process's, bit for bit; every rank then holds (and rank 0 checkpoints) the
    whole cache, so a resumed run finds every pair it trains on at any world size. In one
    process: ``precompute_reference_logps``."""
    from rftengine import distributed

    kwargs = dict(chunk_size=chunk_size, packing=packing)
    if not distributed.is_distributed() or not examples:
        return precompute_reference_logps(reference, examples, pad_id, batch_size=batch_size, progress=progress,
                                          **kwargs)
    start, stop, per_rank = distributed.even_share(-(-len(examples) // batch_size))
    rows = []
    # A sharded reference runs collectives in each forward: every rank runs per_rank batches, a
    # short share padded with repeats of the first batch (dropped after the gather).
    for b in track(range(start, start + per_rank), progress, desc="reference log-probs"):
        chunk = examples[b * batch_size:(b + 1) * batch_size] if b < stop else examples[:batch_size]
        values = precompute_reference_logps(reference, chunk, pad_id, batch_size=batch_size, **kwargs)
        rows.append(torch.cat([values, values.new_zeros(batch_size - len(chunk), 2)]))   # row b*batch_size+j
    return distributed.all_gather_cat(torch.cat(rows))[:len(examples)]


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

    hidden = response_hidden(policy, batch, packing=config.packing)
    weight, bias = output_head(policy)
    kwargs: dict[str, Any] = {}
    if config.uses_reference:
        if ref_logps is not None:
            ref = ref_logps.to(hidden.device, torch.float32)
            kwargs["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        elif reference is not None:
            ref_hidden, ref_weight, ref_bias = reference.hidden_and_head(batch, packing=config.packing)
            kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        else:
            raise ValueError(f"loss_type={config.loss_type!r} needs ref_logps or a reference model")
    loss, op_stats = fused_dpo_loss(
        hidden, weight, batch.response_ids, mask=batch.response_mask,
        bias=bias, beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
        simpo_gamma=config.simpo_gamma if config.loss_type == "simpo" else 0.0,
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
    state: TrainState | None = None,
    real_pairs: int | None = None,
) -> dict[str, float]:
    """One optimizer step of DPO on a pair batch; returns float metrics (see
    ``dpo_batch_loss``) plus ``grad_norm``, ``learning_rate``, ``train/skipped_steps`` (a
    non-finite step is skipped and counted in ``state``) and ``train/padding_fraction`` (of
    the padded batch: what ``config.packing`` saves).

    The pairs go through in micro-batches (``config.micro_batch_size`` pairs, or
    ``gradient_accumulation_steps`` of them) under ``config.precision``; each micro-batch's
    pair-mean loss and stats are weighted by its share of the step's pairs (all ranks), so the
    step equals one pass over the whole batch.

    ``real_pairs`` (online DPO under torchrun, where each rank judged a different number of
    pairs): only the first ``real_pairs`` pairs count (0 allowed); every rank runs as many
    micro-batches as the rank with the most (FSDP needs every rank in each forward and
    backward), padding with micro-batches of one pair of weight 0, and the loss divides by the
    global count of real pairs. The batch then needs a row past the real ones, or one real row,
    to pad with."""
    policy.train()
    pairs = batch.num_rows // 2
    real = pairs if real_pairs is None else real_pairs
    total = global_count(real)
    plan = [(rows, len(rows)) for rows in split_rows(real, micro_batch_rows(config, real))] if real else []
    if real_pairs is not None:
        from rftengine import distributed

        most = int(distributed.all_reduce_max(torch.tensor([len(plan)])))   # len(plan) in one process
        plan += [(torch.tensor([real if real < pairs else 0]), 0)] * (most - len(plan))

    def micro_loss(micro):
        rows, weight = micro
        both = torch.cat([rows, rows + pairs]).to(batch.input_ids.device)
        loss, stats = dpo_batch_loss(policy, batch.select(both), config, reference=reference,
                                     ref_logps=ref_logps[rows.to(ref_logps.device)] if ref_logps is not None else None)
        share = weight / total
        return loss * share, {k: v * share for k, v in stats.items()}

    stats = accumulated_step(plan, micro_loss, optimizer, scheduler, config, device=batch.input_ids.device,
                             state=state)
    stats["train/padding_fraction"] = float(padding_fraction(batch.attention_mask))
    return stats


def train_dpo(
    policy: nn.Module,
    tokenizer,
    pairs: Sequence[Mapping[str, Any]],
    config: DPOConfig | None = None,
    *,
    ref_model: nn.Module | None = None,
    eval_data: Sequence[Mapping[str, Any]] | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``policy`` in place with DPO on ``[{"prompt", "chosen", "rejected"}, ...]``.

    Args:
        policy: causal LM (dropout switched off); its trainable weights are first cast to the
            dtype of ``config.precision`` (fp32 master weights under the mixed precisions).
        tokenizer: needs an EOS token; chat-message pairs need a chat template.
        pairs: preference pairs, plain strings or chat messages.
        config: ``DPOConfig`` (defaults if None).
        ref_model: the reference; default a frozen copy of ``policy`` as given (adapters off
            for PEFT). Not needed when resuming a run with ``precompute_ref`` (the cache is in
            the state); required when resuming with ``precompute_ref=False`` (a copy of the
            resumed policy would be the wrong reference: ValueError).
        eval_data: held-out pairs: the DPO loss and its stats on them, without grad, as
            ``eval/loss``, ``eval/rewards/accuracies``, ``eval/rewards/margins`` ... every
            ``config.eval_every`` steps and after the last (``rftengine.methods.evaluation``);
            their reference log-probs are cached in the state like the training pairs'.
        callback: ``callback(step, metrics)`` after each step.
        state: a ``TrainState`` or its ``state_dict()`` to resume from.
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end.
        progress: tqdm bars for the reference pass and the steps.
    """
    config = config or DPOConfig()
    require_eos(tokenizer)
    check_trainable_model(policy, tokenizer, config.precision)
    disable_dropout(policy)
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=config.max_prompt_length,
                                  max_response_length=config.max_response_length)
    require_example_positions(policy, examples)
    num_steps = total_steps(config, len(examples), config.batch_size)
    train_state = make_train_state("dpo", policy, config, num_steps, state)
    pad = pad_token_id(tokenizer)
    ref_logps = train_state.extra.get("ref_logps")
    if ref_logps is not None and tuple(ref_logps.shape) != (len(examples), 2):
        raise ValueError(
            f"the resumed state caches reference log-probs for {ref_logps.shape[0]} pairs, "
            f"but {len(examples)} pairs were given"
        )
    eval_examples = eval_ref = None
    if eval_data is not None:
        eval_examples = encode_preferences(tokenizer, eval_data, max_prompt_length=config.max_prompt_length,
                                           max_response_length=config.max_response_length)
        require_example_positions(policy, eval_examples)
        eval_ref = train_state.extra.get("eval_ref_logps")
        if eval_ref is not None and tuple(eval_ref.shape) != (len(eval_examples), 2):
            eval_ref = None               # other eval pairs than the cached ones: computed anew
    need_eval_ref = config.uses_reference and config.precompute_ref and eval_examples is not None and eval_ref is None
    reference = None
    if config.uses_reference and (ref_logps is None or not config.precompute_ref or need_eval_ref):
        reference = Reference(policy, ref_model, resumed=train_state.step > 0,
                              dtype=frozen_dtype(config, device_of(policy)))
        if config.precompute_ref:
            for key, todo in (("ref_logps", examples if ref_logps is None else None),
                              ("eval_ref_logps", eval_examples if need_eval_ref else None)):
                if todo is not None:
                    train_state.extra[key] = shared_reference_logps(
                        reference, todo, pad, batch_size=config.ref_batch_size,
                        chunk_size=config.logprob_chunk_size, progress=progress, packing=config.packing,
                    )
            ref_logps, eval_ref = train_state.extra["ref_logps"], train_state.extra.get("eval_ref_logps")
            reference = None  # the copy is no longer needed; free it
    device = device_of(policy)

    def run_step(idx: list[int]) -> dict[str, float]:
        batch = collate_preferences([examples[i] for i in idx], pad).to(device)
        return dpo_step(
            policy, train_state.optimizer, batch, config, scheduler=train_state.scheduler, reference=reference,
            state=train_state,
            ref_logps=ref_logps[idx] if (ref_logps is not None and config.uses_reference) else None,
        )

    evaluate = None
    if eval_examples is not None:
        from rftengine.methods.evaluation import example_evaluator

        def eval_stats(batch, idx):
            _, stats = dpo_batch_loss(policy, batch, config, reference=reference,
                                      ref_logps=eval_ref[idx] if config.uses_reference and eval_ref is not None else None)
            return {key: (value, len(idx)) for key, value in stats.items()}

        evaluate = example_evaluator(policy, eval_examples, lambda ex: collate_preferences(ex, pad), config, eval_stats)

    history = train_loop(train_state, config, num_steps, len(examples), run_step, callback=callback,
                         checkpoint_fn=checkpoint_fn, progress=progress, desc="dpo",
                         postfix={"loss": "loss", "acc": "rewards/accuracies"}, evaluate=evaluate)
    policy.eval()
    return TrainResult(model=policy, state=train_state, history=history)


@torch.no_grad()
def sequence_logps(
    model: nn.Module, tokenizer, pairs: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
    max_prompt_length: int | None = None, max_response_length: int | None = None,
) -> torch.Tensor:
    """``[N, 2]`` fp32 CPU summed log-probs of (chosen, rejected) under ``model``."""
    examples = encode_preferences(tokenizer, pairs, max_prompt_length=max_prompt_length,
                                  max_response_length=max_response_length)
    with eval_mode(model):
        return pair_values(examples, pad_token_id(tokenizer), lambda batch: response_logprobs(model, batch).sum(-1),
                           batch_size=batch_size, device=device_of(model))


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
