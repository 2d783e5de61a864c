"""The decoder's weights as the static runner reads them: references into the HF module.

`gather_weights` collects the parameters of a Llama/Qwen2/Mistral-family model without copying
them, so an in-place update (an optimizer step, `load_state_dict`) is seen by the next rollout and
by the CUDA graphs captured over these very storages. `signature` fingerprints the storages so
the engine notices when a parameter was replaced rather than updated. When the rollout dtype
differs from some parameters' (fp32 master weights, bf16 rollouts; fp32 adapters on a bf16 base)
`shadow` makes one cast copy of those that `refresh` overwrites in place before each rollout.

PEFT LoRA. A ``PeftModel`` (or a model with LoRA layers injected) runs on the same runner: each
adapted projection keeps its frozen base weight by reference and carries its active adapter as a
`LoRA` term, ``y = x @ W.T + b + scale * ((x @ A.T) @ B.T + b_B)`` (`model_runner.linear`), with
``scale`` = lora_alpha / r, or lora_alpha / sqrt(r) under rslora (PEFT's own ``scaling``).
Why low-rank matmuls rather than a merged rollout copy ``W + scale * B @ A``:
- memory: a merged copy of every adapted weight is a second model (all-linear LoRA on a 7B model in
  bf16: ~13 GB) taken from the KV cache, which sets how many sequences a rollout holds; the
  adapters themselves are ~0.5% of that (rank 16);
- fidelity: LoRA's update is small against W; merged in bf16 (8 mantissa bits) much of it rounds
  away, so the rollout would sample another policy than the one being trained;
- freshness for free: A and B are read in place like any parameter, so an optimizer step reaches
  the next rollout and its CUDA graphs with nothing to recompute.
The price: two rank-r matmuls and an add per adapted projection, ~2 r (in + out) / (in * out) of
its flops (<1% at r=16, hidden 4096) and 3 more kernels each in the decode step.
Dropout is off (rollouts run as in eval). Disabled adapters (``disable_adapter()``) and merged ones
run the base weight alone, as PEFT's forward does. What stays on the eager fallback, with the
reason: DoRA and other LoRA variants (DoRA rescales each output by the column norms of
``W + scale * B @ A``, a full-size computation each step), several active adapters at once,
adapters on the embeddings or the lm head (the trainer's fused heads read the head weight
directly too), and any other PEFT tuner or wrapper (``modules_to_save`` copies, quantized bases).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
# RoPE variants whose inverse frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass
class LoRA:
    """One active LoRA adapter: adds ``scale * (x @ a.T @ b.T + bias)`` to its projection."""
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    bias: torch.Tensor | None  # [out], PEFT's lora_bias
    scale: float  # lora_alpha / r (rslora: lora_alpha / sqrt(r))


@dataclasses.dataclass
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]
    lora: LoRA | None = None


@dataclasses.dataclass
class Layer:
    input_norm: torch.Tensor  # [hidden]
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: torch.Tensor  # [hidden]
    gate: Linear
    up: Linear
    down: Linear
    window: int | None  # sliding-window size of this layer's attention, None = full


@dataclasses.dataclass
class DecoderWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[Layer]
    norm: torch.Tensor  # [hidden]
    lm_head: Linear  # weight [vocab, hidden]; the embedding itself when embeddings are tied
    inv_freq: torch.Tensor  # [head_dim / 2] float32 RoPE inverse frequencies
    rope_scale: float  # multiplies cos/sin (YaRN attention factor; 1.0 otherwise)
    eps: float
    scaling: float  # softmax scale, head_dim ** -0.5
    heads: int
    kv_heads: int
    head_dim: int
    act: Callable[[torch.Tensor], torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def vocab(self) -> int:
        return self.lm_head.weight.shape[0]


class UnsupportedAdapter(TypeError):
    """PEFT adapters the static runner does not apply (the message says which and why)."""


def _linear(module: nn.Module, name: str) -> Linear:
    if type(module) is nn.Linear:
        return Linear(module.weight, module.bias)
    lora_linear = _peft_lora_linear()
    if lora_linear is not None and type(module) is lora_linear:
        return _adapted(module, name)
    # Other PEFT tuners, quantized layers, ...: their forward is not a plain x @ W.T + b.
    raise TypeError(f"{name} is {type(module).__name__}, not a plain torch.nn.Linear")


def _peft_lora_linear() -> type | None:
    """PEFT's LoRA ``Linear`` layer class, None when peft is not installed (then no model has one)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return None
    return LoraLinear


def _adapted(module: nn.Module, name: str) -> Linear:
    """A PEFT LoRA layer as its base projection plus the active adapter, as its forward computes it."""
    base = module.base_layer
    if type(base) is not nn.Linear or module.fan_in_fan_out:
        raise TypeError(f"{name} is a LoRA layer over {type(base).__name__}, not over a plain torch.nn.Linear")
    if module.disable_adapters or module.merged:
        if module.disable_adapters and module.merged:
            # PEFT unmerges on its next forward; until then the base weight still holds the adapters
            raise UnsupportedAdapter(f"{name} has adapters merged into its base weight while adapters are disabled")
        return Linear(base.weight, base.bias)  # merged: the base weight already holds the adapters
    active = [n for n in module.active_adapters if n in module.lora_A]
    if not active:
        return Linear(base.weight, base.bias)
    if len(active) > 1:
        raise UnsupportedAdapter(
            f"{name} has {len(active)} active adapters ({', '.join(active)}); the static runner applies "
            "one (set_adapter to a single adapter)"
        )
    adapter = active[0]
    if module.use_dora.get(adapter) or adapter in getattr(module, "lora_variant", {}):
        why = (
            "DoRA rescales each output by the column norms of W + scale * B @ A, a full-size "
            "computation per forward" if module.use_dora.get(adapter)
            else f"{type(module.lora_variant[adapter]).__name__} changes the LoRA forward"
        )
        raise UnsupportedAdapter(f"{name} adapter {adapter!r}: the static runner applies plain LoRA only ({why})")
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    if type(a) is not nn.Linear or type(b) is not nn.Linear:
        raise UnsupportedAdapter(f"{name} adapter {adapter!r} is not a pair of plain torch.nn.Linear")
    return Linear(base.weight, base.bias, LoRA(a.weight, b.weight, b.bias, float(module.scaling[adapter])))


def _plain(linear: Linear, name: str) -> Linear:
    if linear.lora is not None:
        raise UnsupportedAdapter(
            f"{name} carries LoRA adapters; leave it out of the LoRA target modules (the fused "
            "log-prob heads read the head weight directly too)"
        )
    return linear


def _embedding(module: nn.Module, name: str) -> torch.Tensor:
    if hasattr(module, "base_layer"):
        # a PEFT embedding's .weight is its base weight: reading it would drop the adapters silently
        raise UnsupportedAdapter(f"{name} carries PEFT adapters; the static runner reads a plain embedding")
    if type(module) is not nn.Embedding:
        raise TypeError(f"{name} is {type(module).__name__}, not a plain torch.nn.Embedding")
    return module.weight


def decoder_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``model``: a ``PeftModel``'s base (its LoRA layers
    injected), else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _window(family: str, config, attn: nn.Module) -> int | None:
    if family == "mistral":
        return getattr(config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def gather_weights(model: nn.Module) -> DecoderWeights:
    """References to the parameters of a supported HF causal LM, PEFT LoRA adapters included
    (raises TypeError/AttributeError on unexpected layouts)."""
    model = decoder_model(model)
    config = model.config
    family = config.model_type
    base = model.model
    layers = []
    for i, block in enumerate(base.layers):
        attn, mlp = block.self_attn, block.mlp
        name = f"model.layers.{i}"
        layers.append(Layer(
            input_norm=block.input_layernorm.weight,
            q=_linear(attn.q_proj, f"{name}.self_attn.q_proj"),
            k=_linear(attn.k_proj, f"{name}.self_attn.k_proj"),
            v=_linear(attn.v_proj, f"{name}.self_attn.v_proj"),
            o=_linear(attn.o_proj, f"{name}.self_attn.o_proj"),
            post_norm=block.post_attention_layernorm.weight,
            gate=_linear(mlp.gate_proj, f"{name}.mlp.gate_proj"),
            up=_linear(mlp.up_proj, f"{name}.mlp.up_proj"),
            down=_linear(mlp.down_proj, f"{name}.mlp.down_proj"),
            window=_window(family, config, attn),
        ))
    first = base.layers[0].self_attn
    return DecoderWeights(
        embed=_embedding(base.embed_tokens, "model.embed_tokens"),
        layers=layers,
        norm=base.norm.weight,
        lm_head=_plain(_linear(model.lm_head, "lm_head"), "lm_head"),
        inv_freq=base.rotary_emb.inv_freq,
        rope_scale=float(base.rotary_emb.attention_scaling),
        eps=float(base.norm.variance_epsilon),
        scaling=float(first.scaling),
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=first.head_dim,
        act=base.layers[0].mlp.act_fn,
    )


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the static runner cannot run this model (None when it can)."""
    model = decoder_model(model)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        return f"model_type {family!r} is not one of {', '.join(SUPPORTED_FAMILIES)}"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else None
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} depends on the sequence length (static: {', '.join(STATIC_ROPE_TYPES)})"
    try:
        weights = gather_weights(model)
    except UnsupportedAdapter as err:
        return str(err)
    except (AttributeError, TypeError) as err:
        return f"unexpected module layout ({err})"
    if weights.heads % weights.kv_heads:
        return f"{weights.heads} attention heads are not a multiple of {weights.kv_heads} kv heads"
    return None


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def _linear_tensors(lin: Linear) -> list[torch.Tensor]:
    lora = lin.lora
    out = [lin.weight, lin.bias] + ([lora.a, lora.b, lora.bias] if lora is not None else [])
    return [t for t in out if t is not None]


def tensors(weights: DecoderWeights) -> list[torch.Tensor]:
    """Every weight tensor, in a fixed order (biases that are None are skipped)."""
    out = [weights.embed, weights.norm, weights.lm_head.weight]
    for layer in weights.layers:
        out += [layer.input_norm, layer.post_norm]
        for f in LINEARS:
            out += _linear_tensors(getattr(layer, f))
    if weights.lm_head.bias is not None:
        out.append(weights.lm_head.bias)
    return out


def signature(weights: DecoderWeights) -> tuple:
    """Storage addresses, shapes and dtypes, and the LoRA scales: changes when a parameter is
    replaced, an adapter switched, enabled or disabled, or rescaled, not when a value is updated."""
    loras = [getattr(layer, f).lora for layer in weights.layers for f in LINEARS]
    scales = tuple(None if lora is None else lora.scale for lora in loras)  # baked into the graphs
    return tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors(weights)) + scales


def shadow(weights: DecoderWeights, dtype: torch.dtype) -> DecoderWeights:
    """``weights`` with every tensor not already of ``dtype`` replaced by a cast copy (tied weights
    stay one tensor; the others stay references); RoPE stays fp32."""
    copies: dict[int, torch.Tensor] = {}

    def cast(t):
        if t is None or t.dtype == dtype:
            return t
        if id(t) not in copies:
            copies[id(t)] = t.detach().to(dtype=dtype, copy=True)
        return copies[id(t)]

    def cast_linear(lin: Linear) -> Linear:
        lora = lin.lora
        if lora is not None:
            lora = dataclasses.replace(lora, a=cast(lora.a), b=cast(lora.b), bias=cast(lora.bias))
        return Linear(cast(lin.weight), cast(lin.bias), lora)

    layers = [
        dataclasses.replace(
            layer, input_norm=cast(layer.input_norm), post_norm=cast(layer.post_norm),
            **{f: cast_linear(getattr(layer, f)) for f in LINEARS},
        )
        for layer in weights.layers
    ]
    return dataclasses.replace(
        weights, embed=cast(weights.embed), layers=layers, norm=cast(weights.norm),
        lm_head=cast_linear(weights.lm_head),
    )


@torch.no_grad()
def refresh(target: DecoderWeights, source: DecoderWeights) -> None:
    """Copy the current values of ``source`` into the shadow ``target`` (same order, in place;
    tensors the shadow shares with ``source`` are skipped)."""
    for dst, src in zip(tensors(target), tensors(source)):
        if dst is not src:
            dst.copy_(src)
