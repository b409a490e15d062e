"""JSON-lines problem sets: one object per line with a problem and (optionally) an answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from covo.infra.errors import DataError

PACKAGED = "package:"


def json_objects(path: Path, required: list[str], what: str = "file") -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) per non-blank line, read lazily; a malformed line or a missing
    required key raises `DataError` naming file and line. Needs no trailing newline."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object")
            for key in required:
                if key not in record:
                    raise DataError(f"{where}: missing key '{key}'")
            yield where, record


def read_jsonl(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str | None = "answer",
    max_samples: int | None = None,
) -> list[dict]:
    """Items `{"problem": str, "answer": str | None}`; a bad line raises naming file and line.

    `path` may name a problem set shipped with the package: `package:gsm8k`, `package:math500`.
    """
    path = packaged_path(path[len(PACKAGED) :]) if str(path).startswith(PACKAGED) else path
    path = Path(path).expanduser()
    items = []
    required = [problem_key] if answer_key is None else [problem_key, answer_key]
    for _, record in json_objects(path, required, what="data file"):
        answer = record[answer_key] if answer_key is not None else None
        items.append(
            {"problem": str(record[problem_key]), "answer": None if answer is None else str(answer)}
        )
        if max_samples is not None and len(items) >= max_samples:
            break
    if not items:
        raise DataError(f"{path}: no items")
    return items


def packaged_path(name: str) -> Path:
    return Path(__file__).parent / "files" / f"{name}.jsonl"
