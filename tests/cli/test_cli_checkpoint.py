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
from rftengine.errors import UserError
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
        f.write(b"half")
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
            f.write(b"partial")
            f.flush()
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


# ---------------------------------------------------------------------------------------------
# Issue 10: state that loads without running code, crash-safe pruning, fallback, disk full,
# non-finite weights, the CAI stage reference stored once.


def train_state(tiny, **extra):
    """The state_dict of a real TrainState: AdamW and LambdaLR after one step, RNG states."""
    from rftengine.methods.optimization import make_optimizer, make_scheduler
    from rftengine.methods.train_state import TrainState
    from rftengine.methods.dpo import DPOConfig

    model = tiny[0]
    cfg = DPOConfig(learning_rate=1e-3, warmup_steps=1)
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg, 4)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    return TrainState("dpo", step=1, data_position=4, model=model, optimizer=opt, scheduler=sched,
                      extra=extra).state_dict()


class Planted:
    """Unpickling this creates a file: what a hostile trainer_state.pt would do."""

    def __init__(self, victim):
        self.victim = str(victim)

    def __reduce__(self):
        return (open, (self.victim, "w"))


def test_state_file_loads_with_weights_only(tmp_path, tiny):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpt.save_checkpoint(tmp_path, step=1, method="dpo", model=tiny[0], tokenizer=tiny[1],
                                state=train_state(tiny))
    payload = torch.load(path / ckpt.STATE_FILE, weights_only=True)  # raises on anything but plain data
    assert payload["state"]["optimizer"]["state"] and payload["state"]["scheduler"]["last_epoch"] == 1
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_checkpoint(path, "dpo").restore_rng()
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_one_rng_snapshot_for_train_state_and_checkpoint():
    from rftengine.methods import train_state

    assert not hasattr(ckpt, "rng_state")  # one function, train_state.capture_rng_state, for both
    state = train_state.capture_rng_state()
    assert {"python", "numpy", "torch"} <= set(state)
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    state = train_state.capture_rng_state()
    np.random.rand()
    train_state.restore_rng_state(state)
    assert np.random.rand() == expected


def test_planted_pickle_does_not_run(tmp_path, tiny):
    victim = tmp_path / "pwned"
    path = save(tmp_path / "out", 1, tiny)
    torch.save({"step": 1, "state": Planted(victim), "rng": {}}, path / ckpt.STATE_FILE)
    with pytest.raises(UserError, match=f"{ckpt.STATE_FILE}.*(unsafe|not plain data)"):
        ckpt.load_checkpoint(path, "dpo")
    with pytest.raises(UserError, match="no checkpoint .* loads"):
        ckpt.load_resume(tmp_path / "out", "dpo")
    assert not victim.exists()


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {  # what a kill, a bad copy or a hostile sender leaves: (the file named, how)
    "truncated model.safetensors": ("model.safetensors", lambda p: truncate(p / "model.safetensors")),
    "truncated trainer_state.pt": (ckpt.STATE_FILE, lambda p: truncate(p / ckpt.STATE_FILE)),
    "empty trainer_state.pt": (ckpt.STATE_FILE, lambda p: (p / ckpt.STATE_FILE).write_bytes(b"")),
    "missing trainer_state.pt": (ckpt.STATE_FILE, lambda p: (p / ckpt.STATE_FILE).unlink()),
    "planted pickle": (ckpt.STATE_FILE, lambda p: torch.save({"x": Planted(p / "pwned")}, p / ckpt.STATE_FILE)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, tiny, capsys, damage):
    for step in (1, 2, 3):
        save(tmp_path, step, tiny, keep_last=3)
    filename, harm = DAMAGE[damage]
    harm(tmp_path / "checkpoint-3")
    loaded = ckpt.load_resume(tmp_path, "dpo")
    assert loaded.step == 2 and loaded.path == tmp_path / "checkpoint-2"
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-3" in err and filename in err, err
    # an explicit checkpoint that does not load: a clear error naming the file, no fallback
    with pytest.raises(UserError, match=f"checkpoint-3.*{filename}|{filename}.*checkpoint-3"):
        ckpt.load_resume(tmp_path / "checkpoint-3", "dpo")
    assert not (tmp_path / "checkpoint-3" / "pwned").exists()


def test_resume_does_not_fall_back_over_another_method(tmp_path, tiny):
    save(tmp_path, 1, tiny)
    with pytest.raises(UserError, match="is a checkpoint of method 'dpo', but this run's method is 'ppo'"):
        ckpt.load_resume(tmp_path, "ppo")


def test_kill_during_pruning_leaves_no_listed_half_checkpoint(tmp_path, tiny, monkeypatch):
    """A kill while rmtree removes checkpoint-1 (here: after its weights went, before the marker)."""
    save(tmp_path, 1, tiny)
    save(tmp_path, 2, tiny)
    real_rmtree = ckpt.shutil.rmtree

    def killed_rmtree(path, *a, **k):
        path = ckpt.Path(path)
        for name in ("model.safetensors", ckpt.STATE_FILE):
            if (path / name).exists():
                (path / name).unlink()
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, tiny, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.load_checkpoint(path, "dpo")
    save(tmp_path, 4, tiny, keep_last=2)  # the next writer clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_disk_full_keeps_previous_checkpoints(tmp_path, tiny, monkeypatch):
    import errno

    save(tmp_path, 1, tiny)
    save(tmp_path, 2, tiny)
    real = ckpt.save_model_dir

    def full_disk(path, model, tokenizer):
        real(path, model, tokenizer)
        with open(path / "model.safetensors", "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))

    monkeypatch.setattr(ckpt, "save_model_dir", full_disk)
    with pytest.raises(UserError, match=f"no space left on device.*{tmp_path}"):
        save(tmp_path, 3, tiny, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # nothing pruned


def test_a_silently_short_weights_file_is_not_committed(tmp_path, tiny, monkeypatch):
    """A writer that loses bytes without raising (a full disk under some writers) is caught
    before the rename: the checkpoint would not load."""
    save(tmp_path, 1, tiny)
    real = ckpt.save_model_dir

    def short(path, model, tokenizer):
        real(path, model, tokenizer)
        truncate(path / "model.safetensors", 0.9)

    monkeypatch.setattr(ckpt, "save_model_dir", short)
    with pytest.raises(UserError, match="model.safetensors"):
        save(tmp_path, 2, tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_non_finite_weights_are_never_saved(tmp_path):
    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    save(tmp_path, 1, (model, tok))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 3] = float("nan")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*(NaN|non-finite)"):
        save(tmp_path, 2, (model, tok))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*(NaN|non-finite)"):
        ckpt.export_model(model, tok, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 3] = 0.0
        model.model.norm.weight[1] = float("inf")
    with pytest.raises(UserError, match=r"model\.norm\.weight"):
        save(tmp_path, 2, (model, tok))


def test_fixed_tensors_are_written_once_and_survive_pruning(tmp_path, tiny):
    """The CAI stage reference: a safetensors file written by the first checkpoint of its stage and
    hard-linked (one copy on disk) into the later ones, each of which stays self-contained."""
    from rftengine.methods.train_state import FixedTensors

    weights = {k: v.clone() for k, v in tiny[0].state_dict().items()}  # tied: embed == lm_head
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    ref = FixedTensors("abc123", weights)

    def save_ref(step, fixed):
        return ckpt.save_checkpoint(tmp_path, step=step, method="cai", model=tiny[0], tokenizer=tiny[1],
                                    state={"extra": {"stage_reference": fixed, "stage": "dpo"}}, keep_last=2)

    first = save_ref(1, ref)
    second = save_ref(2, ref)
    name = "stage_reference.safetensors"
    assert (first / name).stat().st_ino == (second / name).stat().st_ino  # the same file, linked
    assert (first / ckpt.STATE_FILE).stat().st_size < 20_000  # the weights are not in the pickle
    third = save_ref(3, ref)  # prunes checkpoint-1
    assert not first.exists()
    loaded = ckpt.load_checkpoint(second, "cai").state["extra"]["stage_reference"]
    assert isinstance(loaded, FixedTensors) and loaded.key == "abc123"
    assert loaded.tensors.keys() == weights.keys()
    assert all(torch.equal(loaded.tensors[k], weights[k]) for k in weights)
    other = save_ref(4, FixedTensors("def456", {k: v + 1 for k, v in weights.items()}))
    assert (other / name).stat().st_ino != (third / name).stat().st_ino  # new tensors, new file
    reloaded = ckpt.load_checkpoint(other, "cai").state["extra"]["stage_reference"].tensors
    assert torch.equal(reloaded["model.norm.weight"], weights["model.norm.weight"] + 1)


def test_state_that_weights_only_would_refuse_is_refused_at_save(tmp_path, tiny):
    """Caught when saving, naming the entry, rather than as a checkpoint that does not load."""
    for bad, where in ((np.float64(0.5), "'kl_coef'"), (object(), "'kl_coef'")):
        with pytest.raises(ValueError, match=f"trainer state .*{where}.* is a {type(bad).__name__}"):
            ckpt.save_checkpoint(tmp_path, step=1, method="dpo", model=tiny[0], tokenizer=tiny[1],
                                 state={"extra": {"kl_coef": bad}})
    assert not list(tmp_path.iterdir())
