"""Preference losses on sequence log-probs / rewards: dpo_loss (DPO family) and bradley_terry_loss.

Public function -> autograd.Function -> Triton launchers (`rftengine.kernels.preference`) on
CUDA or the torch references below elsewhere. Inputs are [B] per-pair values (see
`sequence_logprobs` to get them from per-token log-probs). `preference_pair_reference` is the
closed form of one pair's loss and its derivative in the margin h (the kernels'
`preference_pair`), importable by fused heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rftengine.ops._checks import (
    capturing,
    check_choice,
    check_finite,
    check_floating,
    check_ndim,
    check_non_negative,
    check_number,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
)
from rftengine.ops._deprecation import deprecated_call_forms
from rftengine.ops._dispatch import use_triton
from rftengine.ops._precision import accumulation_dtype

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


# ---------------------------------------------------------------- closed forms


def preference_pair_reference(h: torch.Tensor, beta: float, simpo_gamma: float, smoothing: float, loss_type: str):
    """One pair's loss and ``dloss/dh`` from its margin h (fp32/fp64 tensors).

    - sigmoid / simpo (``z = β·h - γ``): ``(1-ε)·softplus(-z) + ε·softplus(z)``
      (= ``-(1-ε)·log σ(z) - ε·log σ(-z)``);
    - robust: ``((1-ε)·softplus(-z) - ε·softplus(z)) / (1 - 2ε)``;
    - ipo: ``(h - 1/(2β))²``;
    - hinge: ``relu(1 - β·h)``.
    """
    if loss_type == "ipo":
        d = h - 0.5 / beta
        return d * d, 2.0 * d
    if loss_type == "hinge":
        z = beta * h
        # built from z so that float64 keeps β exact; a NaN margin keeps a NaN derivative
        d_h = torch.where(z < 1.0, torch.full_like(z, -beta), torch.zeros_like(z))
        return torch.relu(1.0 - z), torch.where(torch.isnan(z), z, d_h)
    z = beta * h - simpo_gamma
    sig_neg, sig_pos = torch.sigmoid(-z), torch.sigmoid(z)
    if loss_type == "robust":
        inv = 1.0 / (1.0 - 2.0 * smoothing)
        loss = ((1.0 - smoothing) * F.softplus(-z) - smoothing * F.softplus(z)) * inv
        d_z = (-(1.0 - smoothing) * sig_neg - smoothing * sig_pos) * inv
    else:
        loss = (1.0 - smoothing) * F.softplus(-z) + smoothing * F.softplus(z)
        d_z = -(1.0 - smoothing) * sig_neg + smoothing * sig_pos
    return loss, beta * d_z


def dpo_margin_reference(pc, pr, rc, rr, lc, lr):
    """``h = a_c·(pc - rc) - a_r·(pr - rr)``, a = 1/length when lengths are given, else 1;
    missing references count as 0. Returns (h, a_c, a_r) in the compute dtype."""
    acc = accumulation_dtype(pc, pr)
    chosen, rejected = pc.to(acc), pr.to(acc)
    if rc is not None:
        chosen, rejected = chosen - rc.to(acc), rejected - rr.to(acc)
    a_c = 1.0 / lc.to(acc) if lc is not None else torch.ones_like(chosen)
    a_r = 1.0 / lr.to(acc) if lr is not None else torch.ones_like(rejected)
    return a_c * chosen - a_r * rejected, a_c, a_r


def dpo_forward_reference(pc, pr, rc, rr, lc, lr, loss_type: str, beta, simpo_gamma, smoothing):
    h, _, _ = dpo_margin_reference(pc, pr, rc, rr, lc, lr)
    return preference_pair_reference(h, beta, simpo_gamma, smoothing, loss_type)[0]


def dpo_backward_reference(pc, pr, rc, rr, lc, lr, loss_type: str, beta, simpo_gamma, smoothing,
                           grad, want_policy, want_ref):
    h, a_c, a_r = dpo_margin_reference(pc, pr, rc, rr, lc, lr)
    d_h = preference_pair_reference(h, beta, simpo_gamma, smoothing, loss_type)[1] * grad.to(h.dtype)
    d_c, d_r = d_h * a_c, -d_h * a_r
    want_ref = want_ref and rc is not None
    return (
        d_c.to(pc.dtype) if want_policy else None,
        d_r.to(pr.dtype) if want_policy else None,
        (-d_c).to(rc.dtype) if want_ref else None,
        (-d_r).to(rr.dtype) if want_ref else None,
    )


def bradley_terry_forward_reference(r_chosen, r_rejected, margin_t, margin: float, center: float):
    acc = accumulation_dtype(r_chosen, r_rejected)
    rc, rr = r_chosen.to(acc), r_rejected.to(acc)
    m = margin_t.to(acc) if margin_t is not None else margin
    s = rc + rr
    return F.softplus(-(rc - rr - m)) + center * s * s


def bradley_terry_backward_reference(r_chosen, r_rejected, margin_t, margin: float, center: float, grad):
    acc = accumulation_dtype(r_chosen, r_rejected)
    rc, rr = r_chosen.to(acc), r_rejected.to(acc)
    m = margin_t.to(acc) if margin_t is not None else margin
    sig_neg = torch.sigmoid(-(rc - rr - m))
    center_term = 2.0 * center * (rc + rr)
    g = grad.to(acc)
    return (g * (center_term - sig_neg)).to(r_chosen.dtype), (g * (center_term + sig_neg)).to(r_rejected.dtype)


# ---------------------------------------------------------------- autograd


class _DPOPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pc, pr, rc, rr, lc, lr, loss_type, beta, simpo_gamma, smoothing, triton_path):
        if triton_path:
            from rftengine.kernels import preference as kernel

            code = kernel.DPO_LOSS_TYPES[loss_type]
            losses = kernel.dpo_forward(pc, pr, rc, rr, lc, lr, code, beta, simpo_gamma, smoothing)
        else:
            losses = dpo_forward_reference(pc, pr, rc, rr, lc, lr, loss_type, beta, simpo_gamma, smoothing)
        ctx.save_for_backward(pc, pr, rc, rr, lc, lr)
        ctx.args, ctx.triton_path = (loss_type, beta, simpo_gamma, smoothing), triton_path
        return losses

    @staticmethod
    def backward(ctx, grad):
        pc, pr, rc, rr, lc, lr = ctx.saved_tensors
        want_policy = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        want_ref = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        nones = (None,) * 7
        if not (want_policy or want_ref):
            return (None, None, None, None) + nones
        loss_type, beta, simpo_gamma, smoothing = ctx.args
        if ctx.triton_path:
            from rftengine.kernels import preference as kernel

            grads = kernel.dpo_backward(
                pc, pr, rc, rr, lc, lr, kernel.DPO_LOSS_TYPES[loss_type], beta, simpo_gamma, smoothing,
                grad.contiguous(), want_policy, want_ref,
            )
        else:
            grads = dpo_backward_reference(
                pc, pr, rc, rr, lc, lr, loss_type, beta, simpo_gamma, smoothing, grad, want_policy, want_ref
            )
        return grads + nones


class _BradleyTerryPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r_chosen, r_rejected, margin_t, margin, center, triton_path):
        if triton_path:
            from rftengine.kernels import preference as kernel

            losses = kernel.bradley_terry_forward(r_chosen, r_rejected, margin_t, margin, center)
        else:
            losses = bradley_terry_forward_reference(r_chosen, r_rejected, margin_t, margin, center)
        ctx.save_for_backward(r_chosen, r_rejected, margin_t)
        ctx.args, ctx.triton_path = (margin, center), triton_path
        return losses

    @staticmethod
    def backward(ctx, grad):
        r_chosen, r_rejected, margin_t = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None
        if ctx.triton_path:
            from rftengine.kernels import preference as kernel

            d_c, d_r = kernel.bradley_terry_backward(
                r_chosen, r_rejected, margin_t, *ctx.args, grad.contiguous()
            )
        else:
            d_c, d_r = bradley_terry_backward_reference(r_chosen, r_rejected, margin_t, *ctx.args, grad)
        return d_c, d_r, None, None, None, None


# ---------------------------------------------------------------- validation


def _check_pairs(name: str, t: torch.Tensor, n: int | None) -> None:
    check_floating(name, t)
    check_ndim(name, t, (1,), "[B] (one value per pair)")
    if n is None and t.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one pair, got shape {tuple(t.shape)}")
    if n is not None:
        check_shape(name, t, (n,), "one value per pair")
    check_finite(name, t)


def _check_lengths(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    check_tensor(name, t)
    check_shape(name, t, (n,), "one token count per pair")
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{name} must be an integer or floating tensor of token counts, got {t.dtype}")
    lengths = t.to(torch.float32)
    check_finite(name, lengths)
    # a value check, so skipped during CUDA-graph capture like every other one (no host sync)
    if not capturing() and not bool((lengths > 0).all()):
        raise ValueError(f"{name} must be > 0 for every pair (token counts), got min {float(lengths.min())}")
    return lengths.contiguous()


def check_dpo_options(loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float) -> None:
    """The scalar options of `dpo_loss` (shared with `fused_dpo_loss`): finite, in range."""
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check_positive("beta", beta)
    check_non_negative("label_smoothing", label_smoothing)
    if loss_type in ("ipo", "hinge") and label_smoothing != 0:
        raise ValueError(f"label_smoothing must be 0 for loss_type={loss_type!r}, got {label_smoothing!r}")
    if loss_type == "robust" and not label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be < 0.5 for loss_type='robust', got {label_smoothing!r}")
    if label_smoothing > 0.5:
        raise ValueError(f"label_smoothing must be <= 0.5, got {label_smoothing!r}")
    check_non_negative("simpo_gamma", simpo_gamma)
    if loss_type != "simpo" and simpo_gamma != 0:
        raise ValueError(f"simpo_gamma (SimPO target margin) must be 0 for loss_type={loss_type!r}, got {simpo_gamma!r}")


def _mean_stats(**values: torch.Tensor) -> dict:
    return {k: v.detach().mean() for k, v in values.items()}


# ---------------------------------------------------------------- public API


@deprecated_call_forms(renamed={"gamma": "simpo_gamma"})
def dpo_loss(
    pol_chosen: torch.Tensor,
    pol_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
):
    """Direct preference optimisation and its variants on sequence log-probs of pairs.

    With the margin ``h = (π_c - ref_c) - (π_r - ref_r)`` (π = policy sequence log-prob),
    ε = ``label_smoothing``, σ the logistic function, per pair:

    - ``"sigmoid"``: DPO (Rafailov et al., 2023), with ε > 0 conservative DPO
      (cDPO, Mitchell, 2023): ``-(1-ε)·log σ(βh) - ε·log σ(-βh)``;
    - ``"robust"``: robust DPO (Chowdhury et al., 2024, "Provably Robust DPO", arXiv
      2403.00409), the unbiased loss under label-flip rate ε < 1/2, as in TRL:
      ``((1-ε)·(-log σ(βh)) + ε·log σ(-βh)) / (1 - 2ε)``;
    - ``"ipo"``: IPO (Azar et al., 2023, arXiv 2310.12036, eq. 17):
      ``(h - 1/(2β))²``; with ``chosen_lengths``/``rejected_lengths`` each log-prob is first
      divided by its sequence length (the per-token average that TRL's IPO uses); without
      them the inputs are used as given (pass averaged log-probs yourself);
    - ``"hinge"``: SLiC hinge (Zhao et al., 2023, arXiv 2305.10425): ``relu(1 - βh)``;
    - ``"simpo"``: SimPO (Meng et al., 2024, arXiv 2405.14734): no reference,
      length-normalised policy log-probs and a target margin γ = ``simpo_gamma``:
      ``-(1-ε)·log σ(β(π_c/|y_c| - π_r/|y_r|) - γ) - ε·log σ(-(...))``.

    The loss is the mean over pairs.

    Args:
        pol_chosen, pol_rejected: ``[B]`` float policy sequence log-probs (get gradients).
        ref_chosen, ref_rejected: ``[B]`` float reference sequence log-probs (constant, but
            differentiable); required except for ``"simpo"``, which ignores them (None is fine).
        beta: > 0.
        loss_type: one of ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``, ``"simpo"``.
        label_smoothing: ε in [0, 0.5] for sigmoid/simpo, [0, 0.5) for robust; must be 0
            for ipo and hinge.
        simpo_gamma: SimPO target margin >= 0; must be 0 for other loss types
            (``gamma``: deprecated name).
        chosen_lengths, rejected_lengths: ``[B]`` token counts > 0 (int or float); required
            for ``"simpo"``, optional for ``"ipo"``, rejected for the others.

    Returns:
        ``(loss, stats)``: ``loss`` 0-d float32 (float64 for float64 inputs); ``stats``
        detached means over pairs: ``loss``, ``rewards/chosen`` (``β·a_c·(π_c - ref_c)``, with
        a = 1/length where lengths are used; SimPO: ``β·π_c/|y_c|``), ``rewards/rejected``,
        ``rewards/margins``, ``rewards/accuracies`` (chosen reward > rejected reward),
        ``logps/chosen``, ``logps/rejected`` (the inputs as given).
    """
    _check_pairs("pol_chosen", pol_chosen, None)
    n = pol_chosen.shape[0]
    _check_pairs("pol_rejected", pol_rejected, n)
    check_dpo_options(loss_type, beta, label_smoothing, simpo_gamma)
    simpo = loss_type == "simpo"
    if not simpo:
        for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
            if ref is None:
                raise ValueError(f"{name} must be a [B] tensor for loss_type={loss_type!r}, got None")
            _check_pairs(name, ref, n)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together or both left None")
    if chosen_lengths is not None and loss_type not in ("ipo", "simpo"):
        raise ValueError(
            f"chosen_lengths/rejected_lengths are used only by 'ipo' and 'simpo', got loss_type={loss_type!r}"
        )
    if simpo and chosen_lengths is None:
        raise ValueError(
            "loss_type='simpo' needs chosen_lengths and rejected_lengths ([B] token counts), got None"
        )
    refs = (None, None) if simpo else (ref_chosen.contiguous(), ref_rejected.contiguous())
    check_same_device(
        pol_chosen=pol_chosen, pol_rejected=pol_rejected, ref_chosen=refs[0], ref_rejected=refs[1],
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )
    lc = _check_lengths("chosen_lengths", chosen_lengths, n) if chosen_lengths is not None else None
    lr = _check_lengths("rejected_lengths", rejected_lengths, n) if rejected_lengths is not None else None

    acc = accumulation_dtype(pol_chosen, pol_rejected)
    triton_path = use_triton(pol_chosen, pol_rejected) and acc == torch.float32
    losses = _DPOPairs.apply(
        pol_chosen.contiguous(), pol_rejected.contiguous(), *refs, lc, lr,
        loss_type, float(beta), float(simpo_gamma), float(label_smoothing), triton_path,
    )
    loss = losses.mean()
    with torch.no_grad():
        chosen = pol_chosen.to(acc) - (refs[0].to(acc) if refs[0] is not None else 0.0)
        rejected = pol_rejected.to(acc) - (refs[1].to(acc) if refs[1] is not None else 0.0)
        if lc is not None:
            chosen, rejected = chosen / lc.to(acc), rejected / lr.to(acc)
        r_c, r_r = beta * chosen, beta * rejected
    stats = {"loss": loss.detach()}
    stats.update(_mean_stats(**{
        "rewards/chosen": r_c, "rewards/rejected": r_r, "rewards/margins": r_c - r_r,
        "rewards/accuracies": (r_c > r_r).to(acc),
        "logps/chosen": pol_chosen.to(acc), "logps/rejected": pol_rejected.to(acc),
    }))
    return loss, stats


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_coef: float | None = None,
):
    """Bradley-Terry reward-model loss on scalar rewards of preference pairs.

    ``loss = mean(-log σ(r_c - r_r - m)) + c·mean((r_c + r_r)²)`` with m = ``margin``
    (Llama 2's preference-strength margin, Touvron et al., 2023) and c = ``center_coef``
    (keeps rewards centred at 0, Eisenstein et al., 2023).

    Args:
        r_chosen, r_rejected: ``[B]`` float rewards, finite (get gradients).
        margin: None, a number, or a ``[B]`` float tensor (constant, no gradient).
        center_coef: None or a number >= 0.

    Returns:
        ``(loss, stats)``: ``loss`` 0-d float32 (float64 for float64 inputs); ``stats``
        detached: ``loss``, ``accuracy`` (mean of r_c > r_r), ``margin`` (mean r_c - r_r),
        ``rewards/chosen``, ``rewards/rejected`` (means).
    """
    _check_pairs("r_chosen", r_chosen, None)
    n = r_chosen.shape[0]
    _check_pairs("r_rejected", r_rejected, n)
    margin_t, margin_value = None, 0.0
    if isinstance(margin, torch.Tensor):
        _check_pairs("margin", margin, n)
        margin_t = margin.detach().contiguous()
    elif margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"margin must be None, a number or a [B] tensor, got {type(margin).__name__}")
        check_number("margin", margin)
        margin_value = float(margin)
    center = 0.0
    if center_coef is not None:
        check_non_negative("center_coef", center_coef)
        center = float(center_coef)
    check_same_device(r_chosen=r_chosen, r_rejected=r_rejected, margin=margin_t)

    triton_path = use_triton(r_chosen, r_rejected) and accumulation_dtype(r_chosen, r_rejected) == torch.float32
    losses = _BradleyTerryPairs.apply(
        r_chosen.contiguous(), r_rejected.contiguous(), margin_t, margin_value, center, triton_path
    )
    loss = losses.mean()
    acc = losses.dtype
    rc, rr = r_chosen.detach().to(acc), r_rejected.detach().to(acc)
    stats = {"loss": loss.detach()}
    stats.update(_mean_stats(**{
        "accuracy": (rc > rr).to(acc), "margin": rc - rr, "rewards/chosen": rc, "rewards/rejected": rr,
    }))
    return loss, stats
