"""The constitution of Constitutional AI (Bai et al. 2022): its principles, loading and
validation, and the prompt templates built from them.

A constitution is an ordered list of principles, each a critique request and a revision
request. ``load_constitution`` reads one from YAML (``rftengine/data/constitution.yaml`` by
default); the CAI driver (``rftengine.methods.cai``) samples a principle per prompt and fills
``CRITIQUE_TEMPLATE`` / ``REVISION_TEMPLATE``; ``principle_judge`` builds RL-CAI's feedback
model from ``PRINCIPLE_TEMPLATE`` / ``PRINCIPLE_PAIRWISE_TEMPLATE``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from rftengine.methods.judge import Judge

CRITIQUE_TEMPLATE = (
    "{prompt}{response}\n\n"
    "Critique request: {critique_request}\n"
    "Critique:"
)
REVISION_TEMPLATE = (
    "{prompt}{response}\n\n"
    "Critique request: {critique_request}\n"
    "Critique:{critique}\n\n"
    "Revision request: {revision_request}\n"
    "Revision:"
)
PRINCIPLE_TEMPLATE = (
    "Principles:\n{criteria}\n\n"
    "Rate how well the response to the request follows the principles, from {lowest} (worst) "
    "to {highest} (best).\n"
    "Request: {prompt}\n"
    "Response: {response}\n"
    "Rating: "
)
PRINCIPLE_PAIRWISE_TEMPLATE = (
    "Principles:\n{criteria}\n\n"
    "Which response to the request follows the principles better? Answer {first} or {second}.\n"
    "Request: {prompt}\n"
    "Response {first}: {response_a}\n"
    "Response {second}: {response_b}\n"
    "Better response: "
)

# The placeholders the critique / revision templates must hold (CAIConfig checks them).
CRITIQUE_FIELDS = {"prompt", "response", "critique_request"}
REVISION_FIELDS = {"prompt", "response", "critique_request", "critique", "revision_request"}


@dataclass(frozen=True)
class Principle:
    """One principle: what to look for in an answer and how to rewrite it."""

    name: str
    critique_request: str
    revision_request: str


@dataclass(frozen=True)
class Constitution:
    """An ordered, non-empty list of principles with distinct names."""

    principles: tuple[Principle, ...]

    def __post_init__(self):
        if not self.principles:
            raise ValueError("a constitution needs at least one principle, got none")
        names = [p.name for p in self.principles]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"constitution principle names must be distinct; repeated: {dup}")

    def __len__(self) -> int:
        return len(self.principles)

    def __getitem__(self, i: int) -> Principle:
        return self.principles[i]

    def sample(self, n: int, seed: int) -> list[Principle]:
        """``n`` principles drawn uniformly with replacement, a pure function of ``seed``."""
        rng = random.Random(seed)
        return [self.principles[rng.randrange(len(self.principles))] for _ in range(n)]

    def criteria(self) -> str:
        """The principles as a bulleted list (what a principle-guided judge reads)."""
        return "\n".join(f"- {p.name}: {p.critique_request}" for p in self.principles)

    @classmethod
    def from_list(cls, items: Sequence[Mapping[str, Any]], source: str = "constitution") -> Constitution:
        """From ``[{"name"?, "critique_request", "revision_request"}, ...]``; errors name the
        source and the principle index."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ValueError(f"{source}: principles must be a list, got {type(items).__name__}")
        principles = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValueError(f"{source}: principle {i} must be a mapping, got {type(item).__name__}")
            unknown = sorted(set(item) - {"name", "critique_request", "revision_request"})
            if unknown:
                raise ValueError(
                    f"{source}: principle {i} has unknown keys {unknown}; allowed: name, critique_request, "
                    "revision_request"
                )
            for key in ("critique_request", "revision_request"):
                value = item.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{source}: principle {i} needs a non-empty string {key!r}, got {value!r}")
            name = item.get("name", f"principle-{i}")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{source}: principle {i} name must be a non-empty string, got {name!r}")
            principles.append(Principle(name.strip(), item["critique_request"].strip(),
                                        item["revision_request"].strip()))
        return cls(tuple(principles))


def default_constitution_path() -> Path:
    """The YAML constitution shipped with rftengine (``rftengine/data/constitution.yaml``)."""
    return Path(str(resources.files("rftengine") / "data" / "constitution.yaml"))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """A constitution from YAML: ``principles: [{name, critique_request, revision_request}, ...]``
    (a bare list of principles is accepted too). ``None`` loads the default set."""
    import yaml

    path = Path(path) if path is not None else default_constitution_path()
    if not path.is_file():
        raise ValueError(f"constitution file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"principles"})
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {unknown}; expected 'principles'")
        if "principles" not in data:
            raise ValueError(f"{path}: no 'principles' list")
        data = data["principles"]
    return Constitution.from_list(data, source=str(path))


def principle_judge(model: nn.Module, tokenizer, constitution: Constitution, **judge_kwargs: Any) -> Judge:
    """A Judge whose templates list every principle of ``constitution`` (RL-CAI's feedback
    model). ``judge_kwargs`` go to ``Judge`` (ratings, choices, chat, batch_size, ...)."""
    judge_kwargs.setdefault("template", PRINCIPLE_TEMPLATE)
    judge_kwargs.setdefault("pairwise_template", PRINCIPLE_PAIRWISE_TEMPLATE)
    judge_kwargs.setdefault("criteria", constitution.criteria())
    return Judge(model, tokenizer, **judge_kwargs)
