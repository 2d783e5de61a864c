"""The process group a run trains in: one process, or N ranks started by `torchrun`.

Everything that crosses ranks goes through these few functions, so the methods read the same
in one process (where each is the identity) and under `torch.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0: the one that logs, shows progress bars, plots and exports."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in one process).

    Token counts and statistics that cross rows (the global token count of an optimizer step,
    whitening moments, the KL controller's mean) go through here, so N ranks compute the numbers
    one process computes on the same global batch. A CPU tensor is reduced on the rank's GPU
    under nccl (which has no CPU collectives) and comes back on the CPU."""
    if not is_distributed():
        return tensor
    out = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (any shape) over every rank's elements: 0-d fp32. In one process,
    ``values.float().mean()``."""
    values = values.detach().float()
    if not is_distributed():
        return values.mean()
    total = all_reduce_sum(torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)]))
    return total[0] / total[1]


def global_std(values: torch.Tensor) -> torch.Tensor:
    """The population standard deviation of ``values`` over every rank's elements (two passes,
    as ``values.std(unbiased=False)`` in one process): 0-d fp32."""
    values = values.detach().float()
    if not is_distributed():
        return values.std(unbiased=False)
    return global_mean((values - global_mean(values)) ** 2).sqrt()


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks (the dict itself in one process).

    Every rank holds an equal share of the global batch (``shard_batch``), so the mean of the
    ranks' per-example means is the mean over the global batch; values equal on every rank
    (``grad_norm``, ``learning_rate``) come out unchanged; metrics named ``*max`` take the
    largest rank's value, metrics named ``*min`` the smallest. Every rank must pass the same keys."""
    if not is_distributed():
        return metrics
    keys = sorted(metrics)
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, keys)
    if any(k != keys for k in gathered):
        raise RuntimeError(f"ranks logged different metrics: {gathered}")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    means = (all_reduce_sum(values) / world_size()).tolist()
    # one collective for both: the max of -x is minus the min of x
    extremes = all_reduce_max(torch.cat([values, -values]))
    maxima, minima = extremes[:len(keys)].tolist(), (-extremes[len(keys):]).tolist()
    # A maximum (``policy/ratio_max``) is the largest rank's, not a mean of the ranks' maxima;
    # likewise a minimum (``clip_ratio/low_min``: the smallest rank's value).
    return {k: maxima[i] if k.endswith("max") else minima[i] if k.endswith("min") else means[i]
            for i, k in enumerate(keys)}


def require_divisible(batch_size: int, owner: str = "batch_size") -> None:
    """ValueError unless the global batch divides evenly over the ranks."""
    n = world_size()
    if batch_size % n:
        raise ValueError(
            f"{owner} must be a multiple of the world size {n} (the global batch is split evenly "
            f"over the ranks), got {batch_size}"
        )


def shard_batch(indices: list[int], owner: str = "batch_size") -> list[int]:
    """This rank's contiguous share of a global batch of example indices: rank ``r`` of ``N``
    takes ``indices[r*B/N : (r+1)*B/N]``. The global batch (``B = len(indices)``, the config's
    ``batch_size``) must divide by the world size; ``owner`` names the field in the error."""
    n = world_size()
    if n == 1:
        return indices
    require_divisible(len(indices), owner)
    share = len(indices) // n
    return indices[rank() * share:(rank() + 1) * share]


def even_share(n: int) -> tuple[int, int, int]:
    """``(start, stop, per_rank)``: this rank's contiguous share of ``n`` items that need not
    divide over the ranks (data to generate, pairs to precompute): ``per_rank = ceil(n / N)``,
    rank ``r`` takes ``[r * per_rank, min((r + 1) * per_rank, n))``, so the last ranks may hold
    fewer, or none. ``(0, n, n)`` in one process. A rank whose work runs collectives (a sharded
    model's forwards, ``gathered`` rollouts) pads its share to ``per_rank`` items, so that every
    rank runs as many; ``all_gather_cat`` of equal shares then lists item ``i`` at row ``i``."""
    n_ranks = world_size()
    per_rank = -(-n // n_ranks) if n else 0
    start = min(rank() * per_rank, n)
    return start, min(start + per_rank, n), per_rank


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``tensor`` (the same shape on every rank) concatenated along dim 0 in rank
    order, on ``tensor``'s device (``tensor`` itself in one process)."""
    if not is_distributed():
        return tensor
    local = tensor.contiguous().to(_comm_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, produced by this run's own code), in rank order
    (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(value: int | None) -> int | None:
    """The largest of the ranks' values (None counts as absent; None when every rank has None),
    e.g. the signal a stop was asked with, so that all ranks stop after the same step."""
    if not is_distributed():
        return value
    out = all_reduce_max(torch.tensor([-1 if value is None else int(value)], device=_comm_device()))
    return None if int(out) < 0 else int(out)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over all ranks (``tensor`` itself in one process;
    on any device, as ``all_reduce_sum``)."""
    if not is_distributed():
        return tensor
    out = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(tensor.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    """Where collectives' tensors live: the rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- torchrun


def launched_by_torchrun() -> bool:
    """True in a process that `torchrun` started as one of several ranks (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: str = "auto") -> Iterator[torch.device | None]:
    """Inside: the process group of a `torchrun` launch, torn down on exit; yields the rank's
    device (``cuda:LOCAL_RANK`` under nccl, the CPU under gloo). Outside torchrun nothing is
    initialised and it yields None: a one-process run is unchanged.

    ``device``: the run's setting, ``auto``, ``cpu`` or ``cuda`` (a rank's GPU is its
    ``LOCAL_RANK``: ``cuda:N`` is refused)."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield None
        return
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"device must be auto, cpu or cuda under torchrun (each rank uses cuda:LOCAL_RANK), got {device!r}"
        )
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ValueError("device is 'cuda' but this machine has no CUDA GPU")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                "give torchrun --nproc_per_node at most the number of GPUs"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        yield dev
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave together: a rank that tears its gloo connections down while a peer is still writing
    # its last results can abort the peer's exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- FSDP2


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (inside RewardModel/CausalLMWithValueHead wrappers):
    ``decoder_of(model).layers`` (``.h`` for GPT-2-style trunks)."""
    from rftengine.methods.modeling import _hf_model, decoder_of

    trunk = decoder_of(_hf_model(model))
    for name in ("layers", "h", "layer", "blocks"):
        layers = getattr(trunk, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(trunk).__name__} to shard (no .layers or .h)")


def shard_model(model: torch.nn.Module, *, precision: str = "fp32") -> torch.nn.Module:
    """Shard ``model`` over the process group with FSDP2: ``fully_shard`` on each decoder layer
    and on ``model`` itself (the root unit: embeddings, final norm, lm head), each ``ValueHead``
    inside (a critic's, a reward model's) its own fp32 unit. A PEFT model's decoder layers are
    its base's (``decoder_of`` reaches them through peft's wrappers): the adapters live in their
    layers' units, trainable over the frozen base.
    Returns ``model`` (now an FSDP module; its parameters are DTensor shards). Frozen models
    (the reference) are sharded the same way and stay frozen.

    The fused heads read ``lm_head.weight`` outside the head's forward, and the methods call
    the trunk rather than ``model.forward``: so the root unit is gathered by the trunk's
    forward (``_gather_root_with_trunk``) and, being the root, stays gathered through forward
    and backward (FSDP2 does not reshard the root after forward); its gradients, the head's
    included, are reduce-scattered at the end of backward like every unit's. The head is read
    after the trunk ran (``response_hidden`` before ``output_head``).

    Gradients are summed over the ranks, not averaged: every loss divides by the global count
    of its optimizer step (``all_reduce_sum``), so each rank's gradient is its share of the
    global one. ``precision`` "bf16-mixed"/"fp16-mixed" (``methods.config_base.PRECISIONS``): bf16
    or fp16 compute (FSDP2's param_dtype) and fp32 gradient reduction over the fp32 master
    weights (cast before sharding); "fp32" and "bf16": the weights' own dtype throughout.
    """
    from torch.distributed.fsdp import fully_shard

    from rftengine.methods.modeling import _hf_model, decoder_of

    if not is_distributed():
        return model
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=_mp_policy(precision))
    for head in _value_heads(model):
        # Its own fp32 unit: a ValueHead computes in fp32 (hidden.float()), which the root's
        # bf16/fp16 param_dtype would break.
        fully_shard(head)
    shard_module(model, precision=precision)
    hf = _hf_model(model)
    if hasattr(hf, "get_output_embeddings") and hf.get_output_embeddings() is not None:
        _gather_root_with_trunk(model, decoder_of(hf))
    return model


def shard_module(module: torch.nn.Module, *, precision: str = "fp32") -> torch.nn.Module:
    """``fully_shard`` on ``module`` as one unit (its sub-units, if any, already sharded), with
    the gradient sum over the ranks of ``shard_model``: a small trainable module outside the
    policy (PPO's shared value head). ``module`` itself in one process."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not is_distributed():
        return module
    fully_shard(module, mp_policy=_mp_policy(precision))
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; a factor of 1 needs none
    return module


def is_sharded(model: torch.nn.Module | None) -> bool:
    """True when ``model`` (or a submodule) is sharded with FSDP2 (``shard_model``)."""
    from torch.distributed.fsdp import FSDPModule

    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def _value_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    from rftengine.methods.modeling import ValueHead

    return [m for m in model.modules() if isinstance(m, ValueHead) and m is not model]


def _mp_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from rftengine.methods.precision import compute_dtype, is_mixed, param_dtype

    if not is_mixed(precision):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype(precision), reduce_dtype=param_dtype(precision))


def _gather_root_with_trunk(root: torch.nn.Module, trunk: torch.nn.Module) -> None:
    """Run the root unit's FSDP pre/post-forward around ``trunk``'s forward when the trunk is
    called directly (``final_hidden``), not from inside ``root.forward`` (which does it already).

    What ``register_fsdp_forward_method`` does for a method of the root, for a submodule's
    forward, with the FSDP state's private hooks (checked with torch 2.13)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    state = root._get_fsdp_state()
    active: list[bool] = []

    def pre(module, args, kwargs):
        outer = state._training_state == TrainingState.FORWARD  # inside root.forward: nothing to do
        active.append(not outer)
        if outer:
            return None
        return state._pre_forward(root, args, kwargs)

    def post(module, args, kwargs, output):
        if not active.pop():
            return None
        return state._post_forward(root, args, output)

    trunk.register_forward_pre_hook(pre, prepend=True, with_kwargs=True)
    trunk.register_forward_hook(post, with_kwargs=True, always_call=False)


def _full_bytes(units) -> int:
    """Bytes of the gathered parameters of FSDP ``units`` (in their compute dtype)."""
    total = 0
    for unit in units:
        for group in unit._get_fsdp_state()._fsdp_param_groups:
            for p in group.fsdp_params:
                dtype = group.mp_policy.param_dtype or p.sharded_param.dtype
                total += p._orig_size.numel() * dtype.itemsize
    return total


@contextmanager
def gathered(model: torch.nn.Module | None) -> Iterator[bool]:
    """Inside: every FSDP unit of ``model`` unsharded, so its modules hold the full weights
    (what a ``Generator`` reads); resharded on exit. Yields whether ``model`` is sharded (a
    model that is not, or None, is left as is).

    On CUDA, full weights that do not fit the device's free memory are a ValueError naming
    both sizes (tensor-parallel rollouts are not supported)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if model is not None else []
    if not units:
        yield False
        return
    device = next(model.parameters()).device
    if device.type == "cuda":
        need = _full_bytes(units)
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise ValueError(
                f"the rollout needs the policy's full weights on each GPU ({need / 2**30:.2f} GiB) but "
                f"{device} has {free / 2**30:.2f} GiB free: the limit of data-parallel rollouts is a model "
                "whose full weights fit one device (tensor-parallel rollouts are not supported)"
            )
    for unit in units:
        unit.unshard()
    try:
        yield True
    finally:
        for unit in units:
            unit.reshard()
