"""A command run by an interpreter without racer-vec's dependencies (README: Set up) says so in one
line naming make test and .venv; a module of racer-vec's own that is missing keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(python, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with the standard library alone, as a newcomer's system python3 is."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    return venv / "bin" / "python"


@pytest.mark.parametrize(
    "command",
    [
        ["train.py", "--help"],
        ["evaluate.py", "--help"],
        ["train.py", "highway_fast"],
        ["-m", "racer_vec.plot", "--help"],
        ["-m", "racer_vec.sweep", "--help"],
    ],
    ids=" ".join,
)
def test_a_bare_interpreter_gets_one_line(bare_python, command):
    out = run(bare_python, *command)
    assert out.returncode != 0 and out.stdout == ""
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("racer-vec: missing dependency '")
    assert "`make test`" in out.stderr and "source .venv/bin/activate" in out.stderr
    assert str(bare_python) in out.stderr  # which interpreter it was


@pytest.mark.parametrize(
    ("module", "one_line"),
    [("racer_vec.no_such_module", False), ("configs.no_such_preset", False), ("no_such_dependency", True)],
)
def test_only_a_missing_third_party_module_loses_its_traceback(module, one_line):
    code = f"""
from racer_vec.missing_dependency import report_missing_dependencies
report_missing_dependencies()
import {module}
"""
    out = run(sys.executable, "-c", code)
    assert out.returncode == 1
    assert ("Traceback" not in out.stderr) == one_line, out.stderr
    assert f"'{module}'" in out.stderr
