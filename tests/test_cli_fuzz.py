"""Bad numbers on both command lines, generated from the config dataclasses (so a new field is
covered the day it is added): for every numeric field, zero, a negative value, a non-number and
NaN give a refusal naming the flag (exit 2), or a value listed in ACCEPTED below, which the slow
test at the end trains with. Never a traceback.

Refusals are found by parsing and validating, as the entry points do before anything starts.
"""

import dataclasses
import json
import math
import subprocess
import sys
import types
import typing

import pytest
import tyro

from conftest import ROOT, TINY_ARGS, train_here
from racer_vec.run.train_cli import parse_train_args
from racer_vec.config import ConfigError, TrainConfig
from racer_vec.validation import flag_name
from racer_vec.run.eval_cli import EvalArgs, validate_args

# (flag, value) pairs that are meaningful settings, with why.
ACCEPTED = {
    # counts where 0 means "off" or "none"
    ("--start-training", "0"): "no random warm-up: updates start once the buffer holds a batch",
    ("--eval-interval", "0"): "periodic evaluation off",
    ("--reset-interval", "0"): "no reset schedule",
    ("--max-worker-restarts", "0"): "the first worker fault stops the run",
    ("--keep-checkpoint-every", "0"): "no milestones: only the newest checkpoints",
    ("--env.max-offroad-steps", "0"): "the env layer's offroad rule off",
    ("--seed", "0"): "a seed",
    ("--eval-seed", "0"): "a seed",
    # reward weights and offsets of either sign
    **{(f"--env.{name}", v): "a reward weight" for name in (
        "collision-reward", "right-lane-reward", "high-speed-reward", "lane-change-reward",
        "offroad-termination-reward") for v in ("0", "-1")},
    ("--reward.speed-weight", "0"): "no speed term",
    ("--reward.speed-weight", "-1"): "a speed penalty",
    ("--reward.safety-coeff", "0"): "no safety term (highway_fast's setting)",
    # the agent
    ("--agent.discount", "0"): "myopic",
    ("--agent.q-min", "-1"): "a support below -1 ... q-max",
    ("--agent.q-min", "0"): "a support 0 ... q-max",
    ("--agent.q-max", "0"): "a support q-min ... 0",
    ("--agent.q-max", "-1"): "a support q-min ... -1",
    ("--agent.cvar-risk", "0"): "the mean",
    ("--agent.cvar-limits", "0"): "the mean, for the limit",
    ("--agent.target-entropy", "0"): "an entropy target",
    ("--agent.target-entropy", "-1"): "an entropy target",
    ("--agent.q-entropy-target-diff", "0"): "an entropy-gap target",
    ("--agent.q-entropy-target-diff", "-1"): "an entropy-gap target",
    **{(f"--agent.{name}", "0"): "frozen: a valid ablation" for name in (
        "actor-lr", "critic-lr", "temp-lr", "limits-lr", "q-entropy-lagrange-lr", "critic-weight-decay",
        "limits-weight-decay")},
    **{(f"--agent.{name}", "0"): "a schedule's transition, its default: none without its schedule" for name in (
        "speed-floor-hold", "speed-floor-end", "cap-ramp-start", "cap-ramp-end")},
}  # fmt: skip
EVAL_ACCEPTED = {
    ("--seed", "0"): "a seed",
    ("--max-videos", "0"): "no videos",
    ("--max-worker-restarts", "0"): "the first worker fault ends the evaluation",
    ("--constant-action", "0"): "coasting straight",
    ("--constant-action", "-1"): "full brake, full left",
}
BAD = ("0", "-1", "abc", "nan")


def _numeric_fields(cls, prefix=""):
    """(dotted path, arity) of every int/float field (tuples of them too), nested sections included."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        while typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint, args = args[0], typing.get_args(args[0])
        if hint in (int, float):
            yield prefix + f.name, 1
        elif typing.get_origin(hint) is tuple and args and all(a in (int, float, Ellipsis) for a in args):
            yield prefix + f.name, 1 if Ellipsis in args else len(args)


TRAIN_FIELDS = list(_numeric_fields(TrainConfig))
EVAL_FIELDS = list(_numeric_fields(EvalArgs))


def test_the_fields_are_found():
    paths = {path for path, _ in TRAIN_FIELDS}
    assert {"num_envs", "agent.cvar_risk", "env.vehicles_density", "reward.speed_range", "agent.hidden_dims",
            "agent.target_entropy", "eval_seed", "max_worker_restarts"} <= paths  # fmt: skip
    assert {path for path, _ in EVAL_FIELDS} == {"num_episodes", "num_workers", "seed", "max_videos", "duration",
                                                 "constant_action", "hold_speed", "idm_target_speed",
                                                 "worker_timeout", "max_worker_restarts"}  # fmt: skip
    assert all(flag in {flag_name(p) for p in paths} for flag, _ in ACCEPTED)


def _refused(run, flag, capsys) -> str | None:
    """The refusal of a parse-and-validate call, None if it accepted the value."""
    try:
        run()
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and flag in message, message
        return message
    except SystemExit as exc:  # tyro's own parse error: its formatted message names the flag
        assert exc.code == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err, err
        return err
    return None


@pytest.mark.parametrize("path, arity", TRAIN_FIELDS, ids=[p for p, _ in TRAIN_FIELDS])
def test_train_refuses_bad_numbers_naming_the_flag(path, arity, capsys):
    flag = flag_name(path)
    for value in BAD:
        argv = ["highway_fast", flag, *[value] * arity]
        refusal = _refused(lambda: parse_train_args(argv), flag, capsys)
        if refusal is None:
            assert (flag, value) in ACCEPTED, f"{flag} {value} is accepted: refuse it, or list why it trains"


@pytest.mark.parametrize("path, arity", EVAL_FIELDS, ids=[p for p, _ in EVAL_FIELDS])
def test_evaluate_refuses_bad_numbers_naming_the_flag(path, arity, capsys):
    flag = flag_name(path)
    for value in BAD:
        argv = ["--policy", "zero", "--preset", "highway_fast", flag, *[value] * arity]
        refusal = _refused(lambda: validate_args(tyro.cli(EvalArgs, args=argv)), flag, capsys)
        if refusal is None:
            assert (flag, value) in EVAL_ACCEPTED, f"{flag} {value} is accepted: refuse it, or list why it runs"


@pytest.mark.slow
def test_entry_points_print_one_line_and_exit_2():
    for script, args in (
        ("train.py", ["--seed", "-1"]),
        ("train.py", ["highway_fast", "--env.vehicles-density", "0"]),
        ("train.py", ["--agent.q-min", "nan"]),
        ("evaluate.py", ["--policy", "zero", "--preset", "highway_fast", "--seed", "-1"]),
    ):
        result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and args[-2] in lines[0], lines


def _with(args, **flags):
    args = list(args)
    for flag, value in flags.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


# The accepted values, in two runs. A support cannot take both bounds at 0 or at -1: the zeros run
# takes q-min 0, the other q-max -1 below a q-min of -5 (q-min -1 and q-max 0 are the same code).
ACCEPTED_RUNS = [
    {flag: value for (flag, value) in ACCEPTED if value == "0" and flag not in ("--start-training", "--agent.q-max")},
    {**{flag: value for (flag, value) in ACCEPTED if value == "-1" and flag != "--agent.q-min"},
     "--agent.q-min": "-5", "--start-training": "0", "--batch-size": "2"},
]


@pytest.mark.slow
@pytest.mark.parametrize("flags", ACCEPTED_RUNS, ids=["zeros", "negatives"])
def test_accepted_values_train(flags, tmp_path, capfd):
    args = _with(TINY_ARGS, **{"--max-steps": "200", "--eval-interval": "100", "--checkpoint-interval": "200"})
    args += [item for flag, value in flags.items() for item in (flag, value)]
    if "--eval-interval" in flags:  # "0" turns it off; the other run evaluates
        args = _with(args, **{"--eval-interval": "0"})
    code = train_here(*args, "--runs-dir", str(tmp_path), "--run-name", "accepted", "--wandb-mode", "disabled")
    err = capfd.readouterr().err  # the file descriptor's: the env workers' output too
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    last = json.loads((tmp_path / "accepted" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["env_steps"] == 200 and last["updates"] > 0 and math.isfinite(last["critic_loss"])
