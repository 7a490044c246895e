"""A run's directory and its bookkeeping (design §7): config.json, run_info.jsonl, metrics.jsonl
and wandb. The checkpoints under it are racer_vec.run.checkpoints'."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from racer_vec.config import TrainConfig, to_dict
from racer_vec.run.provenance import machine_info, source_commit


class RunDirectory:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.path = Path(cfg.resume) if cfg.resume else Path(cfg.runs_dir) / (cfg.run_name or default_run_name(cfg))
        self.checkpoints = self.path / "checkpoints"
        self.wandb_run = None

    def open(self, env_steps: int) -> None:
        """Write the resolved config, record this session, start wandb (a start or a resume at `env_steps`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        # One line per start or resume: which code and machine produced which part of the run.
        session = {
            "started": datetime.now().isoformat(timespec="seconds"),
            "env_steps": env_steps,
            **source_commit(),
            "machine": machine_info(),
        }
        with open(self.path / "run_info.jsonl", "a") as f:
            f.write(json.dumps(session) + "\n")
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
        """One metrics.jsonl line (and a wandb step)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
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
