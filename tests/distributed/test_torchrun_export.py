"""The export under torchrun: PPO's sharded critic is gathered and written to final/critic as a
sequence classifier, as in one process."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from .test_torchrun_cli import model_dir, run_cli, train_args  # noqa: F401 - model_dir: the fixture


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_two_rank_critic_export_equals_one_process(tmp_path, model_dir, critic):  # noqa: F811
    args = ["train.top_k=1", f"train.critic={critic}", "train.save_every=0", "train.max_steps=1"]  # greedy: same batch
    run_cli(1, train_args("ppo", model_dir, tmp_path / "one", *args))
    run_cli(2, train_args("ppo", model_dir, tmp_path / "two", *args))
    one, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "one" / "final" / "critic",
                                                                  output_loading_info=True)
    two = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "final" / "critic")
    assert not info["missing_keys"]
    p1, p2 = dict(one.named_parameters()), dict(two.named_parameters())
    assert p1.keys() == p2.keys()
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-5, msg=name)
    card1 = (tmp_path / "one" / "final" / "README.md").read_text()
    card2 = (tmp_path / "two" / "final" / "README.md").read_text()
    assert "/critic" in card1 and "/critic" in card2
