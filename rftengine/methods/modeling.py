"""Models for every method: loading, dropout off, final hidden states + lm-head weights for the
fused heads, the frozen reference, value heads and reward models.

Any Hugging Face ``AutoModelForCausalLM`` works: the decoder trunk comes from
``model.get_decoder()`` and the head from ``model.get_output_embeddings()`` (tied embeddings
included: the head weight is then the embedding matrix itself). PEFT (LoRA) models work when
``peft`` is installed; their reference is the same model with adapters disabled.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rftengine.methods.data import SequenceBatch

VALUE_HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------- loading


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (modules, attention-dropout attributes and config),
    so train() and eval() mode compute the same function and log-probs are deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "dropout_p", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None:
            for key, value in list(vars(config).items()):
                if "dropout" in key and isinstance(value, float):
                    setattr(config, key, 0.0)
    return model


def load_causal_lm(
    model_or_path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A causal LM, dropout off, from an existing model or from where ``model_source`` resolves
    a path or id (never downloading): a local directory, a hub id in the local Hugging Face
    cache, or a PEFT adapter directory, whose adapters are merged into its base (a plain model:
    training it trains every weight; a ``lora`` section then adds fresh adapters on top).

    Args:
        model_or_path: an ``nn.Module`` (returned as is, moved/cast if asked), a directory or a
            cached hub id.
        dtype, device: optional cast / placement.
    """
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        from transformers import AutoModelForCausalLM

        from rftengine.methods.model_source import resolve_model

        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        source, adapters = resolve_model(model_or_path, "model", weights=True), []
        while source.is_adapter:  # adapters over adapters: merged innermost first
            adapters.append(source.path)
            source = source.base
        model = AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
        for adapter_dir in reversed(adapters):
            model = _merge_adapters(model, adapter_dir)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return disable_dropout(model)


def import_peft(needed_for: str):
    """The ``peft`` module (an optional extra), or a ValueError saying that ``needed_for`` needs
    it and how to install it. The one place that checks for peft."""
    try:
        import peft
    except ImportError:
        raise ValueError(f"{needed_for} needs peft, which is not installed: pip install rftengine[peft]") from None
    return peft


def _merge_adapters(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """``base`` with the PEFT adapters of ``adapter_dir`` folded into its weights."""
    peft = import_peft(f"model {adapter_dir} is a PEFT adapter directory: loading it")
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    for p in merged.parameters():  # peft froze the base: trainable again, as any loaded model
        p.requires_grad_(True)
    return merged


def load_tokenizer(tokenizer_or_path, *, padding_side: str = "left"):
    """A tokenizer (one given, or from a local directory, a cached hub id or an adapter
    directory's base, see ``model_source``), with a pad token (EOS if none)."""
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from rftengine.methods.model_source import resolve_tokenizer_dir

        path = resolve_tokenizer_dir(tokenizer_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = tokenizer_or_path
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# ----------------------------------------------------------------------------- trunk and head


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder trunk whose ``last_hidden_state`` feeds the lm head (final norm applied)."""
    get = getattr(model, "get_decoder", None)
    if callable(get):
        dec = get()
        if dec is not None and dec is not model:
            return dec
    for name in ("model", "transformer", "gpt_neox", "decoder"):
        dec = getattr(model, name, None)
        if isinstance(dec, nn.Module):
            return dec
    raise ValueError(
        f"cannot find the decoder trunk of {type(model).__name__}: it has no get_decoder() and "
        "no .model/.transformer attribute"
    )


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the lm head (the embedding when tied)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm head) to score tokens with")
    if hasattr(head, "base_layer"):
        raise ValueError(
            "the lm head carries PEFT adapters (lm_head in target_modules); the fused heads read "
            "the head weight directly, so leave lm_head out of the LoRA target modules"
        )
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            f"{type(model).__name__} applies final_logit_softcapping, which the fused lm-head "
            "log-prob ops do not support"
        )
    return head.weight, getattr(head, "bias", None)


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside the wrappers (RewardModel, CausalLMWithValueHead)."""
    while isinstance(model, (RewardModel, CausalLMWithValueHead)):
        model = model.model
    return model


def vocab_size_of(model: nn.Module) -> int | None:
    """Rows of the input embedding (and of the lm head when there is one): the ids the model
    can read and score. None when the model exposes neither."""
    model = _hf_model(model)
    sizes = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            sizes.append(weight.shape[0])
    return min(sizes) if sizes else None


def check_trainable_model(model: nn.Module, tokenizer, precision: str | None = None) -> None:
    """The checks every ``train_*`` runs before any work: no fp16 trainable weights unless
    ``precision`` (None: the device's default) upcasts them (``require_trainable_dtype``), and
    a vocabulary that holds every id of ``tokenizer``."""
    from rftengine.methods.precision import require_trainable_dtype, resolve_precision

    require_trainable_dtype(model.parameters(), resolve_precision(precision, device_of(model)))
    vocab = vocab_size_of(model)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the model's vocabulary has {vocab} tokens but the tokenizer has {len(tokenizer)}: ids "
            f">= {vocab} would index past the embedding; use the tokenizer the model was trained with "
            "(or resize the model's token embeddings)"
        )


def max_positions_of(model: nn.Module) -> int | None:
    """``config.max_position_embeddings`` (or ``n_positions``), None when the config has neither."""
    config = getattr(_hf_model(model), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def require_positions(model: nn.Module, length: int, detail: str, fields: str) -> None:
    """ValueError when a sequence of ``length`` tokens (``detail`` says how it adds up) does not
    fit the model's position table; the message names the config ``fields`` to lower."""
    limit = max_positions_of(model)
    if limit is not None and length > limit:
        raise ValueError(
            f"the model's max_position_embeddings = {limit} is below {detail} = {length} tokens; "
            f"lower {fields} (or use a model with more positions)"
        )


def require_example_positions(model: nn.Module, examples, fields: str = "max_prompt_length or max_response_length") -> None:
    """``require_positions`` for tokenised examples: ``(prompt_ids, response_ids)`` tuples or
    ``PreferenceExample`` (the longer of chosen and rejected)."""
    if max_positions_of(model) is None or not examples:
        return

    def split(e) -> tuple[int, int]:
        if isinstance(e, tuple):
            return len(e[0]), len(e[1])
        return len(e.prompt_ids), max(len(e.chosen_ids), len(e.rejected_ids))

    prompt, response = max((split(e) for e in examples), key=sum)
    require_positions(model, prompt + response,
                      f"the longest encoded prompt + response, {prompt} + {response}", fields)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant activation checkpointing) in
    every Hugging Face model inside ``model`` (a causal LM, a PEFT model, a critic or reward
    model wrapper). Only train-mode forwards checkpoint: rollouts and no-grad passes run in
    eval mode and are unaffected; the fused heads read the final hidden states as before.
    ValueError when no model inside supports it."""
    from transformers import PreTrainedModel

    found = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            # transformers >= 5.x names it activation checkpointing; the old name warns there
            enable = getattr(module, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} holds no Hugging Face model that supports "
            "activation checkpointing"
        )


def rollout_dtype(model: nn.Module, precision: str) -> torch.dtype | None:
    """The dtype a ``Generator`` samples ``model`` in: the compute dtype of ``precision`` (a
    bf16/fp16 copy of fp32 master weights under the mixed precisions), or None (the model's
    own dtype) where the Generator falls back to the model's eager forward, which cannot cast."""
    from rftengine.generation.weights import unsupported_reason
    from rftengine.methods.precision import compute_dtype

    if unsupported_reason(model) is not None:
        return None
    return compute_dtype(precision)


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``cumsum(mask) - 1`` (pads clamped to 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


Columns = slice | torch.Tensor | None


def _take_columns(values: torch.Tensor, columns: Columns) -> torch.Tensor:
    """``values [N, L, ...]`` at ``columns``: all (None), a slice, or ``[N, K]`` per-row positions."""
    if columns is None:
        return values
    if isinstance(columns, slice):
        return values[:, columns]
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[rows, columns]


def _trunk_hidden(
    model: nn.Module, trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    packing: bool, columns: Columns,
) -> torch.Tensor:
    """``trunk``'s last hidden states at ``columns`` of the padded layout; with ``packing``, the
    trunk runs on the packed real tokens (``methods.packed``; ``model``'s config decides whether
    that is exact) and the hidden states are gathered back to the padded positions read."""
    from rftengine.methods.packed import pack_for

    packed = pack_for(model, input_ids, attention_mask) if packing else None
    if packed is None:
        out = trunk(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return _take_columns(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], columns)
    # attention_mask=None: the attention reads the sequence boundaries from position_ids
    # (block-diagonal causal mask) or, for flash-attn varlen, from cu_seqlens.
    out = trunk(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                **packed.attention_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.flatten(0, 1)[_take_columns(packed.index, columns)]


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
    packing: bool = False, columns: Columns = None,
) -> torch.Tensor:
    """Final hidden states of the trunk (no lm head, no logits materialised): ``[N, L, H]``, or
    ``[N, K, H]`` at ``columns`` (a slice of positions, or ``[N, K]`` int64 per-row positions).

    packing: run the trunk padding-free (``rftengine.methods.packed``); the states at real
    (``attention_mask`` 1) positions equal the padded ones, those at pad positions are another
    real token's (every caller masks them out). A model family for which packing is not exact
    runs padded with a warning.
    """
    return _trunk_hidden(model, decoder_of(model), input_ids, attention_mask, packing, columns)


def response_hidden(model: nn.Module, batch: SequenceBatch, *, packing: bool = False) -> torch.Tensor:
    """Hidden states that score the response tokens: ``[N, T, H]`` = ``hidden[:, P-1:-1]``
    (logits at t score token t+1); with ``packing`` only these positions are gathered from the
    packed trunk output."""
    if batch.prompt_length < 1:
        raise ValueError("batch.prompt_length must be >= 1: the first response token needs a context")
    return final_hidden(model, batch.input_ids, batch.attention_mask, packing=packing,
                        columns=slice(batch.prompt_length - 1, -1))


def response_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    packing: bool = False,
):
    """Per-token log-probs ``[N, T]`` fp32 of the response tokens under softmax(logits / T),
    through the fused lm-head op (no ``[N, T, V]`` logits stored); 0 on masked positions.
    Returns ``(logp, entropy)`` when ``return_entropy``. ``packing``: see ``final_hidden``."""
    from rftengine.ops import linear_token_logprobs

    hidden = response_hidden(model, batch, packing=packing)
    weight, bias = output_head(model)  # after the trunk: under FSDP2 its forward gathers the head
    kwargs = {"chunk_size": chunk_size} if chunk_size is not None else {}
    return linear_token_logprobs(
        hidden, weight, batch.response_ids, bias=bias, temperature=temperature,
        mask=batch.response_mask, return_entropy=return_entropy, **kwargs,
    )


# ----------------------------------------------------------------------------- reference


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Reference:
    """The frozen reference policy for KL penalties and DPO.

    Either an explicit ``ref_model``, a frozen deep copy of ``policy`` taken at construction
    (before any update), or, for a PEFT model, the policy itself with adapters disabled (no
    second copy in memory). ``dtype`` casts the reference model, copy or ``ref_model``, in
    place (the compute dtype of a mixed-precision run; None keeps its dtype); a PEFT policy's
    shared base is never cast.

    ``resumed=True`` says ``policy`` holds resumed weights: a copy of it would not be the
    policy the run started from, so a non-PEFT policy then needs ``ref_model`` (the original
    model) and a ValueError says so instead of silently using the wrong reference.
    """

    def __init__(self, policy: nn.Module, ref_model: nn.Module | None = None, *, resumed: bool = False,
                 dtype: torch.dtype | None = None):
        self.policy = policy
        if ref_model is None and resumed and not is_peft_model(policy):
            raise ValueError(
                "resuming needs ref_model: the reference is the policy at the start of training, "
                "and the policy given now holds the resumed weights; pass the original (initial) "
                "model as ref_model"
            )
        if ref_model is not None:
            self.model = freeze(disable_dropout(ref_model))
            self.shared = False
        elif is_peft_model(policy):
            self.model = policy
            self.shared = True
        else:
            self.model = freeze(disable_dropout(copy.deepcopy(policy)))
            self.shared = False
        if dtype is not None and not self.shared:
            # A frozen model needs no fp32 master weights; and a resumed run (given the initial
            # model as ref_model) must compute the reference as the fresh run's copy did.
            self.model.to(dtype)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yields the module that computes reference outputs (adapters off for PEFT)."""
        if self.shared:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model

    @torch.no_grad()
    def logprobs(self, batch: SequenceBatch, *, temperature: float = 1.0, chunk_size: int | None = None,
                 packing: bool = False):
        """Reference per-token log-probs ``[N, T]`` fp32 of the response tokens (no grad)."""
        with self.active() as model:
            return response_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size,
                                     packing=packing)

    @torch.no_grad()
    def hidden_and_head(self, batch: SequenceBatch, *, packing: bool = False):
        """``(hidden [N, T, H], weight [V, H], bias)`` of the reference, for fused DPO's
        on-the-fly reference path."""
        with self.active() as model:
            hidden = response_hidden(model, batch, packing=packing)
            weight, bias = output_head(model)  # after the trunk: under FSDP2 its forward gathers the head
        return hidden, weight.detach(), bias.detach() if bias is not None else None


# ----------------------------------------------------------------------------- value heads


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    weight, _ = output_head(model)
    return weight.shape[1]


class ValueHead(nn.Module):
    """Scalar head ``v = h·w + b`` over hidden states, computed in fp32; ``w`` drawn from
    N(0, 1/(H+1)) with a generator seeded by ``seed`` (the global RNG when None), ``b = 0``.
    ``bias=False`` drops ``b``: a reward model's head, which then is exactly the bias-free
    ``score`` layer of a transformers ``*ForSequenceClassification`` (see
    ``hf_export.sequence_classifier``); a Bradley-Terry reward is shift-invariant, so ``b``
    would learn nothing there.

    ``forward(hidden [..., H]) -> [...]`` fp32.
    """

    def __init__(self, hidden_size: int, seed: int | None = None, *, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # A run's init must follow its config.seed, not whatever the global RNG holds.
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5, generator=gen)
        if bias:
            nn.init.zeros_(self.linear.bias)
        else:  # dropped after nn.Linear drew it: the global RNG advances as with a bias, so runs stay the same
            self.linear.register_parameter("bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32 under autocast too: values feed GAE and the value loss
        with torch.autocast(hidden.device.type, enabled=False):
            return self.linear(hidden.float()).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of the last non-pad position (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp(min=0)


class CausalLMWithValueHead(nn.Module):
    """A causal LM trunk with a scalar ``ValueHead``: the separate PPO critic, or a reward
    model built from a causal LM. The lm head itself is not run.

    ``forward(input_ids [N, L], attention_mask [N, L]) -> values [N, L]`` fp32 (``[N, K]`` at
    ``columns``, see ``final_hidden``, which also describes ``packing``).
    """

    def __init__(self, model: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.model = disable_dropout(model)
        self.v_head = value_head if value_head is not None else ValueHead(hidden_size_of(model))
        weight, _ = output_head(model)
        self.v_head.to(weight.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, packing: bool = False,
                columns: Columns = None) -> torch.Tensor:
        return self.v_head(final_hidden(self.model, input_ids, attention_mask, packing=packing, columns=columns))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, packing: bool = False) -> torch.Tensor:
        """``[N]`` value at the last non-pad token."""
        last = last_token_index(attention_mask)[:, None]
        return self.v_head(final_hidden(self.model, input_ids, attention_mask, packing=packing, columns=last)[:, 0])

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, **kwargs)
        save_file({k: v.contiguous() for k, v in self.v_head.state_dict().items()},
                  os.path.join(path, VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, device=None) -> CausalLMWithValueHead:
        from safetensors.torch import load_file

        from rftengine.methods.model_source import resolve_model

        path = resolve_model(path, "value-head model").path
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise ValueError(f"{str(path)!r} has no {VALUE_HEAD_FILE}: not a value-head model directory")
        model = load_causal_lm(path, dtype=dtype, device=device)
        weights = load_file(str(head_file))
        head = ValueHead(hidden_size_of(model), bias="linear.bias" in weights)
        head.load_state_dict(weights)
        return cls(model, head)


# ----------------------------------------------------------------------------- reward models


def _classifier_head(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(
        f"{type(model).__name__} has no .score/.classifier head; use a causal LM with a value head"
    )


class RewardModel(nn.Module):
    """A scalar reward model: ``forward(input_ids [N, L], attention_mask [N, L]) -> [N]`` fp32,
    the score read at each row's last non-pad token.

    Wraps either an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (kind
    "classification": trunk + its ``score`` head at the last non-pad token) or a causal LM with
    a value head (kind "value_head"; a plain causal LM is wrapped in one).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, CausalLMWithValueHead):
            self.kind = "value_head"
        elif hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
            model = CausalLMWithValueHead(model, ValueHead(hidden_size_of(model), bias=False))
            self.kind = "value_head"
        else:
            num_labels = getattr(getattr(model, "config", None), "num_labels", None)
            if num_labels != 1:
                raise ValueError(
                    f"a sequence-classification reward model must have num_labels=1, got {num_labels}"
                )
            _classifier_head(model)
            self.kind = "classification"
        self.model = disable_dropout(model)

    @property
    def backbone(self) -> nn.Module:
        """The underlying Hugging Face model (causal LM for value_head, the classifier otherwise)."""
        return self.model.model if self.kind == "value_head" else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, packing: bool = False) -> torch.Tensor:
        """``[N]`` fp32 scores; ``packing``: see ``final_hidden``."""
        if self.kind == "value_head":
            return self.model.score(input_ids, attention_mask, packing=packing)
        last = last_token_index(attention_mask)[:, None]
        hidden = _trunk_hidden(self.model, self.model.base_model, input_ids, attention_mask, packing, last)[:, 0]
        return _classifier_head(self.model)(hidden).float().squeeze(-1)

    def to_sequence_classifier(self, pad_token_id: int | None = None) -> nn.Module:
        """This reward model as its architecture's transformers ``*ForSequenceClassification``
        (the trained score head, ``pad_token_id`` or the config's in its config): its
        ``save_pretrained(dir)`` writes what ``AutoModelForSequenceClassification`` loads with
        the same scores (``hf_export``; the CLI's export does this)."""
        from rftengine.methods.hf_export import scalar_model_classifier

        return scalar_model_classifier(self, pad_token_id).model

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> None:
        """rftengine's directory layout, which ``from_pretrained`` reads back exactly (what
        checkpoints hold): a Hugging Face directory, plus value_head.safetensors for kind
        value_head. For transformers, save ``to_sequence_classifier()`` instead."""
        self.model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, device=None) -> RewardModel:
        """Load what ``save_pretrained`` wrote: a value-head directory or a classifier."""
        from rftengine.methods.model_source import resolve_model

        source = resolve_model(path, "reward model")
        if source.is_adapter:
            raise ValueError(f"reward model {source.path} is a PEFT adapter directory; a reward model must be "
                             "a full model directory (merge the adapters into it first)")
        path = source.path
        if (path / VALUE_HEAD_FILE).is_file():
            return cls(CausalLMWithValueHead.from_pretrained(path, dtype=dtype, device=device))
        from transformers import AutoModelForSequenceClassification

        kwargs = {"local_files_only": True, "num_labels": 1}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
        return cls(model.to(device) if device is not None else model)


def reward_model_from_causal_lm(model: nn.Module, kind: str = "value_head") -> RewardModel:
    """A fresh reward model initialised from a causal LM's weights.

    kind "value_head": the LM trunk + a new ValueHead (the LM object is reused).
    kind "classification": an ``AutoModelForSequenceClassification(num_labels=1)`` of the same
    architecture with the trunk weights copied and a new score head.
    """
    if kind == "value_head":
        return RewardModel(model)
    if kind != "classification":
        raise ValueError(f"kind must be 'value_head' or 'classification', got {kind!r}")
    from rftengine.methods.hf_export import classifier_like

    return RewardModel(classifier_like(model))
