"""Evaluation under torchrun: each of 2 ranks evaluates its share of the held-out data (an odd
number of items, so one rank runs a padding call), and the logged eval/* values equal those of
one process."""

import json

import pytest

from rftengine.metrics import read_metrics

from ..cli.cli_helpers import EXAMPLES, write_jsonl
from .test_torchrun_cli import model_dir, run_cli, train_args  # noqa: F401 (model_dir: a fixture)

PAIRS = [json.loads(line) for line in (EXAMPLES / "data" / "pairs.jsonl").read_text().splitlines() if line.strip()]
EVAL_KEYS = {
    "dpo": ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"),
    "grpo": ("eval/reward", "eval/reward_std", "eval/completions/mean_length"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_two_ranks_evaluate_as_one_process(tmp_path, model_dir, method):  # noqa: F811
    if method == "dpo":
        held_out = write_jsonl(tmp_path / "held_out.jsonl", PAIRS[-5:])
    else:
        held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": p} for p in ("ab:", "cde:", "fg:")])
    extra = [f"eval_data={held_out}", "train.eval_every=2", "train.eval_batch_size=2", "report_to=[jsonl]"]
    args = [a for a in train_args(method, model_dir, tmp_path / "one", *extra) if a != "tensorboard=false"]
    run_cli(1, args)
    run_cli(2, [a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in args])
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [set(EVAL_KEYS[method]) <= set(r) for r in two] == [False, True, True]        # steps 2 and 3 (the last)
    assert [sorted(k for k in r if k.startswith("eval/")) for r in two] == \
        [sorted(k for k in r if k.startswith("eval/")) for r in one]
    for r1, r2 in zip(one, two):
        for key in EVAL_KEYS[method]:
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5), (r1["step"], key)
