"""Progress display: a rich bar on a terminal, one plain line per log interval otherwise (log files)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class ProgressDisplay:
    def __init__(self, total: int, start: int = 0, description: str = "train"):
        self.interactive = sys.stdout.isatty()
        self.progress = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=Console(),
                refresh_per_second=4,
            )
            self.task = self.progress.add_task(description, total=total, completed=start, stats="")
            self.progress.start()

    def update(self, counters, buffer_size: int) -> None:
        if self.progress is None:
            return
        sps = counters.env_steps / counters.train_time if counters.train_time > 0 else 0.0
        stats = (
            f"sps {sps:6.1f}  speed {_fmt(counters.speed_ema, '5.1f')} m/s  "
            f"collision {_fmt(counters.collision_ema, '.3f')}  buffer {buffer_size}"
        )
        self.progress.update(self.task, completed=counters.env_steps, stats=stats)

    def log(self, record: dict) -> None:
        """A log-interval line for non-interactive output (the bar already shows it on a terminal)."""
        if self.interactive:
            return
        parts = [
            f"steps {record['env_steps']}",
            f"sps {record['sps']:.1f}",
            f"speed_ema {_fmt(record['speed_ema'], '.2f')}",
            f"collision_ema {_fmt(record['collision_ema'], '.3f')}",
            f"buffer {record['buffer_size']}",
        ]
        if "episode_return_mean" in record:
            parts.append(f"return {record['episode_return_mean']:.2f}")
        if "eval/mean_return" in record:
            parts.append(f"eval_return {record['eval/mean_return']:.2f}")
        print("  ".join(parts), flush=True)

    def message(self, text: str) -> None:
        """A line of its own, above the bar on a terminal."""
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
