"""python -m racer_vec.pendulum: the learner on a task with a known answer (the learning itself is
measured in the README; here the harness: episodes, evaluation, reward scale, bad input)."""

import numpy as np
import pytest

from racer_vec import pendulum
from racer_vec.pendulum import PendulumArgs

TINY = PendulumArgs(steps=450, start_training=200, batch_size=32, hidden_dims=(16, 16), eval_interval=400,
                    eval_episodes=1)  # fmt: skip


@pytest.mark.slow
def test_tiny_check_trains_and_evaluates():
    logged = []
    evaluations = pendulum.run(TINY, log=logged.append)
    assert [step for step, _ in evaluations] == [400, 450]
    returns = np.array([value for _, value in evaluations])
    # 200-step episodes of rewards in [-16.3, 0]
    assert np.all((returns <= 0) & (returns >= -16.3 * 200))
    assert len(logged) == 2 and "eval return" in logged[0]


def test_scaled_returns_fit_the_support():
    # the worst discounted return, every step at Pendulum's lowest reward, lies inside [q_min, q_max]
    args = PendulumArgs()
    worst = -(np.pi**2 + 0.1 * 8**2 + 0.001 * 2**2) / args.reward_scale / (1 - pendulum.agent_config(args).discount)
    assert args.q_min <= worst < -160 and args.q_max >= 0


@pytest.mark.parametrize("argv, flag", [
    (["--cvar-risk", "1"], "--cvar-risk"),
    (["--steps", "500", "--start-training", "600"], "--start-training"),
    (["--batch-size", "0"], "--batch-size"),
    (["--q-min", "5", "--q-max", "5"], "--q-min"),
])
def test_bad_input_is_one_line_and_exit_2(argv, flag, capsys):
    assert pendulum.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err
