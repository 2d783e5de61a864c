"""The note that says where an exported model is and how to load it: written as README.md in
the model directory and printed at the end of `rftengine train`."""

from __future__ import annotations

from pathlib import Path

KINDS = ("causal_lm", "adapter", "reward")


def model_card(out_dir: str | Path, kind: str, *, base: str | None = None, critic_offset: float | None = None,
               pad_is_eos: bool = False) -> str:
    """Markdown for the export in ``out_dir``: ``kind`` "causal_lm" (a plain model directory),
    "adapter" (LoRA adapters over ``base``) or "reward" (a one-label sequence classifier);
    ``critic_offset`` (not None): a PPO critic in ``out_dir/critic``, whose bias-free score
    layer leaves out that value-head bias; ``pad_is_eos``: the tokenizer pads with EOS."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    where = str(Path(out_dir).resolve())
    if kind == "adapter":
        lines = [
            f"`{where}` holds LoRA adapters (adapter_config.json, adapter_model.safetensors) over the base "
            f"`{base}`, and the tokenizer. Load them with peft:",
            "",
            "    from peft import AutoPeftModelForCausalLM",
            f'    model = AutoPeftModelForCausalLM.from_pretrained("{where}")',
            "    model = model.merge_and_unload()  # optional: a plain transformers model",
            "",
            f"In rftengine, `model: {where}` loads the base with these adapters merged in.",
        ]
    elif kind == "reward":
        lines = [
            f"`{where}` is a reward model: a sequence classifier with one label that scores a text at its "
            "last non-pad token. Load it with transformers:",
            "",
            "    from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            f'    model = AutoModelForSequenceClassification.from_pretrained("{where}")',
            f'    tokenizer = AutoTokenizer.from_pretrained("{where}")',
            '    scores = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0]',
            "",
            f"In rftengine it is a `reward: {where}` for ppo, grpo and rloo.",
        ]
    else:
        lines = [
            f"`{where}` is a Hugging Face model directory (weights, config, tokenizer). Load it with "
            "transformers:",
            "",
            "    from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'    model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'    tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "",
            f"In rftengine it is a `model: {where}` like any other.",
        ]
    if critic_offset is not None:
        lines += [
            "",
            f"`{where}/critic` holds the PPO critic (value model), loaded the same way with "
            "AutoModelForSequenceClassification: its logit is the value at the last non-pad token"
            + (f", minus the value head's bias {critic_offset:.6g}, which the bias-free score layer "
               "cannot hold." if critic_offset else "."),
        ]
    if pad_is_eos and (kind == "reward" or critic_offset is not None):
        lines += [
            "",
            "The tokenizer pads with its EOS token, so transformers reads the score at the last token that "
            "is not EOS: give it texts without a trailing EOS (rftengine reads the last token of the "
            "attention mask).",
        ]
    return "# The model rftengine trained\n\n" + "\n".join(lines) + "\n"
