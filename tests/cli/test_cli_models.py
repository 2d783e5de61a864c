"""Models in and out of `rftengine train`: hub ids from the local cache (offline), PEFT adapter
directories as `model`, the exported reward model and critic loaded by transformers, the note
that says where the final model is, and no empty output_dir left by a failed run."""

import dataclasses
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rftengine import checkpoint as ckpt
from rftengine.cli import main
from rftengine.cli.runners import METHOD_RUNNERS
from rftengine.methods.model_source import resolve_model, resolve_tokenizer_dir
from rftengine.methods.modeling import RewardModel, load_causal_lm, load_tokenizer

from .cli_helpers import write_config, write_jsonl

PAIRS = [{"prompt": "p:", "chosen": " aeiou", "rejected": " xyz"}, {"prompt": "q:", "chosen": " oo", "rejected": " k"}]
DPO = {"max_steps": 1, "batch_size": 2, "max_prompt_length": 16, "max_response_length": 8}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _config(tmp_path, name, model, method="dpo", train=DPO, **values):
    """A run config written to tmp_path/<name>.yaml, with output_dir tmp_path/<name> (unless given)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    values.setdefault("output_dir", str(tmp_path / name))
    return write_config(tmp_path / f"{name}.yaml", method=method, model=str(model), data=str(data),
                        progress=False, plot=False, train=train, **values)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """An HF hub cache at tmp holding `acme/tiny` (the tiny model), read offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time
    return cache


def test_hub_id_from_the_local_cache(hub_cache, tiny_model_dir, tmp_path, capsys):
    ids = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(_logits(load_causal_lm("acme/tiny"), ids), _logits(load_causal_lm(tiny_model_dir), ids))
    assert load_tokenizer("acme/tiny")("abc")["input_ids"] == load_tokenizer(tiny_model_dir)("abc")["input_ids"]

    assert main(["train", str(_config(tmp_path, "run", "acme/tiny"))]) == 0
    out = capsys.readouterr().out
    final = tmp_path / "run" / "final"
    # the note says where the model is and how to load it, printed and as the export's README.md
    card = (final / "README.md").read_text()
    assert card in out and f'AutoModelForCausalLM.from_pretrained("{final.resolve()}")' in card
    AutoModelForCausalLM.from_pretrained(final)


def test_uncached_hub_id_is_a_clear_error(hub_cache, tmp_path, capsys):
    code = main(["train", str(_config(tmp_path, "run", "acme/absent"))])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "model 'acme/absent' not found" in err and str(hub_cache) in err
    assert "rftengine does not download models" in err and "`hf download acme/absent`" in err


def test_adapter_directory_as_model(tiny_model_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    fast = {**DPO, "learning_rate": 0.05}  # adapters that clearly change the output (B is 0 at init)
    assert main(["train", str(_config(tmp_path, "lora", tiny_model_dir, train=fast, lora=LORA))]) == 0
    adapters = tmp_path / "lora" / "final"
    assert (adapters / ckpt.ADAPTER_CONFIG).is_file() and not (adapters / "config.json").exists()
    assert "AutoPeftModelForCausalLM" in (adapters / "README.md").read_text()

    ids = torch.tensor([[4, 5, 6, 7, 8]])
    merged = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapters)).merge_and_unload().eval()
    torch.testing.assert_close(_logits(load_causal_lm(adapters), ids), _logits(merged, ids))
    assert (_logits(load_causal_lm(tiny_model_dir), ids) - _logits(merged, ids)).abs().max() > 1e-2

    # no lora section: the adapters are merged into the base, which trains fully
    assert main(["train", str(_config(tmp_path, "full", adapters))]) == 0
    assert (tmp_path / "full" / "final" / "model.safetensors").is_file()
    # a lora section: fresh adapters over the merged model, exported merged (peft cannot stack them)
    assert main(["train", str(_config(tmp_path, "again", adapters, lora=LORA))]) == 1
    assert "set merge_lora: true" in capsys.readouterr().err
    assert main(["train", str(_config(tmp_path, "again", adapters, lora=LORA, merge_lora=True))]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "again" / "final")


def test_adapter_directory_without_its_base(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ckpt.ADAPTER_CONFIG).write_text('{"base_model_name_or_path": "%s"}' % (tmp_path / "gone"))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert main(["train", str(_config(tmp_path, "run", adapter))]) == 1
    err = capsys.readouterr().err
    assert f"model {adapter}: base model directory not found: {tmp_path / 'gone'}" in err


def test_model_source_resolution(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ckpt.ADAPTER_CONFIG).write_text('{"base_model_name_or_path": null}')
    with pytest.raises(ValueError, match="has adapter_config.json but no adapter weights"):
        resolve_model(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="names no base model"):
        resolve_model(adapter)
    # a relative base is read from the working directory, else beside the adapter directory
    shutil.copytree(tiny_model_dir, adapter / "base")
    (adapter / ckpt.ADAPTER_CONFIG).write_text('{"base_model_name_or_path": "base"}')
    assert resolve_model(adapter).base.path == adapter / "base"
    assert resolve_tokenizer_dir(adapter) == adapter / "base"  # no tokenizer files of its own
    with pytest.raises(ValueError, match=r"model directory not found: \./absent is not a directory"):
        resolve_model("./absent")  # a path, never looked up in the hub cache


def test_reward_model_export_loads_in_transformers_with_the_same_scores(tiny_model_dir, tmp_path):
    train = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "save_every": 3}
    assert main(["train", str(_config(tmp_path, "rm", tiny_model_dir, method="reward", train=train))]) == 0
    trained = RewardModel.from_pretrained(tmp_path / "rm" / "checkpoint-3").eval()  # the value-head layout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm" / "final")
    enc = tokenizer(["p: aeiou", "q: k", "a longer text"], return_tensors="pt", padding=True)
    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final", output_loading_info=True)
    assert not info["missing_keys"]  # the trained score head, not a fresh one
    with torch.no_grad():
        expected = trained(enc["input_ids"], enc["attention_mask"])
        got = hf.eval()(**enc).logits[:, 0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf.score.weight, trained.model.v_head.linear.weight)


def test_ppo_exports_its_critic(tiny_model_dir, tmp_path):
    train = {"max_steps": 1, "batch_size": 2, "max_new_tokens": 4, "ppo_epochs": 1, "minibatch_size": 2}
    cfg = _config(tmp_path, "ppo", tiny_model_dir, method="ppo", train=train,
                  reward="rftengine.toy:vowel_fraction_reward")
    assert main(["train", str(cfg)]) == 0
    critic, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ppo" / "final" / "critic",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and critic.config.pad_token_id is not None
    card = (tmp_path / "ppo" / "final" / "README.md").read_text()
    # the critic's head is bias-free like the score layer, so the export is exact (no offset to state)
    assert "/critic" in card and "bias" not in card


def test_rlaif_ppo_exports_its_critic(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ab:"}, {"prompt": "cd:"}])
    cfg = write_config(tmp_path / "rlaif.yaml", method="rlaif", model=str(tiny_model_dir), judge=str(tiny_model_dir),
                       data=str(prompts), output_dir=str(tmp_path / "rlaif"), progress=False, plot=False,
                       judge_options={"choices": ["a", "b"], "batch_size": 8},
                       train={"algorithm": "ppo", "batch_size": 2, "group_size": 2, "max_new_tokens": 4,
                              "max_steps": 1, "ppo": {"ppo_epochs": 1, "minibatch_size": 4}})
    assert main(["train", str(cfg)]) == 0
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rlaif" / "final" / "critic",
                                                                 output_loading_info=True)
    assert not info["missing_keys"]


# --------------------------------------------------------------------------- failed runs


def test_failed_run_leaves_no_output_dir(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, "run", tiny_model_dir, output_dir=str(tmp_path / "nested" / "run"))
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n')
    assert main(["train", str(cfg)]) == 1
    assert "pairs.jsonl:2: malformed JSON" in capsys.readouterr().err  # found after output_dir was made
    assert not (tmp_path / "nested").exists()  # nor the parent made for it


def test_failed_run_keeps_a_directory_it_did_not_make(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _config(tmp_path, "run", tiny_model_dir)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")

    def crash(run):
        raise RuntimeError("mid-setup")

    monkeypatch.setitem(METHOD_RUNNERS, "dpo", dataclasses.replace(METHOD_RUNNERS["dpo"], run=crash))
    with pytest.raises(RuntimeError, match="mid-setup"):
        main(["train", str(cfg)])
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(RuntimeError, match="mid-setup"):  # the same crash in a new directory removes it
        main(["train", str(cfg)])
    assert not (tmp_path / "run").exists()


def test_model_load_error_leaves_no_output_dir(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("weights do not fit")

    monkeypatch.setattr("rftengine.methods.modeling.load_causal_lm", broken)
    assert main(["train", str(_config(tmp_path, "run", tiny_model_dir))]) == 1
    assert "weights do not fit" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
