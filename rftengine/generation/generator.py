"""Generator: rollouts from a Hugging Face causal LM, in the training process, on its live weights.

The loop (gpt-fast style): `prefill` each prompt once into a static KV cache, copied for its
samples; sample the first token from the prefill logits; then one `decode step` per token:
forward + temperature + top-k/top-p + exponential-race sampling (counter-based noise keyed by
(seed, sequence index, step)) + `token_logprobs` + done mask,
captured as one CUDA graph per (batch bucket, live cache length) on CUDA and run eagerly
elsewhere. Each row has its own cache column, position and output column, so rows at different
lengths share a step. The host reads the device only every `done_check_interval` steps; there
(`scheduler.run`) finished rows leave, the live ones are compacted to the front and queued
sequences are prefilled into the freed rows (continuous batching).
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
from rftengine.generation.kv_cache import StaticKVCache, round_up
from rftengine.generation.model_runner import decode_forward, prefill
from rftengine.generation.outputs import GenerationOutput
from rftengine.generation.params import SamplingParams, model_eos_ids, request_params, run_request
from rftengine.generation.prompts import left_pad
from rftengine.generation.sampling import SamplerSettings
from rftengine.generation.scheduler import Results, StopChecker, Work, device_ints, run
from rftengine.generation.state import RolloutState, advance, record_token
from rftengine.generation.text import is_text_prompt
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


def _has_text(prompts) -> bool:
    return not isinstance(prompts, torch.Tensor) and isinstance(prompts, Sequence) and any(
        is_text_prompt(p) for p in prompts)


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
            (grouped-query attention, tied embeddings, sliding windows included; PEFT LoRA
            adapters as low-rank matmuls, see `weights`) run on the static-cache runner that
            reads the model's parameters in place; other models run their own forward eagerly,
            with an `EagerFallbackWarning`.
        max_batch_size: most sequences decoded at once (rows of the KV cache). A call may hold
            any number of sequences: they queue for rows.
        max_seq_len: most tokens per sequence, prompt + response; sizes the KV cache.
        continuous: continuous batching (default). At each done check the finished rows leave
            the batch (the live rows are compacted into the smallest CUDA-graph bucket that holds
            them: cache rows gathered, per-row state moved) and queued sequences are prefilled
            into the freed rows, so a step costs the live rows. False: the sequences run in
            batches of ``max_rows``, each decoded until its longest sequence is done (the
            behaviour before continuous batching; kept for comparison). The eager fallback
            always runs so.
        kv_cache_memory: a memory budget for the KV cache and the per-row rollout buffers: an
            int is bytes; a float in (0, 1] is that fraction of the device's free memory at
            construction (CUDA only: on CPU give bytes). The rows are
            ``min(max_batch_size, budget // bytes_per_row)`` (``max_rows``); a budget below one
            row of max_seq_len tokens is a ValueError. None: ``max_batch_size`` rows.
        dtype: rollout dtype of the activations and the cache (default: the parameters' dtype).
            A different dtype keeps one cast copy of the weights not already in it, refreshed
            before each call.
        cuda_graphs: capture the decode step as CUDA graphs on CUDA (False: eager, for debugging).
        compile: fuse the decode step's elementwise work with ``torch.compile`` (dynamic shapes;
            the first call compiles).
        done_check_interval: decode steps between the host's reads of the device (the one sync):
            where finished rows leave, queued sequences start and ``stop_checker`` runs.
        attention: decode attention of the static runner. ``"auto"``: flash-attn's kv-cache kernel
            (reads each row's live keys only) when flash-attn >= 2.6 is installed and the rollout
            is on an Ampere-or-newer GPU in fp16/bf16 with head_dim a multiple of 8, else SDPA.
            ``"flash"`` insists (ValueError saying why it cannot), ``"sdpa"`` never uses flash-attn.
            The resolved choice is the ``attention`` attribute (None on the eager fallback).
        tokenizer: a Hugging Face tokenizer for text prompts, ``texts`` and stop strings (also
            per call: ``generate(tokenizer=)``). Used by the calls that take the vLLM-shaped
            path (``sampling_params``, text prompts or ``tokenizer=``); a plain keyword call
            with token ids returns no texts.

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

    Continuous batching does not change a sequence's tokens: its noise is keyed by its own
    position in the call (+ ``sequence_offset``) and its own response-token index, and each row
    attends to its own keys only. The batch-dependence left is the logits' own: the matmuls of a
    step (and of a prefill chunk) run at the batch's shape, and other shapes may reduce in another
    order, which can change the last bits of a logit (and, rarely, a near-tie draw).
    """

    def __init__(
        self, model: nn.Module, *, max_batch_size: int, max_seq_len: int,
        dtype: torch.dtype | None = None, cuda_graphs: bool = True, compile: bool = False,
        done_check_interval: int = 16, attention: str = "auto", tokenizer=None,
        continuous: bool = True, kv_cache_memory: int | float | None = None,
    ):
        self.max_batch_size = _check_count("max_batch_size", max_batch_size)
        if not isinstance(continuous, bool):
            raise ValueError(f"continuous must be a bool, got {continuous!r}")
        self.max_seq_len = _check_count("max_seq_len", max_seq_len)
        self.done_check_interval = _check_count("done_check_interval", done_check_interval)
        first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        if first is None or not hasattr(model, "config"):
            raise ValueError(f"model must be a Hugging Face causal LM with parameters, got {type(model).__name__}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating torch dtype or None, got {dtype}")
        self.model = model
        self.tokenizer = tokenizer
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
        self.continuous = continuous and self.backend == "static"
        self.bytes_per_row = self._bytes_per_row()
        self.max_rows = self._rows_for(kv_cache_memory)
        self._buckets = row_buckets(self.max_rows)
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
    def capacity(self) -> int:
        """How many sequences are decoded at once (``max_rows``)."""
        return self.max_rows

    def _bytes_per_row(self) -> int:
        """Device bytes one row of max_seq_len tokens takes: KV cache, its valid mask and the
        rollout's per-row output buffers."""
        config = self.model.config
        if self.backend == "static":
            w = gather_weights(self.model)
            layers, kv_heads, head_dim = len(w.layers), w.kv_heads, w.head_dim
        else:
            heads = config.num_attention_heads
            layers = config.num_hidden_layers
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        length = round_up(self.max_seq_len, 128)  # StaticKVCache's block
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # keys + values; valid (bool); out tokens (int64), log-probs x2 (float32), mask (bool)
        return 2 * layers * length * kv_heads * head_dim * itemsize + length + (self.max_seq_len + 1) * 17

    def _rows_for(self, budget) -> int:
        if budget is None:
            return self.max_batch_size
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"kv_cache_memory must be an int (bytes), a float in (0, 1] or None, got {budget!r}")
        if isinstance(budget, float):
            if not 0 < budget <= 1:
                raise ValueError(f"kv_cache_memory as a float is a fraction of free memory in (0, 1], got {budget}")
            if self.device.type != "cuda":
                raise ValueError(
                    f"kv_cache_memory as a fraction needs a CUDA device (free memory is unknown on {self.device}); "
                    f"give a number of bytes, got {budget}"
                )
            budget = int(torch.cuda.mem_get_info(self.device)[0] * budget)
        rows = budget // self.bytes_per_row
        if rows < 1:
            raise ValueError(
                f"kv_cache_memory ({budget} bytes) does not hold one sequence of max_seq_len ({self.max_seq_len}) "
                f"tokens, which needs {self.bytes_per_row} bytes"
            )
        return min(self.max_batch_size, rows)

    @property
    def num_graphs(self) -> int:
        """CUDA graphs currently captured."""
        return len(self._graphs) if self._graphs is not None else 0

    # -- the public call -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tokenizer=None,
        attention_mask: torch.Tensor | None = None,
        num_samples: int = 1,
        max_new_tokens: int | Sequence[int] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        eos_token_ids="model",
        pad_token_id: int | None = None,
        seed: int | None = None,
        sequence_offset: int = 0,
        return_truncated_logprobs: bool = False,
        stop_checker: StopChecker | None = None,
    ) -> GenerationOutput:
        """Sample ``num_samples`` responses per prompt.

        Args:
            prompts: a list of B token-id sequences, or a ``[B, L]`` integer tensor with its
                ``attention_mask`` ``[B, L]`` (bool or 0/1; padding on either side). With a
                tokenizer, also strings and chat-message lists (`rftengine.generation.text`).
            sampling_params: vLLM's request shape (`SamplingParams`), one, or one per prompt
                (differing in ``max_tokens`` only), instead of the sampling keywords below
                (num_samples .. seed; giving both is refused). With it, or with a tokenizer, or
                text prompts, the output carries ``texts`` (`rftengine.generation.params.run_request`).
            tokenizer: encodes text prompts, decodes ``texts`` and stop strings (default: the
                Generator's ``tokenizer``).
            num_samples: responses per prompt; the prompt is prefilled once and shared.
            max_new_tokens: most tokens per response: an int, or one per prompt (its samples
                share it). Each prompt + its max_new_tokens <= max_seq_len and <= the model's
                ``config.max_position_embeddings``.
            temperature, top_k, top_p, min_p: see `SamplerSettings` (temperature > 0; top_k=1 is greedy).
            eos_token_ids: an id or ids that end a response (kept, inside the mask); None or []
                generates exactly max_new_tokens; ``"model"`` (the default): the model's
                ``generation_config`` / ``config`` EOS ids (`params.model_eos_ids`).
            pad_token_id: id written at padding (default: config.pad_token_id, else the first EOS id, else 0).
            seed: with the sequence index and the decode step, decides each sequence's sampling
                noise; None draws one. Greedy decoding (``top_k=1``) draws no noise.
            sequence_offset: global index of this call's first sequence: sample s of prompt p is
                sequence ``sequence_offset + p * num_samples + s``. Splitting prompts over calls
                (or ranks) with matching offsets samples what one call would (see the class docstring).
            return_truncated_logprobs: also return log-probs under the truncated distribution.
            stop_checker: ``f(sequence_ids, responses) -> cuts``, called at each done check with
                the sequences that were live before it (their global indices and the response
                token ids so far, host lists); it returns, per sequence, None (go on) or the
                response length to cut at: the sequence is finished with reason ``"stop"`` and
                its tokens past the cut are dropped (mask False, pad id). Only called when given.

        Returns:
            GenerationOutput (shapes documented there).

        Warns a RuntimeWarning (once per call) when the model produced NaN/inf logits, e.g. from
        NaN weights; the flag rides on the rollout's existing device-to-host reads (no extra sync).
        """
        if sampling_params is not None or tokenizer is not None or _has_text(prompts):
            request = request_params(
                sampling_params, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, min_p=min_p, eos_token_ids=eos_token_ids, seed=seed,
            )
            return run_request(
                self, prompts, request, tokenizer=tokenizer if tokenizer is not None else self.tokenizer,
                attention_mask=attention_mask, pad_token_id=pad_token_id, sequence_offset=sequence_offset,
                return_truncated_logprobs=return_truncated_logprobs,
            )
        if max_new_tokens is None:
            raise ValueError("max_new_tokens is required (or pass sampling_params=SamplingParams(max_tokens=...))")
        if isinstance(eos_token_ids, str) and eos_token_ids == "model":
            eos_token_ids = model_eos_ids(self.model)
        params = SamplerSettings(temperature, top_k, top_p, min_p).validate()
        copies = _check_count("num_samples", num_samples)
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
        if stop_checker is not None and not callable(stop_checker):
            raise ValueError(f"stop_checker must be a callable or None, got {type(stop_checker).__name__}")

        ids, prompt_mask = left_pad(prompts, attention_mask, device=self.device, vocab=vocab, pad=pad)
        batch = ids.shape[0]
        if (isinstance(sequence_offset, bool) or not isinstance(sequence_offset, int)
                or not 0 <= sequence_offset <= 2**63 - 1 - batch * copies):
            raise ValueError(
                f"sequence_offset must be an int in [0, 2**63 - 1 - number of sequences], got {sequence_offset!r}"
            )
        work = Work(copies, prompt_mask.sum(1).tolist(), _per_prompt_limits(max_new_tokens, batch), sequence_offset)
        self._check_lengths(work)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        rollout = self._rollout_static if self.backend == "static" else self._rollout_hf
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            results, nonfinite = rollout(ids, prompt_mask, work, params, return_truncated_logprobs, pad,
                                         eos_ids, seed, stop_checker)
        out = _collect(results, ids, prompt_mask, copies)
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

    def _check_lengths(self, work: Work) -> None:
        """Every prompt + its max_new_tokens fits the cache and the model's positions."""
        lengths, limits = work.prompt_lengths, work.limits
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > self.max_seq_len:
            raise ValueError(
                f"every prompt must be at most max_seq_len ({self.max_seq_len}) tokens, got one of {lengths[longest]}"
            )
        worst = max(range(len(lengths)), key=lambda p: lengths[p] + limits[p])
        total = f"{lengths[worst]} + {limits[worst]} = {lengths[worst] + limits[worst]}"
        if lengths[worst] + limits[worst] > self.max_seq_len:
            raise ValueError(
                f"a prompt + its max_new_tokens must be <= max_seq_len ({self.max_seq_len}), "
                f"got {total} (prompt {worst})"
            )
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and lengths[worst] + limits[worst] > max_positions:
            # positions past the model's table: RoPE extrapolates silently, learned tables index out of range
            raise ValueError(
                f"a prompt + its max_new_tokens must be <= the model's max_position_embeddings "
                f"({max_positions}), got {total} (prompt {worst})"
            )

    def _prepare_weights(self) -> None:
        source = gather_weights(self.model)
        sig = signature(source)
        if sig != self._signature:
            # First call, or a parameter was replaced (new storage): graphs would read stale memory.
            if self._graphs is not None:
                self._graphs.clear()
            # References to every tensor already in the rollout dtype, cast copies of the others.
            self._weights = shadow(source, self.dtype)
            self._signature = sig
        else:
            refresh(self._weights, source)  # the cast copies only; in-place, so graphs see it

    def _prepare_buffers(self, params: SamplerSettings, with_truncated: bool, n_eos: int) -> None:
        w = self._weights
        if self._cache is None:
            self._cache = StaticKVCache(
                layers=len(w.layers), rows=self.max_rows, length=self.max_seq_len,
                kv_heads=w.kv_heads, head_dim=w.head_dim, dtype=self.dtype, device=self.device,
            )
        config = (params, with_truncated, n_eos)
        if config != self._config:
            # Sampling settings are baked into the captured kernels: a new setting, new graphs.
            if self._graphs is not None:
                self._graphs.clear()
            state = self._state
            if state is None or state.with_truncated != with_truncated or state.eos.numel() != n_eos:
                self._state = RolloutState(self.max_rows, self.max_seq_len, self.device, with_truncated, n_eos)
            self._config = config

    def _decode_step(self, rows: int, live: int, params: SamplerSettings) -> None:
        state = self._state
        positions = state.positions[:rows]
        # a row's next cache column is its token's position (prompts start at column 0)
        logits = self._decode(self._weights, self._cache, state.tokens[:rows], positions, positions, live,
                              self.attention)
        advance(state, rows)
        record_token(state, logits, params)

    def _replay(self, rows: int, live: int, params: SamplerSettings) -> None:
        """Replay the graph of (rows, live), capturing it first if needed, mid-rollout."""
        if self._graphs is None:
            self._graphs = DecodeGraphs()
        key = (rows, live)
        if key not in self._graphs:
            # The capture's eager warm-up runs a real step: it writes the cache column and output
            # column the replay below writes again with the same values, and advances the per-row
            # state, which is put back.
            state = self._state
            saved = [t.clone() for t in (*state.per_row(), state.nonfinite)]
            self._graphs.capture(key, functools.partial(self._decode_step, rows, live, params))
            for t, old in zip((*state.per_row(), state.nonfinite), saved):
                t.copy_(old)
        self._graphs.replay(key)

    def _rollout_static(self, ids, prompt_mask, work, params, with_truncated, pad, eos, seed, stop_checker):
        self._prepare_weights()
        self._prepare_buffers(params, with_truncated, eos.numel())
        state = self._state
        state.start(pad, eos, seed)
        results = Results(state, work.size, max(work.limits), pad)
        runner = _StaticRunner(self, ids, prompt_mask, work, params)
        nonfinite = run(runner, state, work, results, capacity=self.max_rows, continuous=self.continuous,
                        interval=self.done_check_interval, stop_checker=stop_checker)
        return results, nonfinite

    def _rollout_hf(self, ids, prompt_mask, work, params, with_truncated, pad, eos, seed, stop_checker):
        rows = min(self.max_rows, work.size)
        state = RolloutState(rows, max(work.limits), self.device, with_truncated, eos.numel())
        state.start(pad, eos, seed)
        results = Results(state, work.size, max(work.limits), pad)
        runner = _EagerRunner(HFRunner(self.model), ids, prompt_mask, work, params, state)
        was_training = self.model.training
        self.model.eval()
        try:
            nonfinite = run(runner, state, work, results, capacity=rows, continuous=False,
                            interval=self.done_check_interval, stop_checker=stop_checker)
        finally:
            runner.hf.release()
            self.model.train(was_training)
        return results, nonfinite


def _per_prompt_limits(max_new_tokens, prompts: int) -> list[int]:
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        return [_check_count("max_new_tokens", max_new_tokens)] * prompts
    if isinstance(max_new_tokens, (str, bytes)) or not isinstance(max_new_tokens, Sequence):
        raise ValueError(f"max_new_tokens must be an int or one int per prompt, got {type(max_new_tokens).__name__}")
    if len(max_new_tokens) != prompts:
        raise ValueError(f"max_new_tokens must hold one entry per prompt ({prompts}), got {len(max_new_tokens)}")
    return [_check_count(f"max_new_tokens[{i}]", n) for i, n in enumerate(max_new_tokens)]


def _admitted_prompts(work: Work, seqs: range) -> tuple[list[int], list[int]]:
    """The prompts of consecutive sequences ``seqs`` and how many of each (their sample rows)."""
    prompts = list(range(work.prompt(seqs[0]), work.prompt(seqs[-1]) + 1))
    counts = [min(seqs.stop, (p + 1) * work.copies) - max(seqs.start, p * work.copies) for p in prompts]
    return prompts, counts


def _admitted_rows(work: Work, seqs: range, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[m]`` int64 prompt lengths, global sequence ids and limits of sequences ``seqs``."""
    ps = [work.prompt(j) for j in seqs]
    return (
        device_ints([work.prompt_lengths[p] for p in ps], device),
        torch.arange(work.offset + seqs.start, work.offset + seqs.stop, device=device),
        device_ints([work.limits[p] for p in ps], device),
    )


class _StaticRunner:
    """The static runner's side of `scheduler.run`: prefill into rows, decode steps (graphs or
    eager), row compaction."""

    def __init__(self, gen: Generator, ids, prompt_mask, work: Work, params: SamplerSettings):
        self.gen, self.work, self.params = gen, work, params
        # Prompts go to the cache from column 0: right-aligned copies of the left-padded batch.
        order = torch.sort(prompt_mask.to(torch.int8), dim=1, descending=True, stable=True).indices
        self.ids, self.mask = ids.gather(1, order), prompt_mask.gather(1, order)
        self.padded = False  # rows past the batch are free (done) for a bucket's extra rows

    def admit(self, row0: int, seqs: range) -> None:
        gen, work, cache, state = self.gen, self.work, self.gen._cache, self.gen._state
        device = self.ids.device
        prompts, counts = _admitted_prompts(work, seqs)
        width = max(work.prompt_lengths[p] for p in prompts)
        chunk = max(1, _PREFILL_TOKENS // width)
        # Every index goes to the device before the first prefill is queued (no wait on it).
        groups = []
        for c0 in range(0, len(prompts), chunk):
            copies = counts[c0:c0 + chunk]
            group = device_ints(prompts[c0:c0 + chunk], device)
            rows_prompt = device_ints([i for i, c in enumerate(copies) for _ in range(c)], device)
            groups.append((group, rows_prompt, max(work.prompt_lengths[p] for p in prompts[c0:c0 + chunk])))
        first_of = device_ints([i for i, c in enumerate(counts) for _ in range(c)], device)
        admitted = _admitted_rows(work, seqs, device)
        logits, row = [], row0
        for group, rows_prompt, plen in groups:
            ids, mask = self.ids[group, :plen], self.mask[group, :plen]
            logits.append(prefill(gen._weights, cache, ids, mask, row, rows_prompt))
            rows = slice(row, row + rows_prompt.shape[0])
            cache.valid[rows] = False
            cache.valid[rows, :plen] = mask[rows_prompt]
            row += rows_prompt.shape[0]
        state.admit(row0, *admitted)
        record_token(state, torch.cat(logits)[first_of], self.params, row0)
        self.padded = False

    def step(self, active: int, live_column: int) -> None:
        gen = self.gen
        rows = bucket_for(active, gen._buckets) if gen._bucket_rows else active
        if rows > active and not self.padded:
            gen._state.free(active)
            gen._cache.valid[active:rows] = False  # flash-attn's cache_leftpad: the free rows have no keys
            self.padded = True
        live = gen._cache.live_length(live_column)
        if gen.uses_cuda_graphs:
            gen._replay(rows, live, self.params)
        else:
            gen._decode_step(rows, live, self.params)

    def compact(self, target: torch.Tensor, source: torch.Tensor, cache_columns: int, out_columns: int) -> None:
        self.gen._cache.move_rows(target, source, min(cache_columns, self.gen._cache.length))
        self.gen._state.move_rows(target, source, out_columns)
        self.padded = False


class _EagerRunner:
    """The eager fallback's side of `scheduler.run`: a batch at a time (no compaction)."""

    def __init__(self, hf: HFRunner, ids, prompt_mask, work: Work, params: SamplerSettings, state: RolloutState):
        self.hf, self.ids, self.mask, self.work, self.params, self.state = hf, ids, prompt_mask, work, params, state

    def admit(self, row0: int, seqs: range) -> None:
        prompts, counts = _admitted_prompts(self.work, seqs)
        plen = max(self.work.prompt_lengths[p] for p in prompts)
        index = device_ints(prompts, self.ids.device)
        ids, mask = self.ids[index, -plen:], self.mask[index, -plen:]  # left-padded: the last plen columns
        repeats = counts[0] if len(set(counts)) == 1 else device_ints(counts, ids.device)
        logits = self.hf.prefill(ids, mask, repeats)
        self.state.admit(row0, *_admitted_rows(self.work, seqs, ids.device))
        record_token(self.state, logits, self.params, row0)

    def step(self, active: int, live_column: int) -> None:
        state = self.state
        logits = self.hf.decode(state.tokens[:active], state.positions[:active])
        advance(state, active)
        record_token(state, logits, self.params)

    def compact(self, target: torch.Tensor, source: torch.Tensor, cache_columns: int, out_columns: int) -> None:
        raise AssertionError("the eager fallback runs without compaction")


def _collect(results: Results, ids, prompt_mask, copies: int) -> GenerationOutput:
    """The rollout's output: responses cut to the longest one."""
    width = max(1, max(results.lengths))
    truncated = results.truncated
    return GenerationOutput(
        sequences=torch.cat([ids.repeat_interleave(copies, dim=0), results.tokens[:, :width]], dim=1),
        prompt_mask=prompt_mask.repeat_interleave(copies, dim=0),
        response_mask=results.mask[:, :width],
        logprobs=results.logp[:, :width],
        truncated_logprobs=truncated[:, :width] if truncated is not None else None,
        finish_reasons=tuple(results.reasons),
    )
