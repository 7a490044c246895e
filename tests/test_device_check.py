"""The device check (racer_vec.device_check): its comparison with the CPU's curves, and the whole
check on this CPU with tiny settings."""

import json

import pytest

from racer_vec import device_check


def curve(speeds, returns, start=16_000, every=1000):
    return {start + k * every: {"speed_ema": v, "episode_return_mean": r} for k, (v, r) in enumerate(zip(speeds, returns))}


REFERENCES = [curve([21.0, 21.5, 22.0], [10.0, 20.0, 30.0]), curve([21.5, 22.5, 22.0], [15.0, 25.0, 35.0])]


def test_a_curve_inside_the_cpu_runs_spread_is_within():
    # the references' largest speed gap is 1.0 m/s; their mean returns 20 and 25 (tolerance 5)
    result = device_check.band(curve([20.2, 23.4, 22.9], [12.0, 18.0, 21.0]), REFERENCES, 18_000)
    assert result["within"] and result["speed_tolerance_m_s"] == pytest.approx(1.0)
    assert result["steps"] == [16_000, 18_000, 3] and result["mean_return"] == pytest.approx(17.0)


@pytest.mark.parametrize(
    "speeds, returns",
    [([19.9, 22.0, 22.0], [20.0] * 3), ([21.5, 22.0, 23.6], [20.0] * 3), ([21.5] * 3, [5.0, 10.0, 14.0])],
    ids=["too slow", "too fast", "return too low"],
)
def test_a_curve_outside_the_spread_is_not_within(speeds, returns):
    assert not device_check.band(curve(speeds, returns), REFERENCES, 18_000)["within"]


def test_no_common_step_is_said():
    result = device_check.band(curve([21.0], [10.0], start=2_000), REFERENCES, 2_000)
    assert not result["compared"] and "no logged step" in result["why"]


@pytest.mark.slow
def test_the_check_runs_on_the_cpu_and_writes_json(tmp_path):
    output = tmp_path / "check.json"
    assert device_check.main(["--output", str(output), "--workers", "2", "--seconds", "0.5",
                              "--warmup-seconds", "0", "--train-steps", "0"]) == 0  # fmt: skip
    report = json.loads(output.read_text())
    assert set(report["learner"]) == {"racer_highway", "highway_fast"}
    assert all(row["agent_updates_per_s"] > 0 and row["compile_seconds"] > 0 for row in report["learner"].values())
    loop = report["loop_highway_fast"]["2"]
    assert set(loop["bounds_transitions_per_s"]) == {"simulate + learn", "max(simulate, learn)"}
    assert loop["transitions_per_s"] > 0 and isinstance(report["fast_simulator"]["fast_path"], bool)
    assert "not exercised" in report["data_parallel"]  # one CPU device
