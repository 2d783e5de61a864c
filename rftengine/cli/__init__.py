"""The `rftengine` command: train from files, run the benchmarks, run the demo.

    rftengine train CONFIG.yaml [key=value ...] [--resume [DIR]] [--debug]
    rftengine bench [--suite kernels|losses|generate|all] [--quick]
    rftengine demo [demo options]

A user error (missing or unreadable file, bad config or data, wrong checkpoint) prints what
went wrong and where, without a traceback, and exits with status 1; `--debug` (or
RFTENGINE_DEBUG=1) shows the traceback instead. SIGINT (Ctrl-C) or SIGTERM during training
finishes the step in progress, writes a checkpoint and exits with 130 or 143, printing the
command that resumes; a second signal aborts at once.

One job a module: this one parses the command line and dispatches; `train` is the driver of
`rftengine train`, `run` the `Run` it hands to the method's runner (`runners`), with `lora`
and `rewards` resolving the run's lora section and reward/judge entries; `resume` holds the
resolved run config and what a resumed run may change; `interrupt` the Ctrl-C/SIGTERM stop;
`bench` the benchmark command (`rftengine.errors`: the one-line error reporting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rftengine.cli.bench import BENCH_SUITES, cmd_bench
from rftengine.cli.interrupt import report_interruption
from rftengine.cli.runners import METHOD_RUNNERS
from rftengine.cli.train import cmd_train
from rftengine.config import METHODS, RESUME_RUN_KEYS, RESUME_TRAIN_KEYS, RunConfig
from rftengine.errors import UserError, as_user_error, debug_mode, debugging
from rftengine.methods.loop import TrainingInterrupted

__all__ = ["build_parser", "main"]


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
    debug_env = debug or debugging()
    try:
        with debug_mode(debug):
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
        report_interruption(exc, args)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"rftengine {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_demo(args) -> int:
    from rftengine import demo

    result = demo.main(args.args)
    return result if isinstance(result, int) else 0


def cmd_toy_model(args) -> int:
    from rftengine.toy_model import write_toy_model

    with as_user_error():
        write_toy_model(args.output_dir, judge=args.judge, steps=args.steps, seed=args.seed)
    return 0
