"""`rftengine train`: the driver. Loads and checks every input before anything heavy, sets up
output_dir, ranks, checkpoint resume and metrics, hands a `Run` to the method's runner, then
exports the trained model."""

from __future__ import annotations

import dataclasses
import os
import random
from contextlib import ExitStack, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import yaml

from rftengine import distributed
from rftengine.checkpoint import (
    ADAPTER_CONFIG,
    README,
    check_model_dir,
    check_tokenizer_dir,
    check_world_size,
    export_model,
    full_state_dict,
    list_checkpoints,
    load_resume,
    quiet_transformers,
)
from rftengine.cli.interrupt import stop_on_signals
from rftengine.cli.lora import require_peft
from rftengine.cli.resume import RUN_CONFIG, abandon_newer, resolved_run_config, resume_changes
from rftengine.cli.run import Run
from rftengine.cli.runners import METHOD_RUNNERS, method_keys
from rftengine.config import RunConfig, is_function_spec, load_run_config, method_config, read_text
from rftengine.errors import UserError, as_user_error
from rftengine.methods.loop import TrainingInterrupted
from rftengine.metrics import JSONL_NAME, MetricsWriter, plot_metrics
from rftengine.output_dir import FINAL_DIR, first_missing, remove_if_unused


def cmd_train(args) -> int:
    run_training(args.config, args.overrides, resume=args.resume)
    return 0


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
    with as_user_error(str(config_path)):
        device = stack.enter_context(distributed.process_group(cfg.device))
    if device is None:
        return None
    if not distributed.is_main_process():
        stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return device


def _run_training(config_path: Path, overrides: list[str], resume: str | None, stack: ExitStack) -> dict:
    cfg = load_run_config(config_path, overrides, method_keys=method_keys)
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
        with as_user_error(f"{config_path}: train"):
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
        changes = resume_changes(checkpoint.path, resolved)

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

    with as_user_error(f"tokenizer {tok_dir}"):
        tokenizer = load_tokenizer(tok_dir)

    distributed.barrier()  # every rank has read the checkpoint before rank 0 moves newer ones aside
    config_text = yaml.safe_dump(resolved, sort_keys=False)
    writer = None
    if main_rank:
        if checkpoint is not None:
            abandon_newer(output_dir, checkpoint)
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


def _torch_dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)  # auto: the dtype the directory was saved in


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
