"""The RACER agent (design §4): one pytree of train states, and a learner whose whole training
iteration is one jitted dispatch.

Parameterizations (all scalars are float32 arrays inside the agent):
- temperature alpha = exp(log_alpha), lagrange lambda = exp(log_lambda) >= 0; both losses are
  differentiated w.r.t. the log.
- the limit h (the steering half-width, or the speed cap's fraction of the target-speed range) is
  stored directly and projected back onto [LIMIT_MIN, 1] after every step (AdamW's weight decay then
  pulls it towards the conservative side, for the cap towards the lowest speed). Without a learned
  limit it stays at 1, the env's full range.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from racer_vec.learner import devices, networks, replay
from racer_vec.config import ACTION_DIM, AgentConfig, ConfigError
from racer_vec.learner.distributional import categorical_l2_project, cvar
from racer_vec.learner.schedules import SpeedBounds, effective_limit

LIMIT_MIN = 1e-3
"""Lower end of the learned limit h, which must stay in (0, 1]."""
METRICS = (
    "critic_loss", "actor_loss", "limit_loss", "temperature_loss", "lagrange_loss", "cross_entropy",
    "entropy_data", "entropy_ood", "entropy_gap", "entropy", "cvar", "q_mean", "temperature", "limit", "lagrange",
)  # fmt: skip
"""Scalar float32 metrics of an iteration (its last agent update), plus the bool `finite`."""
RNG_IMPL = "unsafe_rbg"
"""PRNG of initialization and updates: XLA's RngBitGenerator, which compiles to a single op where
threefry adds loops and kernels (and seconds of compile time). Acting uses the caller's keys."""


@flax.struct.dataclass
class TrainState:
    """Parameters and their optimizer state (the optax transform itself lives in the Learner)."""

    params: Any
    opt_state: Any


@flax.struct.dataclass
class RacerAgent:
    """Network parameters are flat vectors (networks.Layout); the layouts are static pytree metadata."""

    actor: TrainState  # params: (actor_size,)
    critic: TrainState  # params: (num_qs, critic_size), one row per ensemble member
    target_critic: jax.Array  # (num_qs, critic_size), Polyak-averaged
    temperature: TrainState  # params: log alpha
    limit: TrainState  # params: the limit h
    lagrange: TrainState  # params: log lambda
    key: jax.Array  # uint32[4]: data of the RNG_IMPL key the updates draw from
    updates: jax.Array  # int32: agent updates done
    actor_layout: networks.Layout = flax.struct.field(pytree_node=False)
    critic_layout: networks.Layout = flax.struct.field(pytree_node=False)
    speed_cap: bool = flax.struct.field(pytree_node=False, default=False)
    """The limit is a one-sided cap on the target speed (index 0), not a symmetric steering box: the
    acting functions read it here, so they need no config."""

    def actor_params(self) -> networks.Params:
        return self.actor_layout.unravel(self.actor.params)

    def critic_params(self) -> networks.Params:
        """Stacked ensemble parameters (leading num_qs axis)."""
        return self.critic_layout.unravel(self.critic.params)


class Optimizers(NamedTuple):
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    temperature: optax.GradientTransformation
    limit: optax.GradientTransformation
    lagrange: optax.GradientTransformation


def make_optimizers(cfg: AgentConfig) -> Optimizers:
    return Optimizers(
        actor=optax.adam(cfg.actor_lr),
        critic=optax.adamw(cfg.critic_lr, weight_decay=cfg.critic_weight_decay),
        temperature=optax.adam(cfg.temp_lr),
        limit=optax.adamw(cfg.limits_lr, weight_decay=cfg.limits_weight_decay),
        lagrange=optax.adam(cfg.q_entropy_lagrange_lr),
    )


def atoms_of(cfg: AgentConfig) -> np.ndarray:
    return np.linspace(cfg.q_min, cfg.q_max, cfg.num_atoms, dtype=np.float32)


def init_agent(cfg: AgentConfig, obs_dim: int, observed_vehicles: int, seed) -> RacerAgent:
    """A fresh agent; `seed` is an int or a PRNG key. With several devices it is replicated on all."""
    if cfg.encoder == "pointnet" and obs_dim != observed_vehicles * networks.VEHICLE_FEATURES:
        raise ValueError(
            f"PointNet expects obs_dim = {networks.VEHICLE_FEATURES} * observed_vehicles "
            f"({observed_vehicles}), got {obs_dim}"
        )
    if isinstance(seed, (int, np.integer)):
        key_data = jax.random.key_data(jax.random.key(int(seed), impl=RNG_IMPL))
    else:
        key_data = jax.random.bits(seed, (4,), jnp.uint32)
    return _agent_initializer(cfg, obs_dim)(key_data)


@functools.cache
def _agent_initializer(cfg: AgentConfig, obs_dim: int):
    # Built inside jit so that every leaf is its own buffer (the agent is donated to the update),
    # and compiled once per architecture.
    return jax.jit(functools.partial(_init_agent, cfg, obs_dim), out_shardings=devices.replicated_sharding())


def reset_agent(cfg: AgentConfig, obs_dim: int, agent: RacerAgent) -> RacerAgent:
    """The release's reset (design §11): every train state but the temperature re-initialized, with
    fresh optimizer states, from the agent's own key stream (so a resumed run resets identically);
    the temperature, the update count and, unless --agent.no-keep-limit-on-reset, the limit carry over."""
    return _agent_resetter(cfg, obs_dim)(agent)


@functools.cache
def _agent_resetter(cfg: AgentConfig, obs_dim: int):
    def reset(agent: RacerAgent) -> RacerAgent:
        key, k_init = jax.random.split(jax.random.wrap_key_data(agent.key, impl=RNG_IMPL))
        fresh = _init_agent(cfg, obs_dim, jax.random.key_data(k_init))
        fresh = fresh.replace(temperature=agent.temperature, key=jax.random.key_data(key), updates=agent.updates)
        return fresh.replace(limit=agent.limit) if cfg.keep_limit_on_reset else fresh

    return jax.jit(reset, out_shardings=devices.replicated_sharding())


def _init_agent(cfg: AgentConfig, obs_dim: int, key_data) -> RacerAgent:
    key = jax.random.wrap_key_data(key_data, impl=RNG_IMPL)
    k_actor, k_critic, k_updates = jax.random.split(key, 3)
    opt = make_optimizers(cfg)

    def state(tx, params):
        return TrainState(params=params, opt_state=tx.init(params))

    scalar = functools.partial(jnp.asarray, dtype=jnp.float32)
    actor_params = networks.actor_init(k_actor, cfg, obs_dim)
    critic_params = networks.ensemble_init(k_critic, cfg, obs_dim)
    actor_layout = networks.Layout.of(actor_params)
    critic_layout = networks.Layout.of(critic_params, batch_dims=1)
    critic_flat = critic_layout.ravel(critic_params, batch_dims=1)
    return RacerAgent(
        actor=state(opt.actor, actor_layout.ravel(actor_params)),
        critic=state(opt.critic, critic_flat),
        target_critic=jnp.copy(critic_flat),
        temperature=state(opt.temperature, scalar(np.log(cfg.init_temperature))),
        limit=state(opt.limit, scalar(cfg.init_limit if cfg.learned_limit else 1.0)),
        lagrange=state(opt.lagrange, scalar(np.log(cfg.q_entropy_lagrange_init))),
        key=jax.random.key_data(k_updates),
        updates=jnp.zeros((), jnp.int32),
        actor_layout=actor_layout,
        critic_layout=critic_layout,
        speed_cap=cfg.learned_limit and cfg.limited_action == "speed",
    )


# ---------------------------------------------------------------------------------------------
# Acting: no config needed, so these compile once per observation shape whatever the run's
# hyperparameters.


@jax.jit
def sample_actions(agent: RacerAgent, observations, key, bounds: SpeedBounds = SpeedBounds()) -> jax.Array:
    """Stochastic actions (N, 2) within the learned limit and the schedules' `bounds`, for observations (N, obs_dim)."""
    mean, log_std = networks.actor_apply(agent.actor_params(), observations)
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    limit = effective_limit(agent.limit.params, bounds)
    return networks.sample_policy(mean, log_std, limit, noise, agent.speed_cap, bounds.floor)[0]


@jax.jit
def deterministic_actions(agent: RacerAgent, observations, bounds: SpeedBounds = SpeedBounds()) -> jax.Array:
    """Evaluation actions: tanh(mean) mapped onto the limited range."""
    mean, _ = networks.actor_apply(agent.actor_params(), observations)
    return networks.squash(mean, effective_limit(agent.limit.params, bounds), agent.speed_cap, bounds.floor)


@jax.jit
def release_actions(agent: RacerAgent, observations, bounds: SpeedBounds = SpeedBounds()) -> jax.Array:
    """The release's evaluation actions: the Gaussian's mean clipped to the action box, no tanh
    (design §11); a learned limit still bounds them."""
    mean, _ = networks.actor_apply(agent.actor_params(), observations)
    low, high = networks.action_box(effective_limit(agent.limit.params, bounds), agent.speed_cap, bounds.floor)
    return jnp.clip(mean, low, high)


# ---------------------------------------------------------------------------------------------
# Learning: small pure updaters, composed into one agent update (design §4.3-4.7)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a compiled update is built from: the resolved agent config, its optimizers, the fixed
    atoms and the device split. Static: the updaters close over nothing else."""

    cfg: AgentConfig
    opt: Optimizers
    atoms: np.ndarray  # (K,)
    shards: devices.Shards
    batch_size: int
    utd_ratio: int


@jax.named_call
def apply_step(tx: optax.GradientTransformation, state: TrainState, grads) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def ensemble(layout: networks.Layout, flat_params, obs, actions):
    """Logits (num_qs, ..., K) of every critic member."""
    return networks.ensemble_apply(layout.unravel(flat_params), obs, actions)


@jax.named_call
def draw_minibatches(setup: Setup, buffer: replay.ReplayBuffer, k_batch, k_noise):
    """U minibatches (fields (U, B, ...)) and standard normal noise for the next actions and the
    OOD actions of each (2, U, B, A) and for the actor's own step (B, A), drawn at once."""
    shards, utd, batch = setup.shards, setup.utd_ratio, setup.batch_size
    indices = shards.local(replay.sample_indices(buffer, k_batch, (utd, batch)), axis=1)
    noise = shards.local(jax.random.normal(k_noise, (2 * utd + 1, batch, ACTION_DIM)), axis=1)
    return replay.gather(buffer, indices), noise[:-1].reshape(2, utd, -1, ACTION_DIM), noise[-1]


@jax.named_call
def critic_loss(setup: Setup, layout, lagrange, flat_params, obs, actions, ood_actions, target):
    """Cross-entropy against the projected target + λ (H_data − H_ood) (design §4.3)."""
    # data and OOD actions share the state encoding: logits (num_qs, 2, B, K)
    log_p = jax.nn.log_softmax(ensemble(layout, flat_params, obs, jnp.stack([actions, ood_actions])))
    cross_entropy = -jnp.mean(jnp.sum(target * log_p[:, 0], axis=-1))
    entropy_data, entropy_ood = jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1), axis=(0, 2))
    loss = cross_entropy + lagrange * (entropy_data - entropy_ood)
    return loss, {
        "critic_loss": loss,
        "cross_entropy": cross_entropy,
        "entropy_data": entropy_data,
        "entropy_ood": entropy_ood,
    }


def critic_step(setup: Setup, layout, alpha, lagrange, carry, minibatch):
    """One critic minibatch: projected target with the termination mask, AdamW, Polyak (design §4.3)."""
    cfg, critic, target_params = setup.cfg, *carry
    batch, next_actions, next_log_probs, ood_actions = minibatch
    target = critic_target(setup, layout, alpha, target_params, batch, next_actions, next_log_probs)
    grads, info = jax.grad(functools.partial(critic_loss, setup, layout, lagrange), has_aux=True)(
        critic.params, batch.observations, batch.actions, ood_actions, target
    )
    critic = apply_step(setup.opt.critic, critic, setup.shards.pmean(grads))
    target_params = optax.incremental_update(critic.params, target_params, cfg.tau)
    return (critic, target_params), setup.shards.pmean(info)


@jax.named_call
def critic_target(setup: Setup, layout, alpha, target_params, batch, next_actions, next_log_probs):
    """The target critic's distributions at (s', a') projected onto the atoms (design §4.3): (num_qs, B, K)."""
    cfg = setup.cfg
    next_probs = jax.nn.softmax(ensemble(layout, target_params, batch.next_observations, next_actions))
    if not cfg.independent_ensemble:
        next_probs = jnp.broadcast_to(jnp.mean(next_probs, axis=0), next_probs.shape)
    atoms = setup.atoms
    next_atoms = atoms - alpha * next_log_probs[:, None] if cfg.backup_entropy else atoms
    # r + gamma * mask * z, mask = 0 on true termination: (B, K), shared by every member
    masks = jnp.ones_like(batch.masks) if cfg.bootstrap_terminations else batch.masks
    target_atoms = batch.rewards[:, None] + cfg.discount * masks[:, None] * next_atoms
    return categorical_l2_project(target_atoms, next_probs, atoms)  # (num_qs, B, K)


def critic_steps(setup: Setup, agent: RacerAgent, batches, noise, alpha, lagrange, bounds: SpeedBounds):
    """The U critic minibatches, scanned; returns (critic, target_critic, per-minibatch info (U,)).
    The next actions take the floor but not the ramp: the learned cap alone, as in RACER's code (design §4.3)."""
    # The actor is fixed during the critic steps, so its actions at s' (targets) and at s (OOD)
    # for all U minibatches come from one tall forward pass: (2, U, B, A).
    with jax.named_scope("actor_tall_pass"):
        mean, log_std = networks.actor_apply(
            agent.actor_params(), jnp.stack([batches.next_observations, batches.observations])
        )
    next_actions, next_log_probs, _ = networks.sample_policy(
        mean[0], log_std[0], agent.limit.params, noise[0], agent.speed_cap, bounds.floor
    )
    ood_actions = mean[1] + jnp.exp(log_std[1]) * noise[1]  # the unsquashed Gaussian
    (critic, target_critic), info = jax.lax.scan(
        functools.partial(critic_step, setup, agent.critic_layout, alpha, lagrange),
        (agent.critic, agent.target_critic),
        (batches, next_actions, next_log_probs, ood_actions),
    )
    return critic, target_critic, info


def policy_objective(setup: Setup, alpha, risk, log_probs, mixture):
    values = cvar(mixture, setup.atoms, risk)
    return jnp.mean(alpha * log_probs - values), values


@jax.named_call
def policy_step(setup: Setup, agent: RacerAgent, critic_params, obs, noise, alpha, bounds: SpeedBounds = SpeedBounds()):
    """Actor and limit (design §4.5, §4.6) on the updated critic's mixture; returns (actor, limit,
    info with the losses, the log-probabilities (B,), the CVaRs (B,) and the mixture (B, K))."""
    cfg, shards, opt = setup.cfg, setup.shards, setup.opt

    def policy(actor_params, limit):
        mean, log_std = networks.actor_apply(actor_params, obs)
        actions, log_probs, _ = networks.sample_policy(mean, log_std, effective_limit(limit, bounds), noise,
                                                       agent.speed_cap, bounds.floor)  # fmt: skip
        mixture = jnp.mean(jax.nn.softmax(ensemble(agent.critic_layout, critic_params, obs, actions)), axis=0)
        return log_probs, mixture

    objective = functools.partial(policy_objective, setup, alpha)
    (log_probs, mixture), policy_vjp = jax.vjp(policy, agent.actor_params(), agent.limit.params)
    (actor_loss, cvars), cotangent = jax.value_and_grad(
        functools.partial(objective, cfg.cvar_risk), argnums=(0, 1), has_aux=True
    )(log_probs, mixture)
    actor_grad, limit_grad = policy_vjp(cotangent)
    # differentiated w.r.t. the nested parameters, which the tall pass already sliced out of
    # the flat vector; one concatenation brings the gradient back to it
    actor = apply_step(opt.actor, agent.actor, shards.pmean(agent.actor_layout.ravel(actor_grad)))

    limit, limit_loss = agent.limit, actor_loss
    if cfg.learned_limit:
        # the actor's loss at the limit's own risk level, differentiated w.r.t. h only (the
        # same loss, and the same backward pass, when cvar_limits follows cvar_risk)
        if cfg.cvar_limits != cfg.cvar_risk:
            (limit_loss, _), cotangent = jax.value_and_grad(
                functools.partial(objective, cfg.cvar_limits), argnums=(0, 1), has_aux=True
            )(log_probs, mixture)
            limit_grad = policy_vjp(cotangent)[1]
        if agent.speed_cap:
            # A speed cap answers to the critic's CVaR alone (design §4.6): the entropy bonus of a
            # wider box, alpha * d(mean log pi)/dh = -alpha / h (log pi holds -log h, nothing else of
            # h), would raise the cap by itself. Taken out exactly, without a second backward pass; where
            # the ramp binds, log pi holds nothing of h. (A floor never meets a learned cap: config.py.)
            limit_loss = limit_loss - alpha * jnp.mean(log_probs)
            entropy_grad = alpha / agent.limit.params
            if bounds.ramp is not None:
                entropy_grad = jnp.where(agent.limit.params <= bounds.ramp, entropy_grad, 0.0)
            limit_grad = limit_grad + entropy_grad
        limit = apply_step(opt.limit, limit, shards.pmean(limit_grad))
        limit = limit.replace(params=jnp.clip(limit.params, LIMIT_MIN, 1.0))
    info = {"actor_loss": actor_loss, "limit_loss": limit_loss, "log_probs": log_probs, "cvars": cvars,
            "mixture": mixture}  # fmt: skip
    return actor, limit, info


def temperature_step(setup: Setup, state: TrainState, entropy):
    """α = exp(log α): loss α (H − target entropy), w.r.t. log α (design §4.6)."""
    loss, grad = jax.value_and_grad(lambda log_alpha: jnp.exp(log_alpha) * (entropy - setup.cfg.target_entropy))(
        state.params
    )
    return apply_step(setup.opt.temperature, state, grad), loss


def lagrange_step(setup: Setup, state: TrainState, entropy_gap):
    """λ = exp(log λ): loss λ (target gap − (H_data − H_ood)), w.r.t. log λ (design §4.6)."""
    loss, grad = jax.value_and_grad(
        lambda log_lambda: jnp.exp(log_lambda) * (setup.cfg.q_entropy_target_diff - entropy_gap)
    )(state.params)
    return apply_step(setup.opt.lagrange, state, grad), loss


def update_metrics(setup: Setup, critic_info, policy_info, entropy, temperature_loss, lagrange_loss,
                   alpha, limit, lagrange) -> dict:  # fmt: skip
    """The METRICS of one agent update (critic values averaged over its U minibatches) and `finite`."""
    pmean = setup.shards.pmean
    losses = {
        "critic_loss": jnp.mean(critic_info["critic_loss"]),
        "actor_loss": pmean(policy_info["actor_loss"]),
        "limit_loss": pmean(policy_info["limit_loss"]),
        "temperature_loss": temperature_loss,
        "lagrange_loss": lagrange_loss,
    }
    finite = jnp.all(jnp.isfinite(critic_info["critic_loss"]))
    for value in losses.values():
        finite &= jnp.isfinite(value)
    return {
        **losses,
        "cross_entropy": jnp.mean(critic_info["cross_entropy"]),
        "entropy_data": jnp.mean(critic_info["entropy_data"]),
        "entropy_ood": jnp.mean(critic_info["entropy_ood"]),
        "entropy_gap": jnp.mean(critic_info["entropy_data"] - critic_info["entropy_ood"]),
        "entropy": entropy,
        "cvar": pmean(jnp.mean(policy_info["cvars"])),
        "q_mean": pmean(jnp.mean(policy_info["mixture"] @ setup.atoms)),
        "temperature": alpha,
        "limit": limit,
        "lagrange": lagrange,
        "finite": finite,
    }


def agent_update(setup: Setup, agent: RacerAgent, buffer: replay.ReplayBuffer, bounds: SpeedBounds):
    """One agent update (design §4.7): U critic minibatches, then the actor, limit, temperature
    and lagrange steps, within the schedules' `bounds`. Returns (agent, metrics)."""
    key = jax.random.wrap_key_data(agent.key, impl=RNG_IMPL)
    key, k_batch, k_noise = jax.random.split(key, 3)
    alpha, lagrange = jnp.exp(agent.temperature.params), jnp.exp(agent.lagrange.params)

    batches, noise, actor_noise = draw_minibatches(setup, buffer, k_batch, k_noise)
    critic, target_critic, critic_info = critic_steps(setup, agent, batches, noise, alpha, lagrange, bounds)
    actor, limit, policy_info = policy_step(setup, agent, critic.params, batches.observations[-1], actor_noise, alpha,
                                            bounds)  # fmt: skip
    entropy = setup.shards.pmean(-jnp.mean(policy_info["log_probs"]))
    temperature, temperature_loss = temperature_step(setup, agent.temperature, entropy)
    entropy_gap = critic_info["entropy_data"][-1] - critic_info["entropy_ood"][-1]
    lagrange_state, lagrange_loss = lagrange_step(setup, agent.lagrange, entropy_gap)

    metrics = update_metrics(setup, critic_info, policy_info, entropy, temperature_loss, lagrange_loss,
                             alpha, agent.limit.params, lagrange)  # fmt: skip
    new_agent = agent.replace(
        actor=actor,
        critic=critic,
        target_critic=target_critic,
        temperature=temperature,
        limit=limit,
        lagrange=lagrange_state,
        key=jax.random.key_data(key),
        updates=agent.updates + 1,
    )
    return new_agent, metrics


def params_finite(agent: RacerAgent):
    # a sum of squares is finite iff every parameter is (no overflow at parameter magnitudes),
    # and a dot is one kernel where all(isfinite(.)) is a chain of reductions per array
    square_sum = sum(
        jnp.vdot(params, params)
        for params in (agent.actor.params, agent.critic.params, agent.target_critic, agent.temperature.params,
                       agent.limit.params, agent.lagrange.params)
    )  # fmt: skip
    return jnp.isfinite(square_sum)


def iteration(setup: Setup, updates_per_iteration: int, agent: RacerAgent, buffer: replay.ReplayBuffer,
              bounds: SpeedBounds = SpeedBounds()):  # fmt: skip
    """`updates_per_iteration` agent updates in a lax.scan, within the schedules' `bounds`: one training iteration."""

    def step(carry, _):
        agent, _, finite = carry
        agent, metrics = agent_update(setup, agent, buffer, bounds)
        return (agent, metrics, finite & metrics["finite"]), None

    # The carry keeps the last update's metrics: no stacking and reducing of every metric.
    placeholder = {name: jnp.zeros((), jnp.float32) for name in METRICS}
    placeholder["finite"] = jnp.ones((), bool)
    (agent, metrics, finite), _ = jax.lax.scan(
        step, (agent, placeholder, jnp.ones((), bool)), None, length=updates_per_iteration
    )
    return agent, {**metrics, "finite": finite & params_finite(agent)}


@dataclasses.dataclass(frozen=True)
class Learner:
    """`iteration(agent, buffer[, bounds]) -> (agent, metrics)`: one jitted dispatch running
    `updates_per_iteration` agent updates; donates the agent."""

    iteration: Callable[..., tuple[RacerAgent, dict]]
    sample_actions: Callable[..., jax.Array]
    deterministic_actions: Callable[..., jax.Array]
    release_actions: Callable[..., jax.Array]
    num_devices: int


@functools.cache
def make_learner(cfg: AgentConfig, *, batch_size: int, utd_ratio: int, updates_per_iteration: int) -> Learner:
    """The compiled training iteration for a resolved agent config (cvar_limits and target_entropy set).

    With several JAX devices each critic minibatch and the actor's batch are split across them and
    gradients are averaged (design §4.8); the agent and buffer stay ordinary replicated pytrees.
    Memoized: the same arguments give the same Learner, so its compiled iteration is reused.
    """
    if cfg.cvar_limits is None or cfg.target_entropy is None:
        raise ValueError("make_learner needs a resolved AgentConfig (see racer_vec.config.resolve)")
    num_devices = jax.device_count()
    if batch_size % num_devices:
        raise ConfigError(f"--batch-size ({batch_size}) must be divisible by the number of JAX devices ({num_devices})")
    setup = Setup(cfg, make_optimizers(cfg), atoms_of(cfg), devices.Shards(num_devices, batch_size // num_devices),
                  batch_size, utd_ratio)  # fmt: skip
    train_iteration = functools.partial(iteration, setup, updates_per_iteration)
    if num_devices > 1:
        # pmap semantics: each device differentiates its own share of the batch and the update
        # averages explicitly with pmean. (With check_vma, autodiff would already psum gradients
        # w.r.t. the replicated parameters, and the pmean on top would double them.)
        train_iteration = jax.shard_map(
            train_iteration,
            mesh=devices.data_mesh(),
            in_specs=PartitionSpec(),  # every argument replicated, the schedules' bounds given or not
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,
        )
    return Learner(
        iteration=jax.jit(train_iteration, donate_argnums=0),
        sample_actions=sample_actions,
        deterministic_actions=deterministic_actions,
        release_actions=release_actions,
        num_devices=num_devices,
    )
