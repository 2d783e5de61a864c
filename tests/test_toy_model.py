"""`rftengine toy-model DIR`: the demo's pretrained toy policy (or judge) saved as a Hugging Face
directory, deterministic per seed, never written over a directory it did not write."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rftengine.cli import main
from rftengine.methods.modeling import load_causal_lm, load_tokenizer
from rftengine.toy_model import MARKER, write_toy_model


def test_writes_a_loadable_model_with_its_chat_template(tmp_path):
    lines = []
    out = write_toy_model(tmp_path / "sft", steps=2, log=lines.append)
    assert out == tmp_path / "sft"
    assert json.loads((out / MARKER).read_text()) == {
        "kind": "policy", "steps": 2, "batch_size": 32, "seed": 0, "made_by": "rftengine toy-model"}
    assert lines[-1].startswith(f"wrote {out}: a policy")
    tokenizer = load_tokenizer(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "kqz> "}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "user: kqz> \nassistant: "
    model = load_causal_lm(out)
    assert model.config.vocab_size == len(tokenizer) and model.config.model_type == "qwen2"


def test_same_seed_same_weights_and_the_judge_differs(tmp_path):
    weights = {}
    for name, kwargs in [("a", {}), ("b", {}), ("judge", {"judge": True}), ("seed1", {"seed": 1})]:
        write_toy_model(tmp_path / name, steps=2, log=lambda _: None, **kwargs)
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    same = [all(torch.equal(weights["a"][k], weights[other][k]) for k in weights["a"])
            for other in ("b", "judge", "seed1")]
    assert same == [True, False, False]
    assert json.loads((tmp_path / "judge" / MARKER).read_text())["kind"] == "judge"


def test_overwrites_only_its_own_directory(tmp_path):
    write_toy_model(tmp_path / "m", steps=1, log=lambda _: None)
    write_toy_model(tmp_path / "m", steps=1, seed=1, log=lambda _: None)  # its own: rewritten
    assert json.loads((tmp_path / "m" / MARKER).read_text())["seed"] == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=f"output_dir {tmp_path / 'mine'} is not empty and holds no {MARKER}"):
        write_toy_model(tmp_path / "mine", steps=1, log=lambda _: None)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["toy-model", str(tmp_path / "m"), *argv]) == 1
    err = capsys.readouterr().err
    assert err == f"rftengine toy-model: error: {message}\n"
    assert not (tmp_path / "m").exists()


def test_cli_says_what_it_wrote(tmp_path, capsys):
    assert main(["toy-model", str(tmp_path / "judge"), "--judge", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'judge'}: a judge" in out and "character tokenizer" in out
