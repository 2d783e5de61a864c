"""The decoder's weights as the static runner reads them: references into the HF module.

`gather_weights` collects the parameters of a Llama/Qwen2/Mistral-family model without copying
them, so an in-place update (an optimizer step, `load_state_dict`) is seen by the next rollout and
by the CUDA graphs captured over these very storages. `signature` fingerprints the storages so
the engine notices when a parameter was replaced rather than updated. When the rollout dtype
differs from the parameters' (fp32 master weights, bf16 rollouts) `shadow` makes one cast copy
that `refresh` overwrites in place before each rollout.
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
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]


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


def _linear(module: nn.Module, name: str) -> Linear:
    if type(module) is not nn.Linear:
        # PEFT adapters, quantized layers, ...: their forward is not a plain x @ W.T + b.
        raise TypeError(f"{name} is {type(module).__name__}, not a plain torch.nn.Linear")
    return Linear(module.weight, module.bias)


def _window(family: str, config, attn: nn.Module) -> int | None:
    if family == "mistral":
        return getattr(config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def gather_weights(model: nn.Module) -> DecoderWeights:
    """References to the parameters of a supported HF causal LM (raises on unexpected layouts)."""
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
        embed=base.embed_tokens.weight,
        layers=layers,
        norm=base.norm.weight,
        lm_head=_linear(model.lm_head, "lm_head"),
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
    except (AttributeError, TypeError) as err:
        return f"unexpected module layout ({err})"
    if weights.heads % weights.kv_heads:
        return f"{weights.heads} attention heads are not a multiple of {weights.kv_heads} kv heads"
    return None


def tensors(weights: DecoderWeights) -> list[torch.Tensor]:
    """Every weight tensor, in a fixed order (biases that are None are skipped)."""
    out = [weights.embed, weights.norm, weights.lm_head.weight]
    for layer in weights.layers:
        out += [layer.input_norm, layer.post_norm]
        for lin in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
            out += [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    if weights.lm_head.bias is not None:
        out.append(weights.lm_head.bias)
    return out


def signature(weights: DecoderWeights) -> tuple:
    """Storage addresses, shapes and dtypes: changes when a parameter is replaced, not when updated."""
    return tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors(weights))


def shadow(weights: DecoderWeights, dtype: torch.dtype) -> DecoderWeights:
    """A copy of every weight cast to ``dtype`` (tied weights stay one tensor); RoPE stays fp32."""
    copies: dict[int, torch.Tensor] = {}

    def cast(t):
        if t is None:
            return None
        if id(t) not in copies:
            copies[id(t)] = t.detach().to(dtype=dtype, copy=True)
        return copies[id(t)]

    def cast_linear(lin: Linear) -> Linear:
        return Linear(cast(lin.weight), cast(lin.bias))

    layers = [
        dataclasses.replace(
            layer, input_norm=cast(layer.input_norm), post_norm=cast(layer.post_norm),
            **{f: cast_linear(getattr(layer, f)) for f in ("q", "k", "v", "o", "gate", "up", "down")},
        )
        for layer in weights.layers
    ]
    return dataclasses.replace(
        weights, embed=cast(weights.embed), layers=layers, norm=cast(weights.norm),
        lm_head=cast_linear(weights.lm_head),
    )


@torch.no_grad()
def refresh(target: DecoderWeights, source: DecoderWeights) -> None:
    """Copy the current values of ``source`` into the shadow ``target`` (same order, in place)."""
    for dst, src in zip(tensors(target), tensors(source)):
        if dst is not src:
            dst.copy_(src)
