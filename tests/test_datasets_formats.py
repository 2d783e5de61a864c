"""Data from every source `datasets` knows (files, folders, save_to_disk, the local hub cache), in
TRL's formats (standard, conversational, implicit prompt, prompt-only), with errors that name the
record."""

import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from rftengine.config import RunConfig
from rftengine.errors import UserError
from rftengine.datasets import extract_prompt, load_preferences, load_prompt_rows, load_prompts, read_records
from rftengine.toy import char_tokenizer

PAIRS = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
TEST_PAIRS = [{"prompt": "t", "chosen": "e", "rejected": "f"}]


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache under tmp_path (`datasets` and huggingface_hub read
    their cache paths and the offline switch at import, so the module values are patched)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(spec, split="train"):
    return load_preferences(spec, char_tokenizer(), split=split)


# ----------------------------------------------------------------------------- files


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(PAIRS, indent=2))
    assert load(array) == PAIRS
    lines = write_jsonl(tmp_path / "lines.json", PAIRS)
    assert load(lines) == PAIRS


def test_json_array_errors_name_the_record_index(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIRS[0], {"prompt": "a", "chosen": "b"}]))
    with pytest.raises(UserError, match=r"pairs.json: record 1: missing field 'rejected'"):
        load(path)
    path.write_text(json.dumps([PAIRS[0], 3]))
    with pytest.raises(UserError, match=r"pairs.json: record 1: expected a JSON object, got int"):
        load(path)
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": \n]')
    with pytest.raises(UserError, match=r"pairs.json:4: malformed JSON"):
        load(path)
    path.write_text("[]")
    with pytest.raises(UserError, match=r"pairs.json: no records"):
        load(path)


def test_parquet_and_csv_files(tmp_path):
    datasets.Dataset.from_list(PAIRS).to_parquet(str(tmp_path / "pairs.parquet"))
    assert load(tmp_path / "pairs.parquet") == PAIRS
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected,margin\np,a,b,1.5\nq,c,d,\n")
    assert load(tmp_path / "pairs.csv") == [PAIRS[0] | {"margin": 1.5}, PAIRS[1]]
    (tmp_path / "bad.csv").write_text("prompt,chosen\np,a\nq,c\n")
    with pytest.raises(UserError, match=r"bad.csv record 0: missing field 'rejected'"):
        load(tmp_path / "bad.csv")


def test_a_single_file_has_only_the_train_split(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(UserError, match=r"pairs.jsonl is a single file, whose only split is 'train'; got split 'test'"):
        load(path, split="test")


def test_missing_path_and_unreadable_table(tmp_path):
    with pytest.raises(UserError, match=r"data file not found: .*absent.parquet"):
        load(tmp_path / "absent.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"broken.parquet: cannot read the data"):
        load(tmp_path / "broken.parquet")


# ----------------------------------------------------------------------------- folders


def test_folder_splits_by_file_name_with_line_numbers(tmp_path):
    folder = tmp_path / "set"
    write_jsonl(folder / "train.jsonl", PAIRS)
    write_jsonl(folder / "test.jsonl", TEST_PAIRS)
    assert load(folder) == PAIRS and load(folder, "test") == TEST_PAIRS
    with pytest.raises(UserError, match=r"set: no split 'validation' \(the folder's splits: train, test\)"):
        load(folder, "validation")
    (folder / "test.jsonl").write_text(json.dumps(TEST_PAIRS[0]) + "\n{oops\n")
    with pytest.raises(UserError, match=r"set/test.jsonl:2: malformed JSON"):
        load(folder, "test")


def test_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "set" / "data"
    folder.mkdir(parents=True)
    datasets.Dataset.from_list(PAIRS).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(TEST_PAIRS).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    assert load(tmp_path / "set") == PAIRS and load(tmp_path / "set", "test") == TEST_PAIRS


def test_save_to_disk_folders(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                                   "test": datasets.Dataset.from_list(TEST_PAIRS)})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load(tmp_path / "dict") == PAIRS and load(tmp_path / "dict", "test") == TEST_PAIRS
    with pytest.raises(UserError, match=r"no split 'dev' \(its splits: train, test\)"):
        load(tmp_path / "dict", "dev")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "one"))
    assert load(tmp_path / "one") == PAIRS
    with pytest.raises(UserError, match=r"one is a saved dataset of one split \('train'\); got split 'test'"):
        load(tmp_path / "one", "test")


# ----------------------------------------------------------------------------- the local hub cache


def put_in_hub_cache(home: Path, repo_id: str) -> None:
    """What `hf download --repo-type dataset` leaves: refs/main -> a snapshot of the repo's files."""
    repo = home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_jsonl(repo / "snapshots" / commit / "train.jsonl", PAIRS)
    write_jsonl(repo / "snapshots" / commit / "test.jsonl", TEST_PAIRS)


def put_in_datasets_cache(home: Path, tmp_path: Path, repo_id: str) -> None:
    """What `datasets.load_dataset(repo_id)` leaves after a download: the prepared Arrow tables in
    HF_DATASETS_CACHE/<owner>___<name>/<config>/<version>/<commit>/."""
    from datasets.packaged_modules.json.json import Json

    files = {"train": str(write_jsonl(tmp_path / "src" / "train.jsonl", PAIRS)),
             "test": str(write_jsonl(tmp_path / "src" / "test.jsonl", TEST_PAIRS))}
    owner, name = repo_id.split("/")
    builder = Json(data_files=files, dataset_name=name, config_name="default", hash="0" * 40)
    builder.download_and_prepare()
    prepared = home / "datasets" / name
    (next(prepared.iterdir())).rename(prepared / "default")  # the hub config's name, not the local files' id
    prepared.rename(home / "datasets" / f"{owner}___{name}")


def test_hub_id_from_the_hub_snapshot_cache(hf_home):
    put_in_hub_cache(hf_home, "org/pairs")
    assert load("org/pairs") == PAIRS and load("org/pairs", "test") == TEST_PAIRS


def test_hub_id_from_the_datasets_cache(hf_home, tmp_path):
    put_in_datasets_cache(hf_home, tmp_path, "org/prepared")
    assert load("org/prepared") == PAIRS and load("org/prepared", "test") == TEST_PAIRS
    with pytest.raises(UserError, match=r"org/prepared: no split 'dev' \(its splits: train, test\)"):
        load("org/prepared", "dev")


def test_uncached_hub_id_says_it_is_not_in_the_cache():
    with pytest.raises(UserError, match=r"data 'org/absent' is not a local file or folder, and not a dataset in the "
                                        r"local Hugging Face cache .*hf download --repo-type dataset org/absent"):
        load("org/absent")


# ----------------------------------------------------------------------------- TRL's formats


def test_implicit_prompt_text_keeps_the_space_with_the_responses(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    assert load(path) == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    assert extract_prompt("ab cd", "ab ce") == ("ab c", "d", "e")


def test_implicit_prompt_conversational(tmp_path):
    user = {"role": "user", "content": "What colour is the sky?"}
    record = {"chosen": [user, {"role": "assistant", "content": "Blue."}],
              "rejected": [user, {"role": "assistant", "content": "Green."}], "margin": 1}
    assert load(write_jsonl(tmp_path / "p.jsonl", [record])) == [{
        "prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}], "margin": 1.0,
    }]


@pytest.mark.parametrize("record, message", [
    ({"chosen": "abc", "rejected": "xyz"}, "share no leading characters"),
    ({"chosen": "abc", "rejected": "abcd"}, "one of chosen and rejected is the beginning of the other"),
    ({"chosen": "abc", "rejected": [{"role": "user", "content": "abc"}]}, "both be text or both chat messages"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "share no leading messages"),
])
def test_implicit_prompt_errors_name_the_line(tmp_path, record, message):
    with pytest.raises(UserError, match=rf"p.jsonl:1: implicit prompt: .*{message}"):
        load(write_jsonl(tmp_path / "p.jsonl", [record]))


def test_prompt_only_rows_keep_every_column(tmp_path):
    chat = [{"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2", "level": 1},
                                              {"prompt": chat, "answer": "4", "source": "x"}])
    assert load_prompt_rows(path, char_tokenizer()) == [
        {"prompt": "1+1?", "answer": "2", "level": 1, "source": None},
        {"prompt": chat, "answer": "4", "level": None, "source": "x"},
    ]
    assert load_prompts(path, char_tokenizer()) == (["1+1?", chat], None)


def test_prompt_rows_from_a_split_of_a_parquet_folder(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    datasets.Dataset.from_list([{"prompt": "a", "reference": "1"}]).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list([{"prompt": "b", "reference": None}]).to_parquet(str(folder / "test.parquet"))
    assert load_prompts(folder, char_tokenizer()) == (["a"], ["1"])
    with pytest.raises(UserError, match=r"prompts \[test\] record 0: missing field 'reference'"):
        load_prompts(folder, char_tokenizer(), split="test")


def test_read_records_names_each_record(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert [where for where, _ in read_records(path)] == [f"{path}:1", f"{path}:2"]


# ----------------------------------------------------------------------------- run config


def test_run_config_splits_and_eval_source():
    base = {"method": "dpo", "model": "m", "data": "org/pairs"}
    assert RunConfig(**base).data_split == "train" and RunConfig(**base).eval_source is None
    assert RunConfig(**base, eval_split="test").eval_source == ("org/pairs", "test")
    assert RunConfig(**base, eval_data="held.jsonl").eval_source == ("held.jsonl", "train")
    assert RunConfig(**base, eval_data="org/x", eval_split="validation").eval_source == ("org/x", "validation")
    with pytest.raises(UserError, match="eval_split is 'train', the split trained on"):
        RunConfig(**base, eval_split="train")
    with pytest.raises(UserError, match="data_split must be a split name such as train or test, got ''"):
        RunConfig(**base, data_split="")
    with pytest.raises(UserError, match="eval_data must be a path, a dataset id or null, got 3"):
        RunConfig(**base, eval_data=3)
