"""A run's checkpoints as files (design §10): which steps there are, whether a step is intact, its
saved counters and config. No JAX here (the sweep reads these too); racer_vec.run.checkpoints
writes and restores the steps with orbax.

Layout: `<run>/checkpoints/<env_steps>/{agent,state[,buffer]}` plus `files.json`: the size and
CRC-32 of every file of the step, written once orbax has finished. A step whose files do not match
it is damaged, found without reading a single array through orbax (whose failed reads print
tracebacks from its coroutines).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from racer_vec.config import ConfigError, TrainConfig, from_dict

MANIFEST = "files.json"
ITEMS = ("agent", "state", "buffer")
EVALUATION_ITEMS = ("agent", "state")
"""What evaluate.py reads of a checkpoint: a damaged buffer does not stop an evaluation."""


class DamagedCheckpoint(Exception):
    """A step with a missing, truncated or unreadable file; the message says which."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def steps(directory: Path) -> list[int]:
    """The steps saved in a checkpoints directory, newest first: orbax writes a step under a
    temporary name and then renames it, and a damaged step set aside is `<step>.damaged`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(root: Path) -> None:
    """files.json of the step directory `root`: every file's size and CRC-32."""
    paths = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(MANIFEST)]
    files = {str(p.relative_to(root)): [p.stat().st_size, _crc(p)] for p in paths}
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(files, indent=0) + "\n")
    tmp.replace(root / MANIFEST)


def verify(root: Path, items=ITEMS) -> None:
    """DamagedCheckpoint unless every file of the step directory `root` that belongs to `items` (or
    to the step itself) has its saved size and CRC. A step saved before manifests existed only
    needs its items' directories and a readable state."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        for item in items[:2]:
            if not (root / item).is_dir():
                raise DamagedCheckpoint(f"{item}/ is missing")
        _state_json(root)
        return
    try:
        files = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise DamagedCheckpoint(f"{MANIFEST} is unreadable") from None
    for name, (size, crc) in files.items():
        item = name.split("/")[0] if "/" in name else None
        if item is not None and item not in items:
            continue
        path = root / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise DamagedCheckpoint(f"{name} has {actual} bytes of {size}")
        if _crc(path) != crc:
            raise DamagedCheckpoint(f"{name} is corrupted")


def locate(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoints directory, step) for one step's directory; (checkpoints directory, None) for a
    run directory or its checkpoints directory (then the caller picks the newest intact step)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and not steps(path):
        return path.parent, int(path.name)
    if not steps(path):
        raise ConfigError(f"--checkpoint {path}: no checkpoints there")
    return path, None


def newest_intact(directory: Path, items=EVALUATION_ITEMS) -> tuple[int, list[tuple[int, str]]]:
    """(newest step whose `items` are intact, the newer (step, reason) passed over)."""
    directory = Path(directory)
    where = f"--checkpoint {directory}"
    step, _, damaged = first_intact(steps(directory), lambda s: verify(directory / str(s), items), where)
    return step, damaged


def first_intact(candidates, attempt, where: str):
    """(step, attempt(step), the newer (step, reason) passed over) for the first of `candidates`
    (newest first) whose `attempt` raises no DamagedCheckpoint; ConfigError naming `where` when none does."""
    damaged = []
    for step in candidates:
        try:
            return step, attempt(step), damaged
        except DamagedCheckpoint as exc:
            damaged.append((step, str(exc)))
    reasons = "; ".join(f"{step}: {reason}" for step, reason in damaged) or "no checkpoint"
    raise ConfigError(f"{where}: no intact checkpoint ({reasons})")


def damage_warning(damaged: list[tuple[int, str]], used: int) -> str:
    """One line naming the damaged steps and the step used instead."""
    names = ", ".join(str(step) for step, _ in damaged)
    noun = "checkpoint" if len(damaged) == 1 else "checkpoints"
    return f"warning: {noun} {names} damaged ({damaged[0][1]}); using checkpoint {used} instead"


def _state_json(root: Path) -> dict:
    path = root / "state" / "metadata"  # where orbax's JsonSave writes
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"state unreadable ({first_line(exc)})") from None


def read_state(directory: Path, step: int) -> dict:
    """The saved counters and config of one checkpoint, without touching the arrays."""
    try:
        return _state_json(Path(directory) / str(step))
    except DamagedCheckpoint as exc:
        raise ConfigError(f"--checkpoint {Path(directory) / str(step)}: damaged checkpoint ({exc})") from None


def saved_config(directory: Path, step: int) -> TrainConfig:
    state = read_state(directory, step)
    if "config" not in state:
        raise ConfigError(f"--checkpoint {directory / str(step)}: not a racer-vec checkpoint (no config)")
    return from_dict(TrainConfig, state["config"])
