"""One complete agent update, recomputed in plain numpy and compared with the jitted learner.

What is checked (design section 4): a tiny agent (utd_ratio 2, a few atoms, two critic members, a
learned steering limit with ``cvar_limits != cvar_risk``), once with the MLP encoder and once with
the PointNet encoder, takes one agent update through ``racer_vec.learner.agent.make_learner(...).iteration``.
The same update is recomputed here in float64 numpy from the equations alone:

- the actor's squashed Gaussian within the limit, log-probabilities with the tanh and affine
  Jacobians (4.1); the critic ensemble, PointNet's masked max-pool, LayerNorm (4.2);
- per critic minibatch (4.3): bootstrapped atoms ``r + gamma * mask * z`` (masks = 0 on some
  rows), each member's target softmax projected onto the support (the Cramér projection, written
  here as the classic "split the mass between the two bracketing atoms"), the cross-entropy, plus
  ``lambda * (H_data - H_ood)`` with OOD actions drawn from the actor's *unsquashed* Gaussian,
  an AdamW step, and the Polyak step ``target <- tau * online + (1 - tau) * target``;
- the actor step on ``mean(alpha * log pi - CVaR_risk(mixture))`` of the ensemble mixture after
  the critic steps (4.4, 4.5); the limit step on the same loss at ``cvar_limits`` w.r.t. h only,
  clipped onto [LIMIT_MIN, 1]; the temperature and lagrange steps w.r.t. their logs (4.6).

Every new parameter (actor, every critic member, the target critic, log alpha, h, log lambda),
every Adam moment (which holds the raw gradients), and every metric the update returns are
compared. The agent is not at its initialization: all parameter vectors are perturbed, the
target critic differs from the online one, alpha and lambda are large enough for their terms
to matter, and the optimizers start from a non-zero Adam state, so that a step depends on the
gradient's magnitude and not only on its sign (a fresh Adam's first step is ``lr * sign(g)``).

Independence: nothing here calls jax.grad or any racer_vec computation for the expected values.
Gradients are central finite differences of the numpy losses in float64 (step 1e-6: errors
near 1e-9, far below the tolerances); Adam/AdamW, softmax, projection, entropies and CVaR are
written out below. racer_vec is used only to
build the agent and the buffer, to read the parameter layouts (shapes and tree order), and to
run the update under test. The one thing taken from JAX is the randomness: the update draws its
minibatch indices and Gaussian noise from the agent's key, and the test draws the same numbers
with the same public jax.random calls on the same key (replicating the update's key splitting)
instead of reimplementing the PRNG; the returned key confirms the replication.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from racer_vec.learner import agent as racer
from racer_vec.learner import replay
from racer_vec.config import ACTION_DIM, AgentConfig

# two learners compiled (~16 s): a long single check, so the quick subset leaves it out
pytestmark = pytest.mark.slow

VEHICLES = 4  # observation rows (ego + 3 others), 6 features each
FEATURES = 6
OBS_DIM = VEHICLES * FEATURES
CAPACITY, BATCH, UTD = 40, 16, 2
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8
FD_STEP = 1e-6

# alpha, lambda and h before the update: large enough that the entropy and lagrange terms matter
TEMPERATURE, LAGRANGE, LIMIT = 0.3, 0.7, 0.6
# non-zero Adam states: count, and the gradient scale that sets mu and nu (see `adam_state`)
ADAM_COUNT = 3


def config(encoder: str) -> AgentConfig:
    """A resolved tiny config: cvar_limits differs from cvar_risk, everything sized so that the
    steps are well above float32 rounding of the parameters."""
    return AgentConfig(
        hidden_dims=(8, 8),
        encoder=encoder,
        pointnet_dim=5,
        discount=0.9,
        tau=0.3,
        num_qs=2,
        num_atoms=9,
        q_min=-4.0,
        q_max=4.0,
        cvar_risk=0.8,
        cvar_limits=0.5,
        actor_lr=1e-2,
        critic_lr=1e-2,
        temp_lr=5e-2,
        critic_weight_decay=0.1,
        critic_layer_norm=True,
        init_temperature=TEMPERATURE,
        target_entropy=-2.0,
        learned_limit=True,
        init_limit=LIMIT,
        limits_lr=5e-2,
        limits_weight_decay=0.1,
        q_entropy_target_diff=-0.05,
        q_entropy_lagrange_init=LAGRANGE,
        q_entropy_lagrange_lr=5e-2,
    )


# ---------------------------------------------------------------------------------------------
# numpy networks (float64), batched over parameter sets
#
# Every parameter leaf carries a leading axis of M parameter sets (M = 1 for a plain forward pass,
# M = 2 * size for all the finite-difference perturbations of a vector at once); data arrays carry
# a leading axis of 1 or M. All shapes below are (M, batch..., features).


def lead(a, ndim):
    """A parameter leaf (M, *shape) reshaped to broadcast against an activation with `ndim` dims."""
    return a.reshape(a.shape[:1] + (1,) * (ndim - a.ndim) + a.shape[1:])


def relu(x):
    return np.maximum(x, 0.0)


def dense(p, x):
    # matmul broadcasts the leading dims: (M or 1, ..., N, in) @ (M, 1..., in, out)
    kernel = p["kernel"].reshape(p["kernel"].shape[:1] + (1,) * (x.ndim - 3) + p["kernel"].shape[1:])
    return np.matmul(x, kernel) + lead(p["bias"], x.ndim)


def layer_norm(p, x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * lead(p["scale"], x.ndim) + lead(p["bias"], x.ndim)


def concat(*arrays):
    shape = np.broadcast_shapes(*(a.shape[:-1] for a in arrays))
    return np.concatenate([np.broadcast_to(a, shape + a.shape[-1:]) for a in arrays], axis=-1)


def encode(params, obs):
    """The observation, or [ego row, max over the present other vehicles of Dense+LN+ReLU] (0 if none)."""
    if "pointnet" not in params:
        return obs
    rows = obs.reshape(obs.shape[:-1] + (-1, FEATURES))
    ego, others = rows[..., 0, :], rows[..., 1:, :]
    p = params["pointnet"]
    z = relu(layer_norm(p["norm"], dense(p["dense"], others)))  # (M, B, V-1, P)
    present = others[..., 0] > 0.5  # the presence feature
    pooled = np.max(np.where(present[..., None], z, -np.inf), axis=-2)
    pooled = np.where(present.any(-1)[..., None], pooled, 0.0)
    return concat(ego, pooled)


def actor_forward(params, obs):
    h = encode(params, obs)
    for layer in params["hidden"]:
        h = relu(dense(layer, h))
    out = dense(params["head"], h)
    return out[..., :ACTION_DIM], np.clip(out[..., ACTION_DIM:], -20.0, 2.0)


def critic_forward(params, obs, actions):
    """One member (or M perturbed copies of it): logits (M, B, K)."""
    h = concat(encode(params, obs), actions)
    for layer in params["hidden"]:
        h = dense(layer["dense"], h)
        if "norm" in layer:
            h = layer_norm(layer["norm"], h)
        h = relu(h)
    return dense(params["head"], h)


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def softmax(logits):
    return np.exp(log_softmax(logits))


def entropy(logits):
    log_p = log_softmax(logits)
    return -np.sum(np.exp(log_p) * log_p, axis=-1)


def scale_of(limit):
    """Half-widths of the action box: [-1, 1] for acceleration, [-h, h] for steering (index 1).
    `limit` is a scalar, or (M,) perturbed limits -> (M, 1, 2)."""
    limit = np.asarray(limit, np.float64)
    scale = np.stack([np.ones_like(limit), limit], axis=-1)
    return scale if limit.ndim == 0 else scale[:, None, :]


def policy_sample(mean, log_std, limit, noise):
    """a = scale * tanh(u), u ~ N(mean, std); log pi(a) = log N(u) - sum log(1 - tanh^2 u) - sum log scale."""
    std = np.exp(log_std)
    u = mean + std * noise
    log_normal = -0.5 * np.square((u - mean) / std) - log_std - 0.5 * np.log(2 * np.pi)
    # log(1 - tanh(u)^2) = log sech(u)^2, written without the cancellation of 1 - tanh^2
    log_sech2 = 2.0 * (np.log(2.0) - np.abs(u) - np.log1p(np.exp(-2.0 * np.abs(u))))
    scale = scale_of(limit)
    log_prob = np.sum(log_normal - log_sech2 - np.log(scale), axis=-1)
    return scale * np.tanh(u), log_prob


def project(target_atoms, probs, support):
    """Mass probs[j] at target_atoms[j] (clipped onto the support) split between the two
    bracketing support atoms in proportion to closeness. Rows: (..., J) -> (..., K)."""
    shape = np.broadcast_shapes(target_atoms.shape, probs.shape)
    tz = np.broadcast_to(np.clip(target_atoms, support[0], support[-1]), shape).reshape(-1, shape[-1])
    p = np.broadcast_to(probs, shape).reshape(-1, shape[-1])
    b = (tz - support[0]) / (support[1] - support[0])
    lo = np.floor(b).astype(int)
    hi = np.ceil(b).astype(int)
    out = np.zeros((tz.shape[0], support.size))
    rows = np.repeat(np.arange(tz.shape[0])[:, None], tz.shape[1], axis=1)
    same = lo == hi  # exactly on an atom
    np.add.at(out, (rows, lo), np.where(same, p, p * (hi - b)))
    np.add.at(out, (rows, hi), np.where(same, 0.0, p * (b - lo)))
    return out.reshape(shape[:-1] + (support.size,))


def cvar(probs, atoms, risk):
    keep = 1.0 - risk
    cdf = np.minimum(np.cumsum(probs, axis=-1), keep)
    q = np.diff(np.concatenate([np.zeros_like(cdf[..., :1]), cdf], axis=-1), axis=-1) / keep
    return np.sum(q * atoms, axis=-1)


# ---------------------------------------------------------------------------------------------
# numpy optimization


def fd_grad(f, x):
    """Central finite differences in float64 of f, which maps M parameter vectors (M, n) to M
    values (M,), at x (any shape): all 2n perturbations are evaluated in one batched call."""
    flat = np.asarray(x, np.float64).reshape(-1)
    step = FD_STEP * np.eye(flat.size)
    values = f(np.concatenate([flat + step, flat - step]))
    return ((values[: flat.size] - values[flat.size :]) / (2 * FD_STEP)).reshape(np.shape(x))


def adam_step(params, grad, state, lr, weight_decay=0.0):
    """optax.adam / optax.adamw: bias-corrected moments, eps outside the root, decoupled decay
    added to the scaled update before the learning rate."""
    count, mu, nu = state
    mu = B1 * mu + (1 - B1) * grad
    nu = B2 * nu + (1 - B2) * np.square(grad)
    count = count + 1
    mu_hat = mu / (1 - B1**count)
    nu_hat = nu / (1 - B2**count)
    update = mu_hat / (np.sqrt(nu_hat) + ADAM_EPS) + weight_decay * params
    return params - lr * update, (count, mu, nu)


def unflatten(layout, flat):
    """Nested numpy parameters from a flat vector (..., size), in the layout's tree order."""
    leaves, offset = [], 0
    for shape in layout.shapes:
        size = int(np.prod(shape, dtype=int))
        leaves.append(flat[..., offset : offset + size].reshape(flat.shape[:-1] + shape))
        offset += size
    assert offset == flat.shape[-1]
    return jax.tree.unflatten(layout.treedef, leaves)


def reference_update(cfg, start, layouts, buffer, indices, noise):
    """The whole agent update in float64 numpy. `start` holds the agent's values, `indices` (U, B)
    and `noise` (2U + 1, B, A) the update's random draws. Returns the new values and the metrics."""
    actor_layout, critic_layout = layouts
    atoms = np.linspace(cfg.q_min, cfg.q_max, cfg.num_atoms)
    alpha, lagrange, limit = np.exp(start["log_alpha"]), np.exp(start["log_lambda"]), start["limit"]
    num_qs = cfg.num_qs
    actor_params = unflatten(actor_layout, start["actor"][None])  # one parameter set: M = 1
    noise = noise[:, None]  # (2U + 1, 1, B, A): broadcast against M
    gather = {name: values[indices][:, None] for name, values in buffer.items()}  # (U, 1, B, ...)

    critic, target = start["critic"].copy(), start["target"].copy()
    critic_state = start["critic_adam"]
    info = []
    for u in range(UTD):
        obs, actions, next_obs = gather["observations"][u], gather["actions"][u], gather["next_observations"][u]
        rewards, masks = gather["rewards"][u], gather["masks"][u]  # (1, B)

        # a' ~ pi(s') within the limit; OOD actions from the unsquashed Gaussian at s
        next_mean, next_log_std = actor_forward(actor_params, next_obs)
        next_actions, _ = policy_sample(next_mean, next_log_std, limit, noise[u])
        mean, log_std = actor_forward(actor_params, obs)
        ood_actions = mean + np.exp(log_std) * noise[UTD + u]

        # r + gamma * mask * z, each member's target distribution projected onto the support
        target_atoms = rewards[..., None] + cfg.discount * masks[..., None] * atoms  # (1, B, K)
        projected = [
            project(target_atoms, softmax(critic_forward(unflatten(critic_layout, target[i][None]), next_obs,
                                                         next_actions)), atoms)
            for i in range(num_qs)
        ]  # fmt: skip

        def member_terms(flat, i, obs=obs, actions=actions, ood_actions=ood_actions, projected=projected):
            """Member i's cross-entropy, H_data and H_ood, for parameter sets flat (M, size): (3, M)."""
            params = unflatten(critic_layout, flat)
            logits = critic_forward(params, obs, actions)
            cross_entropy = -np.mean(np.sum(projected[i] * log_softmax(logits), axis=-1), axis=-1)
            h_data = np.mean(entropy(logits), axis=-1)
            h_ood = np.mean(entropy(critic_forward(params, obs, ood_actions)), axis=-1)
            return np.stack([cross_entropy, h_data, h_ood])

        # means over members (and batch); the loss is the mean over members of each member's term
        cross_entropy, h_data, h_ood = np.mean([member_terms(critic[i][None], i)[:, 0] for i in range(num_qs)], axis=0)
        loss = cross_entropy + lagrange * (h_data - h_ood)
        info.append({"critic_loss": loss, "cross_entropy": cross_entropy, "entropy_data": h_data, "entropy_ood": h_ood})

        def member_loss(flat, i):
            ce, hd, ho = member_terms(flat, i)
            return (ce + lagrange * (hd - ho)) / num_qs  # member i's share of the mean over members

        grad = np.stack([fd_grad(lambda flat, i=i: member_loss(flat, i), critic[i]) for i in range(num_qs)])
        critic, critic_state = adam_step(critic, grad, critic_state, cfg.critic_lr, cfg.critic_weight_decay)
        target = cfg.tau * critic + (1 - cfg.tau) * target

    # actor and limit: the last minibatch's states, the critic after its steps, the last noise row
    obs = gather["observations"][-1]
    actor_noise = noise[2 * UTD]
    members = [unflatten(critic_layout, critic[i][None]) for i in range(num_qs)]

    def policy(actor_flat, limit):
        mean, log_std = actor_forward(unflatten(actor_layout, actor_flat), obs)
        actions, log_probs = policy_sample(mean, log_std, limit, actor_noise)
        mixture = np.mean([softmax(critic_forward(p, obs, actions)) for p in members], axis=0)  # (M, B, K)
        return log_probs, mixture

    def objective(actor_flat, limit, risk):
        log_probs, mixture = policy(actor_flat, limit)
        return np.mean(alpha * log_probs - cvar(mixture, atoms, risk), axis=-1)

    actor0 = start["actor"][None]
    log_probs, mixture = (x[0] for x in policy(actor0, limit))
    actor_loss = objective(actor0, limit, cfg.cvar_risk)[0]
    limit_loss = objective(actor0, limit, cfg.cvar_limits)[0]
    actor_grad = fd_grad(lambda flat: objective(flat, limit, cfg.cvar_risk), start["actor"])
    # w.r.t. h only: the actor's parameters fixed, h perturbed (in the box and in the log-prob)
    limit_grad = fd_grad(lambda h: objective(actor0, h[:, 0], cfg.cvar_limits), limit)
    actor, actor_state = adam_step(start["actor"], actor_grad, start["actor_adam"], cfg.actor_lr)
    new_limit, limit_state = adam_step(limit, limit_grad, start["limit_adam"], cfg.limits_lr, cfg.limits_weight_decay)
    new_limit = np.clip(new_limit, racer.LIMIT_MIN, 1.0)

    # temperature alpha = exp(log alpha), lagrange lambda = exp(log lambda): differentiated w.r.t. the logs
    policy_entropy = -np.mean(log_probs)
    temperature_loss = alpha * (policy_entropy - cfg.target_entropy)
    temperature_grad = fd_grad(lambda x: np.exp(x[:, 0]) * (policy_entropy - cfg.target_entropy), start["log_alpha"])
    log_alpha, temperature_state = adam_step(start["log_alpha"], temperature_grad, start["temperature_adam"],
                                             cfg.temp_lr)  # fmt: skip
    gap = info[-1]["entropy_data"] - info[-1]["entropy_ood"]  # the last critic minibatch's entropies
    lagrange_loss = lagrange * (cfg.q_entropy_target_diff - gap)
    lagrange_grad = fd_grad(lambda x: np.exp(x[:, 0]) * (cfg.q_entropy_target_diff - gap), start["log_lambda"])
    log_lambda, lagrange_state = adam_step(start["log_lambda"], lagrange_grad, start["lagrange_adam"],
                                           cfg.q_entropy_lagrange_lr)  # fmt: skip

    mean_of = lambda name: np.mean([step[name] for step in info])  # noqa: E731
    metrics = {
        "critic_loss": mean_of("critic_loss"),
        "actor_loss": actor_loss,
        "limit_loss": limit_loss,
        "temperature_loss": temperature_loss,
        "lagrange_loss": lagrange_loss,
        "cross_entropy": mean_of("cross_entropy"),
        "entropy_data": mean_of("entropy_data"),
        "entropy_ood": mean_of("entropy_ood"),
        "entropy_gap": np.mean([step["entropy_data"] - step["entropy_ood"] for step in info]),
        "entropy": policy_entropy,
        "cvar": np.mean(cvar(mixture, atoms, cfg.cvar_risk)),
        "q_mean": np.mean(mixture @ atoms),
        "temperature": alpha,
        "limit": limit,
        "lagrange": lagrange,
    }
    new = {
        "actor": actor, "critic": critic, "target": target, "log_alpha": log_alpha, "limit": new_limit,
        "log_lambda": log_lambda, "actor_adam": actor_state, "critic_adam": critic_state,
        "limit_adam": limit_state, "temperature_adam": temperature_state, "lagrange_adam": lagrange_state,
    }  # fmt: skip
    return new, metrics


# ---------------------------------------------------------------------------------------------
# the agent, the buffer, the jitted update


def adam_state(rng, shape, grad_scale):
    """A mid-training Adam state (count, mu, nu): nu of the order of grad_scale^2, so that a step
    is roughly linear in the gradient rather than its sign."""
    mu = 0.3 * grad_scale * rng.normal(size=shape)
    nu = grad_scale**2 * rng.uniform(0.5, 1.5, size=shape)
    return ADAM_COUNT, mu.astype(np.float32), nu.astype(np.float32)


def set_adam(state: racer.TrainState, adam) -> racer.TrainState:
    count, mu, nu = adam

    def replace(s):
        if isinstance(s, optax.ScaleByAdamState):
            return s._replace(count=jnp.asarray(count, jnp.int32), mu=jnp.asarray(mu), nu=jnp.asarray(nu))
        return s

    return state.replace(opt_state=tuple(replace(s) for s in state.opt_state))


def get_adam(state: racer.TrainState):
    (adam,) = [s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState)]
    return int(adam.count), np.asarray(adam.mu), np.asarray(adam.nu)


def transitions(rng):
    """Kinematics-like rows: ego present, others present at random (some samples with none)."""
    obs = rng.normal(size=(2, CAPACITY, VEHICLES, FEATURES))
    presence = (rng.random((2, CAPACITY, VEHICLES)) < 0.6).astype(float)
    presence[..., 0] = 1.0
    presence[:, :4, 1:] = 0.0  # no other vehicle in the first rows
    obs[..., 0] = presence
    obs = obs.reshape(2, CAPACITY, OBS_DIM).astype(np.float32)
    return {
        "observations": obs[0],
        "actions": rng.uniform(-1, 1, (CAPACITY, ACTION_DIM)).astype(np.float32),
        "rewards": (1.5 * rng.normal(size=CAPACITY)).astype(np.float32),
        "masks": (rng.random(CAPACITY) > 0.3).astype(np.float32),
        "next_observations": obs[1],
    }


class Case(NamedTuple):
    cfg: AgentConfig
    layouts: tuple  # (actor, critic) networks.Layout
    start: dict  # the agent's values before the update
    got: dict  # ... after the jitted update
    got_metrics: dict
    expected: dict  # ... after the numpy update
    expected_metrics: dict


@pytest.fixture(scope="module", params=["mlp", "pointnet"])
def case(request) -> Case:
    cfg = config(request.param)
    rng = np.random.default_rng(7 if request.param == "mlp" else 8)
    data = transitions(rng)
    buffer = replay.insert(replay.init_buffer(CAPACITY, OBS_DIM), *data.values())
    assert int(buffer.size) == CAPACITY and float(np.min(data["masks"])) == 0.0

    agent = racer.init_agent(cfg, OBS_DIM, VEHICLES, 3)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    actor = f32(np.asarray(agent.actor.params) + 0.3 * rng.normal(size=agent.actor.params.shape))
    critic = f32(np.asarray(agent.critic.params) + 0.3 * rng.normal(size=agent.critic.params.shape))
    target = f32(critic + 0.3 * rng.normal(size=critic.shape))
    start = {
        "actor": actor, "critic": critic, "target": target, "log_alpha": f32(np.log(TEMPERATURE)),
        "limit": f32(LIMIT), "log_lambda": f32(np.log(LAGRANGE)),
        "actor_adam": adam_state(rng, actor.shape, 0.05),
        "critic_adam": adam_state(rng, critic.shape, 0.02),
        "limit_adam": adam_state(rng, (), 0.5),
        "temperature_adam": adam_state(rng, (), 0.5),
        "lagrange_adam": adam_state(rng, (), 0.1),
    }  # fmt: skip
    agent = agent.replace(
        actor=set_adam(agent.actor.replace(params=jnp.asarray(actor)), start["actor_adam"]),
        critic=set_adam(agent.critic.replace(params=jnp.asarray(critic)), start["critic_adam"]),
        target_critic=jnp.asarray(target),
        temperature=set_adam(agent.temperature.replace(params=jnp.asarray(start["log_alpha"])),
                             start["temperature_adam"]),
        limit=set_adam(agent.limit.replace(params=jnp.asarray(start["limit"])), start["limit_adam"]),
        lagrange=set_adam(agent.lagrange.replace(params=jnp.asarray(start["log_lambda"])), start["lagrange_adam"]),
    )

    # the update's random draws, by the update's own key splitting and calls on the same key
    key = jax.random.wrap_key_data(agent.key, impl=racer.RNG_IMPL)
    next_key, k_batch, k_noise = jax.random.split(key, 3)
    indices = np.asarray(replay.sample_indices(buffer, k_batch, (UTD, BATCH)))
    noise = np.asarray(jax.random.normal(k_noise, (2 * UTD + 1, BATCH, ACTION_DIM)), np.float64)
    next_key = np.asarray(jax.random.key_data(next_key))
    # the minibatches hold terminations, and (for PointNet) states without any other vehicle
    assert (data["masks"][indices] == 0).any() and (data["masks"][indices] == 1).any()
    assert (data["observations"][indices].reshape(UTD, BATCH, VEHICLES, FEATURES)[..., 1:, 0] == 0).all(-1).any()

    layouts = (agent.actor_layout, agent.critic_layout)
    as64 = lambda v: v if isinstance(v, tuple) else np.asarray(v, np.float64)  # noqa: E731
    expected, expected_metrics = reference_update(
        cfg, {k: as64(v) for k, v in start.items()}, layouts,
        {k: np.asarray(v, np.float64) for k, v in data.items()}, indices, noise,
    )  # fmt: skip

    learner = racer.make_learner(cfg, batch_size=BATCH, utd_ratio=UTD, updates_per_iteration=1)
    layout_before = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), agent)
    new_agent, metrics = learner.iteration(agent, buffer)  # donates `agent`
    # the update's boundary: the agent keeps its pytree, shapes and dtypes; the metrics are scalars
    chex.assert_trees_all_equal_shapes_and_dtypes(new_agent, layout_before)
    chex.assert_shape(list(metrics.values()), ())
    chex.assert_type([metrics[name] for name in racer.METRICS], jnp.float32)
    chex.assert_trees_all_equal(new_agent.key, next_key, strict=True,
                                custom_message="the key replication does not match the update's")  # fmt: skip
    assert int(new_agent.updates) == 1 and bool(metrics["finite"])
    got = {
        "actor": np.asarray(new_agent.actor.params), "critic": np.asarray(new_agent.critic.params),
        "target": np.asarray(new_agent.target_critic), "log_alpha": np.asarray(new_agent.temperature.params),
        "limit": np.asarray(new_agent.limit.params), "log_lambda": np.asarray(new_agent.lagrange.params),
        "actor_adam": get_adam(new_agent.actor), "critic_adam": get_adam(new_agent.critic),
        "limit_adam": get_adam(new_agent.limit), "temperature_adam": get_adam(new_agent.temperature),
        "lagrange_adam": get_adam(new_agent.lagrange),
    }  # fmt: skip
    got_metrics = {k: float(v) for k, v in metrics.items() if k != "finite"}
    return Case(cfg, layouts, start, got, got_metrics, expected, expected_metrics)


# ---------------------------------------------------------------------------------------------
# comparisons
#
# Tolerances: the jitted update runs in float32, the reference in float64 on the same float32
# inputs. Parameters are compared as steps (new - old), each array against its own largest step,
# so an error in a step cannot hide behind the parameter's magnitude: an absolute tolerance, a
# fraction of that largest step (chex.assert_trees_all_close with rtol 0, which names the first
# parameter array, as its path in the network's tree, where it is exceeded).

STEP_RTOL = 1e-3  # of the array's largest |step|; float32 rounding stays below ~1.5e-4
MOMENT_RTOL = 1e-3  # of the array's largest |mu| (|nu|)
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-5


def assert_step(name, got, expected, before, layout=None):
    got_step = np.asarray(got, np.float64) - before
    expected_step = np.asarray(expected, np.float64) - before
    scale = np.max(np.abs(expected_step))
    assert scale > 0, name
    tree = (lambda flat: unflatten(layout, flat)) if layout is not None else (lambda x: x)  # noqa: E731
    chex.assert_trees_all_close(tree(got_step), tree(expected_step), rtol=0.0, atol=STEP_RTOL * scale,
                                custom_message=f"{name}: step error vs largest step {scale:.3g}")  # fmt: skip


def assert_moments(name, got, expected):
    got_count, got_mu, got_nu = got
    count, mu, nu = expected
    assert got_count == count, name
    for moment, g, e in (("mu", got_mu, mu), ("nu", got_nu, nu)):
        scale = float(np.max(np.abs(e)))
        chex.assert_trees_all_close(np.asarray(g, np.float64), e, rtol=0.0, atol=MOMENT_RTOL * scale,
                                    custom_message=f"{name}.{moment} vs largest |{moment}| {scale:.3g}")  # fmt: skip


def test_critic_members_and_their_adamw_state(case):
    """Two AdamW steps on cross-entropy + lambda * (H_data - H_ood), with the moments (gradients)."""
    critic_layout = case.layouts[1]
    for i in range(case.cfg.num_qs):
        assert_step(f"critic[{i}]", case.got["critic"][i], case.expected["critic"][i], case.start["critic"][i],
                    critic_layout)  # fmt: skip
    assert_moments("critic", case.got["critic_adam"], case.expected["critic_adam"])


def test_target_critic_polyak_step(case):
    for i in range(case.cfg.num_qs):
        assert_step(f"target_critic[{i}]", case.got["target"][i], case.expected["target"][i], case.start["target"][i],
                    case.layouts[1])  # fmt: skip


def test_actor_and_its_adam_state(case):
    """One Adam step on mean(alpha * log pi - CVaR_risk(mixture))."""
    assert_step("actor", case.got["actor"], case.expected["actor"], case.start["actor"], case.layouts[0])
    assert_moments("actor", case.got["actor_adam"], case.expected["actor_adam"])


@pytest.mark.parametrize("name", ["log_alpha", "limit", "log_lambda"])
def test_scalar_parameters(case, name):
    """Temperature and lagrange steps w.r.t. their logs; the limit's AdamW step at cvar_limits."""
    assert_step(name, case.got[name], case.expected[name], case.start[name])
    adam = {"log_alpha": "temperature_adam", "limit": "limit_adam", "log_lambda": "lagrange_adam"}[name]
    assert_moments(adam, case.got[adam], case.expected[adam])


def test_metrics(case):
    got, expected = case.got_metrics, case.expected_metrics
    assert set(got) == set(racer.METRICS) == set(expected)
    chex.assert_tree_all_finite(expected)
    # every mismatch at once (chex.assert_trees_all_close would stop at the first)
    mismatched = {
        name: (got[name], float(expected[name]))
        for name in racer.METRICS
        if not np.isclose(got[name], expected[name], rtol=METRIC_RTOL, atol=METRIC_ATOL)
    }
    assert not mismatched, f"metrics (jax, numpy): {mismatched}"
