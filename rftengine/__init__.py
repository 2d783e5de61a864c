"""rftengine: a lean, performance-first engine for reinforcement finetuning of language models.

    import rftengine
    rftengine.token_logprobs(...)            # ops: Triton on CUDA, torch reference elsewhere
    rftengine.Generator(model, ...)          # CUDA-graph rollouts
    rftengine.SamplingParams(n=4, max_tokens=256, stop=["\n"])   # vLLM's request shape for them
    rftengine.train_dpo(policy, tok, pairs, rftengine.DPOConfig(beta=0.1))

The ops are imported eagerly (they need only torch); the generation loop and the methods pull in
transformers, so they load on first access. Every public name of `rftengine.ops`,
`rftengine.generation` and `rftengine.methods` is reachable from here.
"""

from __future__ import annotations

import importlib

from rftengine import ops
from rftengine.ops import *  # noqa: F403  (the functional API, listed in ops.__all__)

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("generation", "methods")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"rftengine.{name}")
    for sub in _LAZY_SUBMODULES:
        module = importlib.import_module(f"rftengine.{sub}")
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    methods = importlib.import_module("rftengine.methods")
    if name in methods.DEPRECATED_RESULT_NAMES:  # deprecated aliases of TrainResult (they warn)
        return getattr(methods, name)
    raise AttributeError(f"module 'rftengine' has no attribute {name!r}")


def __dir__():
    names = set(globals()) | set(_LAZY_SUBMODULES)
    for sub in _LAZY_SUBMODULES:
        names |= set(getattr(importlib.import_module(f"rftengine.{sub}"), "__all__", ()))
    return sorted(names)


__all__ = ["ops", *ops.__all__, *_LAZY_SUBMODULES, "__version__"]
