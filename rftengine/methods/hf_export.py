"""Scalar models (reward models, PPO critics) as transformers ``*ForSequenceClassification``
models, so that ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads the trained
score head and gives rftengine's scores.

A value-head model (a causal-LM trunk plus ``ValueHead``) becomes the classifier of the same
architecture with ``num_labels=1``: the trunk weights copied, ``score.weight`` = the value
head's weight, ``config.pad_token_id`` set so that transformers reads the score at each row's
last non-pad token, as ``RewardModel`` does. The ``score`` layers of transformers' decoder
classifiers (Llama, Qwen2, Mistral, GPT-2 ...) have no bias: neither have rftengine's reward
heads nor its PPO critics (``ValueHead(bias=False)``, as TRL's value model, a classifier itself),
so their export is exact; a value head with a bias (from a checkpoint written before the critic
dropped it) cannot carry it, and the classifier's scores are the head's minus that constant, which the
caller is told (``ScalarExport.offset``).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from rftengine.methods.modeling import (
    CausalLMWithValueHead,
    RewardModel,
    ValueHead,
    decoder_of,
    is_peft_model,
    output_head,
)


class ScalarExport(NamedTuple):
    """``model``: the ``*ForSequenceClassification`` to save; ``offset``: the value head's bias
    that its bias-free score layer leaves out (its scores = the value head's - offset; 0.0 when
    the export is exact)."""

    model: nn.Module
    offset: float


def classifier_like(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` (``num_labels=1``) of causal LM ``model``'s
    architecture, the trunk weights copied from it, a freshly initialised score head; in
    ``model``'s dtype, on ``device`` (default: ``model``'s). ValueError when the trunk weights
    do not fit."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    result = classifier.base_model.load_state_dict(decoder_of(model).state_dict(), strict=False)
    if result.missing_keys:
        raise ValueError(f"trunk weights did not fit the classifier: missing {result.missing_keys[:4]}")
    weight, _ = output_head(model)
    return classifier.to(device=weight.device if device is None else device, dtype=weight.dtype)


def _plain_trunk(model: nn.Module) -> nn.Module:
    """A PEFT model's base with its adapters merged in (on a copy: the model is left as is)."""
    return copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model


def value_head_classifier(model: nn.Module, head: ValueHead, pad_token_id: int | None = None) -> ScalarExport:
    """Causal LM ``model``'s trunk (adapters merged) with value head ``head`` as a
    ``*ForSequenceClassification``: ``score.weight`` = ``head``'s ``[1, H]`` weight, and
    ``pad_token_id`` (or the model config's) in its config. Built on the CPU: an export must not
    hold a second copy of the trunk on the accelerator."""
    classifier = classifier_like(_plain_trunk(model), device="cpu")
    score = classifier.score if hasattr(classifier, "score") else None
    if not isinstance(score, nn.Linear) or score.weight.shape != head.linear.weight.shape:
        raise ValueError(
            f"{type(classifier).__name__} has no [1, {head.linear.weight.shape[1]}] linear score layer to hold the "
            "value head"
        )
    with torch.no_grad():
        score.weight.copy_(head.linear.weight.to(score.weight))
    offset = 0.0
    if head.linear.bias is not None:
        if score.bias is not None:
            with torch.no_grad():
                score.bias.copy_(head.linear.bias.to(score.bias))
        else:
            offset = float(head.linear.bias.detach().float().item())
    _set_pad(classifier, pad_token_id)
    return ScalarExport(classifier, offset)


def _set_pad(classifier: nn.Module, pad_token_id: int | None) -> None:
    if pad_token_id is not None:
        classifier.config.pad_token_id = pad_token_id
    if classifier.config.pad_token_id is None:
        raise ValueError(
            "the exported classifier needs a pad token id (transformers reads the score at the last non-pad "
            "token): give a tokenizer with a pad (or EOS) token"
        )


def scalar_model_classifier(model: nn.Module, pad_token_id: int | None = None) -> ScalarExport:
    """A ``RewardModel``, ``CausalLMWithValueHead`` or classifier as the
    ``*ForSequenceClassification`` to save (a classifier reward model is itself, its config's
    ``pad_token_id`` set)."""
    if isinstance(model, RewardModel):
        if model.kind == "classification":
            _set_pad(model.model, pad_token_id)
            return ScalarExport(model.model, 0.0)
        model = model.model
    if isinstance(model, CausalLMWithValueHead):
        return value_head_classifier(model.model, model.v_head, pad_token_id)
    raise ValueError(f"expected a RewardModel or CausalLMWithValueHead, got {type(model).__name__}")
