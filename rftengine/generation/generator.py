"""Generator: rollouts from a Hugging Face causal LM, in the training process, on its live weights.

The loop (gpt-fast style): `prefill` each prompt once into a static KV cache, copied for its
samples; sample the first token from the prefill logits; then one `decode step` per token:
forward + temperature + top-k/top-p + exponential-race sampling (counter-based noise keyed by
(seed, sequence index, step)) + `token_logprobs` + done mask,
captured as one CUDA graph per (batch bucket, live cache length) on CUDA and run eagerly
elsewhere. The host checks whether every row is done only every `done_check_interval` steps.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from rftengine.generation.attention import ATTENTION_CHOICES, select_attention
from rftengine.generation.cuda_graphs import DecodeGraphs, bucket_for, row_buckets
from rftengine.generation.hf_runner import HFRunner
from rftengine.generation.kv_cache import StaticKVCache
from rftengine.generation.model_runner import decode_forward, prefill
from rftengine.generation.outputs import GenerationOutput
from rftengine.generation.prompts import left_pad
from rftengine.generation.sampling import SamplingParams
from rftengine.generation.state import RolloutState, advance, record_token
from rftengine.generation.weights import gather_weights, refresh, shadow, signature, unsupported_reason
from rftengine.ops._checks import FLOAT_DTYPES, check_choice

# Prompts per prefill chunk are chosen so one chunk holds about this many tokens.
_PREFILL_TOKENS = 16384


class EagerFallbackWarning(UserWarning):
    """The model's family has no static runner; generation uses its own (slower) forward."""


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _token_ids(name: str, value, vocab: int) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be an int, a sequence of ints or None, got {type(value).__name__}")
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
            raise ValueError(f"{name} must hold token ids in [0, {vocab}), got {tok!r}")
    return list(ids)


class Generator:
    """Sampling rollouts with per-token log-probs that match the trainer's kernel.

    Args:
        model: a Hugging Face decoder-only causal LM. Llama, Qwen2 and Mistral families
            (grouped-query attention, tied embeddings, sliding windows included) run on the
            static-cache runner that reads the model's parameters in place; other models run
            their own forward eagerly, with an `EagerFallbackWarning`.
        max_batch_size: most sequences (prompts x num_samples) per call; sizes the KV cache.
        max_seq_len: most tokens per sequence, prompt + response; sizes the KV cache.
        dtype: rollout dtype of the activations and the cache (default: the parameters' dtype).
            A different dtype keeps one cast copy of the weights, refreshed before each call.
        cuda_graphs: capture the decode step as CUDA graphs on CUDA (False: eager, for debugging).
        compile: fuse the decode step's elementwise work with ``torch.compile`` (dynamic shapes;
            the first call compiles).
        done_check_interval: steps between host checks for "every row finished".
        attention: decode attention of the static runner. ``"auto"``: flash-attn's kv-cache kernel
            (reads each row's live keys only) when flash-attn >= 2.6 is installed and the rollout
            is on an Ampere-or-newer GPU in fp16/bf16 with head_dim a multiple of 8, else SDPA.
            ``"flash"`` insists (ValueError saying why it cannot), ``"sdpa"`` never uses flash-attn.
            The resolved choice is the ``attention`` attribute (None on the eager fallback).

    Sampling noise is a pure function of (seed, global sequence index, decode step)
    (``sampling.noise_keys``), so a sequence's draws do not depend on which other sequences share
    its batch, the CUDA-graph bucket, ``max_batch_size`` or how a caller splits its prompts into
    calls (``sequence_offset``); nor on the device. What remains batch-dependent is the logits
    themselves: other batch shapes (and left padding) run other matmul shapes and reduction
    orders, which can change the last bits of a logit and, rarely, flip a near-tie draw.
    The noise is about 10 int64 elementwise passes over ``[rows, V]``; on one CPU thread (tiny
    Qwen2, V=32000, 16 rows) it costs 5-7 ms per step against 15 ms for the ``exponential_``
    draw it replaced (a decode step: 11-13 ms instead of 20-25 ms; greedy, no noise: 5-6 ms).

    Rollouts run the model as in eval mode (no dropout). The parameters are read by reference:
    update them in place (optimizer steps, ``load_state_dict``) and the next call, graphs
    included, uses the new values. Replacing a parameter tensor is noticed and rebuilds the
    graphs. ``free()`` gives the cache and the graphs back; the next call rebuilds them.
    """

    def __init__(
        self, model: nn.Module, *, max_batch_size: int, max_seq_len: int,
        dtype: torch.dtype | None = None, cuda_graphs: bool = True, compile: bool = False,
        done_check_interval: int = 16, attention: str = "auto",
    ):
        self.max_batch_size = _check_count("max_batch_size", max_batch_size)
        self.max_seq_len = _check_count("max_seq_len", max_seq_len)
        self.done_check_interval = _check_count("done_check_interval", done_check_interval)
        first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        if first is None or not hasattr(model, "config"):
            raise ValueError(f"model must be a Hugging Face causal LM with parameters, got {type(model).__name__}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating torch dtype or None, got {dtype}")
        self.model = model
        self.device = first.device
        self.dtype = dtype or first.dtype
        reason = unsupported_reason(model)
        self.backend = "static" if reason is None else "eager-hf"
        if reason is None:
            self.attention = select_attention(attention, self.device, self.dtype, gather_weights(model).head_dim)
        else:
            check_choice("attention", attention, ATTENTION_CHOICES)
            if attention == "flash":
                raise ValueError(f"attention='flash' needs the static runner, which cannot run this model ({reason})")
            self.attention = None
            if self.dtype != first.dtype:
                raise ValueError(
                    f"dtype must be the model's own ({first.dtype}) on the eager fallback, got {self.dtype}"
                )
            warnings.warn(
                f"rftengine.generation: {type(model).__name__} has no static runner ({reason}); "
                "generating with the model's own forward, eagerly and without CUDA graphs",
                EagerFallbackWarning, stacklevel=2,
            )
        self.uses_cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and reason is None
        # Graphs run a fixed number of rows (a bucket); the rows past the batch start done.
        self._bucket_rows = self.uses_cuda_graphs
        self._decode = torch.compile(decode_forward, dynamic=True) if compile else decode_forward
        self._buckets = row_buckets(self.max_batch_size)
        self._weights = None
        self._signature = None
        self._cache: StaticKVCache | None = None
        self._state: RolloutState | None = None
        self._graphs: DecodeGraphs | None = None
        self._config = None

    # -- memory --------------------------------------------------------------------------------

    def free(self) -> None:
        """Drop the KV cache, the CUDA graphs, the rollout buffers and any cast weight copy."""
        self._graphs = self._cache = self._state = self._config = None
        self._weights = self._signature = None
        if self.device.type == "cuda":
            # The graphs' private pool goes back to the driver only through empty_cache.
            torch.cuda.empty_cache()

    @property
    def num_graphs(self) -> int:
        """CUDA graphs currently captured."""
        return len(self._graphs) if self._graphs is not None else 0

    # -- the public call -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts,
        *,
        attention_mask: torch.Tensor | None = None,
        num_samples: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_ids,
        pad_token_id: int | None = None,
        seed: int | None = None,
        sequence_offset: int = 0,
        return_truncated_logprobs: bool = False,
    ) -> GenerationOutput:
        """Sample ``num_samples`` responses per prompt.

        Args:
            prompts: a list of B token-id sequences, or a ``[B, L]`` integer tensor with its
                ``attention_mask`` ``[B, L]`` (bool or 0/1; padding on either side).
            num_samples: responses per prompt; the prompt is prefilled once and shared.
            max_new_tokens: most tokens per response; longest prompt + this <= max_seq_len and
                <= the model's ``config.max_position_embeddings``.
            temperature, top_k, top_p: see `SamplingParams` (temperature > 0; top_k=1 is greedy).
            eos_token_ids: an id or ids that end a response (kept, inside the mask); None or []
                generates exactly max_new_tokens.
            pad_token_id: id written at padding (default: config.pad_token_id, else the first EOS id, else 0).
            seed: with the sequence index and the decode step, decides each sequence's sampling
                noise; None draws one. Greedy decoding (``top_k=1``) draws no noise.
            sequence_offset: global index of this call's first sequence: sample s of prompt p is
                sequence ``sequence_offset + p * num_samples + s``. Splitting prompts over calls
                (or ranks) with matching offsets samples what one call would (see the class docstring).
            return_truncated_logprobs: also return log-probs under the truncated distribution.

        Returns:
            GenerationOutput (shapes documented there).

        Warns a RuntimeWarning (once per call) when the model produced NaN/inf logits, e.g. from
        NaN weights; the flag rides on the rollout's existing device-to-host reads (no extra sync).
        """
        params = SamplingParams(temperature, top_k, top_p).validate()
        copies = _check_count("num_samples", num_samples)
        new_tokens = _check_count("max_new_tokens", max_new_tokens)
        vocab = self._vocab()
        eos = _token_ids("eos_token_ids", eos_token_ids, vocab)
        if pad_token_id is None:
            config_pad = getattr(self.model.config, "pad_token_id", None)
            pad_token_id = config_pad if isinstance(config_pad, int) else (eos[0] if eos else 0)
        pad = _token_ids("pad_token_id", pad_token_id, vocab)[0]
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        if (isinstance(sequence_offset, bool) or not isinstance(sequence_offset, int)
                or not 0 <= sequence_offset <= 2**63 - 1 - self.max_batch_size):
            raise ValueError(
                f"sequence_offset must be an int in [0, 2**63 - 1 - max_batch_size], got {sequence_offset!r}"
            )

        ids, prompt_mask = left_pad(prompts, attention_mask, device=self.device, vocab=vocab, pad=pad)
        batch, plen = ids.shape
        rows = batch * copies
        if rows > self.max_batch_size:
            raise ValueError(
                f"prompts x num_samples must be <= max_batch_size ({self.max_batch_size}), "
                f"got {batch} x {copies} = {rows}"
            )
        if plen > self.max_seq_len:
            raise ValueError(
                f"every prompt must be at most max_seq_len ({self.max_seq_len}) tokens, got one of {plen}"
            )
        if plen + new_tokens > self.max_seq_len:
            raise ValueError(
                f"longest prompt + max_new_tokens must be <= max_seq_len ({self.max_seq_len}), "
                f"got {plen} + {new_tokens} = {plen + new_tokens}"
            )
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and plen + new_tokens > max_positions:
            # positions past the model's table: RoPE extrapolates silently, learned tables index out of range
            raise ValueError(
                f"longest prompt + max_new_tokens must be <= the model's max_position_embeddings "
                f"({max_positions}), got {plen} + {new_tokens} = {plen + new_tokens}"
            )
        lengths = prompt_mask.sum(1).repeat_interleave(copies)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        rollout = self._rollout_static if self.backend == "static" else self._rollout_hf
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            state, steps = rollout(
                ids, prompt_mask, copies, new_tokens, params, return_truncated_logprobs,
                lengths, pad, eos_ids, seed, sequence_offset,
            )
        out, nonfinite = _collect(state, ids, prompt_mask, copies, steps)
        if nonfinite:
            warnings.warn(
                "rftengine.generation: the model produced non-finite logits (NaN or inf) in this rollout; "
                "the affected log-probs are NaN or inf and the tokens arbitrary: check the weights for NaN/inf",
                RuntimeWarning, stacklevel=3,  # the caller of generate(), past torch.no_grad's wrapper
            )
        return out

    # -- internals -----------------------------------------------------------------------------

    def _vocab(self) -> int:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            return head.weight.shape[0]
        return self.model.config.vocab_size

    def _loop(self, state: RolloutState, rows: int, new_tokens: int, step) -> int:
        """Run decode steps 1 .. new_tokens-1 (token 0 came from prefill); returns tokens produced."""
        for t in range(1, new_tokens):
            # The only host sync of the loop, every done_check_interval steps.
            if t % self.done_check_interval == 0 and bool(state.done[:rows].all()):
                return t
            step(t)
        return new_tokens

    def _prepare_weights(self) -> None:
        source = gather_weights(self.model)
        sig = signature(source)
        if sig != self._signature:
            # First call, or a parameter was replaced (new storage): graphs would read stale memory.
            if self._graphs is not None:
                self._graphs.clear()
            self._weights = source if source.dtype == self.dtype else shadow(source, self.dtype)
            self._signature = sig
        elif self._weights.embed is not source.embed:
            refresh(self._weights, source)

    def _prepare_buffers(self, params: SamplingParams, with_truncated: bool, n_eos: int) -> None:
        w = self._weights
        if self._cache is None:
            self._cache = StaticKVCache(
                layers=len(w.layers), rows=self.max_batch_size, length=self.max_seq_len,
                kv_heads=w.kv_heads, head_dim=w.head_dim, dtype=self.dtype, device=self.device,
            )
        config = (params, with_truncated, n_eos)
        if config != self._config:
            # Sampling settings are baked into the captured kernels: a new setting, new graphs.
            if self._graphs is not None:
                self._graphs.clear()
            state = self._state
            if state is None or state.with_truncated != with_truncated or state.eos.numel() != n_eos:
                self._state = RolloutState(
                    self.max_batch_size, self.max_seq_len, self.device, with_truncated, n_eos
                )
            self._config = config

    def _decode_step(self, rows: int, live: int, params: SamplingParams) -> None:
        state = self._state
        logits = self._decode(
            self._weights, self._cache, state.tokens[:rows], state.slot, state.positions[:rows], live,
            self.attention,
        )
        record_token(state, logits, params)
        advance(state)

    def _capture(self, rows: int, lives: list[int], params: SamplingParams) -> None:
        if self._graphs is None:
            self._graphs = DecodeGraphs()
        for live in lives:
            if (rows, live) not in self._graphs:
                # The warm-up step writes cache column 0 and output column 0: both are reset or
                # overwritten by the rollout that follows. The valid mask of an earlier rollout is
                # reset too: flash-attn's cache_leftpad = slot + 1 - (valid columns) would come out
                # negative, an out-of-bounds read.
                self._state.slot.zero_()
                self._state.step.zero_()
                self._cache.valid[:rows].zero_()
                self._graphs.capture((rows, live), functools.partial(self._decode_step, rows, live, params))

    def _rollout_static(
        self, ids, prompt_mask, copies, new_tokens, params, with_truncated, lengths, pad, eos, seed, offset
    ):
        batch, plen = ids.shape
        rows = batch * copies
        self._prepare_weights()
        self._prepare_buffers(params, with_truncated, eos.numel())
        cache, state = self._cache, self._state
        step_rows = bucket_for(rows, self._buckets) if self._bucket_rows else rows
        if self.uses_cuda_graphs:
            lives = sorted({cache.live_length(plen + t - 1) for t in range(1, new_tokens)})
            self._capture(step_rows, lives, params)
        state.start(rows, plen, lengths, pad, eos, seed, offset)
        cache.valid[:step_rows].zero_()
        chunk = max(1, _PREFILL_TOKENS // plen)
        first = torch.cat([
            prefill(self._weights, cache, ids[b0:b0 + chunk], prompt_mask[b0:b0 + chunk], b0 * copies, copies)
            for b0 in range(0, batch, chunk)
        ]).repeat_interleave(copies, dim=0)
        cache.valid[:rows, :plen] = prompt_mask.repeat_interleave(copies, dim=0)
        record_token(state, first, params)

        def step(t: int) -> None:
            live = cache.live_length(plen + t - 1)
            if self.uses_cuda_graphs:
                self._graphs.replay((step_rows, live))
            else:
                self._decode_step(step_rows, live, params)

        return state, self._loop(state, rows, new_tokens, step)

    def _rollout_hf(
        self, ids, prompt_mask, copies, new_tokens, params, with_truncated, lengths, pad, eos, seed, offset
    ):
        rows = ids.shape[0] * copies
        state = RolloutState(rows, new_tokens, self.device, with_truncated, eos.numel())
        state.start(rows, ids.shape[1], lengths, pad, eos, seed, offset)
        runner = HFRunner(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            record_token(state, runner.prefill(ids, prompt_mask, copies), params)

            def step(t: int) -> None:
                record_token(state, runner.decode(state.tokens, state.positions), params)
                advance(state)

            steps = self._loop(state, rows, new_tokens, step)
        finally:
            runner.release()
            self.model.train(was_training)
        return state, steps


def _collect(state: RolloutState, ids, prompt_mask, copies: int, steps: int) -> tuple[GenerationOutput, bool]:
    """The rollout's output, and whether any step produced non-finite logits."""
    rows = ids.shape[0] * copies
    truncated = state.out_truncated
    # the one host read of the rollout's flags: done rows, then the non-finite flag
    *done, nonfinite = torch.cat([state.done[:rows], state.nonfinite]).tolist()
    return GenerationOutput(
        sequences=torch.cat([ids.repeat_interleave(copies, dim=0), state.out_tokens[:rows, :steps]], dim=1),
        prompt_mask=prompt_mask.repeat_interleave(copies, dim=0),
        response_mask=state.out_mask[:rows, :steps].clone(),
        logprobs=state.out_logp[:rows, :steps].clone(),
        truncated_logprobs=truncated[:rows, :steps].clone() if truncated is not None else None,
        finish_reasons=tuple("eos" if d else "length" for d in done),
    ), nonfinite
