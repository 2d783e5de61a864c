"""Reading the user's files for `rftengine train`: JSONL data, constitutions, reward specs.

Every problem is reported as a UserError that names the file and, for JSONL, the line:
`data/pairs.jsonl:7: missing field 'rejected'`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rftengine.config import UserError, decode_utf8

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


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
                    records.append((lineno, _parse_record(line, path, lineno)))
    except OSError as exc:
        raise UserError(f"data file {path}: {exc.strerror or exc}") from None
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def _parse_record(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{path}:{lineno}: JSON nested too deeply (over {sys.getrecursionlimit()} levels)") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    for name, value in record.items():
        bad = _lone_surrogate([name, value])
        if bad is not None:
            raise UserError(  # repr: the name itself may hold the surrogate, which stderr cannot print
                f"{path}:{lineno}: field {name!r} holds a lone surrogate ({bad}), which is not text: "
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


def _is_messages(value) -> bool:
    return isinstance(value, list)


def _check_messages(value, path, lineno, name) -> None:
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise UserError(
                f"{path}:{lineno}: field '{name}' message {i} must be an object with string 'role' and 'content', "
                f"got {message!r}"
            )
    if not value:
        raise UserError(f"{path}:{lineno}: field '{name}' is an empty message list")


def _check_text_or_messages(record, path, lineno, name) -> bool:
    """Checks one field; True when it is a chat-message list."""
    if name not in record:
        raise UserError(f"{path}:{lineno}: missing field '{name}' (present: {', '.join(sorted(record)) or 'none'})")
    value = record[name]
    if isinstance(value, str):
        return False
    if _is_messages(value):
        _check_messages(value, path, lineno, name)
        return True
    raise UserError(f"{path}:{lineno}: field '{name}' must be a string or a list of chat messages, got {type(value).__name__}")


def _require_chat_template(tokenizer, path, lineno) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            f"{path}:{lineno}: the data has chat messages but the tokenizer has no chat template; "
            "give a tokenizer directory with one (tokenizer_config.json 'chat_template') or use plain text"
        )


def load_preferences(path: str | Path, tokenizer) -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected"[, "margin"]}, checked line by line.

    Each text field is a string or a list of chat messages ({"role", "content"}); chat records are
    passed on as messages (the methods render them with the tokenizer's chat template), after
    checking here that the tokenizer has one, so the error can name the line.
    """
    pairs = []
    for lineno, record in read_jsonl(path):
        chat = [_check_text_or_messages(record, path, lineno, name) for name in PREFERENCE_FIELDS]
        if any(chat):
            _require_chat_template(tokenizer, path, lineno)
        pair = {name: record[name] for name in PREFERENCE_FIELDS}
        if record.get("margin") is not None:
            if isinstance(record["margin"], bool) or not isinstance(record["margin"], (int, float)):
                raise UserError(f"{path}:{lineno}: field 'margin' must be a number, got {record['margin']!r}")
            pair["margin"] = float(record["margin"])
        pairs.append(pair)
    return pairs


def load_prompts(path: str | Path, tokenizer) -> tuple[list, list | None]:
    """Prompts {"prompt"} (a string or chat messages) and the optional "reference" answers.

    Returns (prompts, references); references is None when no record has one, and an error
    names the first line without one when only some records do.
    """
    prompts, references = [], []
    for lineno, record in read_jsonl(path):
        if _check_text_or_messages(record, path, lineno, "prompt"):
            _require_chat_template(tokenizer, path, lineno)
        prompts.append(record["prompt"])
        references.append((lineno, record.get("reference")))
    given = [ref is not None for _, ref in references]
    if not any(given):
        return prompts, None
    if not all(given):
        lineno = next(n for n, ref in references if ref is None)
        raise UserError(f"{path}:{lineno}: missing field 'reference' (other records have one; give it to every record or none)")
    return prompts, [ref for _, ref in references]
