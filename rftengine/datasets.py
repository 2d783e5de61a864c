"""Reading the user's files for `rftengine train`: data sets, constitutions, reward specs.

Data (`data:` / `eval_data:`) is a local file, a folder, a `save_to_disk` folder or a Hugging Face
Hub dataset id found in the local cache:

- JSON Lines (`.jsonl`, and any unknown suffix) and JSON (`.json`: an array of objects, or JSON
  Lines) are read here, so that every problem names the file and the line
  (`data/pairs.jsonl:7: missing field 'rejected'`) or, for an array, the record's index
  (`data/pairs.json: record 6: ...`);
- Parquet, CSV and Arrow files, folders of data files (splits named by the file names, e.g.
  `train.jsonl`/`test.parquet` or `data/train-*.parquet`, as `datasets` resolves them),
  `save_to_disk` folders and hub ids are read with the `datasets` library; errors name the row
  (`org/pairs [train] record 6: ...`, rows counted from 0).

Records come in TRL's formats: preference pairs with an explicit prompt, or with the prompt
implicit in `chosen`/`rejected` (their shared prefix); prompt-only rows (extra columns kept);
each text field a string (standard) or a list of chat messages (conversational).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from rftengine.chat import require_chat_template
from rftengine.config import decode_utf8, read_text
from rftengine.errors import UserError

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
# Files read with `datasets`, by suffix -> its builder; JSON and JSON Lines are read here.
TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
JSON_SUFFIXES = (".jsonl", ".json")
# A hub dataset id: `name` or `owner/name` (what is not a local path and looks like one).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; each record must be a JSON object of
    UTF-8 text (a string holding a lone surrogate, which JSON's \\uXXXX escapes allow but no
    tokenizer can encode, is rejected here, where the line is known)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    records = []
    offset = 0
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                line = decode_utf8(raw, f"{path}:{lineno}", offset, with_line=False)
                offset += len(raw)
                if line.strip():
                    records.append((lineno, _parse_record(line, f"{path}:{lineno}")))
    except OSError as exc:
        raise UserError(f"data file {path}: {exc.strerror or exc}") from None
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def _parse_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply (over {sys.getrecursionlimit()} levels)") from None
    return _check_object(record, where)


def _check_object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, value in record.items():
        bad = _lone_surrogate([name, value])
        if bad is not None:
            raise UserError(  # repr: the name itself may hold the surrogate, which stderr cannot print
                f"{where}: field {name!r} holds a lone surrogate ({bad}), which is not text: "
                "fix the \\uXXXX escape"
            )
    return record


def _lone_surrogate(value) -> str | None:
    """A lone surrogate (as \\uXXXX) in the strings of `value` (keys included), or None.
    Iterative: a record may be nested nearly as deep as the recursion limit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"\\u{ord(item[exc.start]):04x}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


# ----------------------------------------------------------------------------- sources


def read_records(spec: str | Path, split: str = "train") -> list[tuple[str, dict]]:
    """(where, record) for every record of split `split` of `spec`: a local file, a folder of data
    files, a `save_to_disk` folder or a hub dataset id in the local Hugging Face cache (see the
    module docstring). `where` names the record in errors: `pairs.jsonl:7`, `pairs.json: record 6`,
    `org/pairs [train] record 6`. A single file holds one split, `train`."""
    path = Path(spec)
    if path.is_dir():
        return _read_folder(path, split)
    if path.is_file():
        if split != "train":
            raise UserError(
                f"{path} is a single file, whose only split is 'train'; got split {split!r}: give a folder "
                f"with {split} files (e.g. {split}.jsonl), a dataset id with that split, or a file of its own"
            )
        return _read_file(path)
    if HUB_ID.fullmatch(str(spec)) and path.suffix.lower() not in (*JSON_SUFFIXES, *TABLE_BUILDERS):
        return _read_hub(str(spec), split)
    raise UserError(f"data file not found: {path}")


def _read_file(path: Path) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix in TABLE_BUILDERS:
        return _read_table([str(path)], str(path))
    if suffix == ".json" and _starts_with_bracket(path):
        return _read_json_array(path)
    return [(f"{path}:{lineno}", record) for lineno, record in read_jsonl(path)]


def _starts_with_bracket(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise UserError(f"data file {path}: {exc.strerror or exc}") from None
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _read_json_array(path: Path) -> list[tuple[str, dict]]:
    """A JSON file holding one array of objects; errors name the record by its index."""
    text = read_text(path, "data file").removeprefix("\ufeff")  # a byte-order mark is not JSON
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply (over {sys.getrecursionlimit()} levels)") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON array of objects or JSON Lines, got {type(items).__name__}")
    if not items:
        raise UserError(f"{path}: no records (the array is empty)")
    return [(f"{path}: record {i}", _check_object(item, f"{path}: record {i}")) for i, item in enumerate(items)]


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_folder(path: Path, split: str) -> list[tuple[str, dict]]:
    datasets = _datasets()
    if _is_saved_dataset(path):
        with _as_user_error(str(path)):
            saved = datasets.load_from_disk(str(path))  # Arrow files and JSON: nothing is unpickled
        if isinstance(saved, datasets.DatasetDict):
            return _table_records(_pick_split(saved, split, str(path)), f"{path} [{split}]")
        own = str(saved.split) if saved.split is not None else "train"
        if split not in ("train", own):
            raise UserError(f"{path} is a saved dataset of one split ({own!r}); got split {split!r}")
        return _table_records(saved, str(path))
    with _as_user_error(str(path)):
        files = datasets.load_dataset_builder(str(path)).config.data_files or {}
    files = {str(name): sorted(paths) for name, paths in files.items()}
    if split not in files:
        raise UserError(f"{path}: no split {split!r} (the folder's splits: {', '.join(files) or 'none'})")
    if all(Path(f).suffix.lower() not in TABLE_BUILDERS for f in files[split]):
        # Read here, to name the file and the line of a malformed record.
        return [item for f in files[split] for item in _read_file(Path(f))]
    return _read_table(files[split], f"{path} [{split}]")


def _read_table(files: list[str], where: str) -> list[tuple[str, dict]]:
    """Parquet, CSV or Arrow files of one split, read with `datasets` (only this split's files:
    `datasets` would otherwise want every split of a folder to have the same columns)."""
    builders = {TABLE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if len(builders) != 1 or None in builders:
        raise UserError(f"{where}: the split mixes file types ({', '.join(sorted({Path(f).suffix for f in files}))}); "
                        "give one type per split")
    with _as_user_error(where):
        table = _datasets().load_dataset(builders.pop(), data_files=files, split="train")
    return _table_records(table, where)


def _read_hub(name: str, split: str) -> list[tuple[str, dict]]:
    """A hub dataset from the local cache: a snapshot downloaded with `hf download --repo-type
    dataset` (read as a folder), or one that `datasets.load_dataset` prepared before. Nothing is
    downloaded, online or not (as for models): a run reads the data it was given, and without a
    network `datasets` would retry for most of a minute before giving up."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        snapshot = None
    if snapshot is not None:
        return _read_folder(Path(snapshot), split)
    datasets = _datasets()
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # what HF_HUB_OFFLINE=1 sets at import: the cache only
    try:
        loaded = datasets.load_dataset(name)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError):
        raise UserError(
            f"data {name!r} is not a local file or folder, and not a dataset in the local Hugging Face "
            f"cache ({datasets.config.HF_DATASETS_CACHE}, hub cache {_hub_cache()}); download it once with "
            f"network access (`hf download --repo-type dataset {name}`) or give a local path"
        ) from None
    except (ValueError, OSError) as exc:
        raise UserError(f"data {name}: {exc}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return _table_records(_pick_split(loaded, split, name), f"{name} [{split}]")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _pick_split(splits, split: str, where: str):
    if split not in splits:
        raise UserError(f"{where}: no split {split!r} (its splits: {', '.join(map(str, splits)) or 'none'})")
    return splits[split]


def _table_records(table, where: str) -> list[tuple[str, dict]]:
    if len(table) == 0:
        raise UserError(f"{where}: no records (the split is empty)")
    return [(f"{where} record {i}", row) for i, row in enumerate(table)]


def _datasets():
    """The `datasets` module, imported where used (it takes about a second). Its own progress
    bars are drawn only where the training bars are (a terminal): in a log file they would
    leave carriage returns."""
    import datasets

    from rftengine.methods.loop import interactive_terminal

    if not interactive_terminal():
        datasets.disable_progress_bars()
    return datasets


class _as_user_error:
    """`datasets`' errors about a user's file or folder (missing split, unreadable table, empty
    folder) as a UserError naming `where`."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        errors = (ValueError, OSError, TypeError, _datasets().exceptions.DatasetsError)
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, errors):
            return False
        cause = exc.__cause__ or exc  # DatasetGenerationError: the reader's error is its cause
        raise UserError(f"{self.where}: cannot read the data ({type(cause).__name__}: {cause})") from None


# ----------------------------------------------------------------------------- records


def _check_messages(value, where, name) -> None:
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise UserError(
                f"{where}: field '{name}' message {i} must be an object with string 'role' and 'content', "
                f"got {message!r}"
            )
    if not value:
        raise UserError(f"{where}: field '{name}' is an empty message list")


def _check_text_or_messages(record, where, name) -> bool:
    """Checks one field; True when it is a chat-message list."""
    if name not in record:
        raise UserError(f"{where}: missing field '{name}' (present: {', '.join(sorted(record)) or 'none'})")
    value = record[name]
    if isinstance(value, str):
        return False
    if isinstance(value, list):
        _check_messages(value, where, name)
        return True
    raise UserError(f"{where}: field '{name}' must be a string or a list of chat messages, got {type(value).__name__}")


def _require_chat_template(tokenizer, where) -> None:
    """The one rule (`rftengine.chat.has_chat_template`: an empty template is none), checked
    here so that the error names the record."""
    try:
        require_chat_template(tokenizer, f"{where}: the data")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def extract_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of a pair whose prompt is implicit: the shared beginning of
    `chosen` and `rejected`. Chat messages: the leading messages both share. Text: the common
    prefix, less a trailing space, which stays with the responses (a BPE tokenizer joins a space
    to the word after it). ValueError when nothing is shared or a response would be empty."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError("chosen and rejected must both be text or both chat messages to share an implicit prompt")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str) and shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    unit = "characters" if isinstance(chosen, str) else "messages"
    if shared == 0:
        raise ValueError(f"chosen and rejected share no leading {unit}, so there is no implicit prompt: add a 'prompt' field")
    if shared in (len(chosen), len(rejected)):
        raise ValueError(
            f"one of chosen and rejected is the beginning of the other ({shared} shared {unit}): no response "
            "is left after the implicit prompt; add a 'prompt' field"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _preference(record: dict, where: str, tokenizer) -> dict:
    if record.get("prompt") is None and "chosen" in record and "rejected" in record:
        for name in ("chosen", "rejected"):
            _check_text_or_messages(record, where, name)
        try:
            prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"])
        except ValueError as exc:
            raise UserError(f"{where}: implicit prompt: {exc}") from None
        record = record | {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    chat = [_check_text_or_messages(record, where, name) for name in PREFERENCE_FIELDS]
    if any(chat):
        _require_chat_template(tokenizer, where)
    pair = {name: record[name] for name in PREFERENCE_FIELDS}
    if record.get("margin") is not None:
        if isinstance(record["margin"], bool) or not isinstance(record["margin"], (int, float)):
            raise UserError(f"{where}: field 'margin' must be a number, got {record['margin']!r}")
        pair["margin"] = float(record["margin"])
    return pair


def load_preferences(spec: str | Path, tokenizer, split: str = "train") -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected"[, "margin"]} of split `split` of `spec`
    (a file, folder or dataset id: see `read_records`), checked record by record.

    Each text field is a string or a list of chat messages ({"role", "content"}); chat records are
    passed on as messages (the methods render them with the tokenizer's chat template), after
    checking here that the tokenizer has one, so the error can name the record. A record without
    a prompt has it implicit in chosen and rejected: their shared beginning (`extract_prompt`).
    """
    return [_preference(record, where, tokenizer) for where, record in read_records(spec, split)]


def load_prompt_rows(spec: str | Path, tokenizer, split: str = "train") -> list[dict]:
    """Prompt rows of split `split` of `spec`: ``[{"prompt": str | messages, <column>: value,
    ...}]``, "prompt" first, then every other column of the data (a column some records lack is
    None there, as in a `datasets` table), for reward functions that take dataset columns.

    "reference" (passed to reward functions as ``references=``) must be in every record or none:
    an error names the first record without one.
    """
    records = read_records(spec, split)
    columns = {"prompt": None}
    for where, record in records:
        if _check_text_or_messages(record, where, "prompt"):
            _require_chat_template(tokenizer, where)
        columns.update(dict.fromkeys(record))
    if "reference" in columns:
        missing = next((where for where, record in records if record.get("reference") is None), None)
        if missing is not None:
            raise UserError(f"{missing}: missing field 'reference' (other records have one; give it to every record or none)")
    return [{name: record.get(name) for name in columns} for _, record in records]


def load_prompts(spec: str | Path, tokenizer, split: str = "train") -> tuple[list, list | None]:
    """Prompts {"prompt"} (a string or chat messages) and the optional "reference" answers of
    split `split` of `spec` (`load_prompt_rows` keeps the other columns too).

    Returns (prompts, references); references is None when no record has one, and an error
    names the first record without one when only some records do.
    """
    rows = load_prompt_rows(spec, tokenizer, split)
    prompts = [row["prompt"] for row in rows]
    return prompts, ([row["reference"] for row in rows] if "reference" in rows[0] else None)
