"""The scheme of the metric names every ``train_*`` function logs, and the earlier names that
still read (docs/metrics.md lists every metric).

A metric that TRL's trainers log keeps TRL's name (``loss``, ``reward``, ``kl``,
``rewards/accuracies``, ``completions/mean_length`` ...): TRL users' dashboards, scripts and
callbacks read rftengine runs unchanged. No other metric has an unprefixed name. rftengine's own
metrics go into the namespace of what they measure: one of TRL's (``rewards/``, ``logps/``,
``completions/``, ``clip_ratio/``, ``objective/``) when they are the same kind of quantity, or
one of rftengine's:

- ``policy/``: the clipped policy update (``policy/approx_kl``, ``policy/ratio_mean`` ...);
- ``value/``: the critic (``value/loss``, ``value/clipfrac`` ...);
- ``judge/``: the AI judge of RLAIF;
- ``cai/``: Constitutional AI's stages;
- ``train/``: the training loop itself (skipped steps, padding, loss scale);
- ``eval/``: the held-out value of any metric above.
"""

from __future__ import annotations

import warnings

# The namespaces rftengine's own metrics may use (the lists above).
TRL_NAMESPACES = ("rewards/", "logps/", "completions/", "clip_ratio/", "objective/")
NAMESPACES = TRL_NAMESPACES + ("policy/", "value/", "judge/", "cai/", "train/", "eval/")

# Earlier metric names -> the names of the scheme above. A step's metrics (``Metrics``) still
# answer to the earlier name, with a DeprecationWarning; the files and trackers get only the new.
RENAMED = {
    "approx_kl": "policy/approx_kl",
    "ratio_mean": "policy/ratio_mean",
    "ratio_max": "policy/ratio_max",
    "policy_loss": "policy/loss",
    "kl/policy": "policy/kl",
    "value_loss": "value/loss",
    "kl_coef": "objective/kl_coef",
    "response_length": "completions/mean_length",
    "stage_index": "cai/stage",
    "pairs": "judge/pairs",
}


class Metrics(dict):
    """One step's metrics (a plain ``dict`` of floats) in which an earlier name of a renamed
    metric (``RENAMED``) still reads, with a DeprecationWarning naming the new one. Iteration,
    ``in`` and copies see only the current names."""

    def _renamed(self, key):
        new = RENAMED.get(key) if isinstance(key, str) else None
        if new is None or not dict.__contains__(self, new):
            return None
        warnings.warn(f"metric {key!r} is now called {new!r}; the old name will stop working",
                      DeprecationWarning, stacklevel=3)
        return new

    def __missing__(self, key):
        new = self._renamed(key)
        if new is None:
            raise KeyError(key)
        return self[new]

    def get(self, key, default=None):
        if dict.__contains__(self, key):
            return self[key]
        new = self._renamed(key)
        return self[new] if new is not None else default
