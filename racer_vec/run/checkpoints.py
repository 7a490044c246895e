"""Orbax checkpoints of a run: the agent pytree, the host-side counters with the config, the buffer.

Written synchronously and atomically by an orbax CheckpointManager that keeps the newest `keep`
steps and, with `keep_every`, the milestones a study evaluates later (design §7); each step's files
are then listed with their CRCs (racer_vec.run.checkpoint_files, which also finds the steps and
checks them without JAX).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from racer_vec.config import ConfigError
from racer_vec.run import checkpoint_files
from racer_vec.run.checkpoint_files import ITEMS, DamagedCheckpoint, first_intact, first_line, verify
from racer_vec.write_failures import WriteFailed, os_error_code, os_error_reason

# orbax logs every save at INFO through absl; a training run's output is its own progress.
logging.getLogger("absl").setLevel(logging.WARNING)


class _QuietWriteFailures(logging.Filter):
    """A failed write (a full disk, say) is logged by orbax's threads and asyncio's tasks with a
    traceback each, before the save raises it; Checkpointer.save reports it in one line (design §10)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return os_error_code(exc) is None and "os_error_code=" not in record.getMessage()


for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_QuietWriteFailures())


@dataclasses.dataclass
class Milestones(ocm.PreservationPolicy):
    """Preserves the first checkpoint at or after each positive multiple of `every` transitions.

    Not orbax's EveryNSteps (step % every == 0): steps advance by num_envs and a stop signal saves
    between intervals, so a milestone's step need not be a multiple. The first step of a window
    stays the first, since this policy never lets it go.
    """

    every: int

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        seen, preserve = set(), []
        for ckpt in checkpoints:  # oldest first
            window = ckpt.step // self.every
            preserve.append(window > 0 and window not in seen)
            seen.add(window)
        return preserve


class Checkpointer:
    def __init__(self, directory: Path, keep: int, keep_every: int = 0):
        self.directory = Path(directory).absolute()
        policies = [ocm.LatestN(n=keep)] + ([Milestones(keep_every)] if keep_every else [])
        self.options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies), enable_async_checkpointing=False, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        self.failed: int | None = None
        """The step whose save failed (a full disk, say)."""

    def latest_step(self) -> int | None:
        return next(iter(self.steps()), None)

    def save(self, step: int, agent, state: dict, buffer=None) -> None:
        """Save `step`; WriteFailed naming it when a write fails (a full disk, say): what it had
        written is removed, the steps before it stay as they were (design §10)."""
        items = {"agent": ocp.args.StandardSave(agent), "state": ocp.args.JsonSave(state)}
        if buffer is not None:
            items["buffer"] = ocp.args.StandardSave(buffer)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()
            checkpoint_files.write_manifest(self.directory / str(step))
        except Exception as exc:  # tensorstore's write errors are ValueErrors that name the OS error
            if os_error_code(exc) is None:
                raise  # not a failed write: an error of ours, with its traceback
            self._failed_save(step)
            raise WriteFailed(self.directory / str(step), os_error_reason(exc)) from None

    def _failed_save(self, step: int) -> None:
        """After a failed save, the step's partial files are removed (orbax writes a step under a
        temporary name)."""
        self.failed = step
        self._remove_partial()
        (self.directory / str(step) / f"{checkpoint_files.MANIFEST}.tmp").unlink(missing_ok=True)

    def _remove_partial(self, settle: float = 0.5, timeout: float = 5.0) -> None:
        """Remove the failed step's temporary directory, until it stays gone for `settle` s: the
        writes still in flight when the save failed recreate what they write into."""
        deadline, gone_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            partial = list(self.directory.glob(f"{self.failed}.orbax-checkpoint-tmp*"))
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
            if partial:
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since >= settle:
                return
            time.sleep(0.05)

    def steps(self) -> list[int]:
        """Saved steps, newest first."""
        return checkpoint_files.steps(self.directory)

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
            raise DamagedCheckpoint(f"unreadable ({first_line(exc)})") from None
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
            raise DamagedCheckpoint(f"{item} unreadable ({first_line(exc)})") from None
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
        try:
            self.manager.close()
        except Exception:
            if self.failed is None:
                raise  # after a failed save, orbax's close re-raises that failure, reported already
        if self.failed is not None:
            self._remove_partial()


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _quiet_orbax_coroutines() -> None:
    """After a failed read, orbax's abandoned read coroutines print "Exception ignored" tracebacks
    when they are collected; the failure has been reported in one line already."""
    default = sys.unraisablehook

    def hook(unraisable):
        if "coroutine" not in repr(unraisable.object):
            default(unraisable)

    sys.unraisablehook = hook


def _quiet_closed_event_loops() -> None:
    """When a save fails, the writes still in flight finish into orbax's closed event loop, and
    tensorstore prints an "Event loop is closed" traceback for each (through sys.excepthook, or as
    unraisable), some before the save raises; Checkpointer.save reports the failure in one line."""

    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, exc, tb: None if closed_loop(exc) else excepthook(kind, exc, tb)
    sys.unraisablehook = lambda unraisable: None if closed_loop(unraisable.exc_value) else unraisablehook(unraisable)


_quiet_closed_event_loops()
