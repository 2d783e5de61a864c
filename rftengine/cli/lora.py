"""The run's `lora:` section: peft present, adapters off the fused heads' output head, and a
resumed LoRA checkpoint's adapters loaded into the adapters this run built."""

from __future__ import annotations

import json
from pathlib import Path

from rftengine.checkpoint import ADAPTER_CONFIG
from rftengine.errors import UserError, as_user_error


def require_peft():
    """The peft module for the run's lora section, or a UserError saying how to install it."""
    from rftengine.methods.modeling import import_peft

    with as_user_error():
        return import_peft("the lora section")


def check_head_not_adapted(model) -> None:
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


def load_adapters(model, checkpoint: Path) -> None:
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
    with as_user_error(f"checkpoint {checkpoint}"):
        result = peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(str(checkpoint), device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(
            f"checkpoint {checkpoint}: adapter weights do not fit this run's adapters "
            f"(missing: {missing[:3]}, unexpected: {result.unexpected_keys[:3]})"
        )
