"""Helpers shared by the CLI tests: tiny model directories, JSONL and YAML writers."""

import json
from pathlib import Path

import yaml

from rftengine.toy import char_tokenizer, tiny_causal_lm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def save_tiny_model(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A 1-layer decoder and the char tokenizer saved as one Hugging Face directory."""
    tok = char_tokenizer(chat_template=chat_template)
    model = tiny_causal_lm(len(tok), seed=seed, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path
