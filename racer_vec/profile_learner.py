"""Where an agent update's time goes (design §9, docs/performance.md): the jax profiler's trace of the
compiled iteration, each XLA kernel's own time summed by what the kernel computes and by the part of
the update it belongs to.

    python -m racer_vec.profile_learner [PRESET] [--iterations 10] [--output profile.json]

Each kernel (an XLA thunk: a fusion, a dot, a copy) is timed on XLA's threads by the trace, minus
the kernels it runs inside (a loop's body); what is left of the executor itself is "runtime". The
kind comes from the kernel's optimized HLO (a dot inside makes it a matmul, else a reduce, a
scatter or gather, a copy, transpose or concatenation, else elementwise); the part from the name
scopes in its op_name (the updaters of racer_vec.learner.agent). Shares are of the summed kernel
time, so they hold under a machine's load better than the wall time does. JAX is imported inside
functions only.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import tyro

import configs
from racer_vec.config import ConfigError, TrainConfig, resolve

PARTS = {
    "critic_target": "critic step: target critic and projection",
    "critic_loss": "critic step: online critic, loss and gradient",
    "apply_step": "critic step: AdamW",
    "actor_tall_pass": "actor's tall pass (next and OOD actions)",
    "policy_step": "actor and limit step",
    "draw_minibatches": "minibatches and noise",
}
"""Name scopes of an update's parts (the outermost one in a kernel's op_name wins) and their labels."""


@dataclasses.dataclass(frozen=True)
class ProfileArgs:
    preset: Annotated[str, tyro.conf.Positional] = configs.DEFAULT
    """Preset whose learner (batch size, utd, networks) is profiled."""
    iterations: int = 10
    """Compiled iterations traced, after warm-up."""
    top: int = 25
    """Kernels listed by their own time."""
    output: str = "profile.json"


def _computations(hlo: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}", hlo, re.M | re.S)}


def _instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """name -> (shape, opcode, the rest of its line)."""
    found = re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) ([\w-]+)\((.*)$", hlo, re.M)
    return {m.group(1): m.group(2, 3, 4) for m in found}


def kind_of(opcode: str, body: str) -> str:
    """What a kernel computes, from its opcode and (for a fusion) its fused computation's text."""
    text = body or f" {opcode}("
    for kind, ops in (("matmul", "dot"), ("scatter/gather", "scatter|gather"), ("reduce", "reduce"),
                      ("copy/transpose/concatenate", "transpose|copy|concatenate")):  # fmt: skip
        if re.search(rf" (?:{ops})\(", text):
            return kind
    return "control flow" if opcode in ("while", "call", "conditional") else "elementwise"


def part_of(op_name: str) -> str:
    for component in op_name.split("/"):
        for scope in re.findall(r"\w+", component):
            if scope in PARTS:
                return PARTS[scope]
    return "critic step: the rest (Polyak, metrics)" if op_name.count("while/body") >= 2 else "the rest of the update"


def kernel_times(xplane: str) -> tuple[collections.Counter, collections.Counter]:
    """Own time (ns) and calls of every kernel on XLA's threads in a trace."""
    import jax

    own, calls = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(xplane).planes:
        for line in plane.lines if plane.name == "/host:CPU" else ():
            if not line.name.startswith("tf_XLA"):
                continue
            events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events), key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end, name, own time]; events nest on a thread
            for start, duration, name in events:
                if "wait for completion" in name:  # the caller waiting for the whole iteration
                    continue
                while stack and stack[-1][0] <= start:
                    _, done, left = stack.pop()
                    own[done] += left
                if stack:
                    stack[-1][2] -= duration
                stack.append([start + duration, name.removeprefix("end: "), duration])
                calls[name] += 1  # an asynchronous kernel's "end: " marker is not a call
            for _, done, left in stack:
                own[done] += left
    return own, calls


def summarize(own: collections.Counter, calls: collections.Counter, hlo: str, iterations: int, top: int) -> dict:
    """Shares of the kernels' summed own time by kind and by part, and the `top` kernels."""
    computations, instructions = _computations(hlo), _instructions(hlo)
    total = sum(own.values())
    by_kind, by_part, kernels = collections.Counter(), collections.Counter(), []
    for name, ns in own.most_common():
        shape, opcode, rest = instructions.get(name, ("", "", ""))
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        if name.startswith(("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener")) or not opcode:
            kind = part = "runtime"
        else:
            kind = kind_of(opcode, computations.get(called.group(1), "") if called else "")
            part = part_of(op_name.group(1) if op_name else "")
        by_kind[kind] += ns
        by_part[part] += ns
        if len(kernels) < top:
            kernels.append({"kernel": name, "kind": kind, "part": part, "shape": shape,
                            "ms_per_iteration": ns / 1e6 / iterations, "share": ns / total,
                            "calls_per_iteration": calls[name] / iterations})  # fmt: skip
    return {
        "iterations": iterations,
        "kernel_ms_per_iteration": total / 1e6 / iterations,
        "by_kind": {k: ns / total for k, ns in by_kind.most_common()},
        "by_part": {k: ns / total for k, ns in by_part.most_common()},
        "top_kernels": kernels,
    }


def profile(cfg: TrainConfig, iterations: int, top: int) -> dict:
    """Trace `iterations` compiled iterations of the preset's learner (after warm-up) and summarize."""
    import jax

    from racer_vec.benchmark import _random_buffer
    from racer_vec.learner.agent import init_agent, make_learner

    learner = make_learner(cfg.agent, batch_size=cfg.batch_size, utd_ratio=cfg.utd_ratio,
                           updates_per_iteration=cfg.updates_per_iteration)  # fmt: skip
    agent = init_agent(cfg.agent, cfg.env.obs_dim, cfg.env.observed_vehicles, 0)
    buffer = _random_buffer(cfg, cfg.env.obs_dim, max(cfg.batch_size * 4, 4096))
    compiled = learner.iteration.lower(agent, buffer).compile()
    for _ in range(3):
        agent, metrics = compiled(agent, buffer)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(iterations):
                agent, metrics = compiled(agent, buffer)
                jax.block_until_ready(metrics)
        own, calls = kernel_times(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    return summarize(own, calls, compiled.as_text(), iterations, top)


def format_profile(report: dict) -> str:
    lines = [f"{report['kernel_ms_per_iteration']:.1f} ms of kernel time per iteration "
             f"({report['updates_per_iteration']} agent update{'s' * (report['updates_per_iteration'] > 1)})", ""]  # fmt: skip
    for title, shares in (("kind", report["by_kind"]), ("part of the update", report["by_part"])):
        lines += [f"| {title} | share |", "|---|---|"] + [f"| {k} | {100 * v:.1f}% |" for k, v in shares.items()] + [""]
    lines += ["| kernel | kind | part | shape | ms per iteration | share |", "|---|---|---|---|---|---|"]
    lines += [f"| {k['kernel']} | {k['kind']} | {k['part']} | {k['shape']} | {k['ms_per_iteration']:.2f} | "
              f"{100 * k['share']:.1f}% |" for k in report["top_kernels"]]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(ProfileArgs, args=argv, description=__doc__.splitlines()[0], prog="python -m racer_vec.profile_learner")
    try:
        if args.preset not in configs.PRESETS:
            raise ConfigError(f"PRESET {args.preset!r} is not one of {', '.join(configs.PRESETS)}")
        if args.iterations <= 0 or args.top < 0:
            raise ConfigError("--iterations must be positive and --top >= 0")
        cfg = resolve(configs.PRESETS[args.preset])
        report = {"preset": args.preset, "updates_per_iteration": cfg.updates_per_iteration,
                  **profile(cfg, args.iterations, args.top)}  # fmt: skip
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: --output {args.output}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(format_profile(report) + f"\n\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
