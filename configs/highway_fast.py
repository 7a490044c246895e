"""The public highway-racer release: highway-fast-v0, 8 workers, PointNet encoders, CVaR 0.5."""

from racer_vec.config import AgentConfig, EnvConfig, RewardConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        preset="highway_fast",
        env=EnvConfig(
            env_id="highway_env:highway-fast-v0",
            observed_vehicles=8,
            vehicles_count=10,
            lanes_count=4,
            vehicles_density=0.75,
            # the release wrote `initial_spacing: 2`, a key highway-env never reads
            ego_spacing=1.5,
            collision_reward=-10.0,
            right_lane_reward=0.1,
            high_speed_reward=0.5,
            lane_change_reward=0.0,
            reward_speed_range=(10.0, 40.0),
            normalize_reward=False,
            offroad_terminal=True,
            max_offroad_steps=0,
            offroad_termination_reward=-2.0,
        ),
        reward=RewardConfig(speed_correction=False, safety_coeff=0.0),
        agent=AgentConfig(
            encoder="pointnet",
            cvar_risk=0.5,
            num_atoms=151,
            q_min=-40.0,
            q_max=80.0,
            target_entropy=-2.0,
            q_entropy_target_diff=0.5,
            q_entropy_lagrange_lr=1e-4,
            learned_limit=False,
        ),
        num_envs=8,
        batch_size=128,
        utd_ratio=8,
        updates_per_iteration=1,
        buffer_size=30_000,
        start_training=8000,
        max_steps=1_600_000,
        # the release's schedule: one reset, at vector step 100k = 800k transitions (design §11)
        reset_interval=100_000,
    )
