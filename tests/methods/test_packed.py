"""Padding-free (packed) training forwards: same losses and gradients as the padded forwards.

Every comparison runs the same model on the same padded batch twice, ``packing=False`` (the
padded forward, the oracle) and ``packing=True``, and checks fp32 agreement of losses and of
every parameter's gradient. Batches mix very different prompt and response lengths, so the
left-padded prompts and right-padded responses of the methods' layout are both exercised.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rftengine.methods import packed
from rftengine.methods.data import PreferenceExample, collate_preferences, make_sequence_batch
from rftengine.methods.dpo import DPOConfig, dpo_batch_loss, dpo_step, precompute_reference_logps
from rftengine.methods.modeling import (
    CausalLMWithValueHead,
    Reference,
    RewardModel,
    final_hidden,
    response_logprobs,
    reward_model_from_causal_lm,
)
from rftengine.methods.ppo import compute_advantages, make_ppo_context, ppo_loss
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig, reward_loss, reward_step
from rftengine.methods.rollout import Rollout
from rftengine.methods.sft import SFTConfig, sft_loss, sft_step
from rftengine.toy import tiny_causal_lm

FAMILIES = ["llama", "qwen2"]
# A packed forward that falls back to padded warns: here every fallback is a failure.
pytestmark = pytest.mark.filterwarnings("error:packing is not exact:UserWarning")
RTOL, ATOL = 1e-5, 1e-6


def _lm(tokenizer, family: str, seed: int = 0):
    return tiny_causal_lm(len(tokenizer), family, seed=seed, hidden_size=32)


def _ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 30, (n,), generator=gen).tolist()


def _pairs(lengths) -> list[PreferenceExample]:
    """Preference pairs with the given (prompt, chosen, rejected) lengths."""
    gen = torch.Generator().manual_seed(0)
    return [PreferenceExample(_ids(gen, p), _ids(gen, c) + [2], _ids(gen, r) + [2]) for p, c, r in lengths]


# Very different lengths: one long prompt, one-token prompts, a response that fills the width.
PAIR_LENGTHS = [(1, 2, 9), (11, 1, 3), (4, 7, 1), (2, 3, 3)]


def _batch(lengths=((1, 9), (12, 1), (3, 4), (6, 2), (2, 6))):
    gen = torch.Generator().manual_seed(1)
    return make_sequence_batch([_ids(gen, p) for p, _ in lengths], [_ids(gen, r) for _, r in lengths], 0)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _both(fn, model):
    """``fn(packing)`` run padded then packed: ``[(out, grads), (out, grads)]``."""
    out = []
    for packing in (False, True):
        result = fn(packing)
        loss = result[0] if isinstance(result, tuple) else result
        loss.backward()
        out.append((result, _grads(model)))
    return out


def _step_stats(model, step):
    """``step(copy_of_model, optimizer, packing)``'s stats, padded then packed, each from a fresh
    copy of ``model`` and a plain SGD optimizer."""
    stats = []
    for packing in (False, True):
        m = copy.deepcopy(model)
        stats.append(step(m, torch.optim.SGD(m.parameters(), lr=0.1), packing))
    return stats


# ----------------------------------------------------------------------------- layout


def test_pack_padded_layout_restarts_positions_and_maps_back():
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [8, 9, 10, 11, 12, 13], [0, 14, 15, 0, 0, 0]])
    mask = (ids != 0).long()
    p = packed.pack_padded(ids, mask)
    # Budget = the padded width (6): rows of 3 + 2 tokens and 6 tokens, first-fit-decreasing.
    assert p.input_ids.shape == (2, 6)
    assert p.input_ids[0].tolist() == [8, 9, 10, 11, 12, 13]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert p.input_ids[1, :5].tolist() == [5, 6, 7, 14, 15]
    assert p.position_ids[1].tolist() == [0, 1, 2, 0, 1, 0]
    flat = p.input_ids.flatten()
    assert torch.equal(flat[p.index][mask.bool()], ids[mask.bool()])
    assert p.attention_kwargs == {}


def test_pack_padded_varlen_is_one_row_with_cu_seqlens():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 10]])
    p = packed.pack_padded(ids, (ids != 0).long(), varlen=True)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert p.position_ids.tolist() == [[0, 1, 0, 1, 2, 0]]
    kw = p.attention_kwargs
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 5, 6] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 3


def test_padding_fraction_is_the_padded_share_of_the_batch():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert float(packed.padding_fraction(mask)) == pytest.approx(3 / 8)


def test_pack_padded_rejects_bad_shapes():
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        packed.pack_padded(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- trunk


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_final_hidden_packed_equals_padded(tokenizer, family, attention):
    model = _lm(tokenizer, family)
    model.config._attn_implementation = attention
    batch = _batch()
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        padded = final_hidden(model, batch.input_ids, batch.attention_mask)
        packed_h = final_hidden(model, batch.input_ids, batch.attention_mask, packing=True)
    torch.testing.assert_close(packed_h[mask], padded[mask], rtol=RTOL, atol=ATOL)


def test_sliding_window_packed_equals_padded(tokenizer):
    """Mistral with a window shorter than the sequences: the sliding-window mask of a packed
    row stays within each sequence too (and the window does change the result)."""
    from transformers import AutoModelForCausalLM

    from rftengine.toy import tiny_config

    models = []
    for window in (3, None):
        config = tiny_config(len(tokenizer), "mistral", hidden_size=32)
        config.sliding_window = window
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config).eval())
    batch = _batch()
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        padded = final_hidden(models[0], batch.input_ids, batch.attention_mask)
        packed_h = final_hidden(models[0], batch.input_ids, batch.attention_mask, packing=True)
        full = final_hidden(models[1], batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(packed_h[mask], padded[mask], rtol=RTOL, atol=ATOL)
    assert (full - padded)[mask].abs().max() > 1e-3


def test_packed_attention_is_block_diagonal(tokenizer):
    """A token's hidden state does not move when another sequence of its packed row changes;
    the same row read as one sequence (contiguous positions) does move, so the test can fail."""
    model = _lm(tokenizer, "qwen2")
    ids = torch.tensor([[0, 0, 0, 0, 5, 6], [0, 0, 8, 9, 10, 11]])
    other = ids.clone()
    other[1, 2:] = torch.tensor([20, 21, 22, 23])
    mask = (ids != 0).long()
    p = packed.pack_padded(ids, mask)
    assert p.input_ids.shape[0] == 1          # both sequences share one row: row 1 first (longer)
    assert p.input_ids[0].tolist() == [8, 9, 10, 11, 5, 6]
    with torch.no_grad():
        a = final_hidden(model, ids, mask, packing=True)[0, 4:]
        b = final_hidden(model, other, mask, packing=True)[0, 4:]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        trunk = model.get_decoder()
        flat_positions = torch.arange(6)[None]
        leak_a = trunk(input_ids=p.input_ids, position_ids=flat_positions).last_hidden_state[0, 4:]
        q = packed.pack_padded(other, mask)
        leak_b = trunk(input_ids=q.input_ids, position_ids=flat_positions).last_hidden_state[0, 4:]
    assert (leak_a - leak_b).abs().max() > 1e-3


def test_unsupported_family_runs_padded_with_a_warning(tokenizer, monkeypatch):
    model = _lm(tokenizer, "qwen2")
    monkeypatch.setattr(packed, "PACKED_MODEL_TYPES", frozenset({"llama"}))
    assert "qwen2" in packed.packing_problem(model)
    batch = _batch()
    with torch.no_grad():
        padded = final_hidden(model, batch.input_ids, batch.attention_mask)
        with pytest.warns(UserWarning, match="packing is not exact for model_type 'qwen2'"):
            out = final_hidden(model, batch.input_ids, batch.attention_mask, packing=True)
    assert torch.equal(out, padded)


def test_unknown_attention_implementation_is_not_packed(tokenizer):
    model = _lm(tokenizer, "llama")
    model.config._attn_implementation = "paged|sdpa"
    assert "paged|sdpa" in packed.packing_problem(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: absolute positions, so they must restart
def test_varlen_attention_gets_cu_seqlens(tokenizer, monkeypatch, family):
    """An attention that, like flash-attn varlen, sees only cu_seqlens (no mask, one flat row)
    gives the padded hidden states: the varlen kwargs reach every attention layer."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def varlen(module, query, key, value, attention_mask, **kwargs):
        assert attention_mask is None and query.shape[0] == 1
        cu = kwargs["cu_seq_lens_q"].long()
        assert torch.equal(cu, kwargs["cu_seq_lens_k"].long())
        seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
        pos = torch.arange(len(seg))
        block = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
        calls.append(int(kwargs["max_length_q"]))
        return sdpa_attention_forward(module, query, key, value, block[None, None], is_causal=False,
                                      scaling=kwargs.get("scaling"), dropout=0.0)

    AttentionInterface.register("test_varlen", varlen)
    monkeypatch.setattr(packed, "VARLEN_ATTENTION", packed.VARLEN_ATTENTION | {"test_varlen"})
    model = _lm(tokenizer, family)
    batch = _batch()
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        padded = final_hidden(model, batch.input_ids, batch.attention_mask)
        model.config._attn_implementation = "test_varlen"
        out = final_hidden(model, batch.input_ids, batch.attention_mask, packing=True)
    assert calls == [13] * model.config.num_hidden_layers
    torch.testing.assert_close(out[mask], padded[mask], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_step_packed_equals_padded(tokenizer, family):
    model = _lm(tokenizer, family)
    batch = _batch()
    (pad, g_pad), (pk, g_pk) = _both(lambda packing: sft_loss(model, batch, packing=packing), model)
    torch.testing.assert_close(pk[0], pad[0], rtol=RTOL, atol=ATOL)
    _assert_same_grads(g_pad, g_pk)
    # The step: the same loss and gradient norm through the optimizer path.
    stats = _step_stats(model, lambda m, opt, packing: sft_step(m, opt, batch, SFTConfig(packing=packing)))
    assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-5)
    assert stats[1]["grad_norm"] == pytest.approx(stats[0]["grad_norm"], rel=1e-5)
    assert stats[1]["train/padding_fraction"] == stats[0]["train/padding_fraction"] == pytest.approx(
        1 - batch.attention_mask.sum().item() / batch.attention_mask.numel())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ref", ["cached", "on_the_fly"])
def test_dpo_step_packed_equals_padded(tokenizer, family, ref):
    policy = _lm(tokenizer, family)
    reference = Reference(policy, _lm(tokenizer, family, seed=1))
    examples = _pairs(PAIR_LENGTHS)
    batch = collate_preferences(examples, 0)
    ref_logps = None
    if ref == "cached":
        cached = [precompute_reference_logps(reference, examples, 0, batch_size=3, packing=p) for p in (False, True)]
        torch.testing.assert_close(cached[1], cached[0], rtol=RTOL, atol=ATOL)
        ref_logps, reference = cached[0], None

    def run(packing):
        config = DPOConfig(beta=0.5, packing=packing)
        return dpo_batch_loss(policy, batch, config, ref_logps=ref_logps, reference=reference)

    (pad, g_pad), (pk, g_pk) = _both(run, policy)
    torch.testing.assert_close(pk[0], pad[0], rtol=RTOL, atol=ATOL)
    for key in ("rewards/margins", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(pk[1][key], pad[1][key], rtol=RTOL, atol=1e-5)
    _assert_same_grads(g_pad, g_pk)
    stats = _step_stats(policy, lambda m, opt, packing: dpo_step(
        m, opt, batch, DPOConfig(beta=0.5, packing=packing), ref_logps=ref_logps, reference=reference))
    assert stats[1]["grad_norm"] == pytest.approx(stats[0]["grad_norm"], rel=1e-5)
    assert stats[1]["train/padding_fraction"] == stats[0]["train/padding_fraction"] > 0.3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["value_head", "classification"])
def test_reward_step_packed_equals_padded(tokenizer, family, kind):
    model = reward_model_from_causal_lm(_lm(tokenizer, family), kind=kind)
    torch.manual_seed(0)
    if kind == "classification":  # a random score head: the zero init would give zero scores
        torch.nn.init.normal_(model.model.score.weight)
    batch = collate_preferences(_pairs(PAIR_LENGTHS), 0)
    (pad, g_pad), (pk, g_pk) = _both(lambda packing: reward_loss(model, batch, packing=packing), model)
    torch.testing.assert_close(pk[0], pad[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pk[1]["rewards/margins"], pad[1]["rewards/margins"], rtol=RTOL, atol=1e-5)
    _assert_same_grads(g_pad, g_pk)
    stats = _step_stats(model, lambda m, opt, packing: reward_step(m, opt, batch, RewardConfig(packing=packing)))
    assert stats[1]["grad_norm"] == pytest.approx(stats[0]["grad_norm"], rel=1e-5)
    assert "train/padding_fraction" in stats[0]


def test_value_head_forward_and_score_packed_equal_padded(tokenizer):
    critic = CausalLMWithValueHead(_lm(tokenizer, "llama"))
    batch = _batch()
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(critic(batch.input_ids, batch.attention_mask, packing=True)[mask],
                                   critic(batch.input_ids, batch.attention_mask)[mask], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(critic.score(batch.input_ids, batch.attention_mask, packing=True),
                                   critic.score(batch.input_ids, batch.attention_mask), rtol=RTOL, atol=ATOL)
        rm = RewardModel(critic)
        torch.testing.assert_close(rm(batch.input_ids, batch.attention_mask, packing=True),
                                   rm(batch.input_ids, batch.attention_mask), rtol=RTOL, atol=ATOL)


def test_response_logprobs_packed_equal_padded_with_entropy(tokenizer):
    model = _lm(tokenizer, "qwen2")
    batch = _batch()
    with torch.no_grad():
        lp, ent = response_logprobs(model, batch, temperature=0.7, return_entropy=True)
        lp_p, ent_p = response_logprobs(model, batch, temperature=0.7, return_entropy=True, packing=True)
    torch.testing.assert_close(lp_p, lp, rtol=RTOL, atol=ATOL)
    m = batch.response_mask
    torch.testing.assert_close(ent_p[m], ent[m], rtol=RTOL, atol=ATOL)


def _rollout(group_size: int) -> Rollout:
    gen = torch.Generator().manual_seed(2)
    lengths = [(1, 7), (1, 2), (9, 1), (9, 5), (3, 3), (3, 6)]
    batch = make_sequence_batch([_ids(gen, p) for p, _ in lengths], [_ids(gen, r) for _, r in lengths], 0)
    logp = -torch.rand(batch.response_mask.shape, generator=gen) * batch.response_mask
    n = batch.num_rows
    return Rollout(["p"] * n, ["r"] * n, None, batch, logp, torch.ones(n, dtype=torch.bool), group_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm,critic", [("ppo", "shared"), ("ppo", "separate"), ("grpo", "shared")])
def test_ppo_logprob_value_pass_and_loss_packed_equal_padded(tokenizer, family, algorithm, critic):
    config = PPOConfig(algorithm=algorithm, critic=critic, group_size=1 if algorithm == "ppo" else 2,
                       batch_size=6 if algorithm == "ppo" else 3, max_new_tokens=7, kl_coef=0.1,
                       recompute_logprobs=True, entropy_coef=0.01)
    policy = _lm(tokenizer, family)
    ctx = make_ppo_context(policy, tokenizer, config, ref_model=_lm(tokenizer, family, seed=1))
    ro = _rollout(config.group_size)
    scores = torch.linspace(-1, 1, ro.batch.num_rows)
    exps, grads = [], []
    for packing in (False, True):
        ctx.config = dataclasses.replace(config, packing=packing)
        exp = compute_advantages(ctx, ro, scores)
        loss, stats = ppo_loss(ctx, exp)
        loss.backward()
        g = _grads(policy)
        if ctx.critic is not None:
            g.update({f"critic.{k}": v for k, v in _grads(ctx.critic).items()})
        exps.append((exp, loss, stats))
        grads.append(g)
    (e0, l0, s0), (e1, l1, s1) = exps
    for name in ("old_logprobs", "advantages", "ref_logprobs", "returns", "old_values"):
        a, b = getattr(e0, name), getattr(e1, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(l1, l0, rtol=RTOL, atol=ATOL)
    _assert_same_grads(grads[0], grads[1])
    assert e0.stats["train/padding_fraction"] == e1.stats["train/padding_fraction"] > 0.3


def test_train_dpo_with_packing_logs_the_padded_run(tokenizer):
    """End to end through train_dpo (reference cache and steps packed): the same losses."""
    from rftengine.methods.dpo import train_dpo

    pairs = [{"prompt": "a" * (1 + 5 * (i % 2)), "chosen": "xy" * (1 + 3 * (i % 3)), "rejected": "z" * (i + 1)}
             for i in range(4)]
    runs = []
    for packing in (False, True):
        config = DPOConfig(batch_size=2, max_steps=2, shuffle=False, learning_rate=1e-3, packing=packing)
        runs.append(train_dpo(_lm(tokenizer, "llama"), tokenizer, pairs, config).history)
    assert [round(h["loss"], 5) for h in runs[1]] == [round(h["loss"], 5) for h in runs[0]]
    assert all(h["train/padding_fraction"] > 0 for h in runs[1])


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_cli_packing_setting_gives_the_padded_run(tmp_path, monkeypatch, method):
    """`train.packing=true` from the CLI: the same metrics as the padded run, padding reported."""
    from rftengine.cli import main
    from rftengine.metrics import read_metrics
    from tests.cli.cli_helpers import EXAMPLES, save_tiny_model
    from tests.cli.test_cli_train import FAST

    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.chdir(EXAMPLES.parent)
    rows = []
    for packing in ("false", "true"):
        out = tmp_path / packing
        argv = ["train", str(EXAMPLES / f"{method}.yaml"), f"model={model_dir}", f"output_dir={out}",
                "train.max_steps=2", *FAST[method], f"train.packing={packing}"]
        if method == "grpo":
            argv.append("reward=rftengine.toy:vowel_fraction_reward")
        assert main(argv) == 0
        rows.append(read_metrics(out / "metrics.jsonl"))
    for padded, packed_row in zip(*rows):
        assert packed_row["loss"] == pytest.approx(padded["loss"], rel=1e-4, abs=1e-6)
        assert packed_row["train/padding_fraction"] == pytest.approx(padded["train/padding_fraction"])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("cls", [DPOConfig, SFTConfig, RewardConfig, PPOConfig])
def test_packing_is_a_checked_bool_defaulting_off(cls):
    assert cls().packing is False
    assert cls(packing=True).packing is True
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.packing must be true or false, got 'yes'"):
        cls(packing="yes")
