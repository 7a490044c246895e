"""Orbax checkpoints of a run: the agent pytree, the host-side counters with the config, the buffer.

Layout: `<run>/checkpoints/<env_steps>/{agent,state[,buffer]}`, written synchronously and atomically
by an orbax CheckpointManager that keeps the newest `keep` steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from racer_vec.config import ConfigError, TrainConfig, from_dict

# orbax logs every save at INFO through absl; a training run's output is its own progress.
logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, agent, state: dict, buffer=None) -> None:
        items = {"agent": ocp.args.StandardSave(agent), "state": ocp.args.JsonSave(state)}
        if buffer is not None:
            items["buffer"] = ocp.args.StandardSave(buffer)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

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
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.directory / str(step)}: checkpoint does not match this agent ({_first_line(exc)})"
            ) from None
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
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path.parent}: unreadable checkpoint ({_first_line(exc)})") from None
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


def locate(path: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, step) for a run dir, its checkpoints dir, or one step's dir."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise ConfigError(f"--checkpoint {path}: no checkpoints there")
    return path, steps[-1]


def read_state(directory: Path, step: int) -> dict:
    """The saved counters and config of one checkpoint, without touching the arrays."""
    path = Path(directory) / str(step) / "state" / "metadata"  # where orbax's JsonSave writes
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--checkpoint {path.parent.parent}: unreadable checkpoint state ({exc})") from None


def saved_config(directory: Path, step: int) -> TrainConfig:
    state = read_state(directory, step)
    if "config" not in state:
        raise ConfigError(f"--checkpoint {directory / str(step)}: not a racer-vec checkpoint (no config)")
    return from_dict(TrainConfig, state["config"])
