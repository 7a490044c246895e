"""The device check (docs/performance.md): one prepared command that measures what an accelerator
changes, in about five minutes, and writes JSON. It runs on a CPU as well, with the CPU's numbers.

    python -m racer_vec.device_check --output device_check.json

It measures:

1. the machine: CPU, cores, JAX backend and devices, package versions;
2. the learner of both presets: agent and critic updates/s and compile time;
3. the `highway_fast` loop end to end with 8 and 16 workers: its simulate and
   learn halves, and the loop against both bounds, simulate + learn (the halves share the cores)
   and max(simulate, learn) (they overlap fully); which one holds is part of what is measured;
4. the fast simulator: whether its fast path holds on this machine's numpy (it falls back to the
   stock code with only a warning) and its env-only transitions/s at the same worker counts;
5. a short real run, `train.py highway_fast --agent.bootstrap-terminations --seed 0`, whose
   learning curve is compared with the two CPU runs of the same settings in results/ (see `band`).

With one device the data-parallel path (design §4.8) is not exercised, and the report says so.
JAX is imported inside functions only: the env workers re-import this module as __mp_main__.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tyro

import configs
from racer_vec import benchmark
from racer_vec.config import ConfigError, resolve
from racer_vec.run.jsonl import read_jsonl
from racer_vec.run.provenance import machine_info

ROOT = Path(__file__).resolve().parents[1]
CPU_REFERENCE = tuple(ROOT / "results" / f"hf_rel_cvar0.5_s{seed}_120000.json" for seed in (0, 1))
"""Two CPU runs of the short run's settings (the release's target, seeds 0 and 1, 2-core AMD EPYC)."""
WINDOW_START = 16_000
"""The comparison starts here: learning starts at 8,000 and the curves before it are the warm-up's."""


@dataclasses.dataclass(frozen=True)
class CheckArgs:
    """Measure the learner, the loop, the fast simulator and a short run on this machine; write JSON."""

    output: Path = Path("device_check.json")
    workers: tuple[int, ...] = (8, 16)
    """Worker counts of the end-to-end loop."""
    seconds: float = 10.0
    """Measuring time of each benchmark row, after warm-up."""
    warmup_seconds: float = 3.0
    train_steps: int = 40_000
    """Transitions of the short real run (0 skips it)."""


def band(run: dict[int, dict], references: list[dict[int, dict]], last_step: int) -> dict:
    """Whether a run's curve lies within the spread of reference runs of the same settings.

    The bits differ after the random warm-up, so the runs are compared as samples of one
    distribution, over the logged steps from WINDOW_START to `last_step`:
    - speed_ema at every step within [min, max] of the references widened by their largest gap
      there (at least 0.5 m/s);
    - the mean training return over the window within [min, max] of the references' means widened
      by the gap between them (at least 5).
    """
    steps = [s for s in sorted(run) if WINDOW_START <= s <= last_step and all(s in r for r in references)]
    if not steps:
        return {"compared": False, "why": f"no logged step from {WINDOW_START} to {last_step} in every curve"}
    speeds = [[r[s]["speed_ema"] for r in references] for s in steps]
    gap = max(max(0.5, max(v) - min(v)) for v in speeds)
    outside = [s for s, v in zip(steps, speeds) if not min(v) - gap <= run[s]["speed_ema"] <= max(v) + gap]

    def mean_return(curve):
        return sum(curve[s]["episode_return_mean"] for s in steps) / len(steps)

    means = [mean_return(r) for r in references]
    widen = max(5.0, max(means) - min(means))
    ours = mean_return(run)
    return {
        "compared": True,
        "steps": [steps[0], steps[-1], len(steps)],
        "speed_tolerance_m_s": gap,
        "speed_steps_outside": outside,
        "mean_return": ours,
        "reference_mean_returns": means,
        "return_tolerance": widen,
        "within": not outside and min(means) - widen <= ours <= max(means) + widen,
    }


def _curve(path: Path) -> dict[int, dict]:
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    else:
        rows = json.loads(path.read_text())["curve"]
    return {row["env_steps"]: row for row in rows}


def short_run(steps: int) -> dict:
    """`train.py highway_fast` for `steps` transitions, as a user runs it; its curve against the CPU's."""
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, str(ROOT / "train.py"), "highway_fast", "--agent.bootstrap-terminations",
                   "--seed", "0", "--max-steps", str(steps), "--eval-interval", "0", "--wandb-mode", "disabled",
                   "--runs-dir", runs, "--run-name", "short"]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            return {"command": command[1:], "returncode": result.returncode, "stderr": result.stderr[-2000:]}
        curve = _curve(Path(runs) / "short" / "metrics.jsonl")
    last = max(curve)
    references = [_curve(p) for p in CPU_REFERENCE]
    return {
        "command": ["train.py", *command[2:-4]],
        "seconds": seconds,
        "transitions_per_s": curve[last]["sps"],
        "at_end": {k: curve[last].get(k) for k in ("env_steps", "speed_ema", "episode_return_mean", "train_collisions_total")},
        "against_cpu": band(curve, references, last),
        "cpu_reference": [p.name for p in CPU_REFERENCE],
    }


def loop(workers: int, args: CheckArgs) -> dict:
    cfg = resolve(dataclasses.replace(configs.PRESETS["highway_fast"], num_envs=workers))
    row = benchmark.end_to_end(cfg, args.warmup_seconds, args.seconds)
    simulate, learn = row["simulate_ms"], row["learn_ms"]
    row["bounds_transitions_per_s"] = {
        "simulate + learn": 1000 * workers / (simulate + learn),
        "max(simulate, learn)": 1000 * workers / max(simulate, learn),
    }
    return row


def check(args: CheckArgs) -> dict:
    import jax

    from racer_vec.sim.fast_sim import numerics_are_exact

    if args.seconds <= 0 or args.warmup_seconds < 0 or args.train_steps < 0 or min(args.workers, default=0) <= 0:
        raise ConfigError("--seconds must be positive, --warmup-seconds and --train-steps >= 0, --workers positive")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info()}  # the machine names its cores
    report["devices"] = [str(d) for d in jax.devices()]
    report["data_parallel"] = (
        f"exercised on {jax.device_count()} devices" if jax.device_count() > 1
        else "not exercised: one device (the sharded path needs several, design §4.8)"
    )  # fmt: skip
    report["learner"] = {
        name: benchmark.learner_only(resolve(configs.PRESETS[name]), args.warmup_seconds, args.seconds)
        for name in ("racer_highway", "highway_fast")
    }
    report["loop_highway_fast"] = {str(w): loop(w, args) for w in args.workers}
    fast_cfg = resolve(configs.PRESETS["highway_fast"])
    report["fast_simulator"] = {
        "fast_path": numerics_are_exact(),
        "env_only_transitions_per_s": {
            str(w): benchmark.env_only(fast_cfg, w, True, args.warmup_seconds, args.seconds) for w in args.workers
        },
    }
    if args.train_steps:
        report["short_run"] = short_run(args.train_steps)
    return report


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(CheckArgs, args=argv, prog="python -m racer_vec.device_check")
    try:
        report = check(args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.output}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
