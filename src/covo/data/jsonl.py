"""JSON-lines problem sets: one object per line with a problem and (optionally) an answer."""

from __future__ import annotations

import json
from pathlib import Path

PACKAGED = "package:"


class DataError(ValueError):
    pass


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
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            if problem_key not in record:
                raise DataError(f"{path}:{lineno}: missing key '{problem_key}'")
            if answer_key is not None and answer_key not in record:
                raise DataError(f"{path}:{lineno}: missing key '{answer_key}'")
            answer = record[answer_key] if answer_key is not None else None
            items.append(
                {
                    "problem": str(record[problem_key]),
                    "answer": None if answer is None else str(answer),
                }
            )
            if max_samples is not None and len(items) >= max_samples:
                break
    if not items:
        raise DataError(f"{path}: no items")
    return items


def packaged_path(name: str) -> Path:
    return Path(__file__).parent / "files" / f"{name}.jsonl"
