"""`rftengine toy-model DIR`: write the demo's pretrained toy model as a Hugging Face directory, so
every config in examples/ runs from a fresh clone with no download.

The policy (default) answers a prompt such as ``"kqz> "`` with a random word (reward
``rftengine.toy:vowel_fraction_reward`` about 0.19), critiques an answer and revises it
(``rftengine.demo.pretrain_policy``); ``--judge`` writes the rating model instead
(``rftengine.demo.pretrain_judge``: ``"rate <word> ="`` -> "1".."5"), which examples/rlaif.yaml
reads. Both are a 2-layer Qwen2-family decoder with the character tokenizer of
``rftengine.toy`` (its chat template included), saved with ``save_pretrained``, plus
``toy_model.json`` recording how they were made.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

MARKER = "toy_model.json"
POLICY_STEPS = 300  # the demo's full pretraining (DemoSettings.pretrain_steps)
JUDGE_STEPS = 200  # the demo's judge finetuning (DemoSettings.judge_steps)


def write_toy_model(
    output_dir: str | Path,
    *,
    judge: bool = False,
    steps: int | None = None,
    seed: int = 0,
    threads: int | None = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Pretrain the toy policy (or, with ``judge``, the toy judge) and save model and tokenizer.

    Args:
        output_dir: the directory to write (created). It must be empty, absent, or a directory
            this function wrote before (it holds ``toy_model.json``), which is overwritten.
        judge: write the judge instead of the policy.
        steps: SFT steps of 32 examples (default: 300 for the policy, 200 for the judge, as in
            the demo); fewer give a weaker model faster (tests use a handful).
        seed: seeds the data, the initial weights and the SFT order: same seed, same weights.
        threads: CPU threads for torch during the run (restored after); one is fastest for a
            model this small. None keeps the current setting.
        log: where the progress line and the summary go.

    Returns the directory written.
    """
    from rftengine.checkpoint import save_model_dir
    from rftengine.demo import pretrain_judge, pretrain_policy
    from rftengine.toy import char_tokenizer

    out = Path(output_dir)
    kind = "judge" if judge else "policy"
    steps = (JUDGE_STEPS if judge else POLICY_STEPS) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"output_dir {out} is not empty and holds no {MARKER} (not a toy model written "
                         "before): choose a new or empty directory")

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        tokenizer = char_tokenizer()
        log(f"pretraining the toy {kind}: {steps} SFT steps of 32 examples on CPU, seed {seed} ...")
        pretrain = pretrain_judge if judge else pretrain_policy
        model = pretrain(tokenizer, random.Random(seed), steps=steps, seed=seed, device="cpu")
    finally:
        torch.set_num_threads(saved_threads)
    out.mkdir(parents=True, exist_ok=True)
    save_model_dir(out, model, tokenizer)
    recipe = {"kind": kind, "steps": steps, "batch_size": 32, "seed": seed,
              "made_by": "rftengine toy-model" + (" --judge" if judge else "")}
    (out / MARKER).write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    what = ("a judge: 'rate <word> =' -> next token '1'..'5' (more vowels, higher)" if judge else
            "a policy: answers prompts like 'kqz> ' with a word, critiques and revises")
    log(f"wrote {out}: {what}; Qwen2-family, {params / 1e3:.0f}k parameters, character tokenizer "
        f"({len(tokenizer)} tokens) with a chat template ({time.perf_counter() - t0:.1f}s)")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rftengine toy-model``."""
    parser.add_argument("output_dir", help="the directory to write, e.g. models/sft (or models/judge with --judge)")
    parser.add_argument("--judge", action="store_true",
                        help="write the rating model that examples/rlaif.yaml uses as its judge")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"SFT steps (default {POLICY_STEPS}, or {JUDGE_STEPS} with --judge; fewer: faster, weaker)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and order (default 0)")
