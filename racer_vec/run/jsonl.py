"""A run's JSON Lines logs, metrics.jsonl and run_info.jsonl (design §7, §10): the one writer and the
one reader every tool uses. No JAX here.

A process killed in the middle of a write leaves a torn line: half a JSON object, and no newline.
The writer starts every record on a new line, so a torn line never swallows the record after it;
the reader skips a torn line wherever it sits (a resumed run's appends follow it) with one warning
per file, and reads on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from racer_vec.config import ConfigError
from racer_vec.write_failures import os_error_reason, writing


def append_jsonl(path: Path, record: dict) -> None:
    """Append `record` as one line, on a line of its own even after a torn one. WriteFailed names
    `path` when the write fails (a full disk, say)."""
    line = (json.dumps(record) + "\n").encode()
    with writing(path), open(path, "a+b") as f:
        if f.tell() > 0:  # "a+" opens at the end
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def parse_jsonl(lines: list[bytes] | list[str], where: str, first_line: int | None = 1) -> list[dict]:
    """The records of `lines` (complete lines of a JSON Lines file, the first of them its line
    `first_line`, None where that is not known), blank ones skipped; a torn line (not a JSON object)
    is skipped with one warning naming `where`."""
    rows, torn = [], []
    for number, line in enumerate(lines, start=first_line or 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn.append(number)
    if torn:
        numbers = ", ".join(map(str, torn[:5])) + (", ..." if len(torn) > 5 else "")
        at = f" (line {numbers})" if first_line is not None else ""
        print(f"warning: {where}: skipped {len(torn)} torn line(s){at}, left by a process killed while writing",
              file=sys.stderr, flush=True)  # fmt: skip
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON Lines file (none if there is no file), torn lines skipped with a warning."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({os_error_reason(exc)})") from None
    return parse_jsonl(data.split(b"\n"), str(path))
