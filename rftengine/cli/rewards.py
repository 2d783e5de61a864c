"""The run's `reward` and `judge` entries as the objects the methods score with: Python
functions, reward-model directories (RewardScorer) and causal LMs as judges, combined into
one `RewardFunctions`."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rftengine.checkpoint import check_model_dir
from rftengine.config import is_function_spec, read_text
from rftengine.errors import UserError, as_user_error
from rftengine.methods.config_base import did_you_mean

if TYPE_CHECKING:
    from rftengine.cli.run import Run


def is_reward_model_dir(path: Path) -> bool:
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
    from rftengine.methods.model_source import has_tokenizer_files
    from rftengine.methods.modeling import load_tokenizer

    if not has_tokenizer_files(path):
        return fallback
    with as_user_error(f"tokenizer {path}"):
        return load_tokenizer(path)


def make_judge(run: Run, path: str | Path, constitution=None):
    """A Judge over the causal LM in `path` with `judge_options` as its keyword arguments;
    with a constitution, the principle-guided judge of RL-CAI."""
    from rftengine.methods.constitution import principle_judge
    from rftengine.methods.judge import Judge
    from rftengine.methods.modeling import load_causal_lm

    options = dict(run.cfg.judge_options)
    valid = [p for p in inspect.signature(Judge).parameters if p not in ("model", "tokenizer")]
    for key in options:
        if key not in valid:
            raise UserError(f"{run.config_path}: unknown judge_options key '{key}'{did_you_mean(key, valid)}")
    path = check_model_dir(path, "judge")
    with as_user_error(f"judge {path}"):
        model = load_causal_lm(path, dtype=run.dtype, device=run.device)
        tokenizer = _load_tokenizer_beside(path, run.tokenizer)
        if constitution is not None:
            return principle_judge(model, tokenizer, constitution, **options)
        return Judge(model, tokenizer, **options)


def reward_functions(run: Run):
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
    with as_user_error(f"{run.config_path}: reward"):
        weights = run.cfg.reward_weights if run.cfg.reward_weights is not None else train_weights
        return RewardFunctions(sources, weights)


def _reward_model_or_judge(run: Run, path: Path):
    """A reward-model directory (value head or sequence classifier) as a RewardScorer, any
    other causal LM directory as a Judge."""
    from rftengine.methods.modeling import RewardModel
    from rftengine.methods.reward import RewardScorer

    if not is_reward_model_dir(path):
        return make_judge(run, path)
    with as_user_error(f"reward model {path}"):
        model = RewardModel.from_pretrained(path, dtype=run.dtype, device=run.device)
        return RewardScorer(model, _load_tokenizer_beside(path, run.tokenizer))
