"""Numbers that a change of structure must not move: the tiny training run (conftest.TINY_ARGS)
logs, value for value, what it logs at REFERENCE_COMMIT, every value but the clocks.

Both runs are made here and now, on this machine, with this interpreter and its packages: HEAD's is
the session fixture `tiny_run`, the reference's is run from a `git worktree` of REFERENCE_COMMIT
(its own train.py, racer_vec and configs, which the test checks were the ones imported). XLA's CPU
kernels and OpenBLAS pick their code by instruction set and thread count, so numbers recorded on
one machine need not hold on another; two runs on the same machine agree bit for bit. Where the
reference cannot be checked out (no git, not a git checkout, a shallow clone without the commit)
the test skips, saying why.

The fast simulator's episodes are compared with stock highway-env's the same way, at test time, in
test_fast_sim.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_ARGS

# The last commit whose numbers the project trusts. Move it only to a commit whose numbers are
# trusted: a change meant to move numbers moves it, in the same commit, and says why in its message.
REFERENCE_COMMIT = "9e982feb0ea67b83343bf648fddff68c5455aa47"
CLOCKS = ("sps", "wall_time")
ADDED_SINCE_REFERENCE = {
    # issue 45's driving diagnostics: the training episodes' and the periodic evaluation's means
    "episode_lane_changes_mean", "episode_overtakes_mean", "episode_distance_mean",
    "eval/mean_lane_changes", "eval/mean_overtakes", "eval/mean_distance",
}  # fmt: skip
"""Keys HEAD logs that the reference did not: new measures, not moved numbers (compared from the
next reference commit on)."""


def logged_values(run_dir: Path) -> list[dict[str, str]]:
    """metrics.jsonl, a dict per line: key -> the value's JSON text (floats are written round-trip,
    so equal text is equal bits; NaN equals NaN), the clocks left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: json.dumps(v) for k, v in row.items() if k not in CLOCKS} for row in rows]


def _differences(reference: list[dict], head: list[dict]) -> list[str]:
    if len(reference) != len(head):
        return [f"{len(reference)} metrics lines at the reference, {len(head)} at HEAD"]
    return [
        f"line {i}: {key}: {ref.get(key, '(absent)')} at the reference, {now.get(key, '(absent)')} at HEAD"
        for i, (ref, now) in enumerate(zip(reference, head))
        for key in sorted(ref.keys() | now.keys())
        if ref.get(key) != now.get(key) and not (key in ADDED_SINCE_REFERENCE and key not in ref)
    ]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=120)


def _reference_unavailable() -> str | None:
    """Why the reference commit cannot be checked out here, or None."""
    if shutil.which("git") is None:
        return "git is not installed"
    if _git("rev-parse", "--git-dir").returncode != 0:
        return f"{ROOT} is not a git checkout"
    if _git("cat-file", "-e", f"{REFERENCE_COMMIT}^{{commit}}").returncode != 0:
        return f"the reference commit {REFERENCE_COMMIT[:7]} is not in this clone's history (a shallow clone?)"
    return None


def _start_reference(worktree: Path, runs_dir: Path, log) -> subprocess.Popen:
    """The tiny run, as the fixture `tiny_run` makes it, from the worktree's train.py, its output to
    `log` (a file: a pipe would fill up and stall the run). Python's verbose mode reports every module
    each process (driver, forkserver, workers) imports, and from where."""
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONVERBOSE": "1"}
    return subprocess.Popen(
        [sys.executable, str(worktree / "train.py"), *TINY_ARGS, "--runs-dir", str(runs_dir), "--run-name", "tiny",
         "--save-buffer", "--wandb-mode", "offline"],
        stdout=log, stderr=subprocess.STDOUT, cwd=worktree, env=env,
    )  # fmt: skip


def _check_imported_from(worktree: Path, output: str, run_dir: Path) -> None:
    """racer_vec and configs came from the worktree in every process: not from this checkout, to
    which the editable install points (the script's directory comes first on sys.path)."""
    roots = set(re.findall(r"([^\s'\"]+)/racer_vec/\S*?\.py", output))
    assert roots == {str(worktree)}, f"racer_vec imported from {sorted(roots)}, not only from {worktree}"
    assert f"{worktree}/racer_vec/sim/highway.py" in output  # the env workers' module
    assert f"{worktree}/configs/" in output and f"{ROOT}/configs/" not in output
    # the driver's own provenance: the commit of the racer_vec it imported
    sessions = [json.loads(line) for line in (run_dir / "run_info.jsonl").read_text().splitlines()]
    assert [s.get("commit") for s in sessions if "commit" in s] == [REFERENCE_COMMIT], sessions


@pytest.mark.slow
def test_the_tiny_run_logs_what_the_reference_commit_logs(request, tmp_path):
    why = _reference_unavailable()
    if why:
        pytest.skip(f"no reference run: {why}")
    worktree = tmp_path / "reference"
    added = _git("worktree", "add", "--detach", str(worktree), REFERENCE_COMMIT)
    assert added.returncode == 0, added.stderr
    try:
        log = tmp_path / "reference.log"
        with log.open("w") as out:
            reference = _start_reference(worktree, tmp_path / "runs", out)
            try:
                # HEAD's run (the session's `tiny_run`, made now if no test made it yet) beside the reference's
                tiny_run = request.getfixturevalue("tiny_run")
                reference.wait(timeout=600)
            finally:
                reference.kill()
        output = log.read_text()
        assert reference.returncode == 0, output[-6000:]
        _check_imported_from(worktree, output, tmp_path / "runs" / "tiny")
        differences = _differences(logged_values(tmp_path / "runs" / "tiny"), logged_values(tiny_run))
        assert not differences, f"HEAD's tiny run differs from {REFERENCE_COMMIT[:7]}'s:\n" + "\n".join(differences[:20])
    finally:
        _git("worktree", "remove", "--force", str(worktree))
        _git("worktree", "prune")
