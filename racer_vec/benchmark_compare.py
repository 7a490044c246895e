"""Side by side: the learner of a reference commit against the working tree's, alternating in one run
(design §9, docs/performance.md).

    python -m racer_vec.benchmark --compare REF [--rounds 10] [--round-seconds 3]

The reference runs from a `git worktree` of REF with this interpreter, in its own subprocess that
imports the worktree's racer_vec and configs (checked: every racer_vec module it loaded lies there);
the working tree runs in a second subprocess the same way. Each measurement is the tree's own
`racer_vec.benchmark.learner_only(resolve(preset), warmup, seconds)` or `end_to_end(...)`, so both
sides measure the same thing: the compiled iteration on the preset's batch and utd, to completion.
The two alternate, round after round (ABBA order, so a drift in the machine's load falls on both),
and the report gives each side's median and every round's ratio working tree / reference.
JAX is imported in the subprocesses only.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from racer_vec.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("highway_fast", "racer_highway")
LOOP_PRESET, LOOP_WORKERS = "highway_fast", 8

# Run by each side's interpreter, in its tree: reports what it imported, then answers one JSON request per
# line with the tree's own benchmark function. Written against the API every compared commit keeps.
_SIDE = r"""
import dataclasses, json, subprocess, sys
import configs
import racer_vec.learner.agent, racer_vec.run.training
from racer_vec import benchmark
from racer_vec.config import resolve
root = sys.argv[1]
commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout.strip())
files = sorted({getattr(m, "__file__", None) or "" for n, m in sys.modules.items() if n.split(".")[0] in ("racer_vec", "configs")})
print(json.dumps({"commit": commit, "dirty": dirty, "files": files}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    cfg = configs.PRESETS[request["preset"]]
    if request["kind"] == "loop":
        result = benchmark.end_to_end(resolve(dataclasses.replace(cfg, num_envs=request["workers"])),
                                      request["warmup"], request["seconds"])
    else:
        result = benchmark.learner_only(resolve(cfg), request["warmup"], request["seconds"])
    print(json.dumps(result), flush=True)
"""


class Side:
    """One tree's subprocess: `measure(request)` -> the benchmark function's result dict."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        env = {**os.environ, "PYTHONPATH": str(root), "WANDB_SILENT": "true"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SIDE, str(root)], cwd=root, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.info = self._reply()
        foreign = [f for f in self.info["files"] if not f.startswith(f"{root}/")]
        if foreign:
            raise RuntimeError(f"{name}: modules imported from outside {root}: {foreign}")

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the benchmark subprocess exited ({self.process.wait()})")
        return json.loads(line)

    def measure(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@contextlib.contextmanager
def reference_worktree(ref: str):
    """A detached `git worktree` of `ref`, removed afterwards."""

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    if git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        raise ConfigError(f"--compare {ref}: not a commit of {ROOT}'s git history")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference"
        added = git("worktree", "add", "--detach", str(path), ref)
        if added.returncode != 0:
            raise ConfigError(f"--compare {ref}: git worktree add failed: {added.stderr.strip()}")
        try:
            yield path
        finally:
            git("worktree", "remove", "--force", str(path))
            git("worktree", "prune")


def _summary(rates: dict[str, list[float]]) -> dict:
    ratios = [h / r for r, h in zip(rates["reference"], rates["working_tree"])]
    return {
        "reference": rates["reference"],
        "working_tree": rates["working_tree"],
        "reference_median": statistics.median(rates["reference"]),
        "working_tree_median": statistics.median(rates["working_tree"]),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def compare(ref: str, rounds: int, warmup: float, seconds: float, loop: bool = True) -> dict:
    """Alternate the two trees' measurements for `rounds` rounds; per-round values and their ratios."""
    if rounds <= 0 or seconds <= 0 or warmup < 0:
        raise ConfigError("--rounds and --round-seconds must be positive and --warmup-seconds >= 0")
    requests = {f"learner {p}": {"kind": "learner", "preset": p} for p in PRESETS}
    if loop:
        requests[f"loop {LOOP_PRESET} {LOOP_WORKERS} workers"] = {"kind": "loop", "preset": LOOP_PRESET, "workers": LOOP_WORKERS}
    key = {"learner": "agent_updates_per_s", "loop": "transitions_per_s"}
    report: dict = {"reference_ref": ref, "rounds": rounds, "seconds": seconds, "warmup_seconds": warmup}
    with reference_worktree(ref) as path:
        sides = []
        try:
            sides = [Side("reference", path), Side("working_tree", ROOT)]
            report["trees"] = {s.name: {k: s.info[k] for k in ("commit", "dirty")} | {"root": str(s.root)} for s in sides}
            for name, request in requests.items():
                rates: dict[str, list[float]] = {s.name: [] for s in sides}
                first: dict[str, dict] = {}
                for i in range(rounds):
                    for side in sides if i % 2 == 0 else sides[::-1]:
                        result = side.measure({**request, "warmup": warmup, "seconds": seconds})
                        first.setdefault(side.name, result)
                        rates[side.name].append(result[key[request["kind"]]])
                        print(f"{name:34s} round {i + 1}/{rounds} {side.name:12s} "
                              f"{result[key[request['kind']]]:8.2f} {key[request['kind']]}", flush=True)  # fmt: skip
                report[name] = _summary(rates) | {"unit": key[request["kind"]], "first": first}
        finally:
            for side in sides:
                side.close()
    return report


def format_comparison(report: dict) -> str:
    trees = report["trees"]
    lines = [
        f"reference {trees['reference']['commit'][:7]} against the working tree "
        f"{trees['working_tree']['commit'][:7]}{' (uncommitted changes)' if trees['working_tree']['dirty'] else ''}, "
        f"{report['rounds']} alternating rounds of {report['seconds']:g} s",
        "",
        "| measurement | reference | working tree | ratio (median) | ratio (range) | compile: reference / working tree |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report.items():
        if not isinstance(row, dict) or "ratios" not in row:
            continue
        compile_s = [row["first"][s].get("compile_seconds") for s in ("reference", "working_tree")]
        compile_text = " / ".join(f"{c:.1f} s" for c in compile_s) if None not in compile_s else ""
        lines.append(
            f"| {name} ({row['unit']}) | {row['reference_median']:.2f} | {row['working_tree_median']:.2f} | "
            f"{row['ratio_median']:.2f}x | {row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}x | {compile_text} |"
        )
    return "\n".join(lines)
