"""Steps per second: env-only, learner-only and end-to-end training (design §9).

    python -m racer_vec.benchmark [PRESET] [--workers 1 2 4 8] [--seconds 20] [--output FILE]
    python -m racer_vec.benchmark --compare REF [--rounds 10] [--round-seconds 3]

Everything is measured after warm-up and compilation. JAX is imported inside functions only: the
env workers re-import this module as __mp_main__.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

import configs
from racer_vec import benchmark_compare
from racer_vec.config import ACTION_DIM, ConfigError, TrainConfig, resolve
from racer_vec.run.provenance import machine_info


@dataclasses.dataclass(frozen=True)
class BenchmarkArgs:
    preset: Annotated[str, tyro.conf.Positional] = configs.DEFAULT
    """Preset to measure (its env, agent, batch size, utd and update schedule)."""
    workers: tuple[int, ...] = (1, 2, 4, 8)
    """Worker (vector env) counts to measure."""
    seconds: float = 20.0
    """Measuring time per configuration, after warm-up."""
    warmup_seconds: float = 3.0
    """Unmeasured time per configuration before measuring."""
    sims: tuple[str, ...] = ("stock", "fast")
    """Simulators for the env-only rates."""
    end_to_end: bool = True
    """Measure the training loop too (not only the env and the learner)."""
    output: str = "benchmark.json"
    compare: str | None = None
    """A reference commit: measure its learner and the working tree's side by side instead, alternating,
    for both presets, and the highway_fast loop with 8 workers (racer_vec.benchmark_compare)."""
    rounds: int = 10
    """Alternating rounds of --compare."""
    round_seconds: float = 3.0
    """Measuring time of each side in each --compare round, after its warm-up (--warmup-seconds)."""


def _timed_loop(step, warmup: float, seconds: float) -> tuple[int, float]:
    """Call step() to warm up, then for `seconds`; returns (calls, elapsed) of the measured part.

    Warm-up is a few calls (the first ones compile, and a later one may compile again) and then
    `warmup` seconds counted after them, so a long compile never eats the warm-up time.
    """
    for _ in range(3):
        step()
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        calls += 1
    return calls, time.perf_counter() - start


def env_only(cfg: TrainConfig, workers: int, fast_sim: bool, warmup: float, seconds: float) -> float:
    """Transitions/s of the AsyncVectorEnv with uniform random actions."""
    from racer_vec.sim import highway

    env_cfg = dataclasses.replace(cfg.env, fast_sim=fast_sim)
    envs = highway.make_vector_env(env_cfg, workers, seed=0)
    rng = np.random.default_rng(0)
    try:
        envs.reset(seed=0)
        calls, elapsed = _timed_loop(
            lambda: envs.step(rng.uniform(-1, 1, (workers, ACTION_DIM)).astype(np.float32)), warmup, seconds
        )
    finally:
        envs.close()
    return calls * workers / elapsed


def _random_buffer(cfg: TrainConfig, obs_dim: int, size: int):
    from racer_vec.learner.replay import init_buffer, insert

    rng = np.random.default_rng(0)
    buffer = init_buffer(cfg.buffer_size, obs_dim, ACTION_DIM)
    for start in range(0, size, 1000):
        n = min(1000, size - start)
        buffer = insert(
            buffer,
            rng.normal(size=(n, obs_dim)).astype(np.float32),
            rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
            rng.normal(size=n).astype(np.float32),
            np.ones(n, np.float32),
            rng.normal(size=(n, obs_dim)).astype(np.float32),
        )
    return buffer


def learner_only(cfg: TrainConfig, warmup: float, seconds: float) -> dict:
    """Agent and critic updates/s of the compiled iteration, with its compile time and GFLOP/s."""
    import jax

    from racer_vec.learner.agent import init_agent, make_learner

    obs_dim = cfg.env.obs_dim
    learner = make_learner(
        cfg.agent, batch_size=cfg.batch_size, utd_ratio=cfg.utd_ratio, updates_per_iteration=cfg.updates_per_iteration
    )
    state = {"agent": init_agent(cfg.agent, obs_dim, cfg.env.observed_vehicles, 0)}
    buffer = _random_buffer(cfg, obs_dim, max(cfg.batch_size * 4, 4096))
    start = time.perf_counter()
    state["agent"], metrics = learner.iteration(state["agent"], buffer)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start

    def step():
        state["agent"], m = learner.iteration(state["agent"], buffer)
        jax.block_until_ready(m)

    calls, elapsed = _timed_loop(step, warmup, seconds)
    agent_updates = calls * cfg.updates_per_iteration / elapsed
    result = {
        "batch_size": cfg.batch_size,
        "utd_ratio": cfg.utd_ratio,
        "updates_per_iteration": cfg.updates_per_iteration,
        "compile_seconds": compile_seconds,
        "agent_updates_per_s": agent_updates,
        "critic_updates_per_s": agent_updates * cfg.utd_ratio,
        "ms_per_agent_update": 1000.0 / agent_updates,
    }
    flops = learner.flops_per_iteration(state["agent"], buffer) if hasattr(learner, "flops_per_iteration") else None
    if flops:
        result["gflop_per_s"] = flops * calls / elapsed / 1e9
    return result


def end_to_end(cfg: TrainConfig, warmup: float, seconds: float) -> dict:
    """The real training loop, learning on, against its two halves measured in the same run."""
    import jax

    from racer_vec.run.training import Trainer

    with tempfile.TemporaryDirectory() as runs_dir:
        cfg = dataclasses.replace(
            cfg,
            runs_dir=runs_dir,
            run_name="bench",
            wandb_mode="disabled",
            eval_interval=0,
            start_training=0,
            max_steps=10**12,
        )
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            trainer.buffer = _random_buffer(cfg, trainer.obs_dim, max(cfg.batch_size * 4, 4096))
            trainer.counters.env_steps = cfg.batch_size * 4
            state = {"obs": trainer.reset_envs(seed=0)}  # starts the workers

            def train_step():
                state["obs"] = trainer.vector_step(state["obs"])

            calls, elapsed = _timed_loop(train_step, warmup, seconds)
            jax.block_until_ready(trainer.agent)
            iteration = elapsed / calls

            # Simulate-only: the same loop with the learner switched off.
            trainer.counters.learning_starts = 10**15
            calls, elapsed = _timed_loop(train_step, min(warmup, 1.0), seconds / 2)
            simulate = elapsed / calls

            def learn_step():
                trainer.agent, m = trainer.learner.iteration(trainer.agent, trainer.buffer)
                jax.block_until_ready(m)

            calls, elapsed = _timed_loop(learn_step, min(warmup, 1.0), seconds / 2)
            learn = elapsed / calls
        finally:
            trainer.close()
    shared_cores = (os.cpu_count() or 1) < cfg.num_envs + 2
    bound = simulate + learn if shared_cores else max(simulate, learn)
    return {
        "workers": cfg.num_envs,
        "updates_per_iteration": cfg.updates_per_iteration,
        "transitions_per_s": cfg.num_envs / iteration,
        "iteration_ms": 1000 * iteration,
        "simulate_ms": 1000 * simulate,
        "learn_ms": 1000 * learn,
        "bound": "simulate + learn (cores shared)" if shared_cores else "max(simulate, learn)",
        "bound_transitions_per_s": cfg.num_envs / bound,
        "bound_efficiency": bound / iteration,
    }


def run(args: BenchmarkArgs) -> dict:
    if args.preset not in configs.PRESETS:
        raise ConfigError(f"PRESET {args.preset!r} is not one of {', '.join(configs.PRESETS)}")
    if not args.workers or min(args.workers) <= 0:
        raise ConfigError(f"--workers must be positive counts, got {args.workers}")
    base = configs.PRESETS[args.preset]
    report = {"preset": args.preset, "machine": machine_info(), "seconds": args.seconds}

    report["env_only"] = []
    for sim in args.sims:
        for n in args.workers:
            rate = env_only(base, n, sim == "fast", args.warmup_seconds, args.seconds)
            report["env_only"].append({"sim": sim, "workers": n, "transitions_per_s": rate})
            print(f"env-only  {sim:5s} workers {n:2d}: {rate:8.1f} transitions/s", flush=True)

    learner = learner_only(resolve(base), args.warmup_seconds, args.seconds)
    report["learner"] = learner
    print(
        f"learner   batch {learner['batch_size']} utd {learner['utd_ratio']}: "
        f"{learner['agent_updates_per_s']:.1f} agent updates/s, {learner['critic_updates_per_s']:.1f} critic updates/s, "
        f"compile {learner['compile_seconds']:.1f} s",
        flush=True,
    )

    report["end_to_end"] = []
    if args.end_to_end:
        for n in args.workers:
            cfg = resolve(dataclasses.replace(base, num_envs=n))
            row = end_to_end(cfg, args.warmup_seconds, args.seconds)
            report["end_to_end"].append(row)
            print(
                f"end-to-end workers {n:2d}: {row['transitions_per_s']:7.1f} transitions/s "
                f"(iteration {row['iteration_ms']:.1f} ms; simulate {row['simulate_ms']:.1f} + learn {row['learn_ms']:.1f} ms;"
                f" {100 * row['bound_efficiency']:.0f}% of the bound {row['bound']})",
                flush=True,
            )
    return report


def format_tables(report: dict) -> str:
    """The report as Markdown tables (the README's Performance section is made of these)."""
    preset, machine = report["preset"], report["machine"]
    lines = [
        f"`{preset}` on {machine['cores']} cores ({machine['cpu']}), JAX {machine['packages']['jax']} "
        f"on {machine['jax_backend']}, {report['seconds']:g} s per row",
        "",
    ]
    if report["env_only"]:
        workers = sorted({r["workers"] for r in report["env_only"]})
        lines += ["| env only (transitions/s) | " + " | ".join(f"{n} worker{'s' * (n > 1)}" for n in workers) + " |",
                  "|---|" + "---|" * len(workers)]
        for sim in dict.fromkeys(r["sim"] for r in report["env_only"]):
            rate = {r["workers"]: r["transitions_per_s"] for r in report["env_only"] if r["sim"] == sim}
            lines.append(f"| {sim} simulator | " + " | ".join(f"{rate[n]:.1f}" if n in rate else "" for n in workers) + " |")
        lines.append("")
    learner = report["learner"]
    lines += [
        "| learner (batch / utd) | agent updates/s | critic updates/s | ms per agent update | compile |",
        "|---|---|---|---|---|",
        f"| {learner['batch_size']} / {learner['utd_ratio']} | {learner['agent_updates_per_s']:.1f} | "
        f"{learner['critic_updates_per_s']:.1f} | {learner['ms_per_agent_update']:.1f} | {learner['compile_seconds']:.1f} s |",
    ]
    if report["end_to_end"]:
        lines += [
            "",
            "| end to end: workers | updates / vector step | transitions/s | iteration | simulate | learn "
            "| bound | of the bound |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["end_to_end"]:
            lines.append(
                f"| {r['workers']} | {r['updates_per_iteration']} | {r['transitions_per_s']:.1f} | "
                f"{r['iteration_ms']:.0f} ms | {r['simulate_ms']:.0f} ms | {r['learn_ms']:.0f} ms | {r['bound']} | "
                f"{100 * r['bound_efficiency']:.0f}% |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(BenchmarkArgs, args=argv, description=__doc__.splitlines()[0], prog="python -m racer_vec.benchmark")
    try:
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--output {args.output}: cannot create its directory ({exc.strerror})") from None
        if args.compare is None:
            report = run(args)
        else:
            report = benchmark_compare.compare(args.compare, args.rounds, args.warmup_seconds, args.round_seconds,
                                               args.end_to_end)  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    tables = format_tables(report) if args.compare is None else benchmark_compare.format_comparison(report)
    print("\n" + tables + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
