"""Every user error of `rftengine train` says what and where, exits 1, and shows no traceback."""

import json
import os
import shutil
from pathlib import Path

import pytest

from rftengine import checkpoint as ckpt
from rftengine.cli import main
from rftengine.errors import UserError
from rftengine.toy import char_tokenizer, tiny_causal_lm

from .cli_helpers import save_tiny_model, write_config, write_jsonl

PAIRS = [{"prompt": "p:", "chosen": " aeiou", "rejected": " xyz"}] * 2


def run_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.startswith("rftengine train: error: ")
    return err


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = write_config(tmp_path / "run.yaml", method="reward", model=str(tiny_model_dir), data=str(data),
                       output_dir=str(tmp_path / "out"), train={"max_steps": 1, "batch_size": 2})
    return tmp_path, cfg


def test_missing_config_file(capsys, tmp_path):
    assert "config file not found: " + str(tmp_path / "none.yaml") in run_error(capsys, ["train", str(tmp_path / "none.yaml")])


def test_missing_data_file(capsys, setup):
    tmp_path, cfg = setup
    err = run_error(capsys, ["train", str(cfg), f"data={tmp_path / 'absent.jsonl'}"])
    assert f"data file not found: {tmp_path / 'absent.jsonl'}" in err


def test_missing_model_dir(capsys, setup):
    tmp_path, cfg = setup
    assert "model directory not found" in run_error(capsys, ["train", str(cfg), f"model={tmp_path / 'nomodel'}"])


def test_malformed_jsonl_line(capsys, setup):
    tmp_path, cfg = setup
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    assert f"{tmp_path / 'pairs.jsonl'}:2: malformed JSON" in run_error(capsys, ["train", str(cfg)])


def test_missing_field(capsys, setup):
    tmp_path, cfg = setup
    write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "a", "rejected": "c"}])
    assert f"{tmp_path / 'pairs.jsonl'}:2: missing field 'chosen'" in run_error(capsys, ["train", str(cfg)])


def test_unknown_keys_suggest(capsys, setup):
    _, cfg = setup
    assert "unknown config key 'keep_lst' (did you mean 'keep_last'?)" in run_error(capsys, ["train", str(cfg), "keep_lst=3"])
    err = run_error(capsys, ["train", str(cfg), "train.batch_sise=3"])
    assert "section 'train'" in err and "batch_sise" in err and "batch_size" in err


def test_bad_method_value(capsys, setup):
    _, cfg = setup
    err = run_error(capsys, ["train", str(cfg), "train.batch_size=0"])
    assert "batch_size must be >= 1" in err


def test_model_dir_without_weights(capsys, setup):
    tmp_path, cfg = setup
    empty = tmp_path / "noweights"
    save_tiny_model(empty)  # writes a progress bar to stderr: read it away below
    capsys.readouterr()
    (empty / "model.safetensors").unlink()
    err = run_error(capsys, ["train", str(cfg), f"model={empty}"])
    assert f"model directory {empty} has no weights" in err


def test_tokenizer_without_chat_template_on_chat_data(capsys, setup):
    tmp_path, cfg = setup
    tok_dir = tmp_path / "plain_tok"
    char_tokenizer(chat_template=False).save_pretrained(tok_dir)
    chat = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], chat])
    err = run_error(capsys, ["train", str(cfg), f"tokenizer={tok_dir}"])
    assert f"{tmp_path / 'pairs.jsonl'}:2: the data has chat messages but the tokenizer has no chat template" in err


def test_checkpoint_from_another_method(capsys, setup):
    tmp_path, cfg = setup
    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    path = ckpt.save_checkpoint(tmp_path / "dpo_run", step=1, method="dpo", model=model, tokenizer=tok, state={})
    err = run_error(capsys, ["train", str(cfg), "--resume", str(path)])
    assert f"{path} is a checkpoint of method 'dpo', but this run's method is 'reward'" in err


def test_fresh_run_refuses_an_output_dir_with_checkpoints(capsys, setup):
    tmp_path, cfg = setup
    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    ckpt.save_checkpoint(tmp_path / "out", step=1, method="reward", model=model, tokenizer=tok, state={})
    assert "already holds checkpoints" in run_error(capsys, ["train", str(cfg)])
    shutil.rmtree(tmp_path / "out")
    assert "resume: directory not found" in run_error(capsys, ["train", str(cfg), "--resume"])


def test_usage_errors_exit_2(capsys, setup):
    _, cfg = setup
    with pytest.raises(SystemExit) as exc:
        main(["train", str(cfg), "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_overrides_after_resume_flag(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("rftengine.cli.train.run_training", lambda path, overrides, resume: seen.update(o=overrides, r=resume))
    assert main(["train", "run.yaml", "a=1", "--resume", "b=2", "c=3"]) == 0
    assert seen == {"o": ["a=1", "b=2", "c=3"], "r": ""}
    assert main(["train", "run.yaml", "--resume", str(tmp_path), "a=1"]) == 0
    assert seen == {"o": ["a=1"], "r": str(tmp_path)}
    assert main(["train", "run.yaml"]) == 0 and seen["r"] is None


def test_bad_device(capsys, setup):
    _, cfg = setup
    assert "device must be auto, cpu, cuda or cuda:N, got 'gpu0'" in run_error(capsys, ["train", str(cfg), "device=gpu0"])
    assert "train section (train.seed)" in run_error(capsys, ["train", str(cfg), "seed=3"])


# --- issue 10: user errors that used to surface as tracebacks --------------------------------


def test_output_dir_is_a_file_or_under_one(capsys, setup):
    tmp_path, cfg = setup
    (tmp_path / "afile").write_text("x")
    err = run_error(capsys, ["train", str(cfg), f"output_dir={tmp_path / 'afile'}"])
    assert f"output_dir {tmp_path / 'afile'} is a file, not a directory" in err
    err = run_error(capsys, ["train", str(cfg), f"output_dir={tmp_path / 'afile' / 'run'}"])
    assert f"output_dir {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, not a directory" in err


def test_output_dir_read_only(capsys, setup, monkeypatch):
    # Tests run as root, where chmod does not stop writes: os.access is what the check asks.
    tmp_path, cfg = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    err = run_error(capsys, ["train", str(cfg), f"output_dir={locked / 'run'}"])
    assert f"output_dir {locked / 'run'} is not writable ({locked} is read-only)" in err


def test_output_dir_permission_error_on_write(capsys, setup, monkeypatch):
    tmp_path, cfg = setup
    import rftengine.cli.train

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "run_config.yaml"))

    monkeypatch.setattr(rftengine.cli.train, "_write_run_config", deny)
    err = run_error(capsys, ["train", str(cfg)])
    assert "Permission denied" in err and str(tmp_path / "out" / "run_config.yaml") in err


def test_config_not_utf8(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"method: dpo\nmodel: m\x80\n")
    err = run_error(capsys, ["train", str(path)])
    assert f"{path}: not UTF-8 text (byte 0x80 at offset 20, line 2)" in err


def test_data_not_utf8(capsys, setup):
    tmp_path, cfg = setup
    good = json.dumps(PAIRS[0]).encode()
    (tmp_path / "pairs.jsonl").write_bytes(good + b"\n" + good[:5] + b"\xff" + good[5:] + b"\n")
    err = run_error(capsys, ["train", str(cfg)])
    assert f"{tmp_path / 'pairs.jsonl'}:2: not UTF-8 text (byte 0xff at offset {len(good) + 1 + 5})" in err


def test_data_deeply_nested(capsys, setup):
    tmp_path, cfg = setup
    (tmp_path / "pairs.jsonl").write_text(json.dumps(PAIRS[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    err = run_error(capsys, ["train", str(cfg)])
    assert f"{tmp_path / 'pairs.jsonl'}:2: JSON nested too deeply" in err


def test_data_lone_surrogate(capsys, setup):
    tmp_path, cfg = setup
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps(PAIRS[0]) + "\n" + '{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}\n')
    err = run_error(capsys, ["train", str(cfg)])
    assert f"{tmp_path / 'pairs.jsonl'}:2: field 'prompt' holds a lone surrogate" in err


def test_data_unreadable(capsys, setup, monkeypatch):
    tmp_path, cfg = setup
    data = tmp_path / "pairs.jsonl"
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self == data:
            raise PermissionError(13, "Permission denied", str(data))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    err = run_error(capsys, ["train", str(cfg)])
    assert f"data file {data}: Permission denied" in err


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:x", "cpu:0:1", "CUDA"])
def test_device_not_cpu_cuda_or_auto(capsys, setup, device):
    _, cfg = setup
    err = run_error(capsys, ["train", str(cfg), f"device={device}"])
    assert f"device must be auto, cpu, cuda or cuda:N, got '{device}'" in err


def test_debug_flag_shows_the_traceback(capsys, setup):
    _, cfg = setup
    with pytest.raises(UserError, match="device must be"):
        main(["train", str(cfg), "device=meta", "--debug"])
    with pytest.raises(UserError, match="device must be"):
        main(["--debug", "train", str(cfg), "device=meta"])
    assert not os.environ.get("RFTENGINE_DEBUG")  # --debug does not leak into later calls
    run_error(capsys, ["train", str(cfg), "device=meta"])


def test_reward_module_with_a_syntax_error(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "broken_reward_mod.py").write_text("def score(prompts, responses):\n    return [1.0 for r in responses\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p:"}] * 2)
    cfg = write_config(tmp_path / "run.yaml", method="grpo", model=str(tiny_model_dir), data=str(data),
                       reward="broken_reward_mod:score", output_dir=str(tmp_path / "out"), train={"group_size": 2})
    err = run_error(capsys, ["train", str(cfg)])
    assert f"reward broken_reward_mod:score: {tmp_path / 'broken_reward_mod.py'}:2: invalid Python" in err


def test_constitution_not_utf8(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "c.yaml").write_bytes(b"principles:\n  - name: \xff\n")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p:"}] * 2)
    cfg = write_config(tmp_path / "run.yaml", method="cai", model=str(tiny_model_dir), data=str(data),
                       constitution=str(tmp_path / "c.yaml"), output_dir=str(tmp_path / "out"))
    err = run_error(capsys, ["train", str(cfg)])
    assert f"{tmp_path / 'c.yaml'}: not UTF-8 text (byte 0xff at offset 22, line 2)" in err


def test_reward_model_config_not_utf8(capsys, tmp_path, tiny_model_dir):
    reward = save_tiny_model(tmp_path / "rm")
    capsys.readouterr()
    (reward / "config.json").write_bytes(b'{"architectures": ["\xff"]}')
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p:"}] * 2)
    cfg = write_config(tmp_path / "run.yaml", method="grpo", model=str(tiny_model_dir), data=str(data),
                       reward=str(reward), output_dir=str(tmp_path / "out"), train={"group_size": 2})
    err = run_error(capsys, ["train", str(cfg)])
    assert f"{reward / 'config.json'}: not UTF-8 text (byte 0xff at offset 20, line 1)" in err
