"""`Run`: what every method's runner gets from the driver (the checked config, device, tokenizer,
checkpoint to resume, metrics writer), with the loaders of the models a run trains and
freezes (policy, LoRA policy, reference), sharded under torchrun."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rftengine import distributed
from rftengine.checkpoint import (
    ADAPTER_CONFIG,
    Checkpoint,
    check_model_dir,
    load_sharded_optimizer_state,
    load_sharded_weights,
    save_checkpoint,
    save_sharded_checkpoint,
)
from rftengine.cli.lora import check_head_not_adapted, load_adapters, require_peft
from rftengine.cli.resume import RUN_CONFIG
from rftengine.config import RunConfig
from rftengine.errors import UserError, as_user_error
from rftengine.metrics import MetricsWriter


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
            from rftengine.methods.precision import cast_trainable, resolve_precision

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
                with as_user_error(f"checkpoint {self.resume.path}"):
                    load_sharded_weights(model, self.resume)
                    self.resume.state["optimizer"] = load_sharded_optimizer_state(model, self.resume)
        return model

    def announce(self, model) -> None:
        """The start-up banner (`rftengine.banner`), once the trained model is built."""
        from rftengine.banner import count_parameters, start_banner, training_config
        from rftengine.methods.precision import resolve_precision

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
        with as_user_error(f"checkpoint {self.resume.path}"):
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
        with as_user_error(f"model {path}"):
            model = load_causal_lm(path, dtype=self.dtype, device=self.device)
        return self.shard(model, trained=True, rebuild=lambda: load_causal_lm(path, dtype=self.dtype, device="cpu"))

    def load_lora_policy(self):
        """`model` wrapped by `peft.get_peft_model`: only the adapters train. A LoRA checkpoint holds
        the adapters alone, so a resumed run rebuilds them on `model` and loads their weights."""
        from rftengine.methods.modeling import load_causal_lm

        peft = require_peft()
        path = check_model_dir(self.cfg.model, "model")
        with as_user_error(f"model {path}"):
            base = load_causal_lm(path, dtype=self.dtype, device=self.device)
        with as_user_error("lora"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = peft.get_peft_model(base, self.cfg.lora.peft_config())
        check_head_not_adapted(model)
        # Adapter directories (checkpoints, the export) name their base absolutely, so peft's
        # AutoPeftModelForCausalLM finds it from any working directory.
        model.peft_config["default"].base_model_name_or_path = str(path.resolve())
        if self.resume is not None and not self.resume.sharded:
            load_adapters(model, self.resume.path)
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
        with as_user_error(f"model {path}"):
            return load_causal_lm(path, dtype=self.dtype, device=self.device)

    def load_reference(self):
        """The frozen reference: always the configured reference (or the initial model), never the
        resumed policy, so KL terms mean the same before and after a resume."""
        from rftengine.methods.modeling import load_causal_lm

        path = check_model_dir(self.cfg.reference_path, "reference")
        with as_user_error(f"reference {path}"):
            return self.shard(load_causal_lm(path, dtype=self.dtype, device=self.device))
