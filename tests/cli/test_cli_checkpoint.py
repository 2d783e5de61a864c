"""Checkpoints: atomic writes, keep-last-N, RNG round trip, method mismatch, crash mid-write."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rftengine import checkpoint as ckpt
from rftengine.config import UserError
from rftengine.toy import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    return tiny_causal_lm(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1), tok


def save(out, step, tiny, **kw):
    model, tok = tiny
    return ckpt.save_checkpoint(out, step=step, method="dpo", model=model, tokenizer=tok,
                                state={"data_position": step * 4}, **kw)


def test_round_trip_and_keep_last(tmp_path, tiny):
    for step in (1, 2, 3):
        path = save(tmp_path, step, tiny, keep_last=2)
    assert path == tmp_path / "checkpoint-3"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert ckpt.resolve_resume(tmp_path) == path and ckpt.resolve_resume(path) == path
    loaded = ckpt.load_checkpoint(path, "dpo")
    assert loaded.step == 3 and loaded.state == {"data_position": 12}
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), b in zip(tiny[0].state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_same_step_is_replaced(tmp_path, tiny):
    save(tmp_path, 5, tiny)
    path = ckpt.save_checkpoint(tmp_path, step=5, method="dpo", model=tiny[0], tokenizer=tiny[1], state={"v": 2})
    assert ckpt.load_checkpoint(path, "dpo").state == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_rng_states_round_trip(tmp_path, tiny):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save(tmp_path, 1, tiny)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_checkpoint(path, "dpo").restore_rng()
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_checkpoint_of_another_method(tmp_path, tiny):
    path = save(tmp_path, 1, tiny)
    with pytest.raises(UserError, match="is a checkpoint of method 'dpo', but this run's method is 'ppo'"):
        ckpt.load_checkpoint(path, "ppo")


def test_resume_errors(tmp_path):
    with pytest.raises(UserError, match="resume: directory not found"):
        ckpt.resolve_resume(tmp_path / "none")
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.resolve_resume(tmp_path)


def test_model_dir_checks(tmp_path, tiny):
    with pytest.raises(UserError, match="model directory not found"):
        ckpt.check_model_dir(tmp_path / "absent")
    tiny[0].config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no weights"):
        ckpt.check_model_dir(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        ckpt.check_model_dir(tmp_path)
    with pytest.raises(UserError, match="tokenizer directory .* has no tokenizer files"):
        ckpt.check_tokenizer_dir(tmp_path)


def test_failure_mid_write_keeps_previous(tmp_path, tiny, monkeypatch):
    save(tmp_path, 1, tiny)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert ckpt.load_checkpoint(ckpt.resolve_resume(tmp_path), "dpo").step == 1


def test_writer_killed_mid_checkpoint(tmp_path, tiny):
    """A process killed (SIGKILL, no cleanup) while writing step 2 leaves step 1 loadable."""
    save(tmp_path, 1, tiny)
    script = textwrap.dedent(f"""
        import os, signal
        from rftengine import checkpoint as ckpt
        from rftengine.toy import char_tokenizer, tiny_causal_lm
        tok = char_tokenizer()
        model = tiny_causal_lm(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
        def die(obj, f, *a, **k):
            open(f, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.torch.save = die
        ckpt.save_checkpoint({str(tmp_path)!r}, step=2, method="dpo", model=model, tokenizer=tok, state={{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-2")]
    assert leftovers, "the killed writer should have left its temporary directory"
    assert ckpt.resolve_resume(tmp_path).name == "checkpoint-1"
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-1", "dpo").step == 1
    save(tmp_path, 3, tiny)  # the next writer clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_export_plain_directory(tmp_path, tiny):
    out = ckpt.export_model(tiny[0], tiny[1], tmp_path / "final", merge_lora=True)
    ckpt.check_model_dir(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert not os.path.exists(tmp_path / "final" / ckpt.MARKER)
