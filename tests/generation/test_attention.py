"""Decode attention: backend selection, SDPA and flash-attn against a float64 reference, and whole
rollouts with flash-attn against rollouts with SDPA.

flash-attn runs only on CUDA machines that have it installed (the `cuda` tests below). On CPU the
same checks run through `fake_flash_with_kvcache`, a torch rendering of flash_attn_with_kvcache's
documented contract and argument checks: it proves that the lengths, layout and window the engine
passes select exactly the keys SDPA attends to.
"""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import rftengine.generation.attention as attention_module
import rftengine.generation.generator as generator_module
from rftengine.generation import GenerationOutput, Generator
from rftengine.generation.attention import DecodeAttention, select_attention
from rftengine.generation.kv_cache import StaticKVCache
from rftengine.generation.model_runner import decode_forward, prefill
from rftengine.generation.weights import DecoderWeights, gather_weights, shadow

# Tiny models and tensors: intra-op threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 16: flash-attn wants a multiple of 8; 4 query heads share 2 kv heads (GQA).
COMMON = dict(
    vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False)).eval(),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)).eval(),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6)).eval(),
}
# Left-padded batches of different prompt lengths; the second rollout reuses the cache and graphs.
PROMPT_SETS = (
    [list(range(3, 40)), [5, 6], list(range(7, 20))],
    [[9], list(range(11, 60, 2)), [4, 4, 4, 4, 4]],
)


def masked_attention(q, keys, values, keep, scale):
    """float64 ``softmax(scale q k^T) v`` over the kept columns; q ``[n, H, D]``, keys/values
    ``[n, S, Hk, D]`` (query head h reads kv head ``h // (H / Hk)``), keep ``[n, S]`` bool."""
    group = q.shape[1] // keys.shape[2]
    k = keys.double().repeat_interleave(group, dim=2)
    v = values.double().repeat_interleave(group, dim=2)
    scores = torch.einsum("nhd,nshd->nhs", q.double(), k) * scale
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("nhs,nshd->nhd", scores.softmax(-1), v)


def reference_attention(q, keys, values, leftpad, slot, window, scale):
    """``[n, H*D]`` float64: row r attends to columns ``leftpad[r] .. slot``, within ``window`` of slot."""
    cols = torch.arange(keys.shape[1], device=q.device)
    keep = (cols >= leftpad[:, None]) & (cols <= slot)
    if window is not None:
        keep &= slot - cols < window
    return masked_attention(q, keys, values, keep, scale).flatten(1)


def fake_flash_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, cache_leftpad, softmax_scale, causal, window_size,
):
    """flash_attn_with_kvcache (flash-attn >= 2.6) without new keys: its argument checks, and its
    documented result: row b attends to cache columns ``[cache_leftpad[b], cache_seqlens[b])``; a
    query at column i keeps keys ``j >= i - window_size[0]`` (i = cache_seqlens[b] - 1 here)."""
    b, s, kv_heads, head_dim = k_cache.shape
    assert k is None and v is None and causal
    assert q.shape[:2] == (b, 1) and q.shape[3] == head_dim and q.shape[2] % kv_heads == 0
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert v_cache.shape == k_cache.shape and q.dtype == k_cache.dtype == v_cache.dtype
    for lengths in (cache_seqlens, cache_leftpad):
        assert lengths.dtype == torch.int32 and lengths.is_contiguous() and lengths.shape == (b,)
    # flash-attn reads columns [leftpad, seqlens) of the cache without a bounds check: a length
    # outside 0 <= leftpad < seqlens <= s is an out-of-bounds read on the GPU
    assert bool((cache_leftpad >= 0).all()), f"negative cache_leftpad {cache_leftpad.tolist()}"
    assert bool((cache_leftpad < cache_seqlens).all() and (cache_seqlens <= s).all()), (
        f"cache_leftpad {cache_leftpad.tolist()}, cache_seqlens {cache_seqlens.tolist()}, {s} columns"
    )
    cols = torch.arange(s, device=q.device)
    keep = (cols >= cache_leftpad[:, None]) & (cols < cache_seqlens[:, None])
    if window_size[0] >= 0:
        keep &= cols >= cache_seqlens[:, None] - 1 - window_size[0]
    return masked_attention(q[:, 0], k_cache, v_cache, keep, softmax_scale).to(q.dtype)[:, None]


@pytest.fixture
def fake_flash(monkeypatch):
    """flash-attn 'installed' as `fake_flash_with_kvcache`, and usable on this device."""
    monkeypatch.setattr(attention_module, "_flash_kvcache", lambda: fake_flash_with_kvcache)
    monkeypatch.setattr(attention_module, "flash_unusable_reason", lambda *args: None)


def random_step(device, dtype, *, heads, kv_heads, head_dim, leftpads, slot, length, block):
    """A cache whose row r holds real keys at columns ``leftpads[r] .. slot``; every other column
    holds random keys too, so attending to one of them changes the result."""
    n = len(leftpads)
    cache = StaticKVCache(
        layers=1, rows=n + 2, length=length, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        device=device, block=block,
    )
    cache.keys[0].normal_()
    cache.values[0].normal_()
    cols = torch.arange(cache.length, device=device)
    leftpad = torch.tensor(leftpads, device=device)
    cache.valid[:n] = (cols >= leftpad[:, None]) & (cols <= slot)
    q = torch.randn(n, heads, head_dim, device=device, dtype=dtype)
    return cache, q, leftpad


def decode_attention(backend, cache, q, slot, window, scale):
    n = q.shape[0]
    step = DecodeAttention(backend, cache, n, torch.tensor([slot], device=q.device), cache.live_length(slot))
    return step(0, q, window, scale)


# -- selection ------------------------------------------------------------------------------------


def test_auto_is_sdpa_without_flash_attn_or_off_cuda(monkeypatch):
    gen = Generator(FAMILIES["llama"](), max_batch_size=4, max_seq_len=32)
    assert gen.attention == "sdpa"  # CPU, whether flash-attn is installed or not
    monkeypatch.setattr(attention_module, "_flash_kvcache", lambda: None)
    assert select_attention("auto", torch.device("cuda"), torch.bfloat16, 64) == "sdpa"
    assert select_attention("sdpa", torch.device("cuda"), torch.bfloat16, 64) == "sdpa"


def test_flash_without_flash_attn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention_module, "_flash_kvcache", lambda: None)
    with pytest.raises(ValueError, match="attention='flash'.*flash-attn >= 2.6.*not installed"):
        Generator(FAMILIES["qwen2"](), max_batch_size=4, max_seq_len=32, attention="flash")
    with pytest.raises(ValueError, match="attention must be one of 'auto', 'sdpa', 'flash', got 'xformers'"):
        Generator(FAMILIES["qwen2"](), max_batch_size=4, max_seq_len=32, attention="xformers")


def test_each_flash_requirement_is_named(monkeypatch):
    monkeypatch.setattr(attention_module, "_flash_kvcache", lambda: fake_flash_with_kvcache)
    cuda = torch.device("cuda")  # a device object only: no check below reaches the GPU
    cases = [
        (torch.device("cpu"), torch.bfloat16, 64, "needs a CUDA device"),
        (cuda, torch.float32, 64, "float16 or bfloat16"),
        (cuda, torch.float16, 12, "head_dim a multiple of 8"),
        (cuda, torch.bfloat16, 512, "head_dim a multiple of 8 and <= 256"),
    ]
    for device, dtype, head_dim, why in cases:
        assert select_attention("auto", device, dtype, head_dim) == "sdpa"
        with pytest.raises(ValueError, match=f"attention='flash' cannot be used: .*{why}"):
            select_attention("flash", device, dtype, head_dim)


def test_flash_on_the_eager_fallback_is_an_error():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="attention='flash' needs the static runner"):
        Generator(model, max_batch_size=2, max_seq_len=16, attention="flash")


# -- one decode step against float64 ---------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_decode_attention_matches_float64_reference(backend, window, fake_flash):
    slot = 21
    cache, q, leftpad = random_step(
        "cpu", torch.float32, heads=6, kv_heads=2, head_dim=8, leftpads=[0, 3, 9, 10, 7, 21],
        slot=slot, length=40, block=16,
    )
    expected = reference_attention(q, cache.keys[0][:6], cache.values[0][:6], leftpad, slot, window, 0.3)
    got = decode_attention(backend, cache, q, slot, window, 0.3)
    assert got.shape == (6, 6 * 8) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


# -- whole rollouts: flash vs SDPA ----------------------------------------------------------------


def forced_logits(w: DecoderWeights, out: GenerationOutput, attention: str) -> torch.Tensor:
    """``[N, T, V]`` float64 logits of the static runner fed the rollout's own tokens (teacher
    forcing): column t scores response token t."""
    n, plen = out.sequences.shape[0], out.prompt_length
    new_tokens = out.responses.shape[1]
    cache = StaticKVCache(
        layers=len(w.layers), rows=n, length=plen + new_tokens, kv_heads=w.kv_heads,
        head_dim=w.head_dim, dtype=w.dtype, device=out.sequences.device,
    )
    steps = [prefill(w, cache, out.sequences[:, :plen], out.prompt_mask, 0, 1)]
    cache.valid[:, :plen] = out.prompt_mask
    lengths = out.prompt_mask.sum(1)
    for t in range(new_tokens - 1):
        slot = torch.tensor([plen + t], device=out.sequences.device)
        live = cache.live_length(plen + t)
        steps.append(decode_forward(w, cache, out.responses[:, t], slot, lengths + t, live, attention))
    return torch.stack(steps, 1).double()


def chosen(logits: torch.Tensor, out: GenerationOutput) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, out.responses[..., None]).squeeze(-1)


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of each row's first True column, the row length when none."""
    return torch.where(mask.any(1), mask.long().argmax(1), mask.shape[1])


def check_flash_rollouts_match_sdpa(model, *, max_seq_len: int, new_tokens: int, bucket_rows: bool = False):
    """Greedy rollouts with attention='flash' against attention='sdpa' on the same model, twice.

    Errors are measured against a float64 teacher-forced reference: flash's logits may be off by
    at most 2x SDPA's on average (3x at worst), its rollout log-probs by 2x SDPA's on average; its
    tokens must be the reference's greedy ones except at near ties, and SDPA's until the first.
    """
    sdpa = Generator(model, max_batch_size=8, max_seq_len=max_seq_len, attention="sdpa")
    flash = Generator(model, max_batch_size=8, max_seq_len=max_seq_len, attention="flash")
    assert (sdpa.attention, flash.attention) == ("sdpa", "flash")
    if bucket_rows:  # as under CUDA graphs: 6 rows run as the 8-row bucket, 2 rows start done
        sdpa._bucket_rows = flash._bucket_rows = True
    w = gather_weights(model)
    w64 = shadow(w, torch.float64)
    eps = torch.finfo(w.dtype).eps
    for prompts in PROMPT_SETS:
        kwargs = dict(num_samples=2, max_new_tokens=new_tokens, top_k=1, eos_token_ids=None)
        a, b = sdpa.generate(prompts, **kwargs), flash.generate(prompts, **kwargs)
        assert torch.equal(a.prompt_mask, b.prompt_mask) and b.responses.shape == (6, new_tokens)

        ref = forced_logits(w64, b, "sdpa")
        floor = 4 * eps * ref.abs().max()
        err_flash = (forced_logits(w, b, "flash") - ref).abs()
        err_sdpa = (forced_logits(w, b, "sdpa") - ref).abs()
        assert err_flash.mean() <= 2 * err_sdpa.mean() + floor / 4
        assert err_flash.max() <= 3 * err_sdpa.max() + floor

        ref_a = forced_logits(w64, a, "sdpa")
        assert torch.isfinite(b.logprobs).all()
        lp_err_flash = (b.logprobs.double() - chosen(ref, b)).abs().mean()
        lp_err_sdpa = (a.logprobs.double() - chosen(ref_a, a)).abs().mean()
        assert lp_err_flash <= 2 * lp_err_sdpa + 1e-5

        # At each step the rollouts' logits lie within about the teacher-forced errors of the
        # reference's, so they take its greedy token wherever its top-2 margin exceeds `tie`.
        tie = 4 * torch.maximum(err_flash.amax(-1), err_sdpa.amax(-1)) + floor  # [N, T]
        top2 = ref.topk(2, dim=-1).values
        assert torch.all(ref.gather(-1, b.responses[..., None]).squeeze(-1) >= top2[..., 0] - tie)
        near_tie = top2[..., 0] - top2[..., 1] < tie
        assert torch.all(first_true(a.responses != b.responses) >= first_true(near_tie))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flash_call_contract_in_rollouts(family, fake_flash):
    # Through the whole loop (bucket padding rows, two rollouts on one cache) the lengths the
    # engine hands flash-attn select the same keys as SDPA's masks: fp32 results agree to rounding.
    check_flash_rollouts_match_sdpa(FAMILIES[family](), max_seq_len=64, new_tokens=12, bucket_rows=True)


class EagerGraphs:
    """`DecodeGraphs` on the CPU: `capture` runs the warm-up step as the real one does and keeps
    the step; `replay` runs it again, reading the buffers as they are then (as a replay does)."""

    def __init__(self):
        self.graphs = {}

    def __contains__(self, key):
        return key in self.graphs

    def __len__(self):
        return len(self.graphs)

    def capture(self, key, step):
        step()  # the eager warm-up; recording a real graph runs nothing
        self.graphs[key] = step

    def replay(self, key):
        self.graphs[key]()

    def clear(self):
        self.graphs.clear()


def test_graph_warmup_after_a_rollout_gives_flash_in_bounds_lengths(fake_flash, monkeypatch):
    # A graph for a new (bucket, live length) is captured after a rollout has filled the cache:
    # its warm-up step writes column 0, so the valid columns left by that rollout must not count
    # (cache_leftpad = 1 - their number would be negative: an out-of-bounds read on the GPU).
    seen = []

    def recording_flash(*args, cache_seqlens, cache_leftpad, **kwargs):
        seen.append(cache_leftpad.clone())
        return fake_flash_with_kvcache(*args, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, **kwargs)

    monkeypatch.setattr(attention_module, "_flash_kvcache", lambda: recording_flash)
    monkeypatch.setattr(generator_module, "DecodeGraphs", EagerGraphs)
    gen = Generator(FAMILIES["llama"](), max_batch_size=8, max_seq_len=64, attention="flash")
    gen.uses_cuda_graphs = gen._bucket_rows = True  # the CUDA path: buckets, capture, replay
    kwargs = dict(max_new_tokens=6, top_k=1, eos_token_ids=None, seed=0)
    gen.generate(PROMPT_SETS[0], num_samples=2, **kwargs)  # 6 rows: the 8-row bucket
    assert gen.num_graphs == 1
    seen.clear()
    out = gen.generate(PROMPT_SETS[1][:1], num_samples=2, **kwargs)  # 2 rows: a new bucket
    assert gen.num_graphs == 2 and seen
    assert min(int(leftpad.min()) for leftpad in seen) == 0  # the warm-up's column 0 and the padding rows
    assert torch.isfinite(out.logprobs).all()


# -- CUDA with flash-attn installed ---------------------------------------------------------------


def _require_flash_attn():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed: the flash decode path cannot run")
    if attention_module._flash_kvcache() is None:
        pytest.skip("the installed flash-attn is older than 2.6 (no cache_leftpad)")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("window", [None, 37])
def test_cuda_flash_decode_attention_matches_float64_reference(dtype, heads, kv_heads, window):
    _require_flash_attn()
    slot = 200
    cache, q, leftpad = random_step(
        "cuda", dtype, heads=heads, kv_heads=kv_heads, head_dim=64, leftpads=[0, 5, 100, 130, 64, 200],
        slot=slot, length=300, block=128,
    )
    expected = reference_attention(q, cache.keys[0][:6], cache.values[0][:6], leftpad, slot, window, 0.125)
    flash = decode_attention("flash", cache, q, slot, window, 0.125)
    sdpa = decode_attention("sdpa", cache, q, slot, window, 0.125)
    assert flash.shape == sdpa.shape == (6, heads * 64) and flash.dtype == dtype
    err_flash, err_sdpa = (flash.double() - expected).abs().max(), (sdpa.double() - expected).abs().max()
    assert err_flash <= 2 * err_sdpa + torch.finfo(dtype).eps * expected.abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_flash_rollouts_match_sdpa(family, dtype):
    _require_flash_attn()
    model = FAMILIES[family]().to(device="cuda", dtype=dtype)
    # 140 new tokens after prompts of up to 37: the live cache grows from 128 to 256 columns;
    # CUDA graphs (the default) replay the flash kernel with per-step lengths.
    check_flash_rollouts_match_sdpa(model, max_seq_len=192, new_tokens=140)
