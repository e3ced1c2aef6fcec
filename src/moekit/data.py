"""Text for evaluation, calibration and training, read from a file or a folder.

`load_text` understands three inputs: a .jsonl file (one JSON object per line, the text in one
field), any other file (read whole as UTF-8 text: one document), and a folder (every file under
it, in sorted path order, each read by the same two rules; hidden files and folders are skipped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MoekitError


def load_text(path: str | Path, field: str = "text") -> list[str]:
    """Returns the non-empty documents at `path` (a .txt or other text file, a .jsonl file whose
    objects carry the text in `field`, or a folder of such files), in a stable order."""
    path = Path(path)
    if not path.exists():
        raise MoekitError(f"{path}: not found; give a .txt file, a .jsonl file or a folder of them")
    files = _files_under(path) if path.is_dir() else [path]
    docs: list[str] = []
    for file in files:
        docs += _read_jsonl(file, field) if file.suffix == ".jsonl" else [_read_utf8(file)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MoekitError(f"{path}: contains no text (every file or record is empty)")
    return docs


def _files_under(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):  # does not follow symlinked folders: no loops
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / n for n in names if not n.startswith(".")]
    if not found:
        raise MoekitError(f"{folder}: the folder has no files; put .txt or .jsonl files in it")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoekitError(f"{file}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or "
                          "move it out of the folder") from None


def _read_jsonl(file: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_read_utf8(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoekitError(f"{file}:{number}: not valid JSON ({e.msg}); a .jsonl file holds one "
                              "JSON object per line") from None
        if not isinstance(record, dict):
            raise MoekitError(f"{file}:{number}: expected a JSON object like {{\"{field}\": \"...\"}}, "
                              f"got {type(record).__name__}")
        if field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise MoekitError(f"{file}:{number}: no \"{field}\" field (fields: {keys}); "
                              f"pass the one that holds the text: load_text(path, field=...)")
        text = record[field]
        if not isinstance(text, str):
            raise MoekitError(f"{file}:{number}: field \"{field}\" holds {type(text).__name__}, not text")
        docs.append(text)
    return docs


def text_tokens(docs: list[str], tokenizer):
    """Returns the token stream [M] (int64 tensor) of docs, each followed by the tokenizer's eos
    token when it has one: what evaluation and calibration read."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
