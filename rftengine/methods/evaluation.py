"""Evaluation on held-out data during training: the ``evaluate`` callable ``train_loop`` runs
every ``config.eval_every`` steps and after the last step, its metrics logged as ``eval/*`` in
that step's row.

Two kinds, built by the methods from their own loss and sampling code:

- ``batch_evaluator``: the training loss code run without grad, in eval mode, over held-out
  pairs or examples (DPO: ``eval/loss``, ``eval/rewards/accuracies``, ``eval/rewards/margins``
  ...; reward model: ``eval/loss``, ``eval/accuracy`` ...; SFT: ``eval/loss``).
- ``rollout_evaluator``: responses sampled for held-out prompts and scored with the run's
  reward (PPO/GRPO/RLOO/RLAIF: ``eval/reward``, ``eval/reward_std``,
  ``eval/completions/mean_length`` in tokens). As TRL's GRPO evaluation does, the responses are
  drawn with the configured sampling (temperature, top-k, top-p) and ``group_size`` of them per
  prompt; the seed is fixed for the whole run, so successive evaluations differ only by the
  policy.

An evaluation changes nothing a resumed run depends on: it runs under ``torch.no_grad``, puts
the models back in their train/eval mode and restores every global RNG afterwards
(``run_evaluation``), so a run with ``eval_every`` trains exactly as one without.

Under torchrun every rank evaluates a contiguous share of the data and the values are global
(sums all-reduced). Every rank runs the same number of forward or generation calls, the ones
with a shorter share a padding call whose values weigh 0, because the forwards of a sharded
(FSDP2) model are collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from rftengine import distributed

EVAL_PREFIX = "eval/"
EVAL_SEED_SALT = 104_729
"""Salt of the evaluation sampling seed (``step_seed(config.seed, 0, EVAL_SEED_SALT)``): apart
from every training rollout's seed."""

Evaluate = Callable[[], dict[str, float]]
"""``evaluate() -> {name: value}``: metrics over the whole eval data (global under torchrun),
names without the ``eval/`` prefix (``run_evaluation`` adds it)."""

BatchStats = Callable[[list[int]], Mapping[str, "tuple[torch.Tensor, torch.Tensor | float]"]]
"""``batch_stats(indices) -> {name: (mean, weight)}``: each metric's mean over the examples
``indices`` and the weight of that mean (pairs, rows or tokens it averages over)."""


def should_evaluate(config, step_done: int, last_step: int) -> bool:
    """After step ``step_done`` (1-based count of steps done): at multiples of
    ``config.eval_every`` (0: none) and after the last step."""
    every = getattr(config, "eval_every", 0) or 0
    return step_done == last_step or (every > 0 and step_done % every == 0)


def run_evaluation(evaluate: Evaluate) -> dict[str, float]:
    """``evaluate()`` without grad, every global RNG (python, numpy, torch, CUDA) restored
    after it, so that evaluating consumes none of the training's random streams; returns its
    metrics as floats named ``eval/<name>``."""
    from rftengine.methods.train_state import capture_rng_state, restore_rng_state

    rng = capture_rng_state()
    try:
        with torch.no_grad():
            metrics = evaluate()
    finally:
        restore_rng_state(rng)
    return {f"{EVAL_PREFIX}{name}": float(value) for name, value in metrics.items()}


def eval_chunks(n: int, size: int) -> list[tuple[list[int], bool]]:
    """This rank's contiguous share of ``n`` eval items (``distributed.even_share``) in
    chunks of at most ``size``, as ``(indices, real)``; every rank gets the same number of
    chunks: where its share runs out it gets ``([an item], False)``, a padding chunk to run
    and weigh 0. In one process the share is every item."""
    if n < 1:
        raise ValueError(f"eval data must hold at least one example, got {n}")
    if size < 1:
        raise ValueError(f"eval batch size must be >= 1, got {size}")
    start, stop, per_rank = distributed.even_share(n)
    share = list(range(start, stop))
    chunks = []
    for i in range(math.ceil(per_rank / size)):
        part = share[i * size:(i + 1) * size]
        chunks.append((part, True) if part else ([0], False))
    return chunks


def _global_means(sums: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Weighted sums over every rank -> means (one all-reduce, one host transfer)."""
    keys = sorted(sums)
    if not keys:
        return {}
    stacked = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys] + [weights[k] for k in keys]))
    totals = stacked.tolist()
    return {k: totals[i] / max(totals[len(keys) + i], 1e-12) for i, k in enumerate(keys)}


def batch_evaluator(n: int, batch_size: int, batch_stats: BatchStats, *,
                    models: Sequence[torch.nn.Module] = (), autocast=None) -> Evaluate:
    """An ``Evaluate`` over ``n`` eval examples: ``batch_stats`` on this rank's chunks of
    ``batch_size`` indices (``eval_chunks``), in eval mode for ``models`` and inside the
    ``autocast()`` context (the run's precision) when given; each metric is the
    weight-averaged mean over all examples (fp64 sums)."""
    from rftengine.methods.modeling import eval_mode

    def evaluate() -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            for model in models:
                stack.enter_context(eval_mode(model))
            for indices, real in eval_chunks(n, batch_size):
                if autocast is not None:
                    with autocast():
                        stats = batch_stats(indices)
                else:
                    stats = batch_stats(indices)
                for name, (mean, weight) in stats.items():
                    mean = torch.as_tensor(mean).detach().double()
                    weight = torch.as_tensor(weight, device=mean.device).detach().double() * float(real)
                    sums[name] = sums.get(name, 0) + mean * weight
                    weights[name] = weights.get(name, 0) + weight
        return _global_means(sums, weights)

    return evaluate


def example_evaluator(model: torch.nn.Module, examples: Sequence[Any], collate: Callable[[list], Any],
                      config, stats: Callable[[Any, list[int]], Mapping[str, tuple]]) -> Evaluate:
    """``batch_evaluator`` over encoded eval ``examples``: each chunk of
    ``config.eval_batch_size`` (null: ``batch_size``) indices is collated (``collate(list of
    examples)``, moved to ``model``'s device) and scored by ``stats(batch, indices) -> {name:
    (mean, weight)}``, the method's training loss code, under ``config.precision``."""
    from rftengine.methods.precision import autocast, resolve_precision
    from rftengine.methods.modeling import device_of

    device = device_of(model)
    precision = resolve_precision(getattr(config, "precision", None), device)

    def batch_stats(indices: list[int]):
        return stats(collate([examples[i] for i in indices]).to(device), indices)

    return batch_evaluator(len(examples), config.eval_batch_size or config.batch_size, batch_stats,
                           models=[model], autocast=lambda: autocast(precision, device))


def rollout_evaluator(
    generator,
    tokenizer,
    prompts: Sequence[Any],
    config,
    score: Callable[[Any], torch.Tensor],
    *,
    num_samples: int,
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> Evaluate:
    """An ``Evaluate`` that samples ``num_samples`` responses per eval prompt with
    ``generator`` (``rollout.sample_rollout``; ``config``'s sampling fields, lengths, seed and
    ``eval_batch_size``) and scores them with ``score(rollout) -> Tensor[N]``; ``columns``: the
    data's other columns, one value per prompt (for the reward functions, as in training).

    Returns ``reward`` (mean score over every response), ``reward_std`` (their population
    standard deviation) and ``completions/mean_length`` (mean response tokens, EOS included).
    Response ``s`` of prompt ``p`` is sampled with the same noise whatever the world size and
    chunking (sequence ``p * num_samples + s`` of one fixed seed)."""
    from rftengine.methods.data_order import step_seed
    from rftengine.methods.modeling import eval_mode
    from rftengine.methods.rollout import sample_rollout

    if num_samples > generator.max_batch_size:
        raise ValueError(f"num_samples ({num_samples}) must be <= the generator's max_batch_size "
                         f"({generator.max_batch_size})")
    per_call = max(1, min(config.eval_batch_size or config.batch_size, generator.max_batch_size // num_samples))
    seed = step_seed(config.seed, 0, salt=EVAL_SEED_SALT)
    model = getattr(generator, "model", None)

    def evaluate() -> dict[str, float]:
        total = None
        with ExitStack() as stack:
            if isinstance(model, torch.nn.Module):
                stack.enter_context(eval_mode(model))
            for indices, real in eval_chunks(len(prompts), per_call):
                ro = sample_rollout(
                    generator, tokenizer, [prompts[i] for i in indices], num_samples=num_samples,
                    max_new_tokens=config.max_new_tokens, max_prompt_length=config.max_prompt_length,
                    temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                    min_p=config.min_p, stop=config.stop, seed=seed,
                    columns={k: [v[i] for i in indices] for k, v in columns.items()} if columns else None,
                    sequence_offset=indices[0] * num_samples,
                )
                # On the model's device: the all-reduce below may be NCCL's, which takes CUDA tensors only.
                device = ro.batch.input_ids.device
                scores = torch.as_tensor(score(ro)).detach().to(device).double().reshape(-1)
                lengths = ro.batch.response_mask.sum(-1).double()
                part = torch.stack([scores.sum(), (scores ** 2).sum(), lengths.sum(),
                                    torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device)])
                part = part * float(real)
                total = part if total is None else total + part
        s, s2, length, count = distributed.all_reduce_sum(total).tolist()
        mean = s / count
        return {"reward": mean, "reward_std": math.sqrt(max(s2 / count - mean * mean, 0.0)),
                "completions/mean_length": length / count}

    return evaluate
