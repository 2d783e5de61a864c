"""The `rftengine` command: train from files, run the benchmarks, run the demo.

    rftengine train CONFIG.yaml [key=value ...] [--resume [DIR]] [--debug]
    rftengine bench [--suite kernels|losses|generate|all] [--quick]
    rftengine demo [demo options]

A user error (missing or unreadable file, bad config or data, wrong checkpoint) prints what
went wrong and where, without a traceback, and exits with status 1; `--debug` (or
RFTENGINE_DEBUG=1) shows the traceback instead. SIGINT (Ctrl-C) or SIGTERM during training
finishes the step in progress, writes a checkpoint and exits with 130 or 143, printing the
command that resumes; a second signal aborts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from rftengine import distributed
from rftengine.checkpoint import (
    ADAPTER_CONFIG,
    PREFIX,
    README,
    Checkpoint,
    check_model_dir,
    check_tokenizer_dir,
    check_world_size,
    export_model,
    full_state_dict,
    latest_checkpoint,
    list_checkpoints,
    load_resume,
    load_sharded_optimizer_state,
    load_sharded_weights,
    quiet_transformers,
    save_checkpoint,
    save_sharded_checkpoint,
)
from rftengine.config import (
    METHODS,
    RESUME_RUN_KEYS,
    RESUME_TRAIN_KEYS,
    RunConfig,
    UserError,
    closest,
    is_function_spec,
    load_run_config,
    method_config,
    read_text,
    yaml_load,
)
from rftengine.datasets import load_preferences, load_prompt_rows
from rftengine.methods.common import STOP, TrainingInterrupted
from rftengine.metrics import CSV_NAME, JSONL_NAME, MetricsWriter, plot_metrics
from rftengine.output_dir import FINAL_DIR, first_missing, remove_if_unused

RUN_CONFIG = "run_config.yaml"  # the fully resolved config, in output_dir and in every checkpoint
ABANDONED_DIR = "abandoned"  # output_dir/abandoned/<time>/: checkpoints of a run a resume branched from
PATH_KEYS = ("model", "data", "tokenizer", "reference", "reward", "judge", "constitution")

BENCH_SUITES = {
    "kernels": ("bench_logprobs", "bench_linear_logprobs", "bench_fused_heads", "bench_sampling"),
    "losses": ("bench_losses",),
    "generate": ("bench_generate",),
    "train": ("bench_train_step",),
}


def describe_method(method: str) -> str:
    """Every setting of a `method` run, from the config dataclasses: the train section's
    fields, then the run level's (`rftengine config METHOD`, `rftengine train --help-config`)."""
    from rftengine.methods.config_base import describe_config

    cls = METHOD_RUNNERS[method].config_class()
    title = f"{cls.__name__} (the train: section" + (f"; method {method} sets algorithm: {method})"
                                                    if method in ("ppo", "grpo", "rloo") else ")")
    return (f"{describe_config(cls, title)}\n\n"
            f"{describe_config(RunConfig, 'RunConfig (the top level of the run file)')}\n\n"
            "Names in parentheses are TRL's for the setting: accepted with a notice, converted where TRL counts "
            "differently (per_device_train_batch_size, warmup_ratio), refused with the reason where no value "
            "carries over.")


class _HelpConfig(argparse.Action):
    """``rftengine train --help-config METHOD``: every setting of a METHOD run (type, default,
    limits, help), then exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(describe_method(values))
        parser.exit()


def cmd_config(args) -> int:
    print(describe_method(args.method))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rftengine")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from rftengine import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rftengine", description="Reinforcement finetuning of language models: train, bench, demo."
    )
    debug_help = "show the traceback of an error instead of the one-line message (also: RFTENGINE_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=f"rftengine {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a YAML config (method: reward, ppo, grpo, rloo, dpo, rlaif, cai)",
                           epilog="Every setting of a METHOD run, with its default and meaning: rftengine config "
                                  "METHOD. TRL's names for them are accepted too.")
    train.add_argument("config", help="the run's YAML file (examples/ has one per method)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config values, dotted for sections (train.beta=0.2); values are YAML")
    train.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                       help="continue from the newest checkpoint in output_dir, or from DIR (a checkpoint or an "
                            "output directory). Resuming from a checkpoint older than the newest in output_dir "
                            "starts a new branch: the newer ones are moved to output_dir/abandoned/<time>/. "
                            "Only these settings may differ from the checkpoint's run, and apply from the next "
                            f"step: {', '.join(RESUME_RUN_KEYS)} and, under train, {', '.join(RESUME_TRAIN_KEYS)}; "
                            "other changes are refused. Ctrl-C or SIGTERM writes a checkpoint of the step in "
                            "progress and prints the command that resumes")
    # SUPPRESS: an unset flag here must not overwrite `rftengine --debug train ...`.
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    train.add_argument("--help-config", action=_HelpConfig, choices=METHODS, metavar="METHOD",
                       help="list every setting of a METHOD run, train section and top level, and exit "
                            "(as rftengine config METHOD)")
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="list every setting of a METHOD run: type, default, limits, meaning "
                                           "and TRL's name for it")
    config.add_argument("method", choices=METHODS, metavar="METHOD", help=", ".join(METHODS))
    config.set_defaults(func=cmd_config)

    bench = sub.add_parser("bench", help="run the kernel, loss and generation benchmarks and print their tables")
    bench.add_argument("--suite", choices=[*BENCH_SUITES, "all"], default="all")
    bench.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run that finishes in seconds")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed runs before timing (each benchmark's default)")
    bench.add_argument("--repeat", type=int, default=None, help="timed runs, median reported (each benchmark's default)")
    bench.add_argument("--out-dir", type=Path, default=None, help="write each benchmark's JSON results here")
    bench.set_defaults(func=cmd_bench)

    # Listed for --help only: main() hands everything after `demo` to rftengine.demo.main.
    sub.add_parser("demo", help="the end-to-end demo on a tiny model, no downloads (rftengine demo --help)")

    from rftengine import toy_model

    toy = sub.add_parser("toy-model", help="write a small pretrained model directory that every config in "
                                           "examples/ can train (no download, about half a minute on CPU)")
    toy_model.add_arguments(toy)
    toy.set_defaults(func=cmd_toy_model)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # the commands in the usage line, whichever were added
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()  # a bare `rftengine`: the usage and the commands, not an error
        return 0
    if argv[:1] == ["demo"]:
        # The demo parses its own options; argparse's REMAINDER would reject a leading "--quick".
        args = argparse.Namespace(command="demo", func=cmd_demo, args=argv[1:])
    else:
        args, extra = parser.parse_known_args(argv)
        if args.command == "train":
            # Overrides may also follow `--resume [DIR]`, which argparse leaves over.
            if args.resume and "=" in args.resume and not Path(args.resume).exists():
                extra.insert(0, args.resume)
                args.resume = ""
            args.overrides += [a for a in extra if not a.startswith("-")]
            extra = [a for a in extra if a.startswith("-")]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = bool(getattr(args, "debug", False))
    debug_env = debug or _debugging()
    try:
        with _debug_mode(debug):
            return int(args.func(args) or 0)
    except UserError as exc:
        if debug_env:
            raise
        print(f"rftengine {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The environment, not the code: an unwritable output_dir, a file that vanished, a full disk.
        if debug_env:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"rftengine {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        _report_interruption(exc, args)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"rftengine {args.command}: interrupted", file=sys.stderr)
        return 130


def _report_interruption(exc: TrainingInterrupted, args) -> None:
    """What a stop by SIGINT/SIGTERM left on disk, and the exact command that resumes it (rank 0
    says it, with the torchrun launch a run of several ranks resumes under)."""
    if not getattr(exc, "main_rank", True):
        return
    name = signal.Signals(exc.signum).name
    latest = latest_checkpoint(exc.output_dir)
    if exc.checkpointed:
        what = f"after step {exc.step}; checkpoint written: {exc.output_dir / f'{PREFIX}{exc.step}'}"
    elif latest is not None:
        what = f"at step {exc.step} with nothing new to save; the newest checkpoint is {latest}"
    else:
        what = "before the first step; nothing was saved"
    print(f"rftengine train: stopped by {name} {what}", file=sys.stderr)
    command = shlex.join(["rftengine", "train", args.config, *args.overrides])
    ranks = getattr(exc, "world_size", 1)
    if ranks > 1:
        command = f"torchrun [the same launch options: {ranks} ranks] $(which rftengine) " + command[len("rftengine "):]
    if latest is not None:
        print(f"resume with: {command} --resume", file=sys.stderr)
    else:
        print(f"start again with: {command}", file=sys.stderr)


def _debugging() -> bool:
    return bool(os.environ.get("RFTENGINE_DEBUG"))


@contextmanager
def _debug_mode(on: bool):
    """RFTENGINE_DEBUG=1 for the duration of a `--debug` command (what `_as_user_error` reads)."""
    if not on:
        yield
        return
    before = os.environ.get("RFTENGINE_DEBUG")
    os.environ["RFTENGINE_DEBUG"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RFTENGINE_DEBUG"]
        else:
            os.environ["RFTENGINE_DEBUG"] = before


@contextmanager
def stop_on_signals():
    """Around training: the first SIGINT or SIGTERM sets `STOP`, so that the training loop
    finishes the step in progress, writes a checkpoint and raises TrainingInterrupted; a second
    one raises KeyboardInterrupt at once (the checkpoint being written, if any, is discarded
    whole). The previous handlers are restored after. Outside the main thread, where handlers
    cannot be installed, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.signum is not None:
            raise KeyboardInterrupt
        STOP.signum = signum
        if not distributed.is_main_process():
            return  # torchrun signals every rank: rank 0 says it once
        # os.write, not print: the handler may run in the middle of a print to stderr (tqdm).
        os.write(2, f"\nrftengine train: {signal.Signals(signum).name} received: stopping after the current "
                    "step and writing a checkpoint (send it again to abort at once)\n".encode())

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        STOP.signum = None


# ---------------------------------------------------------------------------------------------
# train


def cmd_train(args) -> int:
    run_training(args.config, args.overrides, resume=args.resume)
    return 0


@dataclass
class Run:
    """What every method's runner needs: the checked config, where to write, what to resume."""

    cfg: RunConfig
    config_path: Path
    method_config: object
    output_dir: Path
    device: torch.device
    dtype: torch.dtype | None
    tokenizer: object
    resume: Checkpoint | None
    writer: MetricsWriter | None  # None on the ranks other than 0 under torchrun: rank 0 logs
    config_text: str = ""  # run_config.yaml: saved into every checkpoint
    rebuild: Callable[[], object] | None = None  # under torchrun: the trained model unsharded, on CPU (export)
    critic: object = None  # ppo's trained critic, exported beside the policy (output_dir/final/critic)

    @property
    def resume_state(self):
        return self.resume.state if self.resume is not None else None

    def callback(self, step: int, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.log(step, metrics)

    def checkpoint_fn(self, state) -> None:
        if distributed.is_distributed():
            save_sharded_checkpoint(
                self.output_dir, step=state.step, method=self.cfg.method, model=state.model,
                optimizer=state.optimizer, tokenizer=self.tokenizer, state=state.state_dict(),
                keep_last=self.cfg.keep_last, files={RUN_CONFIG: self.config_text}, modules=state.modules,
            )
            return
        save_checkpoint(
            self.output_dir, step=state.step, method=self.cfg.method, model=state.model,
            tokenizer=self.tokenizer, state=state.state_dict(), keep_last=self.cfg.keep_last,
            files={RUN_CONFIG: self.config_text},
        )

    def policy_path(self) -> str:
        """The weights to start from: the checkpoint's when resuming, else the configured model
        (also for a sharded checkpoint, whose weights `shard` then loads)."""
        return str(self.resume.path) if self.resume is not None and not self.resume.sharded else self.cfg.model

    def shard(self, model, *, trained: bool = False, rebuild: Callable[[], object] | None = None):
        """Under torchrun: `model` sharded over the ranks with FSDP2 (`distributed.shard_model`),
        and `rebuild()` (the same model, unsharded, on CPU) is what the export fills with the
        final weights; in one process `model` stays as is. The `trained` model takes a resumed
        sharded checkpoint's weights and optimizer state (under torchrun or not)."""
        if distributed.is_distributed():
            from rftengine.methods.common import cast_trainable, resolve_precision

            precision = resolve_precision(getattr(self.method_config, "precision", None), self.device)
            if trained:
                # fp32 master weights before sharding: the method's own cast cannot re-type shards.
                cast_trainable(model.parameters(), precision)
            model = distributed.shard_model(model, precision=precision)
        if trained:
            self.rebuild = rebuild
            self.announce(model)
            # Any world size, one process included: the shards are resharded on load.
            # A checkpoint that also holds other trained modules (PPO's critic) is restored by
            # `restore_with_modules` once they are built.
            if self.resume is not None and self.resume.sharded and not self.resume.state.get("sharded_modules"):
                with _as_user_error(f"checkpoint {self.resume.path}"):
                    load_sharded_weights(model, self.resume)
                    self.resume.state["optimizer"] = load_sharded_optimizer_state(model, self.resume)
        return model

    def announce(self, model) -> None:
        """The start-up banner (`rftengine.banner`), once the trained model is built."""
        from rftengine.banner import count_parameters, start_banner, training_config
        from rftengine.methods.common import resolve_precision

        precision = getattr(training_config(self.method_config), "precision", None)
        trainable, total = count_parameters(model)
        print(start_banner(method=self.cfg.method, device=self.device,
                           precision=resolve_precision(precision, self.device), trainable=trainable, total=total,
                           max_steps=getattr(self.method_config, "max_steps", None),
                           num_epochs=getattr(self.method_config, "num_epochs", None),
                           world_size=distributed.world_size()), flush=True)

    def restore_with_modules(self, model, modules: dict) -> None:
        """Resuming a sharded checkpoint of `model` and `modules` (what `save_sharded_checkpoint`
        wrote for them together): their weights, and the optimizer state over all of their
        parameters, into the resume state the method restores."""
        if self.resume is None or not self.resume.sharded:
            return
        saved = self.resume.state.get("sharded_modules") or []
        if sorted(modules) != saved:
            raise UserError(f"checkpoint {self.resume.path} holds modules {saved}, this run trains {sorted(modules)}; "
                            "resume with the config that wrote it")
        holder = torch.nn.ModuleDict({"policy": model, **modules})
        with _as_user_error(f"checkpoint {self.resume.path}"):
            load_sharded_weights(holder, self.resume)
            self.resume.state["optimizer"] = load_sharded_optimizer_state(holder, self.resume)
        self.resume.state["modules"] = {name: m.state_dict() for name, m in modules.items()}

    def load_policy(self):
        """The policy to train: the configured model (or the resumed checkpoint's weights); with a
        `lora` section, the configured model wrapped in LoRA adapters."""
        from rftengine.methods.modeling import load_causal_lm

        if self.cfg.lora is not None:
            return self.load_lora_policy()
        if self.resume is not None and (self.resume.path / ADAPTER_CONFIG).is_file():
            raise UserError(
                f"{self.resume.path} holds LoRA adapters but this run's config has no lora section; "
                "resume with the config that wrote it"
            )
        path = check_model_dir(self.policy_path(), "checkpoint" if self.policy_path() != self.cfg.model else "model")
        with _as_user_error(f"model {path}"):
            model = load_causal_lm(path, dtype=self.dtype, device=self.device)
        return self.shard(model, trained=True, rebuild=lambda: load_causal_lm(path, dtype=self.dtype, device="cpu"))

    def load_lora_policy(self):
        """`model` wrapped by `peft.get_peft_model`: only the adapters train. A LoRA checkpoint holds
        the adapters alone, so a resumed run rebuilds them on `model` and loads their weights."""
        from rftengine.methods.modeling import load_causal_lm

        peft = require_peft()
        path = check_model_dir(self.cfg.model, "model")
        with _as_user_error(f"model {path}"):
            base = load_causal_lm(path, dtype=self.dtype, device=self.device)
        with _as_user_error("lora"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = peft.get_peft_model(base, self.cfg.lora.peft_config())
        _check_head_not_adapted(model)
        # Adapter directories (checkpoints, the export) name their base absolutely, so peft's
        # AutoPeftModelForCausalLM finds it from any working directory.
        model.peft_config["default"].base_model_name_or_path = str(path.resolve())
        if self.resume is not None and not self.resume.sharded:
            _load_adapters(model, self.resume.path)
        if not distributed.is_distributed() and (self.resume is None or not self.resume.sharded):
            self.announce(model)
            return model

        def rebuild():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                plain = peft.get_peft_model(load_causal_lm(path, dtype=self.dtype, device="cpu"),
                                            self.cfg.lora.peft_config())
            plain.peft_config["default"].base_model_name_or_path = str(path.resolve())
            return plain

        # Under torchrun: sharded per decoder layer of the base (adapters inside their layers'
        # units) plus the root; a sharded checkpoint holds base and adapters, restored by `shard`.
        return self.shard(model, trained=True, rebuild=rebuild)

    def reference_model(self, needed: bool = True):
        """The reference to hand the method, or None where the method makes its own: a frozen copy
        of the initial policy (a fresh full-finetuning run) or, for LoRA, the policy with its
        adapters disabled (no second copy, resumed or not). A configured `reference` is always
        loaded; a resumed full-finetuning run loads the initial model, as the policy now holds
        the resumed weights."""
        if not needed:
            return None
        # Under torchrun too: a sharded policy cannot be copied, the reference is loaded anew
        # (LoRA: its adapters disabled, which works on the sharded policy as on one process's).
        if (self.cfg.reference is not None or (self.resume is not None and self.cfg.lora is None)
                or (distributed.is_distributed() and self.cfg.lora is None)):
            return self.load_reference()
        return None

    def load_initial_model(self):
        """The configured model as it starts training (not a resumed checkpoint's), unsharded."""
        from rftengine.methods.modeling import load_causal_lm

        path = check_model_dir(self.cfg.model, "model")
        with _as_user_error(f"model {path}"):
            return load_causal_lm(path, dtype=self.dtype, device=self.device)

    def load_reference(self):
        """The frozen reference: always the configured reference (or the initial model), never the
        resumed policy, so KL terms mean the same before and after a resume."""
        from rftengine.methods.modeling import load_causal_lm

        path = check_model_dir(self.cfg.reference_path, "reference")
        with _as_user_error(f"reference {path}"):
            return self.shard(load_causal_lm(path, dtype=self.dtype, device=self.device))


def require_peft():
    """The peft module, or a UserError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError("the lora section needs peft, which is not installed: pip install rftengine[peft]") from None
    return peft


def _check_head_not_adapted(model) -> None:
    """The fused log-prob heads read the output head's weight directly: an adapter on it (or on
    the input embeddings tied to it) would silently be left out of every log-prob."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = {"the output head": model.get_output_embeddings()}
    if getattr(model.config, "tie_word_embeddings", False):
        modules["the input embeddings, tied to the output head"] = model.get_input_embeddings()
    for what, module in modules.items():
        if isinstance(module, BaseTunerLayer):
            name = next(n for n, m in model.get_base_model().named_modules() if m is module)
            raise UserError(
                f"lora.target_modules adapts {name}, {what}: the fused log-prob heads read the head's "
                "weight directly and would bypass the adapter; remove it from target_modules"
            )


def _load_adapters(model, checkpoint: Path) -> None:
    """Resume a LoRA run: the checkpoint's adapter weights into `model`, whose adapters were just
    built from this run's lora section (they must have the same shape and targets)."""
    import peft

    config_path = checkpoint / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(
            f"{checkpoint} holds a full model, not LoRA adapters, but this run's config has a lora section; "
            "resume with the config that wrote it"
        )
    saved = json.loads(config_path.read_text())
    built = model.peft_config["default"]
    for key, name in (("r", "r"), ("lora_alpha", "alpha"), ("use_rslora", "use_rslora"),
                      ("target_modules", "target_modules")):
        now, then = getattr(built, key), saved.get(key)
        if key == "target_modules":
            now, then = sorted(now), sorted(then) if isinstance(then, list) else then
        if now != then:
            raise UserError(
                f"{checkpoint} was written with lora {name} = {then!r}, but this run's lora section gives {now!r}; "
                "resume with the config that wrote it"
            )
    with _as_user_error(f"checkpoint {checkpoint}"):
        result = peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(str(checkpoint), device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(
            f"checkpoint {checkpoint}: adapter weights do not fit this run's adapters "
            f"(missing: {missing[:3]}, unexpected: {result.unexpected_keys[:3]})"
        )


@contextmanager
def _as_user_error(where: str):
    """ValueError/OSError raised while reading the user's inputs -> UserError naming the input.

    `--debug` or RFTENGINE_DEBUG=1 shows the original traceback instead."""
    try:
        yield
    except (ValueError, OSError) as exc:
        if _debugging():
            raise
        raise UserError(f"{where}: {exc}") from None


def _torch_dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)  # auto: the dtype the directory was saved in


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(config_path: str | Path, overrides: list[str] = (), *, resume: str | None = None) -> dict:
    """`rftengine train`: load and check everything, train with checkpoints and metrics, export.

    `resume`: None starts fresh (an output_dir that already holds checkpoints is an error),
    "" continues from the newest checkpoint in output_dir, a path from that checkpoint or
    output directory. Returns the method's summary (also printed).

    Under `torchrun` (WORLD_SIZE > 1) every rank runs this: the process group is set up from
    torchrun's environment and torn down at the end, the models are sharded with FSDP2, each
    rank trains on its share of every global batch, and rank 0 alone prints, logs metrics,
    plots and exports (`rftengine.distributed`).
    """
    with quiet_transformers(), ExitStack() as stack:
        return _run_training(Path(config_path), list(overrides), resume, stack)


def _start_ranks(cfg: RunConfig, config_path: Path, stack: ExitStack) -> torch.device | None:
    """Under torchrun: the process group (for the rest of the run; `stack` tears it down) and
    this rank's device; rank > 0 prints nothing. None in one process."""
    with _as_user_error(str(config_path)):
        device = stack.enter_context(distributed.process_group(cfg.device))
    if device is None:
        return None
    if not distributed.is_main_process():
        stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return device


def _run_training(config_path: Path, overrides: list[str], resume: str | None, stack: ExitStack) -> dict:
    cfg = load_run_config(config_path, overrides, method_keys=_method_keys)
    rank_device = _start_ranks(cfg, config_path, stack)
    main_rank = distributed.is_main_process()
    spec = METHOD_RUNNERS[cfg.method]
    section = dict(cfg.train)
    if cfg.method in ("ppo", "grpo", "rloo"):
        # One config class for the three; the method names the algorithm.
        if section.setdefault("algorithm", cfg.method) != cfg.method:
            raise UserError(
                f"{config_path}: train.algorithm is {section['algorithm']!r} but method is {cfg.method!r}; "
                "set only method"
            )
    method_cfg = method_config(spec.config_class(), section, str(config_path))
    if distributed.is_distributed() and hasattr(method_cfg, "batch_size"):  # cai: each stage's, in _run_cai
        with _as_user_error(f"{config_path}: train"):
            distributed.require_divisible(method_cfg.batch_size)
    if cfg.lora is not None:
        require_peft()
    output_dir = Path(cfg.output_dir)
    _check_output_dir(output_dir, stack)
    resolved = resolved_run_config(cfg, method_cfg)

    checkpoint = None
    if resume is None:
        if list_checkpoints(output_dir):
            raise UserError(
                f"output_dir {output_dir} already holds checkpoints of an earlier run: add --resume to "
                "continue it, or choose another output_dir (or delete the old one)"
            )
    else:
        checkpoint = load_resume(resume or output_dir, cfg.method)  # skips damaged checkpoints, says which
        check_world_size(checkpoint)
        changes = _resume_changes(checkpoint.path, resolved)

    # Every input is checked before anything heavy is loaded, so mistakes surface in seconds.
    if (check_model_dir(cfg.model, "model") / ADAPTER_CONFIG).is_file() and cfg.lora is not None and not cfg.merge_lora:
        raise UserError(
            f"model {cfg.model} is a PEFT adapter directory: its adapters are merged into its base and the lora "
            "section trains fresh adapters over that, which peft cannot load as adapters over adapters; set "
            "merge_lora: true (the export is then one plain model), or drop the lora section to train fully"
        )
    for key in ("reference", "judge"):
        if getattr(cfg, key) is not None:
            check_model_dir(getattr(cfg, key), key)
    for reward_spec in cfg.reward_specs:
        if not is_function_spec(reward_spec):
            check_model_dir(reward_spec, "reward")
    if cfg.constitution is not None and Path(cfg.constitution).is_file():
        read_text(cfg.constitution, "constitution")  # unreadable or not UTF-8: say so before the models load

    try:
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"{config_path}: device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{config_path}: device is {cfg.device!r} but this machine has no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"{config_path}: device is {cfg.device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )
    if rank_device is not None:
        device = rank_device
    _seed_everything(getattr(method_cfg, "seed", 0))
    tok_dir = check_tokenizer_dir(cfg.tokenizer_path)
    from rftengine.methods.modeling import load_tokenizer

    with _as_user_error(f"tokenizer {tok_dir}"):
        tokenizer = load_tokenizer(tok_dir)

    distributed.barrier()  # every rank has read the checkpoint before rank 0 moves newer ones aside
    config_text = yaml.safe_dump(resolved, sort_keys=False)
    writer = None
    if main_rank:
        if checkpoint is not None:
            _abandon_newer(output_dir, checkpoint)
        _write_run_config(output_dir, config_text)
        writer = MetricsWriter(
            output_dir, resume_step=checkpoint.step if checkpoint is not None else None, report_to=cfg.report_to,
            config=resolved,
        )
    if not main_rank:
        cfg = dataclasses.replace(cfg, progress=False)  # rank 0 shows the progress bars
    run = Run(cfg, config_path, method_cfg, output_dir, device, _torch_dtype(cfg.dtype), tokenizer,
              checkpoint, writer, config_text)
    start = f"resuming from {checkpoint.path} (step {checkpoint.step})" if checkpoint else "starting"
    print(f"rftengine train: method {cfg.method}, {start}; writing to {output_dir}", flush=True)
    if checkpoint is not None:
        if changes:
            print(f"rftengine train: settings changed since {checkpoint.path.name}'s run, applied from step "
                  f"{checkpoint.step + 1}:", *changes, sep="\n  ", flush=True)
        checkpoint.restore_rng()  # the method's state restores torch and python RNGs again, numpy is ours
    try:
        with stop_on_signals():
            model, summary = spec.run(run)
    except TrainingInterrupted as exc:
        exc.output_dir = output_dir  # for the message that says what was saved and how to resume
        exc.world_size, exc.main_rank = distributed.world_size(), main_rank  # the group is gone by then
        raise
    finally:
        if writer is not None:
            writer.close()

    if cfg.export:
        summary["final_model"] = str(_export(run, model, output_dir / FINAL_DIR))
    if cfg.plot and main_rank:
        plot = plot_metrics(writer.rows, output_dir / "metrics.png", title=f"rftengine {cfg.method}")
        if plot is not None:
            summary["plot"] = str(plot)
    summary["metrics"] = str(output_dir / JSONL_NAME)
    print("rftengine train: done")
    for key, value in summary.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if cfg.export and main_rank:  # where the model is and how to load it (also its README.md)
        print("\n" + (output_dir / FINAL_DIR / README).read_text(encoding="utf-8"), end="", flush=True)
    return summary


def _export(run: Run, model, out: Path) -> Path:
    """The final model directory: `export_model` in one process; under torchrun the shards are
    gathered into a full state dict on rank 0, which writes it (the others wait)."""
    if not distributed.is_distributed():
        return export_model(model, run.tokenizer, out, merge_lora=run.cfg.merge_lora, critic=run.critic)
    state = full_state_dict(model)
    critic_state = full_state_dict(run.critic) if run.critic is not None else None  # every rank gathers
    if distributed.is_main_process():
        plain = run.rebuild()
        plain.load_state_dict(state)
        critic = _plain_critic(run, plain, critic_state) if critic_state is not None else None
        export_model(plain, run.tokenizer, out, merge_lora=run.cfg.merge_lora, critic=critic)
    distributed.barrier()
    return out


def _plain_critic(run: Run, policy, state: dict):
    """Under torchrun: the sharded critic rebuilt unsharded on CPU with its gathered `state`: a
    value head on `policy` (critic "shared") or a value-head model over the initial `model`."""
    from rftengine.methods.modeling import CausalLMWithValueHead, ValueHead, hidden_size_of, load_causal_lm

    if isinstance(run.critic, ValueHead):
        critic = ValueHead(hidden_size_of(policy), bias=run.critic.linear.bias is not None)
    else:
        trunk = load_causal_lm(check_model_dir(run.cfg.model, "model"), dtype=run.dtype, device="cpu")
        head = ValueHead(hidden_size_of(trunk), bias=run.critic.v_head.linear.bias is not None)
        critic = CausalLMWithValueHead(trunk, head)
    critic.load_state_dict(state)
    return critic


def _check_output_dir(output_dir: Path, stack: ExitStack | None = None) -> None:
    """output_dir is a directory, or can be made one, and is writable: checked before anything
    heavy (an error after an hour of training would lose it). With `stack` (the run's): should
    the run fail, the output_dir it made is removed again unless it holds results
    (`output_dir.remove_if_unused`); one that existed before is never touched."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file, not a directory")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output_dir {output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == output_dir else f" ({existing} is read-only)"
        raise UserError(f"output_dir {output_dir} is not writable{where}")
    if stack is not None and distributed.is_main_process():  # rank 0 alone writes output_dir
        created = first_missing(output_dir)

        def on_exit(exc_type, exc, tb) -> bool:
            if exc_type is not None:
                remove_if_unused(output_dir, created)
            return False  # the error goes on

        stack.push(on_exit)


def _write_run_config(output_dir: Path, text: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG).write_text(text, encoding="utf-8")


def _plain(value):
    """Config values as YAML-safe plain data: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_run_config(cfg: RunConfig, method_cfg) -> dict:
    """The run's config with every default filled in, run level and method section alike: a
    nested stage section (CAI's sft/dpo/rl, RLAIF's ppo/dpo) is the stage config it builds
    (`<name>_config`); one its mode does not use stays as given."""
    out = _plain(cfg)
    train = _plain(method_cfg)
    for name in train:
        builder = f"{name}_config"
        if isinstance(getattr(type(method_cfg), builder, None), property):
            try:
                train[name] = _plain(getattr(method_cfg, builder))
            except ValueError:
                pass  # a stage this configuration does not train (RLAIF's dpo under algorithm ppo)
    out["train"] = train
    return out


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _same_setting(key: str, then, now) -> bool:
    if then == now:
        return True
    if isinstance(then, float) and isinstance(now, float) and then != then and now != now:
        return True  # NaN
    if key in PATH_KEYS and isinstance(then, str) and isinstance(now, str):
        return Path(then).resolve() == Path(now).resolve()  # the same file, written another way
    return False


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _resume_changes(checkpoint: Path, resolved: dict) -> list[str]:
    """The settings this run changes from the run that wrote `checkpoint`, as "key: old -> new"
    lines; a UserError when one is not among those a resumed run may change (RESUME_RUN_KEYS,
    RESUME_TRAIN_KEYS at any depth of train): the others change what the checkpoint's training
    means, or live in its state (the KL controller, cached reference log-probs, generated data),
    where a new value would be silently ignored."""
    recorded_path = checkpoint / RUN_CONFIG
    if not recorded_path.is_file():
        print(f"rftengine train: note: {checkpoint} records no {RUN_CONFIG} (an older rftengine wrote it): "
              "settings changed since its run are not checked", flush=True)
        return []
    try:
        recorded = yaml_load(recorded_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, OSError) as exc:
        raise UserError(f"{recorded_path}: unreadable ({exc})") from None
    then, now = _flatten(recorded), _flatten(resolved)
    missing = object()
    # lora is checked against the checkpoint's own adapter_config.json when the policy loads
    # (`_load_adapters`), which also covers checkpoints that record no run config.
    changed = [k for k in {**then, **now} if k.split(".")[0] != "lora"
               and not _same_setting(k, then.get(k, missing), now.get(k, missing))]

    def allowed(key: str) -> bool:
        parts = key.split(".")
        return key in RESUME_RUN_KEYS or (parts[0] == "train" and parts[-1] in RESUME_TRAIN_KEYS)

    refused = [k for k in changed if not allowed(k)]
    if refused:
        key = refused[0]
        more = f" (and {', '.join(refused[1:])})" if refused[1:] else ""
        show = lambda v: "unset" if v is missing else _show(v)  # noqa: E731
        raise UserError(
            f"--resume: {checkpoint} was trained with {key} = {show(then.get(key, missing))}, this run sets "
            f"{show(now.get(key, missing))}{more}. A resumed run may change only {', '.join(RESUME_RUN_KEYS)} "
            f"and, under train, {', '.join(RESUME_TRAIN_KEYS)}: resume with the checkpoint's settings, or "
            "start a new run in another output_dir"
        )
    return [f"{k}: {_show(then.get(k))} -> {_show(now.get(k))}" for k in changed]


def _abandon_newer(output_dir: Path, checkpoint: Checkpoint) -> None:
    """Resuming from a checkpoint older than the newest in output_dir starts a new branch: the
    newer checkpoints belong to the run being abandoned, and a later --resume (after a crash of
    the new branch) must not pick them. They are moved, with a copy of that run's metrics, to
    output_dir/abandoned/<time>/, where neither --resume nor keep_last pruning looks."""
    newer = [p for p in list_checkpoints(output_dir) if int(p.name[len(PREFIX):]) > checkpoint.step]
    if not newer:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = output_dir / ABANDONED_DIR / stamp
    suffix = 1
    while dest.exists():
        suffix += 1
        dest = output_dir / ABANDONED_DIR / f"{stamp}-{suffix}"
    dest.mkdir(parents=True)
    for name in (JSONL_NAME, CSV_NAME):
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, dest / name)
    for path in newer:
        os.replace(path, dest / path.name)
    names = ", ".join(p.name for p in newer)
    verb = "are" if len(newer) > 1 else "is"
    print(f"rftengine train: {names} {verb} newer than {checkpoint.path.name}: resuming from it starts a new "
          f"branch, so they were moved to {dest} (with that run's metrics)", flush=True)


# ---------------------------------------------------------------------------------------------
# one runner per method: load the method's data and models, call its train_* function


@dataclass
class MethodRunner:
    config_class: Callable[[], type]
    run: Callable[[Run], tuple[object, dict]]


def _is_reward_model_dir(path: Path) -> bool:
    from rftengine.methods.modeling import VALUE_HEAD_FILE

    if (path / VALUE_HEAD_FILE).is_file():
        return True
    if not (path / "config.json").is_file():
        return False  # a PEFT adapter directory: a causal LM's adapters (check_model_dir resolved its base)
    text = read_text(path / "config.json", "model config")  # not UTF-8: a UserError naming the file
    try:
        architectures = json.loads(text).get("architectures") or []
    except (ValueError, AttributeError):
        return False  # not a reward model's config: loading it as a judge gives the error
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _run_reward(run: Run):
    from rftengine.methods.modeling import load_causal_lm
    from rftengine.methods.reward import RewardModel, as_reward_model, train_reward_model

    pairs = load_preferences(run.cfg.data, run.tokenizer, split=run.cfg.data_split)
    eval_pairs = _eval_data(run, pairs=True)
    path = check_model_dir(run.policy_path(), "checkpoint" if run.policy_path() != run.cfg.model else "model")

    def load(device):
        if _is_reward_model_dir(path):
            return RewardModel.from_pretrained(path, dtype=run.dtype, device=device)
        # A new value head draws from the global RNG: seeded alike on every rank and in rebuild().
        return as_reward_model(load_causal_lm(path, dtype=run.dtype, device=device))

    with _as_user_error(f"model {path}"):
        model = load(run.device)
    model = run.shard(model, trained=True, rebuild=lambda: load("cpu"))
    with _as_user_error("method reward"):
        result = train_reward_model(
            model, run.tokenizer, pairs, run.method_config, callback=run.callback, state=run.resume_state,
            checkpoint_fn=run.checkpoint_fn, progress=run.cfg.progress, eval_data=eval_pairs,
        )
    return result.model, {"steps": result.state.step, "pair_accuracy": result.accuracy}


def _import_function(spec: str, config_dir: Path):
    """`package.module:function` -> the callable; the config's folder and the working directory
    are searched after sys.path, so a rewards.py beside the config is found."""
    module_name, _, func_name = spec.partition(":")
    extra = [d for d in (str(config_dir), os.getcwd()) if d not in sys.path]
    sys.path.extend(extra)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"reward {spec}: cannot import module '{module_name}' ({exc})") from None
    except SyntaxError as exc:
        raise UserError(f"reward {spec}: {exc.filename}:{exc.lineno}: invalid Python ({exc.msg})") from None
    finally:
        for d in extra:
            sys.path.remove(d)
    func = getattr(module, func_name, None)
    if func is None:
        raise UserError(f"reward {spec}: module '{module_name}' ({module.__file__}) has no '{func_name}'")
    if not callable(func):
        raise UserError(f"reward {spec}: '{func_name}' is a {type(func).__name__}, not a function")
    return func


def _load_tokenizer_beside(path: Path, fallback):
    """The tokenizer saved in a model directory, or `fallback` when it has none."""
    from rftengine.methods.modeling import load_tokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((path / n).is_file() for n in names):
        return fallback
    with _as_user_error(f"tokenizer {path}"):
        return load_tokenizer(path)


def _make_judge(run: Run, path: str | Path, constitution=None):
    """A Judge over the causal LM in `path` with `judge_options` as its keyword arguments;
    with a constitution, the principle-guided judge of RL-CAI."""
    from rftengine.methods.cai import principle_judge
    from rftengine.methods.judge import Judge
    from rftengine.methods.modeling import load_causal_lm

    options = dict(run.cfg.judge_options)
    valid = [p for p in inspect.signature(Judge).parameters if p not in ("model", "tokenizer")]
    for key in options:
        if key not in valid:
            raise UserError(f"{run.config_path}: unknown judge_options key '{key}'{closest(key, valid)}")
    path = check_model_dir(path, "judge")
    with _as_user_error(f"judge {path}"):
        model = load_causal_lm(path, dtype=run.dtype, device=run.device)
        tokenizer = _load_tokenizer_beside(path, run.tokenizer)
        if constitution is not None:
            return principle_judge(model, tokenizer, constitution, **options)
        return Judge(model, tokenizer, **options)


def _reward_fn(run: Run):
    """`reward` (one entry or a list) as one `RewardFunctions`, weighted by `reward_weights`
    (run level, or train.reward_weights: not both). Each entry: a Python `module:function`, a
    reward-model directory (value head or sequence classifier) scored with RewardScorer, or any
    other causal LM directory used as a Judge; a directory is named after its folder in the
    `rewards/<name>/*` metrics."""
    from rftengine.methods.rewards import NamedReward, RewardFunctions

    train_weights = getattr(run.method_config, "reward_weights", None)
    if run.cfg.reward_weights is not None and train_weights is not None:
        raise UserError(f"{run.config_path}: reward_weights is given twice, at the run level and in train: "
                        "keep one")
    sources = []
    for spec in run.cfg.reward_specs:
        if is_function_spec(spec):
            sources.append(_import_function(spec, run.config_path.resolve().parent))
        else:
            path = check_model_dir(spec, "reward")
            sources.append(NamedReward(_reward_model_or_judge(run, path), path.resolve().name))
    with _as_user_error(f"{run.config_path}: reward"):
        weights = run.cfg.reward_weights if run.cfg.reward_weights is not None else train_weights
        return RewardFunctions(sources, weights)


def _reward_model_or_judge(run: Run, path: Path):
    """A reward-model directory (value head or sequence classifier) as a RewardScorer, any
    other causal LM directory as a Judge."""
    from rftengine.methods.modeling import RewardModel
    from rftengine.methods.reward import RewardScorer

    if not _is_reward_model_dir(path):
        return _make_judge(run, path)
    with _as_user_error(f"reward model {path}"):
        model = RewardModel.from_pretrained(path, dtype=run.dtype, device=run.device)
        return RewardScorer(model, _load_tokenizer_beside(path, run.tokenizer))


def _prompt_data(run: Run, source: tuple[str, str] | None = None) -> list:
    """The prompt data of `data` (or of `source`: (path or id, split)): the prompts, or rows
    {"prompt", <column>: ...} when the data has other columns (`answer`, `reference` ...), which
    reach the reward functions (methods.rewards)."""
    spec, split = source or (run.cfg.data, run.cfg.data_split)
    rows = load_prompt_rows(spec, run.tokenizer, split=split)
    if all(len(row) == 1 for row in rows):
        return [row["prompt"] for row in rows]
    return rows


def _eval_data(run: Run, pairs: bool):
    """The held-out data of `eval_data`/`eval_split` (`RunConfig.eval_source`): preference
    pairs (`pairs`) or prompt data; None when the run has none."""
    source = run.cfg.eval_source
    if source is None:
        return None
    return load_preferences(source[0], run.tokenizer, split=source[1]) if pairs else _prompt_data(run, source)


def _run_ppo(run: Run):
    """ppo, grpo and rloo: PPOConfig.algorithm is the method."""
    from rftengine.methods.ppo import train_ppo

    prompts = _prompt_data(run)
    eval_prompts = _eval_data(run, pairs=False)
    reward_fn = _reward_fn(run)
    policy = run.load_policy()
    cfg = run.method_config
    ref_model = run.reference_model(cfg.kl_coef > 0 or cfg.adaptive_kl)
    critic = None
    if cfg.algorithm == "ppo" and (distributed.is_sharded(policy) or (run.resume and run.resume.sharded)):
        critic = _sharded_critic(run, policy, cfg, f"method {run.cfg.method}")
    with _as_user_error(f"method {run.cfg.method}"):
        result = train_ppo(
            policy, run.tokenizer, prompts, cfg, reward_fn=reward_fn, ref_model=ref_model, critic=critic,
            callback=run.callback, state=run.resume_state, checkpoint_fn=run.checkpoint_fn,
            progress=run.cfg.progress, eval_data=eval_prompts,
        )
    run.critic = result.context.critic if result.context is not None else None  # exported with the policy
    return result.policy, _last_metrics(result, ("reward", "kl", "loss"))


def _run_dpo(run: Run):
    from rftengine.methods.dpo import train_dpo

    pairs = load_preferences(run.cfg.data, run.tokenizer, split=run.cfg.data_split)
    eval_pairs = _eval_data(run, pairs=True)
    policy = run.load_policy()
    cfg = run.method_config
    # A resumed run with precomputed reference log-probs has them in its state (the eval pairs'
    # too, when it evaluated as many): no reference model.
    cached = (run.resume.state.get("extra") or {}).get("eval_ref_logps") if run.resume else None
    eval_cached = eval_pairs is None or (cached is not None and len(cached) == len(eval_pairs))
    ref_model = run.reference_model(cfg.uses_reference and not (run.resume and cfg.precompute_ref and eval_cached))
    with _as_user_error("method dpo"):
        result = train_dpo(
            policy, run.tokenizer, pairs, cfg, ref_model=ref_model, callback=run.callback,
            state=run.resume_state, checkpoint_fn=run.checkpoint_fn, progress=run.cfg.progress,
            eval_data=eval_pairs,
        )
    return result.policy, _last_metrics(result, ("loss", "rewards/accuracies", "rewards/margins"))


def _sharded_critic(run: Run, policy, ppo_cfg, where: str):
    """PPO's critic under torchrun (or resuming a sharded checkpoint), built by the CLI (ppo,
    rlaif, cai's RL stage) rather than by the method: sharded like the policy, so that the checkpoint restores it with the policy
    (`Run.restore_with_modules`); a sharded policy cannot be copied, so a separate critic's
    trunk is loaded anew (`Run.load_initial_model`)."""
    from rftengine.methods.ppo import make_critic

    with _as_user_error(where):
        critic = make_critic(policy, ppo_cfg, run.load_initial_model() if ppo_cfg.critic == "separate" else None)
    run.restore_with_modules(policy, {"critic": critic})
    return critic


def _run_rlaif(run: Run):
    from rftengine.methods.rlaif import train_rlaif

    prompts = _prompt_data(run)
    eval_prompts = _eval_data(run, pairs=False)
    # Under torchrun the judge is replicated, not sharded: each rank judges its own rollouts in
    # no-grad forwards whose number varies per rank (FSDP would need every rank in each one),
    # at the cost of one full judge per rank in its load dtype.
    judge = _make_judge(run, run.cfg.judge)
    policy = run.load_policy()
    ref_model = run.reference_model()
    cfg = run.method_config
    critic = None
    if cfg.algorithm == "ppo" and (distributed.is_sharded(policy) or (run.resume and run.resume.sharded)):
        critic = _sharded_critic(run, policy, cfg.ppo_config, "method rlaif")
    with _as_user_error("method rlaif"):
        result = train_rlaif(
            policy, run.tokenizer, prompts, judge, run.method_config, ref_model=ref_model, critic=critic,
            callback=run.callback, state=run.resume_state, checkpoint_fn=run.checkpoint_fn,
            progress=run.cfg.progress, eval_data=eval_prompts,
        )
    run.critic = result.critic  # exported with the policy (output_dir/final/critic)
    return result.policy, _last_metrics(result, ("judge/score", "reward", "kl", "loss"))


def _run_cai(run: Run):
    from rftengine.methods.cai import load_constitution, train_cai

    if run.cfg.eval_source is not None:
        raise UserError(f"{run.config_path}: eval_data / eval_split are not supported for method cai yet "
                        "(its stages have no held-out evaluation); remove them")
    prompts = _prompt_data(run)
    with _as_user_error("constitution"):
        constitution = load_constitution(run.cfg.constitution)
    cfg = run.method_config
    judge = None
    if "rl" in cfg.stages:
        # Always the configured judge (default: the initial policy), never a copy of a resumed policy.
        judge = _make_judge(run, run.cfg.judge or run.cfg.model, constitution)
    for stage in cfg.stages if distributed.is_distributed() else ():
        with _as_user_error(f"{run.config_path}: train.{stage}"):  # before any generation
            distributed.require_divisible(getattr(cfg, f"{stage}_config").batch_size)
    ref_model = run.load_reference() if run.cfg.reference else None
    policy = run.load_policy()
    critic = None
    if run.resume is not None and run.resume.state.get("sharded_modules"):
        # a checkpoint of the RL stage with PPO's critic: handed to that stage, restored
        critic = _sharded_critic(run, policy, cfg.rl_config, "method cai")
    with _as_user_error("method cai"):
        result = train_cai(
            policy, run.tokenizer, prompts, cfg, constitution=constitution, judge=judge, ref_model=ref_model,
            # under torchrun the stages' frozen copies are loaded anew: a sharded policy cannot be copied
            load_model=run.load_initial_model, critic=critic,
            callback=run.callback, state=run.resume_state, checkpoint_fn=run.checkpoint_fn,
            progress=run.cfg.progress,
        )
    summary = _last_metrics(result, ("loss", "rewards/accuracies", "reward"))
    summary.update(examples=len(result.examples), pairs=len(result.pairs))
    return result.policy, summary


def _last_metrics(result, keys) -> dict:
    summary = {"steps": result.state.step}
    if result.history:
        summary.update({f"last {k}": result.history[-1][k] for k in keys if k in result.history[-1]})
    return summary


def _method_keys(method: str) -> list[str]:
    from rftengine.methods.config_base import config_keys

    return config_keys(METHOD_RUNNERS[method].config_class())  # TRL's names too


def _module_attr(module: str, name: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(f"rftengine.methods.{module}"), name)


METHOD_RUNNERS: dict[str, MethodRunner] = {
    "reward": MethodRunner(_module_attr("reward", "RewardConfig"), _run_reward),
    "ppo": MethodRunner(_module_attr("ppo", "PPOConfig"), _run_ppo),
    "grpo": MethodRunner(_module_attr("ppo", "PPOConfig"), _run_ppo),
    "rloo": MethodRunner(_module_attr("ppo", "PPOConfig"), _run_ppo),
    "dpo": MethodRunner(_module_attr("dpo", "DPOConfig"), _run_dpo),
    "rlaif": MethodRunner(_module_attr("rlaif", "RLAIFConfig"), _run_rlaif),
    "cai": MethodRunner(_module_attr("cai", "CAIConfig"), _run_cai),
}


# ---------------------------------------------------------------------------------------------
# bench


def _bench_module(name: str):
    try:
        return importlib.import_module(f"rftengine.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"rftengine.bench.{name}":
            raise
        return None


def cmd_bench(args) -> int:
    names = [n for suite, mods in BENCH_SUITES.items() if args.suite in (suite, "all") for n in mods]
    modules = {name: _bench_module(name) for name in names}
    missing = [name for name, module in modules.items() if module is None]
    if missing:
        raise UserError(f"benchmark modules not found in rftengine.bench: {', '.join(missing)} (broken install?)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type != "cuda" and not args.quick:
        raise UserError(
            f"the full-size benchmarks (the ANCHORS shapes, up to ~63 GiB of tensors) need a CUDA GPU, "
            f"got device {device}; run `rftengine bench --quick` for the CPU smoke run"
        )
    argv_common = ["--quick"] if args.quick else []
    for flag in ("device", "warmup", "repeat"):
        if getattr(args, flag) is not None:
            argv_common += [f"--{flag}", str(getattr(args, flag))]
    for name, module in modules.items():
        argv = list(argv_common)
        if args.out_dir is not None:
            argv += ["--out", str(args.out_dir / f"{name}.json")]
        print(f"\n### {name} {' '.join(argv)}".rstrip(), flush=True)
        module.main(argv)
    if torch.device(device).type != "cuda":
        print("\nnote: this ran on CPU: only the smoke figures (that every benchmark runs and agrees) are "
              "meaningful here; speed and memory are measured on a CUDA GPU.")
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
    from rftengine import demo

    result = demo.main(args.args)
    return result if isinstance(result, int) else 0


# ---------------------------------------------------------------------------------------------
# toy-model


def cmd_toy_model(args) -> int:
    from rftengine.toy_model import write_toy_model

    try:
        write_toy_model(args.output_dir, judge=args.judge, steps=args.steps, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
