"""Writes that fail (design §8, §10): a full disk, a file-size limit, a place that cannot be written.
A failed write is one line naming the path and the reason (WriteFailed), never a traceback, and
never costs an intact file: whole files are written beside their old version and renamed over it.
An output place is checked before any work starts (check_output_dir): one line, exit 2. No JAX here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

from racer_vec.config import ConfigError


class WriteFailed(Exception):
    """A write failed; the message names the path and the reason (e.g. No space left on device)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot write {path} ({reason})")
        self.path, self.reason = Path(path), reason


def error_exit(exc: ConfigError | WriteFailed) -> int:
    """A tool's last word on a failure: one line; exit 2 for the user's mistake, 1 for a write the
    machine refused."""
    print(f"error: {exc}", file=sys.stderr)
    return 1 if isinstance(exc, WriteFailed) else 2


def os_error_code(exc: BaseException | None) -> int | None:
    """The errno of an OSError in `exc`'s chain, or of the OS error a tensorstore (orbax) message
    names (`[os_error_code='28']`); None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        match = re.search(r"os_error_code='?(\d+)", str(exc))
        if match:
            return int(match.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_reason(exc: BaseException) -> str:
    """The reason in a few words: the OS error's text where there is one, else the message's first line."""
    code = os_error_code(exc)
    if code is not None:
        return os.strerror(code)
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


@contextlib.contextmanager
def writing(path: Path | str):
    """An OSError inside the block becomes WriteFailed naming `path`."""
    try:
        yield
    except OSError as exc:
        raise WriteFailed(path, os_error_reason(exc)) from None


def write_atomically(path: Path | str, data: str | bytes) -> None:
    """Write a whole file beside its old version and rename it over it: a failed write leaves the old
    file as it was (and no partial one). WriteFailed names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            tmp.replace(path)
    except WriteFailed:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be written in `directory` (created if need be), or None when they can: a file
    is created there and removed at once."""
    if directory.exists() and not directory.is_dir():
        return f"{directory} is not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"cannot write there ({os_error_reason(exc)})"
    return None


def check_output_dir(flag: str, path: Path | str) -> Path:
    """Before any work starts: ConfigError naming `flag`, `path` and the reason unless files can be
    written in the directory `path` (created if need be)."""
    path = Path(path)
    reason = _unwritable(path)
    if reason is not None:
        raise ConfigError(f"{flag} {path}: {reason}")
    return path


def check_output_file(flag: str, path: Path | str) -> Path:
    """check_output_dir for the file `path`: its directory, and that it is not a directory itself."""
    path = Path(path)
    reason = f"{path} is a directory, not a file" if path.is_dir() else _unwritable(path.parent)
    if reason is not None:
        raise ConfigError(f"{flag} {path}: {reason}")
    return path
