"""The run's `lora:` section: only the adapters train, the reference is the base with adapters off
(no second model loaded), resume is exact, and the export is either a merged plain model directory
or the adapter directory."""

import sys

import pytest
import torch
from safetensors.torch import load_file

import rftengine.cli.run
import rftengine.cli.train
from rftengine.checkpoint import ADAPTER_CONFIG
from rftengine.cli import main
from rftengine.metrics import read_metrics

from .cli_helpers import EXAMPLES

peft = pytest.importorskip("peft", reason="peft is an optional extra; install rftengine[test] or [peft]")

# precompute_ref=false: the reference is live at every step, resumed run included
DPO = ["train.batch_size=3", "train.max_prompt_length=32", "train.max_response_length=16",
       "train.learning_rate=5e-2", "train.precompute_ref=false", "train.save_every=2"]


class Crash(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_reference_model(monkeypatch):
    """A LoRA run's reference is the policy with its adapters off: loading a model for it is a bug."""
    def forbidden(self):
        raise AssertionError("a LoRA run loaded a separate reference model")

    monkeypatch.setattr(rftengine.cli.run.Run, "load_reference", forbidden)
    monkeypatch.chdir(EXAMPLES.parent)  # the example's data path is relative to the repository root


def train(model_dir, out, *extra, steps=2, crash_at=None):
    argv = ["train", str(EXAMPLES / "dpo_lora.yaml"), f"model={model_dir}", f"output_dir={out}",
            "progress=false", "plot=false", f"train.max_steps={steps}", *DPO, *extra]
    with pytest.MonkeyPatch.context() as mp:
        if crash_at is not None:
            log = rftengine.cli.run.Run.callback

            def callback(self, step, metrics):
                if step == crash_at:
                    raise Crash(f"simulated crash after step {step}")
                log(self, step, metrics)

            mp.setattr(rftengine.cli.run.Run, "callback", callback)
            with pytest.raises(Crash):
                main(argv)
        else:
            assert main(argv) == 0


def probe_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return torch.tensor([tok.encode("say: aeiou xkcd")])


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def test_only_adapters_train_and_the_merged_export_loads_without_peft(tmp_path, tiny_model_dir, monkeypatch):
    ids = probe_ids(tiny_model_dir)
    seen = {}
    export = rftengine.cli.train.export_model

    def spy(model, tokenizer, out_dir, merge_lora=False, **kwargs):
        # before the export merges the adapters into the model in place
        seen["peft"] = isinstance(model, peft.PeftModel)
        seen["params"] = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
        seen["logits"] = logits(model, ids)
        return export(model, tokenizer, out_dir, merge_lora=merge_lora, **kwargs)

    monkeypatch.setattr(rftengine.cli.train, "export_model", spy)
    train(tiny_model_dir, tmp_path / "out")  # the example merges on export

    assert seen["peft"]
    base = base_model(tiny_model_dir)
    base_params = dict(base.named_parameters())
    adapters = {n: p for n, (p, trainable) in seen["params"].items() if "lora_" in n}
    frozen = {n: p for n, (p, trainable) in seen["params"].items() if "lora_" not in n}
    assert {n for n, (_, trainable) in seen["params"].items() if trainable} == set(adapters)
    assert len(adapters) == 8  # A and B of q, k, v, o in the one layer
    assert len(frozen) == len(base_params)
    for name, value in frozen.items():  # base_model.model.<name>.base_layer.weight -> <name>.weight
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, base_params[key]), name
    assert all(p.abs().max() > 0 for n, p in adapters.items() if "lora_B" in n)  # B starts at 0: it trained

    final = tmp_path / "out" / "final"
    assert (final / "config.json").is_file() and not (final / ADAPTER_CONFIG).exists()
    assert not any("lora" in k or k.startswith("base_model") for k in load_file(final / "model.safetensors"))
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "peft", None)  # `import peft` now fails: the directory must not need it
        merged = base_model(final)
    torch.testing.assert_close(logits(merged, ids), seen["logits"], rtol=0, atol=1e-5)
    assert (logits(base, ids) - seen["logits"]).abs().max() > 1e-3  # the adapters changed the model


def test_resume_is_exact_and_the_adapter_export(tmp_path, tiny_model_dir, capsys):
    train(tiny_model_dir, tmp_path / "full", "merge_lora=false", steps=4)
    # checkpoint-2 survives, step 3 is lost
    train(tiny_model_dir, tmp_path / "resumed", "merge_lora=false", steps=4, crash_at=3)
    train(tiny_model_dir, tmp_path / "resumed", "merge_lora=false", "--resume", steps=4)

    rows_full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    rows_resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    assert rows_resumed == rows_full  # losses and every other metric, bit for bit
    assert rows_full[2]["loss"] != rows_full[3]["loss"]

    ckpt_full, ckpt_resumed = tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4"
    assert not (ckpt_full / "model.safetensors").exists()  # a LoRA checkpoint holds the adapters only
    opt_full = torch.load(ckpt_full / "trainer_state.pt", weights_only=True)["state"]["optimizer"]["state"]
    opt_resumed = torch.load(ckpt_resumed / "trainer_state.pt", weights_only=True)["state"]["optimizer"]["state"]
    assert len(opt_full) == 8 and opt_full.keys() == opt_resumed.keys()
    for i in opt_full:
        assert all(torch.equal(opt_full[i][k], opt_resumed[i][k]) for k in opt_full[i]), i

    final_full, final_resumed = tmp_path / "full" / "final", tmp_path / "resumed" / "final"
    assert (final_full / ADAPTER_CONFIG).is_file() and not (final_full / "model.safetensors").exists()
    a, b = load_file(final_full / "adapter_model.safetensors"), load_file(final_resumed / "adapter_model.safetensors")
    assert len(a) == 8 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the adapter directory names its base absolutely: peft loads it from anywhere
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(final_full)).eval()
    ids = probe_ids(tiny_model_dir)
    assert (logits(model, ids) - logits(base_model(tiny_model_dir), ids)).abs().max() > 1e-3

    capsys.readouterr()
    # resuming a LoRA checkpoint with other adapters, or with none, is an error, not a silent restart
    argv = ["train", str(EXAMPLES / "dpo_lora.yaml"), f"model={tiny_model_dir}",
            f"output_dir={tmp_path / 'full'}", "progress=false", "train.max_steps=5", *DPO, "--resume"]
    assert main([*argv, "lora.r=2"]) == 1
    assert "was written with lora r = 16, but this run's lora section gives 2" in capsys.readouterr().err
    assert main([*argv, "lora=null", "merge_lora=false"]) == 1
    assert "holds LoRA adapters but this run's config has no lora section" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("lora.alpah=16", "unknown lora key 'alpah' (did you mean 'alpha'?)"),
    ("lora.lora_r=16", "unknown lora key 'lora_r' (did you mean 'r'?)"),  # TRL's spelling
    ("lora.target_modules=[q_proj,lm_head]", "lora.target_modules must not include the output head (lm_head)"),
    ("lora.target_modules=q_proj", "lora.target_modules must be a list of module names or 'all-linear'"),
    ("lora.dropout=0.05", "lora.dropout must be 0"),
    ("lora.r=0", "lora.r must be an integer >= 1"),
    ("lora=[4]", "lora must be a mapping of LoRA settings"),
    # the output head is tied to the input embeddings in the tiny model: checked on the loaded model
    ("lora.target_modules=[embed_tokens]", "adapts model.embed_tokens, the input embeddings, tied to the output head"),
])
def test_bad_lora_config(override, message, tmp_path, tiny_model_dir, capsys):
    argv = ["train", str(EXAMPLES / "dpo_lora.yaml"), f"model={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}", "progress=false", override]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "rftengine train: error: " in err and message in err, err


def test_merge_lora_needs_lora_and_peft_is_required(tmp_path, tiny_model_dir, capsys, monkeypatch):
    argv = ["train", str(EXAMPLES / "dpo.yaml"), f"model={tiny_model_dir}", f"output_dir={tmp_path / 'out'}",
            "progress=false"]
    assert main([*argv, "merge_lora=true"]) == 1
    assert "merge_lora is true but there is no lora section" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)
    assert main([*argv, "lora.r=8"]) == 1
    assert "needs peft, which is not installed: pip install rftengine[peft]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is loaded or written
