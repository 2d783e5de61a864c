"""`rftengine demo`: every alignment method of rftengine, end to end, on a tiny model, in about
half a minute on 2 CPU cores, with no download.

The synthetic world: a character-level policy answers a prompt such as ``"kqz> "`` with a
word. The verifiable reward (``rftengine.toy.vowel_fraction_reward``) is the fraction of the
word's letters that are vowels: a program checks it, so every stage's effect is measured
exactly. A first supervised pass ("pretraining") teaches the policy three skills: answer with
a random word (reward about 0.19), critique an answer, and revise it into a word that reads
well (consonant-vowel alternation, reward about 0.5) -- the raw material Constitutional AI
needs.

The stages then run in turn, each from the same pretrained policy:

1. reward model: Bradley-Terry on program-labelled pairs of the policy's own samples;
2. PPO against that reward model (RLHF);
3. DPO on the same preference pairs;
4. RLAIF: GRPO with a Judge -- a second tiny LM finetuned on program-written ratings, read
   through the expected rating of its next-token distribution;
5. Constitutional AI: answer -> critique -> revision under a two-principle constitution,
   then SFT on the revisions and DPO on (revision ≻ original).

Printed: a before/after table of the true reward, preference accuracy and KL to the
pretrained policy. Written to ``output_dir`` through ``rftengine.metrics.MetricsWriter``, the
writer of ``rftengine train``: every step of every stage as it comes (a "stage" column), to
``demo_metrics.jsonl`` and ``demo_metrics.csv`` by default (``report_to``), so a killed demo
leaves the steps so far; at the end one summary line per table row in the JSONL, and
``demo_curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rftengine.toy import VOWELS, vowel_fraction

if TYPE_CHECKING:
    from rftengine.metrics import MetricsWriter

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWEL_LETTERS = "".join(sorted(VOWELS))  # "aeiou": a fixed order keeps the seeded draws reproducible
CONSONANTS = "".join(c for c in LETTERS if c not in VOWELS)

# The toy constitution and stage templates (the char tokenizer is lowercase-only).
TOY_CONSTITUTION = [
    {"name": "vowels", "critique_request": "enough vowels?", "revision_request": "use more vowels"},
    {"name": "sound", "critique_request": "easy to say?", "revision_request": "make it easy to say"},
]
CRITIQUE_TEMPLATE = "{prompt}{response}\ncritique ({critique_request}):"
REVISION_TEMPLATE = "{prompt}{response}\ncritique ({critique_request}):{critique}\nrevision ({revision_request}):"
JUDGE_TEMPLATE = "rate {response} ="
RATINGS = ("1", "2", "3", "4", "5")
# The pairwise answer tokens: the toy judge is read pointwise only, but Judge needs two one-token
# choices, and the char tokenizer has no "A"/"B".
JUDGE_CHOICES = ("1", "2")


@dataclass
class DemoSettings:
    """Sizes of one demo run (``quick`` shrinks every stage for tests)."""

    pretrain_steps: int = 300
    pretrain_batch: int = 32
    judge_steps: int = 200
    num_prompts: int = 256
    eval_prompts: int = 64
    rm_pairs: int = 384
    rm_steps: int = 120
    ppo_steps: int = 30
    dpo_steps: int = 60
    rlaif_steps: int = 25
    cai_prompts: int = 128
    cai_sft_steps: int = 40
    cai_dpo_steps: int = 30
    max_new_tokens: int = 12

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(pretrain_steps=80, judge_steps=60, num_prompts=64, eval_prompts=32, rm_pairs=192,
                   rm_steps=50, ppo_steps=6, dpo_steps=6, rlaif_steps=4, cai_prompts=16,
                   cai_sft_steps=3, cai_dpo_steps=3)


@dataclass
class StageRow:
    """One line of the before/after table."""

    stage: str
    reward_before: float
    reward_after: float
    accuracy_before: float
    accuracy_after: float
    kl_after: float
    seconds: float
    note: str = ""


@dataclass
class DemoResult:
    """What ``run_demo`` returns: the table rows, the files written (``metrics_path``: the JSONL,
    there when ``report_to`` has jsonl) and the wall time."""

    rows: list[StageRow]
    metrics_path: Path
    plot_path: Path
    seconds: float
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the toy world


def random_word(rng: random.Random, lo: int = 5, hi: int = 9) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def fluent_word(rng: random.Random, lo: int = 5, hi: int = 9) -> str:
    """Consonant-vowel alternation: the 'revised' answer style (vowel fraction about 1/2)."""
    start = rng.randrange(2)
    return "".join(rng.choice(VOWEL_LETTERS if (i + start) % 2 else CONSONANTS) for i in range(rng.randint(lo, hi)))


def make_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(3)) + "> "


def critique_of(response: str) -> str:
    return " few vowels" if vowel_fraction(response) < 0.34 else " fine"


def rating_of(response: str) -> str:
    """Program-written rating 1..5 of a word from its vowel fraction."""
    vf = vowel_fraction(response)
    return RATINGS[min(4, int(vf / 0.7 * 5))]


def pretraining_data(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Answers (random words), critiques and revisions (fluent words) in equal parts."""
    data = []
    for i in range(n):
        prompt, answer = make_prompt(rng), random_word(rng)
        principle = TOY_CONSTITUTION[rng.randrange(len(TOY_CONSTITUTION))]
        kind = i % 3
        if kind == 0:
            data.append({"prompt": prompt, "response": answer})
        elif kind == 1:
            data.append({"prompt": CRITIQUE_TEMPLATE.format(prompt=prompt, response=answer,
                                                            critique_request=principle["critique_request"]),
                         "response": critique_of(answer)})
        else:
            critique = critique_of(answer)
            data.append({"prompt": REVISION_TEMPLATE.format(
                prompt=prompt, response=answer, critique_request=principle["critique_request"],
                critique=critique, revision_request=principle["revision_request"]),
                "response": " " + fluent_word(rng)})
    return data


def judge_data(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Rating examples over words of every vowel density, so all five ratings occur."""
    data = []
    for _ in range(n):
        p_vowel = rng.random()
        word = "".join(rng.choice(VOWEL_LETTERS) if rng.random() < p_vowel else rng.choice(CONSONANTS)
                       for _ in range(rng.randint(4, 10)))
        data.append({"prompt": JUDGE_TEMPLATE.format(response=word), "response": rating_of(word)})
    return data


def labelled_pairs(prompts: list[str], samples: list[list[str]]) -> list[dict[str, str]]:
    """Program-labelled preferences: the sample with the higher vowel fraction is chosen."""
    pairs = []
    for prompt, (a, b) in zip(prompts, samples):
        va, vb = vowel_fraction(a), vowel_fraction(b)
        if va != vb:
            pairs.append({"prompt": prompt, "chosen": a if va > vb else b, "rejected": b if va > vb else a})
    return pairs


# ----------------------------------------------------------------------------- pretraining


def toy_lm(tokenizer, seed: int, which: int, device: torch.device | str = "cpu"):
    """The demo's random-init Qwen2-family model (hidden 64, 2 layers); ``which`` tells the policy
    (1) from the judge (2) under one ``seed``."""
    from rftengine.toy import tiny_causal_lm

    return tiny_causal_lm(len(tokenizer), "qwen2", seed=seed * 100 + which, hidden_size=64).to(device)


def _pretrain(model, tokenizer, data, *, steps: int, batch_size: int, seed: int, callback):
    from rftengine.methods.sft import SFTConfig, train_sft

    train_sft(model, tokenizer, data, SFTConfig(learning_rate=3e-3, batch_size=batch_size, max_steps=steps,
                                                warmup_steps=10, lr_scheduler="cosine", seed=seed),
              callback=callback)
    return model.eval()


def pretrain_policy(tokenizer, rng: random.Random, *, steps: int, batch_size: int = 32, seed: int = 0,
                    device: torch.device | str = "cpu", callback=None):
    """The pretrained toy policy: SFT from random init on ``pretraining_data`` (answer a prompt
    such as ``"kqz> "`` with a random word, critique an answer, revise it into a fluent word).

    ``rng`` draws the data (and is advanced, as the demo's later draws rely on); ``seed`` seeds
    the initial weights and the SFT order. Returns the model in eval mode, on ``device``.
    """
    model = toy_lm(tokenizer, seed, 1, device)
    return _pretrain(model, tokenizer, pretraining_data(rng, steps * batch_size // 2), steps=steps,
                     batch_size=batch_size, seed=seed, callback=callback)


def pretrain_judge(tokenizer, rng: random.Random, *, steps: int, batch_size: int = 32, seed: int = 0,
                   device: torch.device | str = "cpu", callback=None):
    """The toy judge: SFT from random init on ``judge_data`` (``"rate <word> ="`` -> a rating
    "1".."5" from the word's vowel fraction). Read it with ``Judge(model, tok, JUDGE_TEMPLATE,
    ratings=RATINGS, choices=JUDGE_CHOICES)``. Returns the model in eval mode, on ``device``."""
    model = toy_lm(tokenizer, seed, 2, device)
    return _pretrain(model, tokenizer, judge_data(rng, steps * batch_size), steps=steps,
                     batch_size=batch_size, seed=seed, callback=callback)


# ----------------------------------------------------------------------------- measurements


class Evaluator:
    """True reward, preference accuracy and KL to the pretrained policy, on held-out data."""

    def __init__(self, base, tokenizer, prompts, pairs, *, max_new_tokens: int, seed: int):
        self.base = base
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.pairs = pairs
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    @torch.no_grad()
    def samples(self, policy) -> list[str]:
        from rftengine.generation import Generator
        from rftengine.methods.rlaif import sample_responses

        gen = Generator(policy, max_batch_size=len(self.prompts), max_seq_len=16 + self.max_new_tokens)
        out = sample_responses(gen, self.tokenizer, self.prompts, num_samples=1,
                               max_new_tokens=self.max_new_tokens, seed=self.seed)
        gen.free()
        return [g[0] for g in out]

    def reward(self, policy) -> float:
        responses = self.samples(policy)
        return sum(vowel_fraction(r) for r in responses) / len(responses)

    def accuracy(self, policy) -> float:
        """Fraction of held-out program-labelled pairs where the policy gives the chosen
        response the higher mean per-token log-likelihood (per token, so that length, which
        the labels ignore, does not decide)."""
        from rftengine.methods.data import encode_preferences
        from rftengine.methods.dpo import sequence_logps

        logps = sequence_logps(policy, self.tokenizer, self.pairs)
        lengths = torch.tensor([[len(e.chosen_ids), len(e.rejected_ids)]
                                for e in encode_preferences(self.tokenizer, self.pairs)], dtype=torch.float32)
        per_token = logps / lengths
        return float((per_token[:, 0] > per_token[:, 1]).float().mean())

    @torch.no_grad()
    def kl(self, policy) -> float:
        """Mean sequence KL(policy || pretrained) on the policy's own samples (k3 estimator)."""
        from rftengine.methods.data import encode_prompt, encode_response, make_sequence_batch, pad_token_id
        from rftengine.methods.modeling import response_logprobs
        from rftengine.ops import kl_penalty

        responses = self.samples(policy)
        batch = make_sequence_batch(
            [encode_prompt(self.tokenizer, p) for p in self.prompts],
            [encode_response(self.tokenizer, r, self.max_new_tokens + 1) for r in responses],
            pad_token_id(self.tokenizer),
        ).to(next(policy.parameters()).device)
        logp = response_logprobs(policy, batch)
        ref = response_logprobs(self.base, batch)
        return float(kl_penalty(logp, ref, estimator="k3", mask=batch.response_mask).sum(-1).mean())


# ----------------------------------------------------------------------------- the run


def run_demo(
    output_dir: str | Path = "rftengine-demo",
    *,
    seed: int = 0,
    device: str | None = None,
    quick: bool = False,
    threads: int | None = 1,
    report_to: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run every stage (module docstring) and write the metrics and the PNG plot.

    Args:
        output_dir: where ``demo_metrics.jsonl``, ``demo_metrics.csv`` and ``demo_curves.png``
            go (created).
        seed: seeds the data, the models and every sampling call: same seed, same numbers.
        device: "cpu", "cuda", ... (default: cuda when available).
        quick: a much smaller run (seconds) for tests and smoke checks.
        threads: CPU threads for torch during the run (restored after). One is fastest for
            models this small (per-op overhead dominates, and a second thread only spins);
            None keeps the current setting.
        report_to: where the metrics go, as ``rftengine train``'s ``report_to`` (any of jsonl,
            csv, tensorboard, wandb, trackio); None: jsonl and csv.
        log: where progress lines and the table go.

    Raises ValueError for bad ``threads`` or ``report_to``, before anything runs.
    """
    report_to = ["jsonl", "csv"] if report_to is None else _checked_report_to(report_to)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        return _run(Path(output_dir), seed, device, quick, report_to, log)
    finally:
        torch.set_num_threads(saved_threads)


def _checked_report_to(report_to) -> list[str]:
    """``report_to`` checked as ``rftengine train`` checks it; a ValueError names the bad destination."""
    from rftengine.config import check_report_to
    from rftengine.errors import UserError

    try:
        return check_report_to(report_to, None)
    except UserError as exc:
        raise ValueError(str(exc)) from None


def _run(out_dir: Path, seed: int, device: str | None, quick: bool, report_to: list[str],
         log: Callable[[str], None]) -> DemoResult:
    from rftengine.metrics import MetricsWriter

    t_start = time.perf_counter()
    settings = DemoSettings.quick() if quick else DemoSettings()
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = {"seed": seed, "device": str(torch_device), **dataclasses.asdict(settings)}
    with MetricsWriter(out_dir, name="demo_metrics", report_to=report_to, config=config) as writer:
        world = _setup(settings, seed, torch_device, log, writer)
        # The stages draw from one rng in this order, so each run of a seed gives the same numbers.
        rm_row, rm_model = stage_reward_model(world)
        rows = [rm_row, stage_ppo(world, rm_model), stage_dpo(world), stage_rlaif(world), stage_cai(world)]
        for row in rows:
            writer.summary({k: v for k, v in vars(row).items() if k != "stage"}, stage=row.stage)
    seconds = time.perf_counter() - t_start
    plot_path = out_dir / "demo_curves.png"
    _plot(world.curves, rows, plot_path)
    written = [path for path, on in ((writer.jsonl_path, writer.write_jsonl), (writer.csv_path, writer.write_csv))
               if on]
    log("")
    log(format_table(rows))
    log(f"\nwrote {', '.join(str(path) for path in [*written, plot_path])} in {seconds:.1f}s")
    return DemoResult(rows=rows, metrics_path=writer.jsonl_path, plot_path=plot_path, seconds=seconds,
                      curves=world.curves)


@dataclass
class DemoWorld:
    """What every stage starts from: the pretrained policy ``base`` (frozen), the prompts and
    program-labelled pairs, the evaluator and the base policy's scores; ``recorder`` writes each
    stage's steps through ``writer`` and collects them in ``curves``."""

    settings: DemoSettings
    seed: int
    device: torch.device
    log: Callable[[str], None]
    rng: random.Random
    tokenizer: Any
    base: Any
    train_prompts: list[str]
    train_pairs: list[dict[str, str]]
    eval_pairs: list[dict[str, str]]
    evaluator: Evaluator
    base_reward: float
    base_accuracy: float
    writer: MetricsWriter
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def recorder(self, stage: str) -> Callable[[int, dict[str, float]], None]:
        return _recorder(self.curves, stage, self.writer)

    def fresh_policy(self):
        """A trainable copy of the pretrained policy."""
        policy = copy.deepcopy(self.base)
        for p in policy.parameters():
            p.requires_grad_(True)
        return policy

    def policy_row(self, stage: str, policy, seconds: float, note: str = "") -> StageRow:
        """The table row of a trained policy (measured on the held-out prompts and pairs), logged."""
        row = StageRow(stage, self.base_reward, self.evaluator.reward(policy), self.base_accuracy,
                       self.evaluator.accuracy(policy), self.evaluator.kl(policy), seconds, note)
        self.log(f"{stage}: reward {row.reward_before:.3f} -> {row.reward_after:.3f}, "
                 f"accuracy {row.accuracy_before:.2f} -> {row.accuracy_after:.2f}, KL {row.kl_after:.3f} "
                 f"({seconds:.1f}s)")
        return row


def _recorder(curves: dict[str, list[dict[str, float]]], stage: str,
              writer: MetricsWriter) -> Callable[[int, dict[str, float]], None]:
    """The ``callback(step, metrics)`` of a train_* call that files its steps under ``stage`` in
    ``curves`` and writes each through ``writer`` as it comes."""
    curves[stage] = []

    def record(step: int, metrics: dict[str, float]) -> None:
        curves[stage].append({"step": step, **metrics})
        writer.log(step, metrics, stage=stage)

    return record


def _setup(settings: DemoSettings, seed: int, device: torch.device, log: Callable[[str], None],
           writer: MetricsWriter) -> DemoWorld:
    """Pretraining (answer, critique, revise), the prompts, and program-labelled pairs of two
    samples per prompt from the pretrained policy (the better one by the program chosen)."""
    from rftengine.generation import Generator
    from rftengine.methods.rlaif import sample_responses
    from rftengine.toy import char_tokenizer

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = char_tokenizer()
    curves: dict[str, list[dict[str, float]]] = {}
    t0 = time.perf_counter()
    base = pretrain_policy(tok, rng, steps=settings.pretrain_steps, batch_size=settings.pretrain_batch, seed=seed,
                           device=device, callback=_recorder(curves, "pretrain", writer))
    for p in base.parameters():
        p.requires_grad_(False)
    train_prompts = [make_prompt(rng) for _ in range(settings.num_prompts)]
    eval_prompts = [make_prompt(rng) for _ in range(settings.eval_prompts)]

    new_tokens = settings.max_new_tokens
    gen = Generator(base, max_batch_size=128, max_seq_len=16 + new_tokens)
    pair_prompts = [make_prompt(rng) for _ in range(settings.rm_pairs + settings.eval_prompts)]
    samples = sample_responses(gen, tok, pair_prompts, num_samples=2, max_new_tokens=new_tokens, seed=seed + 7)
    gen.free()
    all_pairs = labelled_pairs(pair_prompts, samples)
    n_eval = max(8, len(all_pairs) * settings.eval_prompts // len(pair_prompts))
    train_pairs, eval_pairs = all_pairs[:-n_eval], all_pairs[-n_eval:]
    evaluator = Evaluator(base, tok, eval_prompts, eval_pairs, max_new_tokens=new_tokens, seed=seed + 1)
    base_reward = evaluator.reward(base)
    base_accuracy = evaluator.accuracy(base)
    log(f"pretrained policy: reward {base_reward:.3f}, {len(train_pairs)} training pairs, "
        f"{len(eval_pairs)} held-out pairs ({time.perf_counter() - t0:.1f}s)")
    return DemoWorld(settings, seed, device, log, rng, tok, base, train_prompts, train_pairs, eval_pairs,
                     evaluator, base_reward, base_accuracy, writer, curves)


def stage_reward_model(world: DemoWorld):
    """1. A Bradley-Terry reward model on the training pairs. Returns its table row and the
    trained (frozen) model."""
    from rftengine.methods.modeling import reward_model_from_causal_lm
    from rftengine.methods.reward import RewardConfig, pairwise_accuracy, train_reward_model

    t0 = time.perf_counter()
    rm = reward_model_from_causal_lm(world.fresh_policy())
    before = pairwise_accuracy(rm, world.tokenizer, world.eval_pairs)
    result = train_reward_model(
        rm, world.tokenizer, world.train_pairs,
        RewardConfig(learning_rate=1e-3, batch_size=16, max_steps=world.settings.rm_steps, seed=world.seed),
        eval_pairs=world.eval_pairs, callback=world.recorder("reward_model"),
    )
    for p in result.model.parameters():
        p.requires_grad_(False)
    row = StageRow("reward model", math.nan, math.nan, before, result.accuracy, math.nan,
                   time.perf_counter() - t0, "held-out pair accuracy")
    world.log(f"reward model: held-out pair accuracy {before:.2f} -> {result.accuracy:.2f} ({row.seconds:.1f}s)")
    return row, result.model


def stage_ppo(world: DemoWorld, reward_model) -> StageRow:
    """2. PPO (with a critic) against the reward model, KL to the pretrained policy (RLHF)."""
    from rftengine.methods.ppo import train_ppo
    from rftengine.methods.ppo_config import PPOConfig
    from rftengine.methods.reward import RewardScorer

    t0 = time.perf_counter()
    policy = world.fresh_policy()
    train_ppo(
        policy, world.tokenizer, world.train_prompts,
        PPOConfig(algorithm="ppo", learning_rate=2e-4, batch_size=32, max_steps=world.settings.ppo_steps,
                  max_new_tokens=world.settings.max_new_tokens, ppo_epochs=2, minibatch_size=16, kl_coef=0.1,
                  vf_coef=0.5, missing_eos_penalty=1.0, seed=world.seed),
        reward_fn=RewardScorer(reward_model, world.tokenizer), ref_model=world.base, callback=world.recorder("ppo"),
    )
    return world.policy_row("PPO (reward model)", policy, time.perf_counter() - t0)


def stage_dpo(world: DemoWorld) -> StageRow:
    """3. DPO on the training pairs, against the pretrained policy."""
    from rftengine.methods.dpo import DPOConfig, train_dpo

    t0 = time.perf_counter()
    policy = world.fresh_policy()
    train_dpo(policy, world.tokenizer, world.train_pairs,
              DPOConfig(beta=0.1, learning_rate=5e-4, batch_size=16, max_steps=world.settings.dpo_steps,
                        seed=world.seed),
              ref_model=world.base, callback=world.recorder("dpo"))
    return world.policy_row("DPO", policy, time.perf_counter() - t0)


def stage_rlaif(world: DemoWorld) -> StageRow:
    """4. RLAIF: GRPO with a Judge, a second tiny LM finetuned on program-written ratings; the
    row's note gives the judge's correlation with the true reward on probe words."""
    from rftengine.methods.judge import Judge
    from rftengine.methods.rlaif import RLAIFConfig, train_rlaif

    t0 = time.perf_counter()
    tok, rng = world.tokenizer, world.rng
    judge_lm = pretrain_judge(tok, rng, steps=world.settings.judge_steps, seed=world.seed, device=world.device,
                              callback=world.recorder("judge_sft"))
    judge = Judge(judge_lm, tok, JUDGE_TEMPLATE, ratings=RATINGS, choices=JUDGE_CHOICES, batch_size=64,
                  max_length=64)
    probe = [random_word(rng) if i % 2 else fluent_word(rng) for i in range(64)]
    judge_corr = _pearson(judge.score([""] * len(probe), probe).tolist(), [vowel_fraction(w) for w in probe])
    policy = world.fresh_policy()
    train_rlaif(
        policy, tok, world.train_prompts, judge,
        RLAIFConfig(algorithm="grpo", judge_mode="pointwise", group_size=4, batch_size=8,
                    max_steps=world.settings.rlaif_steps, max_new_tokens=world.settings.max_new_tokens,
                    seed=world.seed,
                    ppo={"learning_rate": 2e-4, "kl_coef": 0.1, "ppo_epochs": 2, "missing_eos_penalty": 1.0}),
        ref_model=world.base, callback=world.recorder("rlaif"),
    )
    return world.policy_row("RLAIF (GRPO + judge)", policy, time.perf_counter() - t0,
                            f"judge vs true reward r={judge_corr:.2f}")


def stage_cai(world: DemoWorld) -> StageRow:
    """5. Constitutional AI: answer -> critique -> revision under the toy constitution, then SFT
    on the revisions and DPO on (revision ≻ original)."""
    from rftengine.methods.cai import CAIConfig, train_cai
    from rftengine.methods.constitution import Constitution

    t0 = time.perf_counter()
    policy = world.fresh_policy()
    settings, seed = world.settings, world.seed
    cai = train_cai(
        policy, world.tokenizer, world.train_prompts[:settings.cai_prompts],
        CAIConfig(mode="sft_dpo", max_new_tokens=settings.max_new_tokens, critique_max_new_tokens=8,
                  max_context_length=128, generation_batch_size=64, critique_template=CRITIQUE_TEMPLATE,
                  revision_template=REVISION_TEMPLATE, seed=seed,
                  sft={"learning_rate": 1e-3, "batch_size": 16, "max_steps": settings.cai_sft_steps, "seed": seed},
                  dpo={"beta": 0.1, "learning_rate": 3e-4, "batch_size": 16, "max_steps": settings.cai_dpo_steps,
                       "seed": seed}),
        constitution=Constitution.from_list(TOY_CONSTITUTION, "demo constitution"), ref_model=None,
        callback=world.recorder("cai"),
    )
    revised = sum(vowel_fraction(e.revision) for e in cai.examples) / len(cai.examples)
    return world.policy_row("Constitutional AI", policy, time.perf_counter() - t0,
                            f"{len(cai.pairs)} pairs, revisions score {revised:.2f}")


# ----------------------------------------------------------------------------- output


def _pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else 0.0


def format_table(rows: list[StageRow]) -> str:
    """The before/after table as fixed-width text."""
    def num(v, fmt):
        return "-" if isinstance(v, float) and math.isnan(v) else format(v, fmt)

    head = f"{'stage':<22} {'reward':>15} {'pref. accuracy':>15} {'KL':>7} {'time':>6}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        reward = f"{num(r.reward_before, '.3f')} -> {num(r.reward_after, '.3f')}"
        acc = f"{num(r.accuracy_before, '.2f')} -> {num(r.accuracy_after, '.2f')}"
        lines.append(f"{r.stage:<22} {reward:>15} {acc:>15} {num(r.kl_after, '.3f'):>7} {r.seconds:>5.1f}s  {r.note}")
    lines += [
        "reward: mean vowel fraction of answers to held-out prompts (checked by a program)",
        "pref. accuracy: held-out program-labelled pairs ranked right by the policy's per-token "
        "likelihood (by the reward model's score on its row)",
        "KL: to the pretrained policy, nats per answer (k3 estimate on the policy's own samples)",
    ]
    return "\n".join(lines)


def _plot(curves: dict[str, list[dict[str, float]]], rows: list[StageRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward model", "reward_model", ("loss", "accuracy")),
        ("PPO vs reward model", "ppo", ("reward", "kl")),
        ("DPO", "dpo", ("loss", "rewards/accuracies")),
        ("RLAIF (judge score)", "rlaif", ("reward", "kl")),
        ("Constitutional AI (SFT, then DPO)", "cai", ("loss",)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, stage, keys) in zip(axes.flat, panels):
        points = curves.get(stage, [])
        for key in keys:
            xs = [p["step"] for p in points if key in p]
            ys = [p[key] for p in points if key in p]
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes.flat[5]
    policy_rows = [r for r in rows if not math.isnan(r.reward_after)]
    xs = range(len(policy_rows))
    ax.bar([x - 0.2 for x in xs], [r.reward_before for r in policy_rows], width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [r.reward_after for r in policy_rows], width=0.4, label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.stage.split(" ")[0] for r in policy_rows], fontsize=8)
    ax.set_title("true reward (vowel fraction), held-out prompts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from rftengine.config import REPORTERS

    parser = argparse.ArgumentParser(
        prog="rftengine demo",
        description="Reward model, PPO, DPO, RLAIF and Constitutional AI on a tiny model with a "
                    "verifiable reward; no download, about half a minute on 2 CPU cores.",
    )
    parser.add_argument("--output-dir", default="rftengine-demo", help="where the metrics and the PNG go")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models and sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (seconds), for smoke tests")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: fastest for models this small)")
    parser.add_argument("--report-to", type=_report_to_option, default=None, metavar="DEST[,DEST...]",
                        help="where the metrics go, comma-separated, as rftengine train's report_to: "
                             f"{', '.join(REPORTERS)} (default: jsonl,csv)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    run_demo(args.output_dir, seed=args.seed, device=args.device, quick=args.quick, threads=args.threads,
             report_to=args.report_to)
    return 0


def _report_to_option(text: str) -> list[str]:
    """``--report-to jsonl,csv``: the destinations, checked as ``report_to`` is."""
    try:
        return _checked_report_to([name.strip() for name in text.split(",") if name.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    # Through the `rftengine` command, so that a user's mistake is one line, as in `rftengine demo`.
    import sys

    from rftengine.cli import main as cli_main

    raise SystemExit(cli_main(["demo", *sys.argv[1:]]))
