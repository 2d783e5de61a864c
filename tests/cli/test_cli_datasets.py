"""JSONL data: plain text and chat records, errors that name the file and the line."""

import json

import pytest

from rftengine.datasets import load_preferences, load_prompt_rows, load_prompts, read_jsonl
from rftengine.errors import UserError
from rftengine.toy import char_tokenizer
from tests.test_datasets_formats import hf_home  # noqa: F401 (fixture: an empty offline HF cache)


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_plain_preferences_and_blank_lines(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "extra": 1}, "", {"prompt": "q", "chosen": "c", "rejected": "d"}])
    assert load_preferences(path, char_tokenizer()) == [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
    ]


def test_chat_records_pass_through_as_messages(tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "aeiou"}],
        "rejected": "xyz",
        "margin": 2,
    }
    assert load_preferences(write_lines(tmp_path, [record]), char_tokenizer()) == [record | {"margin": 2.0}]
    with pytest.raises(UserError, match=r"data.jsonl:1: field 'margin' must be a number"):
        load_preferences(write_lines(tmp_path, [record | {"margin": "big"}]), char_tokenizer())


def test_prompts_with_references(tmp_path):
    chat = [{"role": "user", "content": "x"}]
    path = write_lines(tmp_path, [{"prompt": "p1", "reference": "a"}, {"prompt": chat, "reference": 3}])
    prompts, refs = load_prompts(path, char_tokenizer())
    assert prompts == ["p1", chat] and refs == ["a", 3]
    prompts, refs = load_prompts(write_lines(tmp_path, [{"prompt": "p"}], "b.jsonl"), char_tokenizer())
    assert prompts == ["p"] and refs is None


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*absent.jsonl"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, "", '{"prompt": "a", "chosen": '])
    with pytest.raises(UserError, match=r"data.jsonl:3: malformed JSON"):
        load_preferences(path, char_tokenizer())
    with pytest.raises(UserError, match=r"data.jsonl:1: expected a JSON object, got list"):
        read_jsonl(write_lines(tmp_path, ["[1, 2]"]))


def test_missing_field_names_the_line(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(UserError, match=r"data.jsonl:2: missing field 'rejected'"):
        load_preferences(path, char_tokenizer())
    with pytest.raises(UserError, match=r"data.jsonl:1: missing field 'prompt'"):
        load_prompts(write_lines(tmp_path, [{"question": "a"}]), char_tokenizer())
    with pytest.raises(UserError, match=r"data.jsonl:2: missing field 'reference'"):
        load_prompts(write_lines(tmp_path, [{"prompt": "a", "reference": 1}, {"prompt": "b"}]), char_tokenizer())


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": 3, "chosen": "b", "rejected": "c"}, "field 'prompt' must be a string or a list of chat messages"),
        ({"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}, "field 'chosen' message 0 must be"),
        ({"prompt": [], "chosen": "b", "rejected": "c"}, "field 'prompt' is an empty message list"),
    ],
)
def test_bad_field_types(tmp_path, record, message):
    with pytest.raises(UserError, match=message):
        load_preferences(write_lines(tmp_path, [record]), char_tokenizer())


def test_chat_data_needs_a_chat_template(tmp_path):
    records = [{"prompt": "a", "chosen": "b", "rejected": "c"},
               {"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}]
    with pytest.raises(UserError, match=r"data.jsonl:2: the data has chat messages but the tokenizer has no chat template"):
        load_preferences(write_lines(tmp_path, records), char_tokenizer(chat_template=False))


def test_an_empty_chat_template_is_none_for_the_data_as_for_the_methods(tmp_path):
    from rftengine.methods.data import render_prompt

    tokenizer = char_tokenizer()
    tokenizer.chat_template = ""  # renders nothing: no template, wherever the chat messages are checked
    chat = [{"role": "user", "content": "a"}]
    with pytest.raises(UserError, match=r"data.jsonl:1: the data has chat messages but the tokenizer has no chat template"):
        load_preferences(write_lines(tmp_path, [{"prompt": chat, "chosen": "b", "rejected": "c"}]), tokenizer)
    with pytest.raises(UserError, match=r"data.jsonl:1: the data has chat messages but the tokenizer has no chat template"):
        load_prompt_rows(write_lines(tmp_path, [{"prompt": chat}]), tokenizer)
    with pytest.raises(ValueError, match="prompt has chat messages but the tokenizer has no chat template"):
        render_prompt(tokenizer, chat)


# ----------------------------------------------------------------------------- through `rftengine train`


def test_cli_trains_on_the_data_split_of_a_parquet_folder(tmp_path, tiny_model_dir, capsys, hf_home):
    import datasets

    from rftengine.cli import main

    from .cli_helpers import write_config

    folder = tmp_path / "pairs"
    folder.mkdir()
    datasets.Dataset.from_list([{"prompt": "p:", "chosen": " aeiou"}] * 2).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list([{"chosen": "p: aeiou", "rejected": "p: xyz"}] * 2).to_parquet(str(folder / "test.parquet"))
    cfg = write_config(tmp_path / "run.yaml", method="reward", model=str(tiny_model_dir), data=str(folder),
                       output_dir=str(tmp_path / "out"), progress=False, plot=False,
                       train={"max_steps": 1, "batch_size": 2})
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{folder} [train] record 0: missing field 'rejected'" in err and "Traceback" not in err
    assert main(["train", str(cfg), "data_split=test"]) == 0  # implicit prompts, split chosen by the config
    assert "\r" not in capsys.readouterr().err  # datasets' own bars are off outside a terminal


def test_cli_uncached_dataset_id_is_a_one_line_error(tmp_path, tiny_model_dir, capsys, hf_home):
    from rftengine.cli import main

    from .cli_helpers import write_config

    cfg = write_config(tmp_path / "run.yaml", method="dpo", model=str(tiny_model_dir), data="org/not-cached",
                       output_dir=str(tmp_path / "out"), train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "data 'org/not-cached' is not a local file or folder, and not a dataset in the local Hugging Face cache" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
