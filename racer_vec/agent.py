"""The RACER agent (SPEC 4): one pytree of train states, and a learner whose whole training
iteration is one jitted dispatch.

Parameterizations (all scalars are float32 arrays inside the agent):
- temperature alpha = exp(log_alpha), lagrange lambda = exp(log_lambda) >= 0; both losses are
  differentiated w.r.t. the log.
- steering limit h is stored directly and projected back onto [LIMIT_MIN, 1] after every step
  (AdamW's weight decay then pulls it towards the conservative side). Without a learned limit it
  stays at 1, the env's full range.
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

from racer_vec import networks, replay
from racer_vec.config import ACTION_DIM, AgentConfig, ConfigError
from racer_vec.distributional import categorical_l2_project, cvar

LIMIT_MIN = 1e-3
"""Lower end of the learned steering limit h, which must stay in (0, 1]."""
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
    limit: TrainState  # params: steering limit h
    lagrange: TrainState  # params: log lambda
    key: jax.Array  # uint32[4]: data of the RNG_IMPL key the updates draw from
    updates: jax.Array  # int32: agent updates done
    actor_layout: networks.Layout = flax.struct.field(pytree_node=False)
    critic_layout: networks.Layout = flax.struct.field(pytree_node=False)

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


def create_agent(cfg: AgentConfig, obs_dim: int, observed_vehicles: int, seed) -> RacerAgent:
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
    return _agent_builder(cfg, obs_dim)(key_data)


@functools.cache
def _agent_builder(cfg: AgentConfig, obs_dim: int):
    # Built inside jit so that every leaf is its own buffer (the agent is donated to the update),
    # and compiled once per architecture.
    return jax.jit(functools.partial(_build_agent, cfg, obs_dim), out_shardings=replay.replicated_sharding())


def reset_agent(cfg: AgentConfig, obs_dim: int, agent: RacerAgent) -> RacerAgent:
    """The release's reset (SPEC 11): every train state but the temperature re-initialized, with
    fresh optimizer states, from the agent's own key stream (so a resumed run resets identically);
    the temperature and the update count carry over."""
    return _agent_resetter(cfg, obs_dim)(agent)


@functools.cache
def _agent_resetter(cfg: AgentConfig, obs_dim: int):
    def reset(agent: RacerAgent) -> RacerAgent:
        key, k_init = jax.random.split(jax.random.wrap_key_data(agent.key, impl=RNG_IMPL))
        fresh = _build_agent(cfg, obs_dim, jax.random.key_data(k_init))
        return fresh.replace(temperature=agent.temperature, key=jax.random.key_data(key), updates=agent.updates)

    return jax.jit(reset, out_shardings=replay.replicated_sharding())


def _build_agent(cfg: AgentConfig, obs_dim: int, key_data) -> RacerAgent:
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
    )


# ---------------------------------------------------------------------------------------------
# Acting: no config needed, so these compile once per observation shape whatever the run's
# hyperparameters.


@jax.jit
def sample_actions(agent: RacerAgent, observations, key) -> jax.Array:
    """Stochastic actions (N, 2) within the learned limit, for observations (N, obs_dim)."""
    mean, log_std = networks.actor_apply(agent.actor_params(), observations)
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return networks.sample_policy(mean, log_std, agent.limit.params, noise)[0]


@jax.jit
def deterministic_actions(agent: RacerAgent, observations) -> jax.Array:
    """Evaluation actions: tanh(mean) mapped onto the limited range."""
    mean, _ = networks.actor_apply(agent.actor_params(), observations)
    return networks.squash(mean, agent.limit.params)


# ---------------------------------------------------------------------------------------------
# Learning


@dataclasses.dataclass(frozen=True)
class Learner:
    """`update(agent, buffer) -> (agent, metrics)`: one jitted dispatch running
    `updates_per_iteration` agent updates; donates the agent."""

    update: Callable[[RacerAgent, replay.ReplayBuffer], tuple[RacerAgent, dict]]
    sample_actions: Callable[[RacerAgent, Any, jax.Array], jax.Array]
    deterministic_actions: Callable[[RacerAgent, Any], jax.Array]
    num_devices: int


@functools.cache
def make_learner(cfg: AgentConfig, *, batch_size: int, utd_ratio: int, updates_per_iteration: int) -> Learner:
    """The training iteration for a resolved agent config (cvar_limits and target_entropy set).

    With several JAX devices each critic minibatch and the actor's batch are split across them and
    gradients are averaged (SPEC 4.8); the agent and buffer stay ordinary replicated pytrees.
    Memoized: the same arguments give the same Learner, so its compiled update is reused.
    """
    if cfg.cvar_limits is None or cfg.target_entropy is None:
        raise ValueError("make_learner needs a resolved AgentConfig (see racer_vec.config.resolve)")
    num_devices = jax.device_count()
    if batch_size % num_devices:
        raise ConfigError(f"--batch-size ({batch_size}) must be divisible by the number of JAX devices ({num_devices})")
    iteration = _make_iteration(cfg, batch_size, utd_ratio, updates_per_iteration, num_devices)
    if num_devices > 1:
        # pmap semantics: each device differentiates its own share of the batch and the update
        # averages explicitly with pmean. (With check_vma, autodiff would already psum gradients
        # w.r.t. the replicated parameters, and the pmean on top would double them.)
        iteration = jax.shard_map(
            iteration,
            mesh=replay.data_mesh(),
            in_specs=(PartitionSpec(), PartitionSpec()),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,
        )
    return Learner(
        update=jax.jit(iteration, donate_argnums=0),
        sample_actions=sample_actions,
        deterministic_actions=deterministic_actions,
        num_devices=num_devices,
    )


def _make_iteration(cfg: AgentConfig, batch_size: int, utd_ratio: int, updates_per_iteration: int, num_shards: int):
    opt = make_optimizers(cfg)
    atoms = atoms_of(cfg)
    local_batch = batch_size // num_shards

    def pmean(tree):
        return jax.lax.pmean(tree, replay.DATA_AXIS) if num_shards > 1 else tree

    def local(x, axis):
        """This device's share of a globally drawn array, so that every device count draws the
        same random numbers and the results agree with one device."""
        if num_shards == 1:
            return x
        start = jax.lax.axis_index(replay.DATA_AXIS) * local_batch
        return jax.lax.dynamic_slice_in_dim(x, start, local_batch, axis)

    def apply_step(tx, state: TrainState, grads) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    def agent_update(agent: RacerAgent, buffer: replay.ReplayBuffer):
        actor_layout, critic_layout = agent.actor_layout, agent.critic_layout
        key = jax.random.wrap_key_data(agent.key, impl=RNG_IMPL)
        key, k_batch, k_noise = jax.random.split(key, 3)
        alpha = jnp.exp(agent.temperature.params)
        lagrange = jnp.exp(agent.lagrange.params)
        limit = agent.limit.params

        def ensemble(flat_params, obs, actions):
            return networks.ensemble_apply(critic_layout.unravel(flat_params), obs, actions)

        # ---- critic (SPEC 4.3) ---------------------------------------------------------------

        def critic_loss(flat_params, obs, actions, ood_actions, target):
            # data and OOD actions share the state encoding: logits (num_qs, 2, B, K)
            log_p = jax.nn.log_softmax(ensemble(flat_params, obs, jnp.stack([actions, ood_actions])))
            cross_entropy = -jnp.mean(jnp.sum(target * log_p[:, 0], axis=-1))
            entropy_data, entropy_ood = jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1), axis=(0, 2))
            loss = cross_entropy + lagrange * (entropy_data - entropy_ood)
            return loss, {
                "critic_loss": loss,
                "cross_entropy": cross_entropy,
                "entropy_data": entropy_data,
                "entropy_ood": entropy_ood,
            }

        def critic_step(carry, minibatch):
            critic, target_params = carry
            batch, next_actions, next_log_probs, ood_actions = minibatch
            next_probs = jax.nn.softmax(ensemble(target_params, batch.next_observations, next_actions))
            if not cfg.independent_ensemble:
                next_probs = jnp.broadcast_to(jnp.mean(next_probs, axis=0), next_probs.shape)
            next_atoms = atoms - alpha * next_log_probs[:, None] if cfg.backup_entropy else atoms
            # r + gamma * mask * z, mask = 0 on true termination: (B, K), shared by every member
            masks = jnp.ones_like(batch.masks) if cfg.bootstrap_terminations else batch.masks
            target_atoms = batch.rewards[:, None] + cfg.discount * masks[:, None] * next_atoms
            target = categorical_l2_project(target_atoms, next_probs, atoms)  # (num_qs, B, K)
            grads, info = jax.grad(critic_loss, has_aux=True)(
                critic.params, batch.observations, batch.actions, ood_actions, target
            )
            critic = apply_step(opt.critic, critic, pmean(grads))
            target_params = optax.incremental_update(critic.params, target_params, cfg.tau)
            return (critic, target_params), pmean(info)

        indices = local(replay.sample_indices(buffer, k_batch, (utd_ratio, batch_size)), axis=1)
        batches = replay.gather(buffer, indices)  # fields (U, B, ...)
        # standard normal noise for the next actions, the OOD actions (U minibatches each) and the
        # actor's own step, drawn at once: (2U + 1, B, A)
        noise = local(jax.random.normal(k_noise, (2 * utd_ratio + 1, batch_size, ACTION_DIM)), axis=1)
        noise, actor_noise = noise[:-1].reshape(2, utd_ratio, -1, ACTION_DIM), noise[-1]

        # The actor is fixed during the critic steps, so its actions at s' (targets) and at s (OOD)
        # for all U minibatches come from one tall forward pass: (2, U, B, A).
        actor_params = agent.actor_params()
        mean, log_std = networks.actor_apply(
            actor_params, jnp.stack([batches.next_observations, batches.observations])
        )
        next_actions, next_log_probs, _ = networks.sample_policy(mean[0], log_std[0], limit, noise[0])
        ood_actions = mean[1] + jnp.exp(log_std[1]) * noise[1]  # the unsquashed Gaussian

        (critic, target_critic), critic_info = jax.lax.scan(
            critic_step,
            (agent.critic, agent.target_critic),
            (batches, next_actions, next_log_probs, ood_actions),
        )

        # ---- actor and limit (SPEC 4.5, 4.6), on the last critic minibatch --------------------

        obs = batches.observations[-1]

        def policy(actor_params, limit):
            mean, log_std = networks.actor_apply(actor_params, obs)
            actions, log_probs, _ = networks.sample_policy(mean, log_std, limit, actor_noise)
            mixture = jnp.mean(jax.nn.softmax(ensemble(critic.params, obs, actions)), axis=0)  # (B, K)
            return log_probs, mixture

        def policy_objective(risk, log_probs, mixture):
            values = cvar(mixture, atoms, risk)
            return jnp.mean(alpha * log_probs - values), values

        (log_probs, mixture), policy_vjp = jax.vjp(policy, actor_params, limit)
        (actor_loss, cvars), cotangent = jax.value_and_grad(
            functools.partial(policy_objective, cfg.cvar_risk), argnums=(0, 1), has_aux=True
        )(log_probs, mixture)
        actor_grad, limit_grad = policy_vjp(cotangent)
        # differentiated w.r.t. the nested parameters, which the tall pass already sliced out of
        # the flat vector; one concatenation brings the gradient back to it
        actor = apply_step(opt.actor, agent.actor, pmean(actor_layout.ravel(actor_grad)))

        limit_state, limit_loss = agent.limit, actor_loss
        if cfg.learned_limit:
            # the actor's loss at the limit's own risk level, differentiated w.r.t. h only (the
            # same loss, and the same backward pass, when cvar_limits follows cvar_risk)
            if cfg.cvar_limits != cfg.cvar_risk:
                (limit_loss, _), cotangent = jax.value_and_grad(
                    functools.partial(policy_objective, cfg.cvar_limits), argnums=(0, 1), has_aux=True
                )(log_probs, mixture)
                limit_grad = policy_vjp(cotangent)[1]
            limit_state = apply_step(opt.limit, limit_state, pmean(limit_grad))
            limit_state = limit_state.replace(params=jnp.clip(limit_state.params, LIMIT_MIN, 1.0))

        # ---- temperature and lagrange multiplier (SPEC 4.6) -----------------------------------

        entropy = pmean(-jnp.mean(log_probs))
        temperature_loss, temperature_grad = jax.value_and_grad(
            lambda log_alpha: jnp.exp(log_alpha) * (entropy - cfg.target_entropy)
        )(agent.temperature.params)
        temperature = apply_step(opt.temperature, agent.temperature, temperature_grad)

        entropy_gap = critic_info["entropy_data"][-1] - critic_info["entropy_ood"][-1]
        lagrange_loss, lagrange_grad = jax.value_and_grad(
            lambda log_lambda: jnp.exp(log_lambda) * (cfg.q_entropy_target_diff - entropy_gap)
        )(agent.lagrange.params)
        lagrange_state = apply_step(opt.lagrange, agent.lagrange, lagrange_grad)

        losses = {
            "critic_loss": jnp.mean(critic_info["critic_loss"]),
            "actor_loss": pmean(actor_loss),
            "limit_loss": pmean(limit_loss),
            "temperature_loss": temperature_loss,
            "lagrange_loss": lagrange_loss,
        }
        finite = jnp.all(jnp.isfinite(critic_info["critic_loss"]))
        for value in losses.values():
            finite &= jnp.isfinite(value)
        metrics = {
            **losses,
            "cross_entropy": jnp.mean(critic_info["cross_entropy"]),
            "entropy_data": jnp.mean(critic_info["entropy_data"]),
            "entropy_ood": jnp.mean(critic_info["entropy_ood"]),
            "entropy_gap": jnp.mean(critic_info["entropy_data"] - critic_info["entropy_ood"]),
            "entropy": entropy,
            "cvar": pmean(jnp.mean(cvars)),
            "q_mean": pmean(jnp.mean(mixture @ atoms)),
            "temperature": alpha,
            "limit": limit,
            "lagrange": lagrange,
            "finite": finite,
        }
        new_agent = agent.replace(
            actor=actor,
            critic=critic,
            target_critic=target_critic,
            temperature=temperature,
            limit=limit_state,
            lagrange=lagrange_state,
            key=jax.random.key_data(key),
            updates=agent.updates + 1,
        )
        return new_agent, metrics

    def iteration(agent: RacerAgent, buffer: replay.ReplayBuffer):
        def step(carry, _):
            agent, _, finite = carry
            agent, metrics = agent_update(agent, buffer)
            return (agent, metrics, finite & metrics["finite"]), None

        # The carry keeps the last update's metrics: no stacking and reducing of every metric.
        placeholder = {name: jnp.zeros((), jnp.float32) for name in METRICS}
        placeholder["finite"] = jnp.ones((), bool)
        (agent, metrics, finite), _ = jax.lax.scan(
            step, (agent, placeholder, jnp.ones((), bool)), None, length=updates_per_iteration
        )
        return agent, {**metrics, "finite": finite & params_finite(agent)}

    def params_finite(agent: RacerAgent):
        # a sum of squares is finite iff every parameter is (no overflow at parameter magnitudes),
        # and a dot is one kernel where all(isfinite(.)) is a chain of reductions per array
        square_sum = sum(
            jnp.vdot(params, params)
            for params in (agent.actor.params, agent.critic.params, agent.target_critic, agent.temperature.params,
                           agent.limit.params, agent.lagrange.params)
        )
        return jnp.isfinite(square_sum)

    return iteration
