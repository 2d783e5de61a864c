"""Generator on tiny random-init models: greedy equals transformers, log-probs equal the trainer's."""

import copy
import warnings

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from rftengine.generation import EagerFallbackWarning, Generator, GenerationOutput
from rftengine.ops import token_logprobs

# Tiny models and tensors: intra-op threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 131
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19, 20]]
COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)


def llama():
    return LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False)).eval()


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)).eval()


def mistral():
    # A window shorter than the sequences, so the sliding-window mask matters.
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6)).eval()


def gpt2():
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return GPT2LMHeadModel(config).eval()


FAMILIES = {"llama": llama, "qwen2": qwen2, "mistral": mistral}


def hf_greedy(model, out: GenerationOutput, new_tokens: int) -> torch.Tensor:
    p = out.prompt_length
    return model.generate(
        out.sequences[:, :p], attention_mask=out.prompt_mask.long(), max_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )


def trainer_logprobs(model, out: GenerationOutput, temperature: float) -> torch.Tensor:
    """What a trainer computes: a full forward on the rollout, then token_logprobs."""
    with torch.no_grad():
        logits = model(
            out.sequences, attention_mask=out.attention_mask.long(), position_ids=out.position_ids
        ).logits
    p = out.prompt_length
    return token_logprobs(logits[:, p - 1:-1], out.responses, temperature=temperature, mask=out.response_mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(family):
    model = FAMILIES[family]()
    gen = Generator(model, max_batch_size=8, max_seq_len=32)
    assert gen.backend == "static"
    out = gen.generate(PROMPTS, max_new_tokens=12, top_k=1, eos_token_ids=None, seed=0)
    assert out.sequences.shape == (3, 9 + 12)
    assert torch.equal(out.sequences, hf_greedy(model, out, 12))
    assert out.prompt_mask.sum(1).tolist() == [9, 2, 5]
    assert out.response_mask.all() and out.finish_reasons == ("length",) * 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logprobs_match_training_forward(family):
    model = FAMILIES[family]()
    gen = Generator(model, max_batch_size=8, max_seq_len=32)
    out = gen.generate(
        PROMPTS, num_samples=2, max_new_tokens=10, temperature=0.8, top_p=0.95,
        eos_token_ids=[3, 4], seed=1, return_truncated_logprobs=True,
    )
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (6, out.responses.shape[1])
    torch.testing.assert_close(out.logprobs, trainer_logprobs(model, out, 0.8), rtol=0, atol=1e-5)
    mask = out.response_mask
    assert torch.all(out.truncated_logprobs[mask] >= out.logprobs[mask] - 1e-6)
    assert torch.all(out.truncated_logprobs[~mask] == 0)


def test_eos_ends_the_response_and_is_kept():
    model = qwen2()
    gen = Generator(model, max_batch_size=8, max_seq_len=40, done_check_interval=2)
    free = gen.generate(PROMPTS, max_new_tokens=12, top_k=1, eos_token_ids=None)
    eos = int(free.responses[0, 4])  # row 0's 5th greedy token becomes the EOS
    out = gen.generate(PROMPTS, max_new_tokens=12, top_k=1, eos_token_ids=eos)
    for r in range(3):
        resp = free.responses[r].tolist()
        end = resp.index(eos) + 1 if eos in resp else len(resp)
        assert out.response_mask[r].tolist() == [True] * end + [False] * (out.responses.shape[1] - end)
        assert out.responses[r, :end].tolist() == resp[:end]
        assert torch.all(out.responses[r, end:] == 0) and torch.all(out.logprobs[r, end:] == 0)
        assert out.finish_reasons[r] == ("eos" if end < len(resp) or resp[-1] == eos else "length")
    assert out.finish_reasons[0] == "eos" and out.response_lengths[0] == 5

    # Every row ends at its first token: the responses are as wide as the longest one.
    first = gen.generate(PROMPTS, max_new_tokens=12, top_k=1, eos_token_ids=free.responses[:, 0].tolist())
    assert first.responses.shape[1] == 1 and first.response_lengths.tolist() == [1, 1, 1]
    assert first.finish_reasons == ("eos",) * 3


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_long_rollout_crosses_cache_blocks(family):
    # Decode attention reads the cache in 128-column blocks: this rollout grows from 1 to 2 blocks.
    model = FAMILIES[family]()
    gen = Generator(model, max_batch_size=4, max_seq_len=160)
    prompts = [list(range(1, 120)), [7, 8, 9]]
    out = gen.generate(prompts, max_new_tokens=16, top_k=1, eos_token_ids=None)
    assert torch.equal(out.sequences, hf_greedy(model, out, 16))
    assert gen._cache.live_length(119) == 128 and gen._cache.live_length(128) == 256


def test_chunked_prefill_and_bucket_padding_change_nothing(monkeypatch):
    import rftengine.generation.generator as generator_module

    model = qwen2()
    kwargs = dict(num_samples=2, max_new_tokens=8, temperature=0.9, eos_token_ids=[3], seed=4)
    monkeypatch.setattr(generator_module, "_PREFILL_TOKENS", 10)  # one prompt per prefill chunk
    padded = Generator(model, max_batch_size=16, max_seq_len=32)
    padded._bucket_rows = True  # 6 rows run as the 8-row bucket, as under CUDA graphs
    out = padded.generate(PROMPTS, **kwargs)
    greedy = padded.generate(PROMPTS, max_new_tokens=8, top_k=1, eos_token_ids=None)
    assert torch.equal(greedy.sequences, hf_greedy(model, greedy, 8))
    torch.testing.assert_close(out.logprobs, trainer_logprobs(model, out, 0.9), rtol=0, atol=1e-5)
    assert out.sequences.shape[0] == 6 and out.response_mask[:, 0].all()


def test_num_samples_share_the_prompt():
    model = llama()
    gen = Generator(model, max_batch_size=12, max_seq_len=32)
    one = gen.generate(PROMPTS, max_new_tokens=8, top_k=1, eos_token_ids=None)
    three = gen.generate(PROMPTS, num_samples=3, max_new_tokens=8, top_k=1, eos_token_ids=None)
    assert torch.equal(three.sequences, one.sequences.repeat_interleave(3, dim=0))
    torch.testing.assert_close(three.logprobs, one.logprobs.repeat_interleave(3, dim=0), rtol=0, atol=1e-5)
    sampled = gen.generate(PROMPTS, num_samples=4, max_new_tokens=8, eos_token_ids=None, seed=7)
    groups = sampled.responses.view(3, 4, -1)
    assert all(len({tuple(s.tolist()) for s in g}) > 1 for g in groups)
    assert torch.equal(sampled.sequences[:, :9].view(3, 4, -1), one.sequences[:, None, :9].expand(3, 4, 9))


def test_seed_reproduces_and_changes_the_draws():
    gen = Generator(qwen2(), max_batch_size=8, max_seq_len=32)
    kwargs = dict(num_samples=2, max_new_tokens=10, eos_token_ids=[3], top_k=20)
    a = gen.generate(PROMPTS, seed=123, **kwargs)
    b = gen.generate(PROMPTS, seed=123, **kwargs)
    c = gen.generate(PROMPTS, seed=124, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)


# 7 prompts of 1 to 12 tokens x 3 samples: 21 sequences.
COMPANY_PROMPTS = [list(range(5 + p, 5 + p + n)) for p, n in enumerate([3, 12, 1, 7, 5, 9, 2])]


def generate_in_calls(model, max_batch_size: int, prompts_per_call: int, **kwargs) -> list[GenerationOutput]:
    """COMPANY_PROMPTS x 3 samples in calls of ``prompts_per_call`` prompts, each call with the
    sequence offset of its first sequence; rows run in CUDA-graph-style buckets (padding rows)."""
    gen = Generator(model, max_batch_size=max_batch_size, max_seq_len=32)
    gen._bucket_rows = True  # as under CUDA graphs: 3 rows run as 4, 15 as 16, 21 as 32 ...
    return [
        gen.generate(COMPANY_PROMPTS[p0:p0 + prompts_per_call], num_samples=3, sequence_offset=3 * p0, **kwargs)
        for p0 in range(0, len(COMPANY_PROMPTS), prompts_per_call)
    ]


def response_rows(outs: list[GenerationOutput]) -> tuple[list[list[int]], torch.Tensor]:
    """Each sequence's response tokens (masked) and the ``[21, T]`` log-probs, across calls."""
    tokens = [r[m].tolist() for o in outs for r, m in zip(o.responses, o.response_mask)]
    width = max(o.logprobs.shape[1] for o in outs)
    logp = torch.cat([torch.nn.functional.pad(o.logprobs, (0, width - o.logprobs.shape[1])) for o in outs])
    return tokens, logp


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_k=40, top_p=0.9)])
def test_samples_do_not_depend_on_batch_company(params):
    """The same 21 sequences with max_batch_size 4, 16 and 64 (calls of 1, 5 and 7 prompts,
    buckets of 4, 16 + 8 and 32 rows, other left padding): the same tokens, and the same
    log-probs to fp32 rounding (only the matmul shapes differ)."""
    model = qwen2()
    kwargs = dict(max_new_tokens=10, eos_token_ids=[3], seed=99, **params)
    reference, logp = response_rows(generate_in_calls(model, 64, 7, **kwargs))
    assert len(reference) == 21 and len({tuple(r) for r in reference}) > 15  # really sampled
    for max_batch_size, per_call in [(4, 1), (16, 5), (64, 3)]:
        tokens, other = response_rows(generate_in_calls(model, max_batch_size, per_call, **kwargs))
        assert tokens == reference, (max_batch_size, per_call)
        torch.testing.assert_close(other, logp, rtol=0, atol=1e-5)


def test_a_sequence_alone_equals_it_in_a_batch():
    model = llama()
    gen = Generator(model, max_batch_size=21, max_seq_len=32)
    kwargs = dict(max_new_tokens=10, eos_token_ids=None, seed=5, temperature=1.2)
    batch = gen.generate(COMPANY_PROMPTS, num_samples=3, **kwargs)
    for p, s in [(0, 0), (1, 2), (4, 1), (6, 2)]:
        alone = gen.generate([COMPANY_PROMPTS[p]], sequence_offset=3 * p + s, **kwargs)
        assert torch.equal(alone.responses[0], batch.responses[3 * p + s])
        torch.testing.assert_close(alone.logprobs[0], batch.logprobs[3 * p + s], rtol=0, atol=1e-5)


def test_seed_and_offset_decide_the_samples():
    """Sample s of a call at offset k is sequence k + s: 2 samples at offset 2 are samples 2 and 3
    of the call at offset 0; another seed or offset samples other responses."""
    gen = Generator(qwen2(), max_batch_size=8, max_seq_len=32)
    kwargs = dict(max_new_tokens=10, eos_token_ids=None, temperature=1.5)
    four = gen.generate(PROMPTS[:1], num_samples=4, seed=1, **kwargs).responses
    assert torch.equal(gen.generate(PROMPTS[:1], num_samples=2, seed=1, sequence_offset=2, **kwargs).responses,
                       four[2:])
    assert len({tuple(r.tolist()) for r in four}) == 4
    for seed, offset in [(2, 0), (1, 4)]:
        other = gen.generate(PROMPTS[:1], num_samples=4, seed=seed, sequence_offset=offset, **kwargs).responses
        assert not any(torch.equal(o, f) for o in other for f in four)


def test_top_k_one_and_tiny_top_p_are_greedy():
    gen = Generator(mistral(), max_batch_size=8, max_seq_len=32)
    greedy = gen.generate(PROMPTS, max_new_tokens=10, top_k=1, eos_token_ids=None, seed=0)
    nucleus = gen.generate(PROMPTS, max_new_tokens=10, top_p=1e-6, eos_token_ids=None, seed=1)
    cold = gen.generate(PROMPTS, max_new_tokens=10, temperature=1e-4, eos_token_ids=None, seed=2)
    assert torch.equal(greedy.sequences, nucleus.sequences)
    assert torch.equal(greedy.sequences, cold.sequences)
    # Log-probs are over the full vocabulary at the sampling temperature, truncation or not.
    torch.testing.assert_close(greedy.logprobs, nucleus.logprobs, rtol=0, atol=0)


def test_padded_tensor_prompts_equal_list_prompts():
    gen = Generator(llama(), max_batch_size=8, max_seq_len=32)
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    for r, p in enumerate(PROMPTS):  # right-padded, as a tokenizer might return
        ids[r, :len(p)] = torch.tensor(p)
        mask[r, :len(p)] = True
    from_list = gen.generate(PROMPTS, max_new_tokens=6, top_k=1, eos_token_ids=None)
    from_tensor = gen.generate(ids, attention_mask=mask.long(), max_new_tokens=6, top_k=1, eos_token_ids=None)
    assert torch.equal(from_list.sequences, from_tensor.sequences)
    assert torch.equal(from_list.prompt_mask, from_tensor.prompt_mask)


@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ([list(range(1, 20))], {"max_new_tokens": 1}, "max_seq_len"),
        ([[1, 2, 3]], {"max_new_tokens": 14}, "max_seq_len"),
        ([[1, 2]] * 2, {"max_new_tokens": [2]}, r"max_new_tokens must hold one entry per prompt \(2\), got 1"),
        ([[1, 2]] * 2, {"max_new_tokens": [2, 0]}, r"max_new_tokens\[1\] must be an int >= 1, got 0"),
        ([[1, 2], [1] * 10], {"max_new_tokens": [13, 7]}, r"max_seq_len \(16\), got 10 \+ 7 = 17 \(prompt 1\)"),
        ([[1, 2]], {"max_new_tokens": 2, "stop_checker": "x"}, "stop_checker must be a callable"),
        ([[1, 2], []], {"max_new_tokens": 2}, "empty prompt"),
        ([], {"max_new_tokens": 2}, "at least one prompt"),
        ([[1, VOCAB]], {"max_new_tokens": 2}, "token ids"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1, 2]], {"max_new_tokens": 2, "temperature": 0.0}, "temperature"),
        ([[1, 2]], {"max_new_tokens": 2, "eos_token_ids": [VOCAB + 3]}, "eos_token_ids"),
        ("hello", {"max_new_tokens": 2}, "prompts"),
        ([[1, 2]], {"max_new_tokens": 2, "sequence_offset": -1}, "sequence_offset"),
        ([[1, 2]], {"max_new_tokens": 2, "sequence_offset": 2**63 - 1}, "sequence_offset"),
        ([[1, 2]] * 2, {"max_new_tokens": 2, "sequence_offset": 2**63 - 2}, "sequence_offset"),
        ([[1, 2]], {"max_new_tokens": 2, "sequence_offset": 1.0}, "sequence_offset"),
    ],
)
def test_bad_input_is_rejected(prompts, kwargs, match):
    gen = Generator(qwen2(), max_batch_size=4, max_seq_len=16)
    kwargs = {"eos_token_ids": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        gen.generate(prompts, **kwargs)


@pytest.mark.parametrize("value", [2, -1])
def test_integer_attention_mask_other_than_0_and_1_is_rejected(value):
    # `mask != 0` would read 2 and -1 as "real token": a mask built by arithmetic must not pass
    gen = Generator(qwen2(), max_batch_size=4, max_seq_len=16)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, value, 1]])
    with pytest.raises(ValueError, match=rf"attention_mask must hold only 0/1 .*got {value}"):
        gen.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_ids=None)


def test_prompt_plus_new_tokens_beyond_the_models_positions_is_rejected():
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "max_position_embeddings": 16})).eval()
    gen = Generator(model, max_batch_size=4, max_seq_len=64)  # the cache would allow it
    with pytest.raises(ValueError, match=r"max_position_embeddings \(16\), got 9 \+ 8 = 17"):
        gen.generate(PROMPTS, max_new_tokens=8, eos_token_ids=None)
    assert gen._cache is None  # refused before any work
    out = gen.generate(PROMPTS, max_new_tokens=7, top_k=1, eos_token_ids=None)  # 9 + 7 = 16 fits
    assert out.responses.shape == (3, 7)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_nan_weights_warn_once_per_rollout(family):
    model = {"qwen2": qwen2, "gpt2": gpt2}[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        gen = Generator(model, max_batch_size=8, max_seq_len=32, done_check_interval=4)
    kwargs = dict(num_samples=2, max_new_tokens=10, eos_token_ids=None, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.generate(PROMPTS, **kwargs)
    assert not [w for w in caught if "non-finite" in str(w.message)]
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")  # one NaN weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(PROMPTS, **kwargs)
    nonfinite = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite) == 1 and issubclass(nonfinite[0].category, RuntimeWarning)
    assert nonfinite[0].filename == __file__  # points at the generate() call
    assert not torch.isfinite(out.logprobs[out.response_mask]).all()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_batch_size"):
        Generator(qwen2(), max_batch_size=0, max_seq_len=16)
    with pytest.raises(ValueError, match="model"):
        Generator(torch.nn.Linear(2, 2), max_batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match="continuous must be a bool, got 1"):
        Generator(qwen2(), max_batch_size=1, max_seq_len=16, continuous=1)


def test_in_place_weight_update_reaches_the_next_rollout():
    torch.manual_seed(4)
    model = llama()
    gen = Generator(model, max_batch_size=8, max_seq_len=32)
    before = gen.generate(PROMPTS, max_new_tokens=8, top_k=1, eos_token_ids=None)

    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    model(before.sequences).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    after = gen.generate(PROMPTS, max_new_tokens=8, top_k=1, eos_token_ids=None)
    assert not torch.equal(before.sequences, after.sequences)
    assert torch.equal(after.sequences, hf_greedy(model, after, 8))
    torch.testing.assert_close(after.logprobs, trainer_logprobs(model, after, 1.0), rtol=0, atol=1e-5)

    # A replaced (not updated) parameter is noticed too.
    layer = model.model.layers[1].mlp
    layer.down_proj.weight = torch.nn.Parameter(torch.randn_like(layer.down_proj.weight))
    replaced = gen.generate(PROMPTS, max_new_tokens=8, top_k=1, eos_token_ids=None)
    assert torch.equal(replaced.sequences, hf_greedy(model, replaced, 8))


def test_cast_rollout_dtype_follows_updates():
    model = qwen2()
    gen = Generator(model, max_batch_size=8, max_seq_len=32, dtype=torch.bfloat16)
    gen.generate(PROMPTS, max_new_tokens=4, top_k=1, eos_token_ids=None)
    assert gen._weights.embed.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    # bf16 logits tie exactly now and then, and top_k=1 keeps every tied token: the seed
    # decides among them, so both generators get the same one
    kwargs = dict(max_new_tokens=6, top_k=1, eos_token_ids=None, seed=3)
    after = gen.generate(PROMPTS, **kwargs)
    fresh = Generator(model, max_batch_size=8, max_seq_len=32, dtype=torch.bfloat16)
    expected = fresh.generate(PROMPTS, **kwargs)
    assert torch.equal(after.sequences, expected.sequences)
    assert torch.equal(after.logprobs, expected.logprobs)


def test_free_then_generate_again():
    gen = Generator(mistral(), max_batch_size=8, max_seq_len=32)
    a = gen.generate(PROMPTS, max_new_tokens=6, eos_token_ids=None, seed=9)
    gen.free()
    assert gen._cache is None and gen._state is None
    b = gen.generate(PROMPTS, max_new_tokens=6, eos_token_ids=None, seed=9)
    assert torch.equal(a.sequences, b.sequences)


def test_unsupported_family_falls_back_with_a_warning():
    model = gpt2()
    with pytest.warns(EagerFallbackWarning, match="GPT2LMHeadModel"):
        gen = Generator(model, max_batch_size=8, max_seq_len=32)
    assert gen.backend == "eager-hf"
    out = gen.generate(PROMPTS, max_new_tokens=8, top_k=1, eos_token_ids=None)
    assert torch.equal(out.sequences, hf_greedy(model, out, 8))
    sampled = gen.generate(PROMPTS, num_samples=2, max_new_tokens=8, temperature=1.3, eos_token_ids=[7], seed=2)
    torch.testing.assert_close(sampled.logprobs, trainer_logprobs(model, sampled, 1.3), rtol=0, atol=1e-5)


# -- CUDA: graph capture ------------------------------------------------------------------------

# Greedy rollouts of one model that run different kernels (a CUDA-graph bucket of 16 rows where
# eager runs 9, the trainer's full forward, transformers' generate) get fp32 logits that differ
# by rounding only: cuBLAS picks its kernel, hence its summation order, per shape. Those
# differences are ~1e-6 of logits of size ~1-10; at a near tie they flip the greedy token and
# the rollouts part ways. What a GPU can promise: the same tokens up to each row's first step
# whose top-2 logit gap is below NEAR_TIE (100x the rounding differences), and on the common
# prefix the same log-probs to rounding.
NEAR_TIE = 1e-4


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of each row's first True column, the row length when none."""
    return torch.where(mask.any(1), mask.long().argmax(1), mask.shape[1])


def common_prefix_until_near_tie(model, ref: GenerationOutput, other_responses: torch.Tensor) -> torch.Tensor:
    """Check that greedy ``other_responses`` ``[N, T]`` equal ``ref``'s up to each row's first
    near tie of ``ref``'s teacher-forced logits; returns the ``[N, T]`` mask of the common prefix."""
    p = ref.prompt_length
    with torch.no_grad():
        logits = model(
            ref.sequences, attention_mask=ref.attention_mask.long(), position_ids=ref.position_ids
        ).logits[:, p - 1:-1].float()
    top2 = logits.topk(2, dim=-1).values
    near_tie = first_true(top2[..., 0] - top2[..., 1] < NEAR_TIE)
    parted = first_true(other_responses != ref.responses)
    assert torch.all(parted >= near_tie), f"tokens part at {parted.tolist()}, first near ties at {near_tie.tolist()}"
    return torch.arange(ref.responses.shape[1], device=parted.device) < parted[:, None]


def _cuda_model(factory, dtype=torch.float32):
    torch.manual_seed(0)
    return factory().to(device="cuda", dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_graphs_equal_eager(family):
    model = _cuda_model(FAMILIES[family])
    graphs = Generator(model, max_batch_size=16, max_seq_len=160)
    eager = Generator(model, max_batch_size=16, max_seq_len=160, cuda_graphs=False)
    kwargs = dict(num_samples=3, max_new_tokens=140, top_k=1, eos_token_ids=None)
    a, b = graphs.generate(PROMPTS, **kwargs), eager.generate(PROMPTS, **kwargs)
    assert graphs.num_graphs >= 2  # 9 rows -> bucket 16; live lengths 128 and 256 crossed
    same = common_prefix_until_near_tie(model, b, a.responses)
    torch.testing.assert_close(a.logprobs[same], b.logprobs[same], rtol=0, atol=1e-5)
    common_prefix_until_near_tie(model, a, hf_greedy(model, a, 140)[:, a.prompt_length:])
    torch.testing.assert_close(a.logprobs, trainer_logprobs(model, a, 1.0), rtol=0, atol=1e-4)


@pytest.mark.cuda
def test_cuda_graphs_sample_reproducibly_and_follow_weight_updates():
    model = _cuda_model(qwen2)
    gen = Generator(model, max_batch_size=8, max_seq_len=64)
    kwargs = dict(num_samples=2, max_new_tokens=20, eos_token_ids=[3], seed=5)
    a, b = gen.generate(PROMPTS, **kwargs), gen.generate(PROMPTS, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, trainer_logprobs(model, a, 1.0), rtol=0, atol=1e-4)
    captured = gen.num_graphs
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    c = gen.generate(PROMPTS, **kwargs)
    assert gen.num_graphs == captured  # replayed, not recaptured
    torch.testing.assert_close(c.logprobs, trainer_logprobs(model, c, 1.0), rtol=0, atol=1e-4)
    greedy = gen.generate(PROMPTS, max_new_tokens=20, top_k=1, eos_token_ids=None)
    assert torch.equal(greedy.sequences, hf_greedy(model, greedy, 20))
    gen.free()
    assert gen.num_graphs == 0
    assert torch.equal(gen.generate(PROMPTS, **kwargs).sequences, c.sequences)


@pytest.mark.cuda
def test_cuda_graphs_sample_the_eager_and_cpu_draws():
    """The captured decode step keys its noise from the state's device tensors, updated in the
    graph: the graphs sample what the eager loop samples, and what the CPU samples, for the same
    (seed, offset), in any bucket (up to a near tie the logits' last bits decide)."""
    model = _cuda_model(qwen2)
    kwargs = dict(num_samples=3, max_new_tokens=24, eos_token_ids=None, seed=11, temperature=1.3)
    graphs = Generator(model, max_batch_size=16, max_seq_len=64)
    eager = Generator(model, max_batch_size=16, max_seq_len=64, cuda_graphs=False)
    a = graphs.generate(PROMPTS, sequence_offset=5, **kwargs)
    b = eager.generate(PROMPTS, sequence_offset=5, **kwargs)
    assert graphs.num_graphs >= 1
    cpu = Generator(copy.deepcopy(model).cpu(), max_batch_size=16, max_seq_len=64).generate(
        PROMPTS, sequence_offset=5, **kwargs)
    alone = graphs.generate(PROMPTS[1:2], sequence_offset=8, **{**kwargs, "num_samples": 1})  # bucket 1
    assert torch.equal(a.responses, b.responses)
    assert torch.equal(a.responses.cpu(), cpu.responses)
    assert torch.equal(alone.responses[0], a.responses[3])
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


@pytest.mark.cuda
def test_cuda_bf16_rollout_logprobs_close_to_trainer(record_property):
    model = _cuda_model(qwen2, torch.bfloat16)
    gen = Generator(model, max_batch_size=8, max_seq_len=64)
    out = gen.generate(PROMPTS, num_samples=2, max_new_tokens=40, eos_token_ids=None, seed=0)
    mask = out.response_mask
    trainer = trainer_logprobs(model, out, 1.0)
    reference_model = copy.deepcopy(model).float()  # the same bf16 weights, fp32 arithmetic
    reference = trainer_logprobs(reference_model, out, 1.0)
    diff = (out.logprobs - trainer).abs()[mask].mean().item()
    err_rollout = (out.logprobs - reference).abs()[mask].mean().item()
    err_trainer = (trainer - reference).abs()[mask].mean().item()

    # Rollout and trainer evaluate the same bf16 network on the same tokens; they differ in how
    # each fp32 accumulation is split (one decode row against the KV cache vs the whole sequence
    # at once, other matmul shapes, another attention kernel), so every activation is rounded to
    # bf16 from slightly different values. bf16 keeps 8 significant bits: unit roundoff
    # u = 2^-8 ~ 3.9e-3, and where two roundings of one value disagree they differ by one ulp,
    # <= 2u relative. For the final logits alone, logp = z_t - logsumexp(z) then moves by
    # dz_t - sum_j p_j dz_j, at most 2u (|z_t| + sum_j p_j |z_j|): that is the bound on the mean.
    # Disagreements upstream are of the same order and mostly cancel (CPU bf16: mean |dlogp|
    # 2.4e-3 - 3.5e-3, about 0.2 of this bound, while |z| ~ 4). And the rollout may be no less
    # accurate than the trainer: its error against fp32 arithmetic at most 2x the trainer's.
    u = 2.0**-8
    with torch.no_grad():
        z = reference_model(
            out.sequences, attention_mask=out.attention_mask.long(), position_ids=out.position_ids
        ).logits[:, out.prompt_length - 1:-1].double()
    scale = (z.gather(-1, out.responses[..., None]).squeeze(-1).abs() + (z.softmax(-1) * z.abs()).sum(-1))[mask]
    bound = 2 * u * scale.mean().item()
    record_property("mean_abs_dlogp_rollout_vs_trainer", diff)
    print(f"\nbf16 mean |dlogp| rollout vs trainer {diff:.3e} (bound {bound:.3e}); against fp32: "
          f"rollout {err_rollout:.3e}, trainer {err_trainer:.3e}")
    assert diff < bound
    assert err_rollout <= 2 * err_trainer


@pytest.mark.cuda
def test_cuda_compiled_step_equals_eager():
    model = _cuda_model(llama)
    compiled = Generator(model, max_batch_size=8, max_seq_len=64, compile=True)
    eager = Generator(model, max_batch_size=8, max_seq_len=64, cuda_graphs=False)
    kwargs = dict(max_new_tokens=16, top_k=1, eos_token_ids=None)
    a, b = compiled.generate(PROMPTS, **kwargs), eager.generate(PROMPTS, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-4)
