"""Run configuration for `rftengine train`: a YAML file plus `key=value` overrides.

A run file has run-level keys (what to load, where to write, how often to checkpoint) and one
`train:` section that maps onto the method's config dataclass through its `from_dict`:

    method: dpo
    model: models/my-sft            # a local Hugging Face directory
    data: data/pairs.jsonl
    output_dir: runs/dpo
    train:
      beta: 0.1
    lora:                           # optional: train LoRA adapters only (pip install rftengine[peft])
      r: 16
      alpha: 32

Overrides use dotted keys and YAML-typed values: `train.beta=0.2 train.seed=3 reference=null`.
Unknown keys are errors that suggest the closest valid key; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rftengine.errors import UserError
from rftengine.methods.config_base import (
    LoopFields,
    OptimFields,
    aliases_of,
    announce,
    did_you_mean,
    option,
    resolve_aliases,
    resumable_fields,
    trl,
)

METHODS = ("reward", "ppo", "grpo", "rloo", "dpo", "rlaif", "cai")
DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORTERS = ("jsonl", "csv", "tensorboard", "wandb", "trackio")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
NEWLINE = ord("\n")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string (it wants `1.0e-5`); learning rates are written the short way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


LORA_ALL_LINEAR = "all-linear"
# The output head's usual names (Llama/Qwen/Mistral ..., GPT-NeoX); the CLI checks the loaded model too.
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out")


@dataclass
class LoraSettings:
    """The run's `lora:` section: train low-rank adapters, the base weights stay frozen.

    r               adapter rank
    alpha           the update is (alpha / r) * B @ A (alpha / sqrt(r) with use_rslora)
    dropout         must be 0: every method trains with dropout off, since the log-probs of the
                    policy must be deterministic (PPO ratios, KL, DPO margins)
    target_modules  module names to adapt (q_proj, v_proj ...; a name matches a module whose dotted
                    path ends with it), or `all-linear`: every linear layer but the output head.
                    The output head (lm_head) is never a target: the fused log-prob heads read
                    its weight directly and would bypass an adapter on it.
    use_rslora      rank-stabilised scaling alpha / sqrt(r)

    The reference of a LoRA run is the base with the adapters disabled (no second copy), and
    checkpoints hold the adapter weights only. TRL's spellings (lora_r, lora_alpha ...) are
    pointed to these names.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | str = LORA_ALL_LINEAR
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise UserError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise UserError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if self.dropout != 0 or isinstance(self.dropout, bool):
            raise UserError(
                f"lora.dropout must be 0, got {self.dropout!r}: rftengine trains with dropout off so that "
                "the policy's log-probs are deterministic (PPO ratios, KL and DPO margins depend on it)"
            )
        if not isinstance(self.use_rslora, bool):
            raise UserError(f"lora.use_rslora must be true or false, got {self.use_rslora!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != LORA_ALL_LINEAR:
                raise UserError(
                    f"lora.target_modules must be a list of module names or '{LORA_ALL_LINEAR}', got {targets!r}"
                )
            return
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(
                f"lora.target_modules must be a non-empty list of module names or '{LORA_ALL_LINEAR}', got {targets!r}"
            )
        head = [t for t in targets if t.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES]
        if head:
            raise UserError(
                f"lora.target_modules must not include the output head ({head[0]}): the fused log-prob heads "
                "read its weight directly, so an adapter on it would be ignored; adapt the decoder's "
                f"layers (q_proj, k_proj, v_proj, o_proj ...) or use '{LORA_ALL_LINEAR}'"
            )

    @classmethod
    def from_dict(cls, raw) -> LoraSettings:
        if not isinstance(raw, dict):
            raise UserError(f"lora must be a mapping of LoRA settings (or null for none), got {raw!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in valid:
                bare = str(key).removeprefix("lora_")
                # TRL's lora_ prefix: point to the name without it
                raise UserError(f"unknown lora key '{key}'{did_you_mean(bare if bare in valid else key, valid)}")
        return cls(**raw)

    def peft_config(self):
        """The equivalent `peft.LoraConfig` (needs peft)."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=targets,
            use_rslora=self.use_rslora, bias="none", task_type="CAUSAL_LM",
        )


@dataclass
class RunConfig:
    """Run-level settings; the method's own hyper-parameters live in `train`.

    Each field's meaning is its `help` (field metadata, as in the method configs):
    `rftengine config METHOD` prints them with the defaults, run level and train section.
    `lora` is a LoraSettings; `train` the method's config (RewardConfig, PPOConfig, DPOConfig,
    RLAIFConfig, CAIConfig), where seed, max_steps and save_every live.
    """

    method: str = option(help=f"the training method: {', '.join(METHODS)}")
    model: str = option(help="the policy: a local Hugging Face model directory, a hub id in the local HF cache "
                             "(never downloaded) or a PEFT adapter directory (merged into its base)")
    data: str | None = option(None, "preference pairs (reward, dpo) or prompts (ppo, grpo, rloo, rlaif, cai): a "
                                    "JSONL/JSON/Parquet/CSV file, a folder, a save_to_disk folder or a cached hub "
                                    "dataset id")
    data_split: str = option("train", "the split of data to train on (a single file's only split is train)")
    eval_data: str | None = option(None, "held-out data like data (null: none, or data's eval_split)")
    eval_split: str | None = option(None, "the split of eval_data, or of data when eval_data is null (null: "
                                          "train for eval_data, no evaluation without it)")
    tokenizer: str | None = option(None, "tokenizer directory (null: model)")
    reference: str | None = option(None, "reference model directory (null: model)")
    reward: str | list[str] | None = option(None, "ppo/grpo/rloo: a reward-model directory, a judge model "
                                                  "directory or module:function, or a list of them (summed)")
    reward_weights: list[float] | None = option(None, "one weight per entry of reward (TRL's reward_weights; "
                                                      "null: all 1)")
    judge: str | None = option(None, "rlaif/cai: the judge's causal-LM directory (null: the policy's model, "
                                     "for cai)")
    constitution: str | None = option(None, "cai: a constitution YAML (null: the one shipped with rftengine)")
    output_dir: str = option("runs/rftengine", "checkpoints, metrics, plot and the final export go here")
    device: str = option("auto", "auto (cuda when available), cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", f"load dtype of the models: {', '.join(DTYPES)} (auto: as saved)")
    keep_last: int = option(2, "checkpoints kept (train.save_every says how often they are written; one "
                               "is always written after the last step)", min=1,
                            aliases=(trl("save_total_limit"),))
    lora: LoraSettings | None = option(None, "train LoRA adapters instead of the full policy (r, alpha, "
                                             "target_modules, use_rslora; null: full finetuning)")
    export: bool = option(True, "write the final model to output_dir/final, with a README.md on how to load it "
                                "(a reward model as a sequence classifier; ppo's critic in final/critic)")
    merge_lora: bool = option(False, "LoRA runs: export the base with the adapters folded in (loads without "
                                     "peft) instead of the adapter directory (peft's AutoPeftModelForCausalLM)")
    report_to: list[str] | None = option(None, f"where the metrics go: any of {', '.join(REPORTERS)} (null: "
                                               "jsonl, csv, and tensorboard when it is installed)")
    tensorboard: bool | None = option(None, "deprecated, use report_to: true adds tensorboard to it, false "
                                            "leaves it out")
    plot: bool = option(True, "write the PNG of the main curves at the end")
    progress: bool = option(True, "show tqdm progress bars on a terminal (otherwise, and when false: one "
                                  "line of metrics every train.logging_steps steps)")
    judge_options: dict[str, Any] = option(help="keyword arguments of rftengine.methods.Judge (template, "
                                                "choices, ratings, criteria, chat ...)", default_factory=dict)
    train: dict[str, Any] = option(help="the method's config (rftengine config METHOD lists it)",
                                   default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}{did_you_mean(self.method, METHODS)}")
        for name in ("model", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        for name in ("data", "tokenizer", "reference", "judge", "constitution"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{name} must be a path or null, got {value!r}")
        self._check_rewards()
        if self.eval_data is not None and not isinstance(self.eval_data, str):
            raise UserError(f"eval_data must be a path, a dataset id or null, got {self.eval_data!r}")
        for name in ("data_split", "eval_split"):
            value = getattr(self, name)
            if not (value is None and name == "eval_split") and (not isinstance(value, str) or not value):
                raise UserError(f"{name} must be a split name such as train or test, got {value!r}")
        if self.eval_data is None and self.eval_split is not None and self.eval_split == self.data_split:
            raise UserError(
                f"eval_split is {self.eval_split!r}, the split trained on (data_split): evaluate on another split "
                "or give eval_data"
            )
        if not isinstance(self.keep_last, int) or isinstance(self.keep_last, bool) or self.keep_last < 1:
            raise UserError(f"keep_last must be an integer >= 1, got {self.keep_last!r}")
        # Anything else (meta, mps, xla ...) would get past torch.device and fail mid-run.
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("export", "merge_lora", "plot", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # The deprecated spelling is folded into report_to once (a replace() must not fold it again).
        self.report_to, self.tensorboard = check_report_to(self.report_to, self.tensorboard), None
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.train, dict):
            raise UserError(f"train must be a mapping of the method's settings, got {self.train!r}")
        if not isinstance(self.judge_options, dict):
            raise UserError(f"judge_options must be a mapping of Judge settings, got {self.judge_options!r}")
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            self.lora = LoraSettings.from_dict(self.lora)
        if self.lora is not None and self.method == "reward":
            raise UserError("lora is not supported for method reward (its value head is trained with the full model)")
        if self.merge_lora and self.lora is None:
            raise UserError("merge_lora is true but there is no lora section: only LoRA runs have adapters to merge")
        if self.data is None:
            raise UserError(f"data is required for method {self.method} (a data file, folder or dataset id)")
        if self.method in ("ppo", "grpo", "rloo") and self.reward is None:
            raise UserError(
                f"reward is required for method {self.method}: a reward-model directory, a judge model "
                "directory or a Python function as module:function"
            )
        if self.method == "rlaif" and self.judge is None:
            raise UserError("judge is required for method rlaif: a causal-LM model directory")

    def _check_rewards(self) -> None:
        rewards = self.reward if isinstance(self.reward, list) else [self.reward]
        if self.reward is not None and (not rewards or not all(isinstance(r, str) and r for r in rewards)):
            raise UserError(f"reward must be a path, module:function, a non-empty list of them, or null, "
                            f"got {self.reward!r}")
        if self.reward_weights is None:
            return
        if self.reward is None:
            raise UserError("reward_weights is set but there is no reward to weigh")
        weights = self.reward_weights
        if (not isinstance(weights, list) or len(weights) != len(rewards)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                           for w in weights)):
            raise UserError(f"reward_weights must be a list of {len(rewards)} finite number(s), one per entry "
                            f"of reward, got {weights!r}")

    @property
    def reward_specs(self) -> list[str]:
        """`reward` as a list (empty when null)."""
        return [] if self.reward is None else self.reward if isinstance(self.reward, list) else [self.reward]

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def reference_path(self) -> str:
        return self.reference or self.model

    @property
    def eval_source(self) -> tuple[str, str] | None:
        """(path or dataset id, split) of the held-out data, or None when there is none: eval_data
        (its eval_split, default train) or, without it, data's eval_split."""
        if self.eval_data is not None:
            return self.eval_data, self.eval_split or "train"
        if self.eval_split is not None and self.data is not None:
            return self.data, self.eval_split
        return None


def check_report_to(report_to, tensorboard) -> list[str] | None:
    """`report_to` checked (a list of REPORTERS, or null: the default), with the deprecated
    `tensorboard: true/false` folded in (a one-line notice says so)."""
    if report_to is not None:
        if isinstance(report_to, str):
            report_to = [report_to]
        if not isinstance(report_to, list) or not all(isinstance(r, str) for r in report_to):
            raise UserError(f"report_to must be a list of {', '.join(REPORTERS)}, got {report_to!r}")
        for name in report_to:
            if name not in REPORTERS:
                raise UserError(f"report_to: unknown destination {name!r}{did_you_mean(name, REPORTERS)}; "
                                f"choose from {', '.join(REPORTERS)}")
        report_to = list(dict.fromkeys(report_to))
    if tensorboard is None:
        return report_to
    if not isinstance(tensorboard, bool):
        raise UserError(f"tensorboard must be true or false, got {tensorboard!r}")
    chosen = list(report_to if report_to is not None else ("jsonl", "csv"))
    chosen = [r for r in chosen if r != "tensorboard"] + (["tensorboard"] if tensorboard else [])
    _notice(f"tensorboard: {str(tensorboard).lower()} is deprecated; it means report_to: [{', '.join(chosen)}]")
    return chosen


def _notice(text: str) -> None:
    """A one-line notice on stderr, from rank 0 only."""
    import logging

    from rftengine import distributed

    if distributed.is_main_process():
        logging.getLogger("rftengine").warning(text)


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))

# What `--resume` lets differ from the checkpoint's run (applied from the next step): where and how
# output is written, the held-out data, the device, how long to train and the optimizer's settings (put into the
# restored optimizer and schedule). Everything else changes what the checkpoint's training means
# or is held in its state, so a change is refused rather than half applied.
RESUME_RUN_KEYS = ("output_dir", "device", "keep_last", "export", "merge_lora", "report_to", "tensorboard", "plot",
                   "progress",
                   "eval_data", "eval_split")
RESUME_TRAIN_KEYS = resumable_fields(LoopFields, OptimFields)   # the fields declared with resume=True


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.beta=0.2' -> (['train', 'beta'], 0.2); the value is read as YAML ('null', 'true', '1e-5')."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} must look like key=value (dotted keys for sections: train.beta=0.1)")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with each dotted `key=value` set; intermediate sections are created as needed."""
    out = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise UserError(f"override {text!r}: {where} is {child!r}, not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def decode_utf8(data: bytes, where: str, offset: int = 0, with_line: bool = True) -> str:
    """`data` as UTF-8 text, or a UserError naming `where` and the first bad byte's offset
    (`offset`: where `data` starts in its file) and, `with_line`, its line in `data`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = f"offset {offset + exc.start}"
        if with_line:
            lineno = data.count(NEWLINE, 0, exc.start) + 1
            at += f", line {lineno}"
        raise UserError(f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at {at})") from None


def read_text(path: str | Path, what: str) -> str:
    """A user's text file as UTF-8; unreadable or non-UTF-8 files are UserErrors naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} file {path}: {exc.strerror or exc}") from None
    return decode_utf8(data, str(path))


def read_yaml(path: str | Path, what: str = "config") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return yaml_load(read_text(path, what))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None


def run_aliases(raw: dict) -> dict:
    """`raw` with other libraries' names for run-level keys (the `aliases` of RunConfig's fields)
    replaced by the keys, at the top level or in the train section (TRL's settings are one flat
    list: `train.save_total_limit` is the run's keep_last), each announced once."""
    aliases = aliases_of(RunConfig)
    train = raw.get("train")
    lifted = [k for k in train if k in aliases] if isinstance(train, dict) else []
    if not lifted:
        return resolve_aliases(RunConfig, raw, prefix="")
    out = {**raw, "train": {k: v for k, v in train.items() if k not in lifted}}
    for key in lifted:
        alias, target = aliases[key]
        if target in out or any(a in out for a, (_, t) in aliases.items() if t == target):
            raise ValueError(f"train.{key} is {alias.library}'s name for the run-level {target}; give only one "
                             f"of train.{key} and {target}")
        out[target] = train[key]
        announce(f"train.{key} is {alias.library}'s name for the run-level {target}; using it")
    return resolve_aliases(RunConfig, out, prefix="")


def load_run_config(path: str | Path, overrides: list[str] = (), method_keys=None) -> RunConfig:
    """Read the YAML run file, apply overrides, check every key.

    Relative paths, in the file and in overrides alike, are relative to the working directory
    (the examples are written to run from the repository root). `method_keys(method)`, when
    given, lists the method config's keys, so a method key set at the top level is pointed to
    the train section."""
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    try:
        raw = run_aliases(raw)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    for key in raw:
        if key not in RUN_KEYS:
            if method_keys is not None and raw.get("method") in METHODS and key in method_keys(raw["method"]):
                raise UserError(f"{path}: '{key}' is a setting of the method: put it in the train section (train.{key})")
            raise UserError(f"{path}: unknown config key '{key}'{did_you_mean(key, RUN_KEYS)}")
    for key in ("method", "model"):
        if key not in raw:
            raise UserError(f"{path}: missing required key '{key}'")
    for key in ("train", "judge_options"):
        if key in raw and raw[key] is None:
            raw[key] = {}
    try:
        return RunConfig(**raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def is_function_spec(spec: str) -> bool:
    """`package.module:function` (a Python callable) rather than a path."""
    if spec.count(":") != 1 or Path(spec).exists():
        return False
    module, _, func = spec.partition(":")
    return bool(module) and all(p.isidentifier() for p in module.split(".")) and func.isidentifier()


def method_config(cls, section: dict, where: str):
    """Build the method's config dataclass via its `from_dict`, turning its ValueError (unknown key
    with a suggestion, out-of-range field) into a UserError that says where the section is."""
    try:
        return cls.from_dict(dict(section))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: section 'train': {exc}") from None
