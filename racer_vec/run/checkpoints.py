"""Orbax checkpoints of a run: the agent pytree, the host-side counters with the config, the buffer.

Layout: `<run>/checkpoints/<env_steps>/{agent,state[,buffer]}`, written synchronously and atomically
by an orbax CheckpointManager that keeps the newest `keep` steps, plus `files.json`: the size and
CRC-32 of every file of the step, written once orbax has finished. A step whose files do not
match it is damaged (design §10), found without reading a single array through orbax (whose failed
reads print tracebacks from its coroutines).
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from racer_vec.config import ConfigError, TrainConfig, from_dict

# orbax logs every save at INFO through absl; a training run's output is its own progress.
logging.getLogger("absl").setLevel(logging.WARNING)

MANIFEST = "files.json"
ITEMS = ("agent", "state", "buffer")
EVALUATION_ITEMS = ("agent", "state")
"""What evaluate.py reads of a checkpoint: a damaged buffer does not stop an evaluation."""


class DamagedCheckpoint(Exception):
    """A step with a missing, truncated or unreadable file; the message says which."""


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, agent, state: dict, buffer=None) -> None:
        items = {"agent": ocp.args.StandardSave(agent), "state": ocp.args.JsonSave(state)}
        if buffer is not None:
            items["buffer"] = ocp.args.StandardSave(buffer)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()
        _write_manifest(self.directory / str(step))

    def steps(self) -> list[int]:
        """Saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def verify(self, step: int, items=ITEMS) -> None:
        """DamagedCheckpoint unless the files of `items` in step `step` are as they were saved."""
        verify(self.directory / str(step), items)

    def restore_newest(self, agent_template, buffer_template=None):
        """(step, agent, state, buffer or None, damaged) of the newest step that restores intact;
        `damaged` lists the newer (step, reason) passed over. ConfigError when none is intact."""

        def attempt(step):
            self.verify(step)
            return self.restore(step, agent_template, buffer_template if self.has_buffer(step) else None)

        step, restored, damaged = first_intact(self.steps(), attempt, str(self.directory))
        return (step, *restored, damaged)

    def set_aside(self, steps) -> None:
        """Rename damaged steps to `<step>.damaged` (kept, not deleted), so that training from an
        older step can save those steps again."""
        for step in steps:
            path = self.directory / str(step)
            path.rename(path.with_name(f"{step}.damaged"))
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def has_buffer(self, step: int) -> bool:
        return (self.directory / str(step) / "buffer").is_dir()

    def restore(self, step: int, agent_template, buffer_template=None):
        """(agent, state, buffer or None); templates give the expected shapes and dtypes."""
        self._check_shapes(step, "agent", agent_template)
        if buffer_template is not None:
            self._check_shapes(step, "buffer", buffer_template)
        items = {
            "agent": ocp.args.StandardRestore(_abstract(agent_template)),
            "state": ocp.args.JsonRestore(),
        }
        if buffer_template is not None:
            items["buffer"] = ocp.args.StandardRestore(_abstract(buffer_template))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:  # tensorstore raises plain Exceptions for unreadable data
            # the shapes matched (checked above): the files are what failed
            _quiet_orbax_coroutines()
            raise DamagedCheckpoint(f"unreadable ({_first_line(exc)})") from None
        return restored["agent"], restored["state"], restored.get("buffer") if buffer_template is not None else None

    def _check_shapes(self, step: int, item: str, template) -> None:
        """ConfigError unless the saved arrays have the template's names and shapes.

        Checked from orbax's metadata before restoring: a restore that fails on a shape leaves
        orbax's other pending reads to print "Event loop is closed" tracebacks at exit.
        """
        path = self.directory / str(step) / item
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns that step-level metadata is missing: not needed here
        try:
            saved = ocp.StandardCheckpointer().metadata(path).item_metadata
            if saved is None:
                raise ValueError(f"no {item} metadata")
        except (OSError, ValueError) as exc:
            raise DamagedCheckpoint(f"{item} unreadable ({_first_line(exc)})") from None
        finally:
            absl.setLevel(level)
        saved_shapes = {_dotted(p): tuple(m.shape) for p, m in jax.tree.leaves_with_path(saved.tree)}
        wanted = {_dotted(p): tuple(x.shape) for p, x in jax.tree.leaves_with_path(template)}
        for name in sorted(wanted.keys() | saved_shapes.keys()):
            if wanted.get(name) != saved_shapes.get(name):
                raise ConfigError(
                    f"{path.parent}: checkpoint does not match this agent "
                    f"({item}.{name}: saved {saved_shapes.get(name)}, expected {wanted.get(name)})"
                )

    def close(self) -> None:
        self.manager.close()


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(root: Path) -> None:
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


def _quiet_orbax_coroutines() -> None:
    """After a failed read, orbax's abandoned read coroutines print "Exception ignored" tracebacks
    when they are collected; the failure has been reported in one line already."""
    default = sys.unraisablehook

    def hook(unraisable):
        if "coroutine" not in repr(unraisable.object):
            default(unraisable)

    sys.unraisablehook = hook


def locate(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoints directory, step) for one step's directory; (checkpoints directory, None) for a
    run directory or its checkpoints directory (then the caller picks the newest intact step)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and not any(p.name.isdigit() for p in path.iterdir()):
        return path.parent, int(path.name)
    if not any(p.name.isdigit() for p in path.iterdir()):
        raise ConfigError(f"--checkpoint {path}: no checkpoints there")
    return path, None


def newest_intact(directory: Path, items=EVALUATION_ITEMS) -> tuple[int, list[tuple[int, str]]]:
    """(newest step whose `items` are intact, the newer (step, reason) passed over)."""
    steps = sorted((int(p.name) for p in Path(directory).iterdir() if p.name.isdigit()), reverse=True)
    step, _, damaged = first_intact(steps, lambda s: verify(Path(directory) / str(s), items), f"--checkpoint {directory}")
    return step, damaged


def first_intact(steps, attempt, where: str):
    """(step, attempt(step), the newer (step, reason) passed over) for the first of `steps` (newest
    first) whose `attempt` raises no DamagedCheckpoint; ConfigError naming `where` when none does."""
    damaged = []
    for step in steps:
        try:
            return step, attempt(step), damaged
        except DamagedCheckpoint as exc:
            damaged.append((step, str(exc)))
    reasons = "; ".join(f"{step}: {reason}" for step, reason in damaged) or "no checkpoint"
    raise ConfigError(f"{where}: no intact checkpoint ({reasons})")


def damage_warning(damaged: list[tuple[int, str]], used: int) -> str:
    """One line naming the damaged steps and the step used instead."""
    steps = ", ".join(str(step) for step, _ in damaged)
    noun = "checkpoint" if len(damaged) == 1 else "checkpoints"
    return f"warning: {noun} {steps} damaged ({damaged[0][1]}); using checkpoint {used} instead"


def _state_json(root: Path) -> dict:
    path = root / "state" / "metadata"  # where orbax's JsonSave writes
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"state unreadable ({_first_line(exc)})") from None


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
