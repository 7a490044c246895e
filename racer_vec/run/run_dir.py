"""A run's directory and its bookkeeping (design §7): its lock (one writer per run, §8), config.json,
run_info.jsonl, metrics.jsonl and wandb. The checkpoints under it are racer_vec.run.checkpoints'.
No JAX at module level: train.py takes the lock before it imports JAX."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from racer_vec.config import TrainConfig, to_dict
from racer_vec.run.jsonl import append_jsonl
from racer_vec.run.provenance import machine_info, source_commit
from racer_vec.run.run_lock import RunLock
from racer_vec.write_failures import write_atomically


class RunDirectory:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.path = Path(cfg.resume) if cfg.resume else Path(cfg.runs_dir) / (cfg.run_name or default_run_name(cfg))
        self.checkpoints = self.path / "checkpoints"
        self.wandb_run = None
        self.run_lock: RunLock | None = None

    def lock(self) -> None:
        """Create the run directory if need be and hold its lock while this process trains in it
        (design §8). ConfigError (exit 2) when another process holds it or the place cannot be
        written; nothing has started yet."""
        if self.run_lock is None:
            flag = f"--resume {self.cfg.resume}" if self.cfg.resume else f"--runs-dir {self.cfg.runs_dir}"
            self.run_lock = RunLock(self.path, flag)

    def unlock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def open(self, env_steps: int) -> None:
        """Write the resolved config, record this session, start wandb (a start or a resume at `env_steps`).
        WriteFailed when a file cannot be written; the config.json before it stays as it was."""
        self.lock()
        write_atomically(self.path / "config.json", json.dumps(to_dict(self.cfg), indent=2) + "\n")
        # One line per start or resume: which code and machine produced which part of the run.
        session = {
            "started": datetime.now().isoformat(timespec="seconds"),
            "env_steps": env_steps,
            **source_commit(),
            "machine": machine_info(),
        }
        append_jsonl(self.path / "run_info.jsonl", session)
        self._init_wandb()

    def _init_wandb(self) -> None:
        if self.cfg.wandb_mode == "disabled":
            return
        import wandb

        self.wandb_run = wandb.init(
            project=self.cfg.wandb_project,
            name=self.path.name,
            id=self.path.name.replace("/", "_"),
            resume="allow",
            dir=str(self.path),
            mode=self.cfg.wandb_mode,
            config=to_dict(self.cfg),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict) -> None:
        """One metrics.jsonl line (and a wandb step); WriteFailed when it cannot be written."""
        append_jsonl(self.path / "metrics.jsonl", record)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["env_steps"])

    def close(self) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            wandb.teardown()  # its service process must not outlive the run (design §8)
            self.wandb_run = None


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.preset}_s{cfg.seed}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
