"""The schedules of the policy's speed box (design §4.1): the speed floor and RACER's ramp on a learned
speed cap. Their values by transition, the config's rules, where the learner applies them (acting, the
actor and limit steps, not the ramp in the critic's next action), and a run that follows them."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from conftest import TINY_ARGS
from racer_vec import results
from racer_vec.config import ConfigError, resolve
from racer_vec.learner import agent as racer
from racer_vec.learner import devices, networks, replay
from racer_vec.learner.schedules import SpeedBounds, cap_ramp, schedule_metrics, speed_bounds, speed_floor, warmup_box

FAST = configs.PRESETS["highway_fast"]
TARGET_SPEED_ENV = dataclasses.replace(FAST.env, target_speed_action=True)  # [0, 40] m/s
CAP = dict(learned_limit=True, limited_action="speed")


def train_config(env=TARGET_SPEED_ENV, **agent):
    return dataclasses.replace(FAST, env=env, agent=dataclasses.replace(FAST.agent, **agent))


FLOOR = train_config(speed_floor=30.0, speed_floor_hold=200_000, speed_floor_end=400_000)
RAMP = train_config(**CAP, init_limit=0.625, cap_ramp_init=0.25, cap_ramp_end=300_000)


# ---------------------------------------------------------------------------------------------
# Values by transition


@pytest.mark.parametrize("env_steps, floor", [(0, 30.0), (200_000, 30.0), (250_000, 22.5), (300_000, 15.0),
                                              (400_000, 0.0), (1_600_000, 0.0)])  # fmt: skip
def test_the_floor_holds_then_falls_linearly_to_the_ranges_low_end(env_steps, floor):
    assert speed_floor(FLOOR.agent, FLOOR.env, env_steps) == pytest.approx(floor, abs=1e-12)
    # on [10, 40] m/s the floor falls to 10, not 0
    env = dataclasses.replace(TARGET_SPEED_ENV, target_speed_range=(10.0, 40.0))
    assert speed_floor(FLOOR.agent, env, env_steps) == pytest.approx(10.0 + (floor / 30.0) * 20.0, abs=1e-12)


@pytest.mark.parametrize("env_steps, ramp", [(0, 0.25), (100_000, 0.5), (150_000, 0.625), (300_000, 1.0),
                                             (600_000, 1.0)])  # fmt: skip
def test_the_ramp_rises_linearly_to_the_top(env_steps, ramp):
    assert cap_ramp(RAMP.agent, env_steps) == pytest.approx(ramp, abs=1e-12)
    late = dataclasses.replace(RAMP.agent, cap_ramp_start=100_000, cap_ramp_end=400_000)
    assert cap_ramp(late, env_steps) == pytest.approx(min(1.0, 0.25 + 0.75 * max(0, env_steps - 100_000) / 300_000))


def test_the_ramp_is_racers_own():
    """scripts/sim/train_online_states.py caps the throttle at min(1, 3 i / max_steps - 0.5) on [-1, 1]:
    with init 0.25 (-0.5 on [-1, 1]) from transition 0 to max_steps / 2 ours is the same cap."""
    max_steps = 600_000
    agent = dataclasses.replace(RAMP.agent, cap_ramp_init=0.25, cap_ramp_start=0, cap_ramp_end=max_steps // 2)
    for i in (0, 1, 1000, 123_457, 299_999, 300_000, 450_000):
        racers = min(1.0, 3 * i / max_steps - 0.5)
        assert 2 * cap_ramp(agent, i) - 1 == pytest.approx(racers, abs=1e-12)


def test_the_values_are_absolute_and_each_end_exact():
    # a run continued to a larger --max-steps keeps both schedules: they do not read it
    for cfg in (FLOOR, RAMP):
        longer = dataclasses.replace(cfg, max_steps=3 * cfg.max_steps)
        for t in range(0, 500_000, 12_345):
            assert speed_bounds(longer, t) == speed_bounds(cfg, t)
    assert speed_bounds(FLOOR, 0) == SpeedBounds(floor=np.float32(0.75))
    assert speed_bounds(FLOOR, 400_000).floor == 0.0 and speed_bounds(RAMP, 300_000).ramp == 1.0
    assert speed_bounds(FLOOR, 0, floor=False) == SpeedBounds()  # evaluation: no floor
    assert speed_bounds(RAMP, 0, floor=False) == SpeedBounds(ramp=np.float32(0.25))  # ... but the ramp
    assert speed_bounds(FAST, 0) == SpeedBounds()


def test_warmup_actions_and_metrics_follow_the_schedules():
    np.testing.assert_array_equal(np.stack(warmup_box(speed_bounds(FLOOR, 0))), [[0.5, -1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(np.stack(warmup_box(speed_bounds(RAMP, 0))), [[-1.0, -1.0], [-0.5, 1.0]])
    np.testing.assert_array_equal(np.stack(warmup_box(SpeedBounds())), [[-1.0, -1.0], [1.0, 1.0]])
    assert schedule_metrics(FLOOR, 300_000, None) == {"speed_floor": 15.0}
    assert schedule_metrics(RAMP, 150_000, 0.7) == {"cap_ramp": 0.625, "effective_limit": 0.625}
    assert schedule_metrics(RAMP, 150_000, 0.5) == {"cap_ramp": 0.625, "effective_limit": 0.5}
    assert schedule_metrics(FAST, 0, 0.5) == {}


# ---------------------------------------------------------------------------------------------
# The config's rules


@pytest.mark.parametrize("cfg, message", [
    (train_config(env=FAST.env, speed_floor=30.0, speed_floor_end=1), "--agent.speed-floor bounds a target speed"),
    (train_config(**CAP, speed_floor=30.0, speed_floor_end=1), "--agent.speed-floor cannot join a learned speed cap"),
    (train_config(speed_floor=40.0, speed_floor_end=1), r"--agent.speed-floor must be in .*\[0, 40\) m/s, got 40"),
    (train_config(speed_floor=-1.0, speed_floor_end=1), "--agent.speed-floor must be in"),
    (train_config(speed_floor=30.0, speed_floor_hold=5, speed_floor_end=4),
     r"--agent.speed-floor-hold \(5\) must not exceed --agent.speed-floor-end \(4\)"),
    (train_config(speed_floor=30.0), "--agent.speed-floor-end must be positive"),
    (train_config(speed_floor_end=10), "--agent.speed-floor-hold and --agent.speed-floor-end need --agent.speed-floor"),
    (train_config(cap_ramp_init=0.25, cap_ramp_end=1), "--agent.cap-ramp-init ramps a learned speed cap"),
    (train_config(**CAP, cap_ramp_init=0.0, cap_ramp_end=1), r"--agent.cap-ramp-init must be in \(0, 1\]"),
    (train_config(**CAP, cap_ramp_init=0.25, cap_ramp_start=2, cap_ramp_end=1), "--agent.cap-ramp-start"),
    (train_config(**CAP, cap_ramp_start=3),
     "--agent.cap-ramp-start and --agent.cap-ramp-end need --agent.cap-ramp-init"),
    (train_config(**CAP, cap_ramp_init=0.25, cap_ramp_end=-1), "--agent.cap-ramp-end must be >= 0"),
])  # fmt: skip
def test_the_config_refuses_what_a_schedule_cannot_do(cfg, message):
    with pytest.raises(ConfigError, match=message) as refused:
        resolve(cfg)
    assert "\n" not in str(refused.value)


def test_the_studys_arms_are_valid_configs():
    resolve(FLOOR)
    resolve(dataclasses.replace(RAMP, agent=dataclasses.replace(RAMP.agent, limits_lr=1e-5, cvar_limits=0.9)))
    resolve(train_config(speed_floor=0.0, speed_floor_hold=10, speed_floor_end=10))  # the low end: a floor of none


# ---------------------------------------------------------------------------------------------
# The squash with a floor


@pytest.mark.parametrize("speed_cap, limit", [(False, 0.4), (True, 0.9)], ids=["steering-limit", "speed-cap"])
@pytest.mark.parametrize("floor", [0.0, 0.3, 0.75])
def test_log_prob_with_a_floor_matches_numerical_change_of_variables(speed_cap, limit, floor):
    rng = np.random.default_rng(1)
    mean, log_std = rng.normal(size=(64, 2)) * 0.8, rng.uniform(-1.5, 0.5, (64, 2))
    # the box from its ends: the target speed in [2 floor - 1, top], top 2h - 1 under a cap, else 1
    low = np.array([2 * floor - 1, -1.0 if speed_cap else -limit])
    high = np.array([2 * limit - 1 if speed_cap else 1.0, 1.0 if speed_cap else limit])
    centre, scale = (low + high) / 2, (high - low) / 2
    box = networks.action_box(limit, speed_cap, jnp.float32(floor))
    np.testing.assert_allclose(np.stack([np.asarray(b) for b in box]), [low, high], atol=1e-6)
    actions = centre + rng.uniform(-0.97, 0.97, (64, 2)) * scale
    u = np.arctanh((actions - centre) / scale)
    std = np.exp(log_std)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    ours = networks.squashed_log_prob(f32((u - mean) / std), f32(u), f32(log_std), limit, speed_cap, f32(floor))
    np.testing.assert_allclose(np.asarray(networks.squash(f32(u), limit, speed_cap, f32(floor))), actions,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    delta = 1e-6
    u_of = lambda a: np.arctanh((a - centre) / scale)  # noqa: E731
    du_da = (u_of(actions + delta) - u_of(actions - delta)) / (2 * delta)
    gaussian = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(np.asarray(ours), np.sum(gaussian + np.log(du_da), axis=-1), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The learner: where each bound applies

OBS_DIM = 2


def small(**overrides):
    cfg = racer.AgentConfig(hidden_dims=(8,), num_atoms=11, q_min=-5.0, q_max=5.0, critic_layer_norm=False,
                            learned_limit=False, target_entropy=-1.0, cvar_risk=0.5, cvar_limits=0.5,
                            limits_lr=1e-2, limits_weight_decay=0.0)  # fmt: skip
    return dataclasses.replace(cfg, **overrides)


def capped_agent(h: float):
    return racer.init_agent(small(**CAP, init_limit=h), OBS_DIM, 1, 0)


OBS = jnp.asarray(np.random.default_rng(2).normal(size=(512, OBS_DIM)) * 3, jnp.float32)


@pytest.mark.slow
def test_sampled_actions_keep_the_floor_and_evaluation_actions_have_none():
    agent = racer.init_agent(small(), OBS_DIM, 1, 1)
    floored = np.asarray(racer.sample_actions(agent, OBS, jax.random.PRNGKey(0), SpeedBounds(floor=np.float32(0.75))))
    assert floored[:, 0].min() >= 0.5 and floored[:, 0].max() <= 1.0
    assert floored[:, 0].min() < 0.55 and floored[:, 0].max() > 0.95  # the whole box [0.5, 1] is used
    # same noise: the floor maps the same u onto [0.5, 1] instead of [-1, 1]
    free = np.asarray(racer.sample_actions(agent, OBS, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(floored[:, 0], 0.75 + 0.25 * free[:, 0], atol=1e-6)
    np.testing.assert_array_equal(floored[:, 1], free[:, 1])
    mean, _ = networks.actor_apply(agent.actor_params(), OBS)
    evaluation = speed_bounds(FLOOR, 0, floor=False)
    np.testing.assert_allclose(racer.deterministic_actions(agent, OBS, evaluation), np.tanh(mean), atol=1e-7)
    np.testing.assert_array_equal(racer.release_actions(agent, OBS * 100, evaluation),
                                  np.clip(np.asarray(networks.actor_apply(agent.actor_params(), OBS * 100)[0]), -1, 1))


def test_acting_takes_the_lower_of_the_learned_cap_and_the_ramp():
    agent = capped_agent(0.5)
    mean = np.asarray(networks.actor_apply(agent.actor_params(), OBS)[0])
    for ramp, top in ((0.3, -0.4), (0.8, 0.0)):  # the ramp binds below h = 0.5; above it, h does
        bounds = SpeedBounds(ramp=np.float32(ramp))
        actions = np.asarray(racer.sample_actions(agent, OBS, jax.random.PRNGKey(3), bounds))
        assert actions[:, 0].max() <= top + 1e-6 and actions[:, 0].max() > top - 0.05 and actions[:, 0].min() < -0.95
        h = min(0.5, ramp)
        np.testing.assert_allclose(racer.deterministic_actions(agent, OBS, bounds)[:, 0],
                                   h - 1 + h * np.tanh(mean[:, 0]), atol=1e-6)  # fmt: skip
        assert float(racer.release_actions(agent, OBS * 100, bounds)[:, 0].max()) <= top + 1e-6


def random_buffer():
    rng = np.random.default_rng(4)
    return replay.insert(replay.init_buffer(256, OBS_DIM), *(jnp.asarray(x, jnp.float32) for x in (
        rng.normal(size=(256, OBS_DIM)), rng.uniform(-1, 1, (256, 2)), rng.normal(size=256), np.ones(256),
        rng.normal(size=(256, OBS_DIM)))))  # fmt: skip


@functools.cache
def update_inputs(cfg):
    """One update's inputs for agents of `cfg` (a buffer of random transitions, its minibatches and
    noise) and its critic and policy steps, compiled once per config and bounds structure."""
    setup = racer.Setup(cfg, racer.make_optimizers(cfg), racer.atoms_of(cfg), devices.Shards(1, 32), 32, 2)
    buffer = random_buffer()
    batches, noise, actor_noise = racer.draw_minibatches(setup, buffer, jax.random.PRNGKey(5), jax.random.PRNGKey(6))
    critic_steps = jax.jit(functools.partial(racer.critic_steps, setup))
    policy_step = jax.jit(functools.partial(racer.policy_step, setup))
    return buffer, batches, noise, actor_noise, critic_steps, policy_step


def critic_after(cfg, agent, bounds):
    _, batches, noise, _, critic_steps, _ = update_inputs(cfg)
    critic, _, _ = critic_steps(agent, batches, noise, jnp.float32(0.5), jnp.float32(1e-3), bounds)
    return np.asarray(critic.params)


@pytest.mark.slow  # compiles the critic or policy step
def test_the_critics_next_action_takes_the_learned_cap_and_the_floor_but_not_the_ramp():
    """RACER's code passes its ramp to acting, the actor and the limit, never to the critic's target
    (output_range_next stays None): the target's next action is the learned cap's alone."""
    cfg = small(**CAP, init_limit=0.5)
    agent = capped_agent(0.5)
    ramped = functools.partial(critic_after, cfg, bounds=SpeedBounds(ramp=np.float32(0.2)))  # binds below h = 0.5
    unramped = critic_after(cfg, agent, SpeedBounds(ramp=np.float32(1.0)))
    np.testing.assert_array_equal(ramped(agent), unramped)
    # ... while the target does read the learned cap: another one moves the critic
    assert not np.array_equal(ramped(agent.replace(limit=agent.limit.replace(params=jnp.float32(0.35)))), unramped)
    # the floor is in it (design §4.3)
    plain = racer.init_agent(small(), OBS_DIM, 1, 0)
    low_end = critic_after(small(), plain, SpeedBounds(floor=np.float32(0.0)))
    assert not np.array_equal(critic_after(small(), plain, SpeedBounds(floor=np.float32(0.5))), low_end)


def policy_after(agent, bounds, alpha=1.0):
    _, batches, _, actor_noise, _, policy_step = update_inputs(small(**CAP, init_limit=0.5))
    actor, limit, info = policy_step(agent, agent.critic.params, batches.observations[-1], actor_noise,
                                     jnp.float32(alpha), bounds)  # fmt: skip
    return np.asarray(actor.params), float(limit.params), np.asarray(info["log_probs"])


@pytest.mark.slow  # compiles the critic or policy step
def test_the_actor_and_the_limit_learn_within_the_ramp():
    agent = capped_agent(0.5)
    actor, limit, log_probs = policy_after(agent, SpeedBounds(ramp=np.float32(1.0)))
    assert limit != 0.5  # the learned cap moves where the ramp does not bind ...
    # ... and exactly so below the ramp's top, at the tie h = ramp too
    for ramp in (0.5, 0.9):
        same = policy_after(agent, SpeedBounds(ramp=np.float32(ramp)))
        np.testing.assert_array_equal(same[0], actor)
        assert same[1] == limit
    ramped_actor, ramped_limit, ramped_log_probs = policy_after(agent, SpeedBounds(ramp=np.float32(0.3)))
    # the actor's log-probabilities are those of the box [-1, 2 * 0.3 - 1]: -log 0.3 in place of -log 0.5
    np.testing.assert_allclose(ramped_log_probs - log_probs, np.log(0.5) - np.log(0.3), rtol=1e-5)
    assert not np.array_equal(ramped_actor, actor)
    # where the ramp binds nothing of the loss depends on h, the entropy correction included: it stays
    assert ramped_limit == 0.5


def device_run(ramps=(0.3, 0.6)) -> dict:
    """Iterations of a capped learner under moving ramps, on this process's devices (design §4.8)."""
    cfg = small(**CAP, init_limit=0.5)
    learner = racer.make_learner(cfg, batch_size=32, utd_ratio=2, updates_per_iteration=2)
    agent, buffer = capped_agent(0.5), random_buffer()
    for ramp in ramps:
        agent, metrics = learner.iteration(agent, buffer, SpeedBounds(ramp=np.float32(ramp)))
    leaves = [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(agent)]
    return {"devices": learner.num_devices, "compiles": learner.iteration._cache_size(), "leaves": leaves,
            "finite": bool(metrics["finite"])}  # fmt: skip


@pytest.mark.slow  # two processes compile the learner
def test_one_and_two_devices_agree_under_a_moving_ramp():
    script = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_schedules; "
              "print(json.dumps(test_schedules.device_run()))")  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    one = device_run()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    two = json.loads(out.strip().splitlines()[-1])
    assert (one["devices"], two["devices"]) == (1, 2) and one["compiles"] == two["compiles"] == 1
    assert one["finite"] and two["finite"]
    for a, b in zip(one["leaves"], two["leaves"], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A run


class CapturingEvaluator:
    """Stands in for the periodic evaluator: keeps the actions its policy gives for `obs`."""

    def __init__(self, obs):
        self.obs, self.actions = obs, []

    def evaluate(self, policy, num_episodes, seed, should_stop=None):
        self.actions.append(np.asarray(policy(self.obs)))
        return {}

    def dead_workers(self):
        return []

    def close(self):
        pass


RUN_SCHEDULES = {
    "floor": ("--agent.speed-floor", "30", "--agent.speed-floor-hold", "100", "--agent.speed-floor-end", "300"),
    "ramp": ("--agent.learned-limit", "--agent.limited-action", "speed", "--agent.init-limit", "0.8",
             "--agent.cap-ramp-init", "0.25", "--agent.cap-ramp-end", "400"),
}  # fmt: skip


@pytest.mark.slow  # a real run
@pytest.mark.parametrize("schedule", RUN_SCHEDULES)
def test_a_run_acts_learns_and_logs_within_its_schedule(schedule, tmp_path):
    from racer_vec.run.train_cli import parse_train_args
    from racer_vec.run.training import Trainer

    cfg = parse_train_args([*TINY_ARGS, "--env.target-speed-action", *RUN_SCHEDULES[schedule], "--max-steps", "200",
                            "--runs-dir", str(tmp_path), "--run-name", schedule,
                            "--wandb-mode", "disabled"])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.evaluator.close()
        obs = np.asarray(np.random.default_rng(0).normal(size=(16, cfg.env.obs_dim)), np.float32)
        trainer.evaluator = CapturingEvaluator(obs)
        assert trainer.run() == 0
        # every stored action, the warm-up's included, within the schedules' box at its transition
        # (two workers: row p was stored at transition p - p % 2)
        actions = np.asarray(trainer.buffer.actions)[:200, 0]
        boxes = [warmup_box(speed_bounds(cfg, p - p % 2)) for p in range(200)]
        low, high = (np.array([box[i][0] for box in boxes]) for i in (0, 1))
        assert np.all(actions >= low - 1e-6) and np.all(actions <= high + 1e-6)
        assert np.any(actions < low + 0.05) and np.any(actions > high - 0.05)
        rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["env_steps"] for r in rows] == [100, 200]
        if schedule == "floor":
            assert [r["speed_floor"] for r in rows] == [30.0, 15.0]
        else:
            assert [r["cap_ramp"] for r in rows] == [0.4375, 0.625]
            assert rows[-1]["effective_limit"] == min(rows[-1]["limit"], 0.625)
            # the ramp bound the whole run (0.25 ... 0.625 < h = 0.8): nothing but the weight decay (below
            # float32's resolution here) moved the cap
            assert float(trainer.agent.limit.params) == pytest.approx(0.8, abs=1e-6)
        # no recompilation as the schedule moved; evaluation acts without the floor, within the ramp
        assert trainer.learner.iteration._cache_size() == 1 and trainer._sample._cache_size() == 1
        (evaluated,) = trainer.evaluator.actions
        evaluation = speed_bounds(cfg, 200, floor=False)
        expected = racer.deterministic_actions(trainer.agent, obs, evaluation)
        np.testing.assert_array_equal(evaluated, expected)
        if schedule == "floor":
            np.testing.assert_array_equal(evaluated, racer.deterministic_actions(trainer.agent, obs))
        # evaluate.py likewise, at the checkpoint's step
        from racer_vec.run.eval_cli import EvalArgs, build_policy, resolve_target

        for rule, act in (("deterministic", racer.deterministic_actions), ("release", racer.release_actions)):
            args = EvalArgs(checkpoint=str(trainer.run_dir), deterministic=rule == "deterministic", protocol=(
                "release" if rule == "release" else "racer-vec"))  # fmt: skip
            policy = build_policy(args, resolve_target(args))
            np.testing.assert_array_equal(policy(obs, None, None), act(trainer.agent, obs, evaluation))
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------
# Resume and results


def test_a_resumed_run_keeps_its_schedules(tmp_path):
    """The schedules are functions of the config and the transition count, both saved with the run: the
    config (config.json) reads back whole, --resume refuses to change a schedule, and a larger
    --max-steps leaves every value where it was."""
    from racer_vec.config import from_dict, to_dict
    from racer_vec.run.train_cli import resume_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = resolve(FLOOR)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert from_dict(type(cfg), json.loads((run / "config.json").read_text())) == cfg
    resumed = resume_config(["--max-steps", "3200000"], str(run))
    assert all(speed_bounds(resumed, t) == speed_bounds(cfg, t) for t in (0, 200_000, 250_008, 400_000, 2_000_000))
    with pytest.raises(ConfigError, match="--agent.speed-floor-end cannot change on --resume"):
        resume_config(["--agent.speed-floor-end", "500000"], str(run))


def _result(cfg, run="r"):
    return {"run": run, "preset": cfg.preset, "seed": cfg.seed, "cvar_risk": cfg.agent.cvar_risk, "env_steps": 600_000,
            "evaluation": {"mean_return": 1.0}, "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}  # fmt: skip


def test_results_files_and_tables_say_which_schedules_trained_a_run():
    floor, ramp, plain = (resolve(cfg) for cfg in (FLOOR, RAMP, train_config()))
    assert results.schedules(_result(floor)["config"]) == {"speed_floor": 30.0, "speed_floor_hold": 200_000,
                                                          "speed_floor_end": 400_000}  # fmt: skip
    assert results.schedules(_result(ramp)["config"]) == {"cap_ramp_init": 0.25, "cap_ramp_start": 0,
                                                         "cap_ramp_end": 300_000}  # fmt: skip
    assert results.schedules(_result(plain)["config"]) == {}
    table = results.table([_result(floor, "b"), _result(ramp, "c"), _result(plain, "a")]).splitlines()
    assert "| schedules |" in table[0]
    assert table[2].endswith("| floor 30 m/s to 200k, none by 400k | 1.0 |")
    assert table[3].endswith("| cap ramp 0.25 to 0k, 1 by 300k | 1.0 |") and table[4].endswith("| — | 1.0 |")
    assert "schedules" not in results.table([_result(plain)])  # no column where no run has one
