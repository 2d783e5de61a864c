"""The lm_head chunk engine shared by `linear_token_logprobs` and the fused heads (private).

Rows of ``hidden [N, H]`` are swept in chunks of C rows; each chunk's logits
``h_c @ W.T [C, V]`` are computed by one matmul into a bounded buffer, reduced by the
softmax passes (the Triton launchers in `rftengine.kernels.logprobs` or their torch
references in `rftengine.ops.logprobs`), and dropped. Three sweeps: forward only
(`logprob_sweep`), backward only (`gradient_sweep`, logits recomputed), and forward plus
backward in one (`fused_sweep`, for losses whose derivative in logp is local to a chunk).
`prepare_head_inputs` validates an op's lm_head inputs and compacts masked rows out; a
`Plan` fixes the matmul dtypes and the chunk size of one call.

Masked rows are compacted: the kept rows are ordered first by a stable sort and only they
enter the matmuls. The number of kept rows is read on the host in the same device-to-host copy
as the target-range check (the one sync every op's validation makes, skipped during CUDA-graph
capture); under capture the op does not compact and masked rows cost matmul work but no
softmax traffic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rftengine.ops._checks import (
    as_mask,
    capturing,
    check_floating,
    check_index_range,
    check_integer,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
)
from rftengine.ops._dispatch import use_triton
from rftengine.ops._precision import accumulation_dtype
from rftengine.ops.logprobs import logprob_grads_reference_, logprob_stats_reference

# Bytes of one chunk of logits. On CUDA that is the op's whole extra memory; the torch
# reference holds about three temporaries of a chunk, so it takes smaller chunks.
_CUDA_CHUNK_BYTES = 384 << 20
_HOST_CHUNK_BYTES = 32 << 20


def default_chunk_rows(n_rows: int, vocab: int, logits_bytes: int, device: torch.device) -> int:
    """Rows per chunk: as many as the logits budget allows, in whole 128-row matmul tiles."""
    budget = _CUDA_CHUNK_BYTES if device.type == "cuda" else _HOST_CHUNK_BYTES
    rows = budget // max(vocab * logits_bytes, 1)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(rows, n_rows))


# device -> result of the probe below; filled only outside CUDA-graph capture
_FP32_OUT_PROBED: dict[torch.device, bool] = {}


def _fp32_out_matmuls(device: torch.device) -> bool:
    """Whether this device's matmuls take half operands and write / accumulate fp32.

    `torch.mm(..., out_dtype=float32)` and `aten.addmm.dtype_out` exist on CUDA from torch 2.8;
    probed once per device (one sync, at the first call outside capture) so older builds fall
    back cleanly. During CUDA-graph capture the probe cannot run (its sync would break the
    capture): an unprobed device then takes the plain half-precision matmuls, for this call
    only, and nothing is cached.
    """
    if device.type != "cuda":
        return False
    if device in _FP32_OUT_PROBED:
        return _FP32_OUT_PROBED[device]
    if capturing():
        return False
    try:
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        out = torch.mm(a, a, out_dtype=torch.float32)
        acc = torch.ones(16, 16, device=device, dtype=torch.float32)
        torch.ops.aten.addmm.dtype_out(acc, a, a, torch.float32, out=acc)
        ok = out.dtype == torch.float32 and bool((acc == 17).all()) and bool((out == 16).all())
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        ok = False
    _FP32_OUT_PROBED[device] = ok
    return ok


class Plan(NamedTuple):
    """How one call runs its matmuls and chunks (fixed per call, from shapes and device)."""

    mm_dtype: torch.dtype      # operands of every matmul (the input dtype on CUDA)
    logits_dtype: torch.dtype  # dtype of the logits chunk (fp32 whenever it can be)
    fp32_out: bool             # half operands, fp32 logits written by cuBLAS
    chunk: int                 # rows per chunk
    triton: bool               # softmax passes in Triton (else the torch references)


def make_plan(dtype: torch.dtype, device: torch.device, n_rows: int, vocab: int,
              chunk_size: int | None, triton_path: bool) -> Plan:
    acc = accumulation_dtype(dtype)
    if device.type == "cuda":
        fp32_out = dtype in (torch.float16, torch.bfloat16) and _fp32_out_matmuls(device)
        mm_dtype, logits_dtype = dtype, (torch.float32 if fp32_out else dtype)
    else:
        # CPU matmuls in half precision are slow and no more faithful: upcast the operands
        fp32_out, mm_dtype, logits_dtype = False, acc, acc
    if chunk_size is None:
        size = torch.empty((), dtype=logits_dtype).element_size()
        chunk = default_chunk_rows(n_rows, vocab, size, device)
    else:
        chunk = max(1, min(chunk_size, n_rows))
    return Plan(mm_dtype, logits_dtype, fp32_out, chunk, triton_path)


def _passes(triton_path: bool):
    if triton_path:
        from rftengine.kernels import logprobs as kernel

        return kernel.chunk_stats, kernel.chunk_grads_
    return logprob_stats_reference, logprob_grads_reference_


# ---------------------------------------------------------------------------------------
# the chunk sweeps


class HeadInputs(NamedTuple):
    """Validated, flattened inputs of one lm_head call; rows are in compacted order."""

    hidden: torch.Tensor              # [N, H]
    weight: torch.Tensor              # [V, H]
    bias: torch.Tensor | None         # [V]
    targets: torch.Tensor             # [n] targets of the processed rows
    keep: torch.Tensor | None         # [n] bool, only when rows are not compacted (capture)
    rows: torch.Tensor | None         # [n] int64 kept row ids, None = rows 0..n-1 in order
    n_total: int                      # N
    plan: Plan
    counts: tuple[int, ...] | None = None  # host copy of the caller's `host_counts`, if read


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def chunk_hidden(inp: HeadInputs, start: int, stop: int) -> torch.Tensor:
    if inp.rows is None:
        return inp.hidden[start:stop]
    return inp.hidden.index_select(0, inp.rows[start:stop])


def matmul_weight(inp: HeadInputs) -> torch.Tensor:
    """The weight in the matmul dtype (the weight itself on CUDA; an upcast copy on CPU)."""
    return inp.weight if inp.weight.dtype == inp.plan.mm_dtype else inp.weight.to(inp.plan.mm_dtype)


def chunk_logits(h_c: torch.Tensor, w_mm: torch.Tensor, plan: Plan) -> torch.Tensor:
    """[C, H] @ [V, H].T -> [C, V] in plan.logits_dtype (fp32 accumulation in every case)."""
    h_c = h_c.to(plan.mm_dtype)
    if plan.fp32_out:
        return torch.mm(h_c, w_mm.t(), out_dtype=torch.float32)
    return torch.mm(h_c, w_mm.t())


def chunk_slice(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if t is None else t[start:stop]


def to_rows(inp: HeadInputs, full: torch.Tensor) -> torch.Tensor:
    """[N] per-token values -> [n] in processed-row order."""
    return full if inp.rows is None else full.index_select(0, inp.rows)


def from_rows(inp: HeadInputs, values: torch.Tensor) -> torch.Tensor:
    """[n] values in processed-row order -> [N], zero at dropped (masked) rows."""
    if inp.rows is None:
        return values
    full = values.new_zeros(inp.n_total)
    return full.index_copy_(0, inp.rows, values)


class GradBuffers:
    """Accumulators of dh, dW, db over the chunks of one sweep."""

    def __init__(self, inp: HeadInputs, need_h: bool, need_w: bool, need_b: bool,
                 fp32_weight_grad: bool):
        h, w, plan = inp.hidden, inp.weight, inp.plan
        self.inp = inp
        self.h = torch.zeros(h.shape, device=h.device, dtype=h.dtype) if need_h else None
        if need_w:
            w_dtype = torch.float32 if fp32_weight_grad and w.dtype != torch.float64 else plan.mm_dtype
            self.w = torch.zeros(w.shape, device=w.device, dtype=w_dtype)
        else:
            self.w = None
        self.b = (
            torch.zeros(w.shape[0], device=w.device, dtype=accumulation_dtype(w))
            if need_b else None
        )

    def add_chunk(self, grad_c: torch.Tensor, h_c: torch.Tensor, w_mm: torch.Tensor,
                  start: int, stop: int) -> None:
        """grad_c [C, V] (plan.mm_dtype) = dloss/dlogits of rows start:stop."""
        inp, plan = self.inp, self.inp.plan
        if self.h is not None:
            if inp.rows is None and self.h.dtype == plan.mm_dtype:
                torch.mm(grad_c, w_mm, out=self.h[start:stop])
            elif inp.rows is None:
                self.h[start:stop] = torch.mm(grad_c, w_mm)
            else:
                self.h.index_copy_(0, inp.rows[start:stop], torch.mm(grad_c, w_mm).to(self.h.dtype))
        if self.w is not None:
            h_mm = h_c.to(plan.mm_dtype)
            if self.w.dtype == plan.mm_dtype:
                self.w.addmm_(grad_c.t(), h_mm)
            elif plan.fp32_out:
                torch.ops.aten.addmm.dtype_out(self.w, grad_c.t(), h_mm, self.w.dtype, out=self.w)
            else:
                self.w.addmm_(grad_c.t().to(self.w.dtype), h_mm.to(self.w.dtype))
        if self.b is not None:
            self.b += grad_c.sum(0, dtype=self.b.dtype)

    def results(self, weight_dtype: torch.dtype, bias_dtype: torch.dtype | None):
        dw = self.w.to(weight_dtype) if self.w is not None else None
        db = self.b.to(bias_dtype) if self.b is not None else None
        return self.h, dw, db


def logprob_sweep(inp: HeadInputs, temperature: float, with_entropy: bool):
    """Forward only: (logp, lse, entropy or None) [n] fp32, in processed-row order."""
    stats, _ = _passes(inp.plan.triton)
    n = inp.targets.shape[0]
    acc = accumulation_dtype(inp.hidden)
    logp = torch.zeros(n, device=inp.hidden.device, dtype=acc)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else None
    w_mm = matmul_weight(inp)
    for start, stop in chunk_bounds(n, inp.plan.chunk):
        logits = chunk_logits(chunk_hidden(inp, start, stop), w_mm, inp.plan)
        lp, ls, ent = stats(
            logits, inp.bias, inp.targets[start:stop], chunk_slice(inp.keep, start, stop),
            temperature, with_entropy,
        )
        logp[start:stop] = lp
        lse[start:stop] = ls
        if with_entropy:
            entropy[start:stop] = ent
    return logp, lse, entropy


def gradient_sweep(
    inp: HeadInputs, temperature: float, lse: torch.Tensor, entropy: torch.Tensor | None,
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, grads: GradBuffers,
) -> None:
    """Backward: recompute each chunk's logits, overwrite them with dlogits, feed dh/dW/db."""
    _, grads_in_place = _passes(inp.plan.triton)
    w_mm = matmul_weight(inp)
    for start, stop in chunk_bounds(inp.targets.shape[0], inp.plan.chunk):
        h_c = chunk_hidden(inp, start, stop)
        logits = chunk_logits(h_c, w_mm, inp.plan)
        grad_c = grads_in_place(
            logits, inp.bias, inp.targets[start:stop], chunk_slice(inp.keep, start, stop),
            temperature, lse[start:stop], chunk_slice(entropy, start, stop),
            grad_logp[start:stop], chunk_slice(grad_entropy, start, stop), inp.plan.mm_dtype,
        )
        grads.add_chunk(grad_c, h_c, w_mm, start, stop)


def fused_sweep(inp: HeadInputs, temperature: float, with_entropy: bool, token_grad,
                grads: GradBuffers, bounds: list[tuple[int, int]] | None = None):
    """Forward and backward in one sweep, for losses whose dloss/dlogp_i is local to a chunk.

    Per chunk: logits, the stats pass, ``token_grad(start, stop, logp_c, entropy_c) ->
    (g_logp_c, g_entropy_c or None)`` on the chunk's [C] vectors, the in-place gradient pass,
    and the dh/dW/db matmuls: 6NHV FLOPs, the logits computed once.
    `bounds`: the chunks as (start, stop) row ranges (default: `chunk_bounds` of the plan);
    rows outside every range get logp 0 and no gradient.
    Returns (logp, entropy or None) [n] in processed-row order.
    """
    stats, grads_in_place = _passes(inp.plan.triton)
    n = inp.targets.shape[0]
    acc = accumulation_dtype(inp.hidden)
    logp = torch.zeros(n, device=inp.hidden.device, dtype=acc)
    entropy = torch.zeros_like(logp) if with_entropy else None
    w_mm = matmul_weight(inp)
    for start, stop in chunk_bounds(n, inp.plan.chunk) if bounds is None else bounds:
        h_c = chunk_hidden(inp, start, stop)
        logits = chunk_logits(h_c, w_mm, inp.plan)
        keep_c = chunk_slice(inp.keep, start, stop)
        lp, lse, ent = stats(logits, inp.bias, inp.targets[start:stop], keep_c, temperature, with_entropy)
        g, g_ent = token_grad(start, stop, lp, ent)
        grad_c = grads_in_place(
            logits, inp.bias, inp.targets[start:stop], keep_c, temperature, lse, ent,
            g.contiguous(), g_ent.contiguous() if g_ent is not None else None, inp.plan.mm_dtype,
        )
        grads.add_chunk(grad_c, h_c, w_mm, start, stop)
        logp[start:stop] = lp
        if with_entropy:
            entropy[start:stop] = ent
    return logp, entropy


# ---------------------------------------------------------------------------------------
# validation and compaction


def _kept_count(targets: torch.Tensor, vocab: int, keep: torch.Tensor | None,
                extra: torch.Tensor | None = None) -> tuple[int | None, tuple[int, ...] | None]:
    """Validate target ids and return (number of kept rows, host copy of `extra`), in one
    device->host copy.

    The count is None while a CUDA graph is being captured (no sync allowed; the caller then
    does not compact). `extra` (integer counts) is read only where that copy happens (a
    mask, no capture), else None.
    """
    if keep is None:
        check_index_range("targets", targets, vocab)
        return targets.numel(), None
    if capturing():
        return None, None
    if targets.numel() == 0:
        return 0, None
    bad = ((targets < 0) | (targets >= vocab)) & keep
    head = torch.stack([bad.sum(), keep.sum()])
    if extra is not None:
        head = torch.cat([head, extra.reshape(-1).to(head.dtype)])
    n_bad, n_kept, *rest = head.tolist()
    if n_bad:
        check_index_range("targets", targets, vocab, keep)  # raises with the offending values
    return int(n_kept), (tuple(int(v) for v in rest) if extra is not None else None)


def prepare_head_inputs(
    hidden, weight, targets, *, bias, mask, temperature, chunk_size,
    names: tuple[str, str, str, str] = ("hidden", "weight", "targets", "bias"),
    host_counts: torch.Tensor | None = None,
) -> tuple[HeadInputs, torch.Size]:
    """Validate the lm_head inputs and build the compaction plan. Returns (inputs, lead shape).

    `names` are the argument names the error messages use (hidden, weight, targets, bias).
    `host_counts`: optional integer tensor the caller needs on the host; it rides on the
    kept-count copy (no extra sync) and lands in ``inputs.counts`` (None where no copy is
    made: no mask, or CUDA-graph capture).
    """
    h_name, w_name, t_name, b_name = names
    check_floating(h_name, hidden)
    check_floating(w_name, weight)
    check_tensor(t_name, targets)
    check_integer(t_name, targets)
    if hidden.dim() not in (2, 3) or hidden.shape[-1] == 0:
        raise ValueError(f"{h_name} must be [N, H] or [B, T, H] with H > 0, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_name} must be [V, H] with V > 0 and H = {hidden.shape[-1]} "
            f"(the last dim of {h_name}), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{w_name} must have the dtype of {h_name} ({hidden.dtype}), got {weight.dtype}")
    vocab = weight.shape[0]
    if bias is not None:
        check_floating(b_name, bias)
        check_shape(b_name, bias, (vocab,), f"one entry per row of {w_name}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"{b_name} must have the dtype of {w_name} ({weight.dtype}), got {bias.dtype}")
    check_shape(t_name, targets, hidden.shape[:-1], f"{h_name}.shape[:-1]")
    device = check_same_device(**{h_name: hidden, w_name: weight, t_name: targets, b_name: bias, "mask": mask})
    check_positive("temperature", temperature)
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = targets.shape
    keep = as_mask("mask", mask, lead, device)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    flat_keep = keep.reshape(-1).contiguous() if keep is not None else None  # kernels read it flat
    n_total = flat_t.shape[0]
    n_kept, counts = _kept_count(flat_t, vocab, flat_keep, host_counts)

    rows = None
    if flat_keep is not None and n_kept is not None:
        if n_kept < n_total:
            # stable: kept rows keep their order, so chunks read hidden rows ascending
            rows = torch.argsort((~flat_keep).to(torch.uint8), stable=True)[:n_kept]
            flat_t = flat_t.index_select(0, rows)
        flat_keep = None
    n = n_total if n_kept is None else n_kept
    triton_path = use_triton(hidden, weight) and hidden.dtype != torch.float64
    plan = make_plan(hidden.dtype, device, n, vocab, chunk_size, triton_path)
    inp = HeadInputs(flat_h, weight, bias, flat_t.contiguous(), flat_keep, rows, n_total, plan, counts)
    return inp, lead


# ---------------------------------------------------------------------------------------
# one-sweep autograd wrapper of the fused heads


def _scaled(t: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.mul_(grad.to(t.dtype))


class FusedSingleSweep(torch.autograd.Function):
    """Loss and gradients from one `fused_sweep`; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inp, temperature, with_entropy, token_grad,
                fp32_weight_grad, finish, bounds):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = GradBuffers(inp, need_h, need_w, need_b and bias is not None, fp32_weight_grad)
        logp, entropy = fused_sweep(inp, temperature, with_entropy, token_grad, grads, bounds)
        loss, stat_values = finish(logp, entropy)
        dh, dw, db = grads.results(weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(stat_values)
        return loss, stat_values

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        dh, dw, db = ctx.saved_tensors
        return (_scaled(dh, grad_loss), _scaled(dw, grad_loss), _scaled(db, grad_loss)) + (None,) * 7
