"""Actor and critic networks as pure functions of explicit parameter pytrees (design §4.1, 4.2).

Parameters are plain nested dicts of arrays, so an ensemble is just parameters stacked on a
leading axis and evaluated with `jax.vmap`, and the architecture is read back from the pytree
(a "pointnet" entry, a "norm" entry per critic layer): the apply functions need no config.

The agent stores each network's parameters as one flat vector (see `Layout`): optimizer steps,
Polyak averaging and finiteness checks are then a handful of XLA kernels instead of several per
parameter array, which is most of what makes the compiled update quick to compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from racer_vec.config import ACTION_DIM, KINEMATICS_FEATURES, SPEED, STEERING, AgentConfig

VEHICLE_FEATURES = len(KINEMATICS_FEATURES)
"""One Kinematics row: presence, x, y, vx, vy, heading."""
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
# He initialization for the ReLU layers. Heads start near zero: the initial policy is N(0, 1) before
# the squash and the initial critic distributions are close to uniform, so no action looks better
# before any data is seen. (No orthogonal init: jaxlib 0.10.2's CPU QR kernel can deadlock when
# several run at once on a 2-thread pool.)
HIDDEN_INIT_SCALE = 2.0
HEAD_INIT_SCALE = 1e-4

Params = dict


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a flat parameter vector maps onto a network's nested parameters (static and hashable)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Params, batch_dims: int = 0) -> Layout:
        leaves, treedef = jax.tree.flatten(params)
        return cls(treedef, tuple(leaf.shape[batch_dims:] for leaf in leaves))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def ravel(self, params: Params, batch_dims: int = 0):
        """Nested parameters -> flat (*batch, size); `batch_dims` leading axes (ensemble members) are kept."""
        leaves = jax.tree.leaves(params)
        return jnp.concatenate([leaf.reshape(leaf.shape[:batch_dims] + (-1,)) for leaf in leaves], axis=-1)

    def unravel(self, flat) -> Params:
        """Flat (*batch, size) -> nested parameters whose leaves keep the leading batch axes."""
        return _unravel(self, flat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _unravel(layout: Layout, flat) -> Params:
    batch = flat.shape[:-1]
    leaves, offset = [], 0
    for shape in layout.shapes:
        size = math.prod(shape)
        leaves.append(flat[..., offset : offset + size].reshape(batch + shape))
        offset += size
    return jax.tree.unflatten(layout.treedef, leaves)


def _unravel_fwd(layout: Layout, flat):
    return _unravel(layout, flat), None


def _unravel_bwd(layout: Layout, _, cotangent):
    # one concatenation; autodiff's own transpose of the slices is a sum of full-size pads
    first = jax.tree.leaves(cotangent)[0]
    return (layout.ravel(cotangent, batch_dims=first.ndim - len(layout.shapes[0])),)


_unravel.defvjp(_unravel_fwd, _unravel_bwd)


def _dense_init(key, fan_in: int, fan_out: int, scale: float) -> Params:
    """`scale` multiplies the kernel's variance 1 / fan_in."""
    init = jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    kernel = init(key, (fan_in, fan_out), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((fan_out,), jnp.float32)}


def _dense(p: Params, x):
    return _matmul(x, p["kernel"]) + p["bias"]


@jax.custom_vjp
def _matmul(x, kernel):
    """`x @ kernel` for a stack of rows x (..., F) (design §9). The kernel's gradient x^T g contracts
    over every row: XLA:CPU's YNNPACK dots take a contraction only along the left operand's minor
    axis, so XLA would transpose the gradient and run the product as a slow Eigen dot (a batched one
    under the ensemble's vmap). Here the input's transpose is made once in the forward pass, behind
    an optimization barrier that keeps XLA from folding it back into the dot."""
    return x @ kernel


def _matmul_fwd(x, kernel):
    rows_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    return x @ kernel, (rows_t, kernel)


def _matmul_bwd(residuals, g):
    rows_t, kernel = residuals
    return g @ kernel.T, rows_t @ g.reshape(-1, g.shape[-1])


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _norm_init(dim: int) -> Params:
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def _layer_norm(p: Params, x, eps: float = 1e-6):
    return _normalize(x, eps) * p["scale"] + p["bias"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x, eps):
    """(x - mean) / sqrt(var + eps) over the last axis. The gradient is the textbook one,
    `rstd * (g - mean(g) - xhat * mean(g * xhat))`: two row means and one pass, where autodiff of
    the moments gives XLA several more kernels (design §9)."""
    return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
    # E[x^2] - E[x]^2 (like flax's default): both moments come from one pass over x
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat, (xhat, rstd)


def _normalize_bwd(eps, residuals, g):
    xhat, rstd = residuals
    return (rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


# ---------------------------------------------------------------------------------------------
# PointNet encoder (design §4.2)


def _pointnet_init(key, dim: int) -> Params:
    return {"dense": _dense_init(key, VEHICLE_FEATURES, dim, HIDDEN_INIT_SCALE), "norm": _norm_init(dim)}


def pointnet_pool(p: Params, others):
    """Max-pool of Dense+LayerNorm+ReLU over the other vehicles' rows `others (..., V-1, 6)`.

    Absent rows are zeroed before the max and the ReLU is applied after it:
    `relu(max_j(present_j * z_j)) = max(0, max_{present j} relu(z_j))`, the masked max of the ReLU
    outputs, and exactly 0 (not -inf) when no other vehicle is present. Applying the ReLU to the
    pooled vector rather than to every row saves a full-size pass.
    """
    return pointnet_pool_members(jax.tree.map(lambda x: x[None], p), others)[0]


def pointnet_pool_members(p: Params, others):
    """`pointnet_pool` of every member of an ensemble (leading axis of p) on the same rows: (m, ..., H).

    The rows of all vehicles and samples go through the members' shared layers as one tall matrix,
    and the members side by side as one wide one, (rows, 6) @ (6, m*H): the members' features stay
    side by side through the LayerNorm and the pool, so neither the forward pass nor the gradient
    moves the rows' member axis (design §9); only the pooled (m, ..., H) is transposed.
    """
    with jax.named_scope("pointnet"):
        kernel = p["dense"]["kernel"]  # (m, 6, H)
        members, features, dim = kernel.shape
        wide = jnp.moveaxis(kernel, 0, 1).reshape(features, members * dim)
        h = _matmul(others, wide) + p["dense"]["bias"].reshape(-1)  # (..., V-1, m*H)
        z = _layer_norm(p["norm"], h.reshape(h.shape[:-1] + (members, dim)))
        present = (others[..., :1] > 0.5).astype(z.dtype)[..., None]
        pooled = jax.nn.relu(_row_max(others.shape[-2], (z * present).reshape(h.shape)))  # (..., m*H)
        return jnp.moveaxis(pooled.reshape(pooled.shape[:-1] + (members, dim)), -2, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _row_max(rows: int, x):
    """`jnp.max(x, axis=-2)` with its gradient sent to the argmax row. XLA:CPU (jaxlib 0.10.2)
    miscompiles jnp.max's own gradient here under jit (the PointNet's LayerNorm and bias
    gradients came out 12-100% off); the forward values are the same floats."""
    return jnp.max(x, axis=-2)


def _row_max_fwd(rows: int, x):
    return jnp.max(x, axis=-2), jnp.argmax(x, axis=-2)


def _row_max_bwd(rows: int, argmax, g):
    chosen = jnp.arange(rows)[:, None] == argmax[..., None, :]  # (..., rows, H)
    return (jnp.where(chosen, g[..., None, :], jnp.zeros((), g.dtype)),)


_row_max.defvjp(_row_max_fwd, _row_max_bwd)


def encode(params: Params, obs):
    """State features: the observation itself, or for PointNet `[ego row, pooled others]`."""
    if "pointnet" not in params:
        return obs
    rows = obs.reshape(obs.shape[:-1] + (-1, VEHICLE_FEATURES))
    return jnp.concatenate([rows[..., 0, :], pointnet_pool(params["pointnet"], rows[..., 1:, :])], axis=-1)


def _encoder_init(key, cfg: AgentConfig, obs_dim: int) -> tuple[Params, int]:
    if cfg.encoder == "pointnet":
        if obs_dim % VEHICLE_FEATURES:
            raise ValueError(f"PointNet needs rows of {VEHICLE_FEATURES} features, got obs_dim {obs_dim}")
        return {"pointnet": _pointnet_init(key, cfg.pointnet_dim)}, VEHICLE_FEATURES + cfg.pointnet_dim
    return {}, obs_dim


# ---------------------------------------------------------------------------------------------
# Actor (design §4.1)


def actor_init(key, cfg: AgentConfig, obs_dim: int) -> Params:
    k_enc, k_head, *k_hidden = jax.random.split(key, 2 + len(cfg.hidden_dims))
    params, width = _encoder_init(k_enc, cfg, obs_dim)
    hidden = []
    for k, dim in zip(k_hidden, cfg.hidden_dims):
        hidden.append(_dense_init(k, width, dim, HIDDEN_INIT_SCALE))
        width = dim
    params["hidden"] = hidden
    params["head"] = _dense_init(k_head, width, 2 * ACTION_DIM, HEAD_INIT_SCALE)
    return params


def actor_apply(params: Params, obs):
    """obs (..., D) -> Gaussian mean and log-std (..., ACTION_DIM) of the pre-squash action u."""
    h = encode(params, obs)
    for layer in params["hidden"]:
        h = jax.nn.relu(_dense(layer, h))
    mean, log_std = jnp.split(_dense(params["head"], h), 2, axis=-1)
    return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def action_scale(limit, speed_cap: bool = False, floor=None):
    """Half-widths of the action box: the limit h on the limited action (steering, or the target speed
    under a speed cap), 1 on the other; a floor φ on the target speed takes φ off its half-width."""
    scale = jnp.ones((ACTION_DIM,), jnp.float32).at[SPEED if speed_cap else STEERING].set(limit)
    return scale if floor is None else scale.at[SPEED].add(-floor)


def _cap_centre(limit, speed_cap: bool, floor):
    # a speed cap keeps the env's low end: its box [-1, 2h - 1] is centred at h - 1; a floor φ raises
    # the low end to 2φ - 1, and the centre by φ (design §4.1)
    centre = jnp.zeros((ACTION_DIM,), jnp.float32)
    centre = centre.at[SPEED].set(limit - 1.0) if speed_cap else centre
    return centre if floor is None else centre.at[SPEED].add(floor)


def action_box(limit, speed_cap: bool = False, floor=None):
    """(low, high) of the action box: steering in [-h, h], or the target speed in [-1, 2h - 1]; a floor
    φ raises the target speed's low end to 2φ - 1."""
    scale = action_scale(limit, speed_cap, floor)
    centre = _cap_centre(limit, speed_cap, floor) if speed_cap or floor is not None else 0.0
    return centre - scale, centre + scale


def squash(u, limit, speed_cap: bool = False, floor=None):
    """a = centre + scale * tanh(u): the env's [-1, 1] box intersected with the learned limit's (and the floor's)."""
    actions = action_scale(limit, speed_cap, floor) * jnp.tanh(u)
    return actions + _cap_centre(limit, speed_cap, floor) if speed_cap or floor is not None else actions


def squashed_log_prob(noise, u, log_std, limit, speed_cap: bool = False, floor=None):
    """log pi(a) for a = centre + scale * tanh(u), u = mean + exp(log_std) * noise, summed over action dims.

    Change of variables: log N(u) - sum log(1 - tanh(u)^2) - sum log(scale) (the centre shifts without
    stretching); the standardized noise is passed in so the Gaussian term needs no division by a tiny std.
    """
    gaussian = -0.5 * jnp.square(noise) - log_std - 0.5 * math.log(2.0 * math.pi)
    log_tanh_jacobian = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.sum(gaussian - log_tanh_jacobian - jnp.log(action_scale(limit, speed_cap, floor)), axis=-1)


def sample_policy(mean, log_std, limit, noise, speed_cap: bool = False, floor=None):
    """Reparameterized squashed sample: returns (actions, log_probs, pre-squash u)."""
    u = mean + jnp.exp(log_std) * noise
    return squash(u, limit, speed_cap, floor), squashed_log_prob(noise, u, log_std, limit, speed_cap, floor), u


# ---------------------------------------------------------------------------------------------
# Critic ensemble (design §4.2)


def critic_init(key, cfg: AgentConfig, obs_dim: int) -> Params:
    """One ensemble member; `ensemble_init` stacks `num_qs` of them."""
    k_enc, k_head, *k_hidden = jax.random.split(key, 2 + len(cfg.hidden_dims))
    params, width = _encoder_init(k_enc, cfg, obs_dim)
    width += ACTION_DIM
    hidden = []
    for k, dim in zip(k_hidden, cfg.hidden_dims):
        layer = {"dense": _dense_init(k, width, dim, HIDDEN_INIT_SCALE)}
        if cfg.critic_layer_norm:
            layer["norm"] = _norm_init(dim)
        hidden.append(layer)
        width = dim
    params["hidden"] = hidden
    params["head"] = _dense_init(k_head, width, cfg.num_atoms, HEAD_INIT_SCALE)
    return params


def ensemble_init(key, cfg: AgentConfig, obs_dim: int) -> Params:
    return jax.vmap(lambda k: critic_init(k, cfg, obs_dim))(jax.random.split(key, cfg.num_qs))


def critic_apply(params: Params, obs, actions):
    """One member: obs (N, D), actions (N, A) or a stack of action sets (S, N, A) -> logits
    (N, K) or (S, N, K).

    Several action sets for the same states (data and out-of-distribution actions) share the state
    encoding and the state half of the first layer, `concat(s, a) @ W = s @ W_s + a @ W_a`, and
    then run through the rest of the network as one taller matrix.
    """
    state = encode(params, obs)
    first = params["hidden"][0]["dense"]
    width = state.shape[-1]
    state_part = _matmul(state, first["kernel"][:width]) + first["bias"]  # (N, H)
    # the actions' few columns as multiply-adds: their kernel's gradient is then a reduction over the
    # rows, where a dot would need the gradient transposed to put the members side by side (design §9)
    action_kernel = first["kernel"][width:]
    action_part = sum(actions[..., i, None] * action_kernel[i] for i in range(action_kernel.shape[0]))
    if actions.ndim == state.ndim:
        h = state_part + action_part
    else:
        # One add per action set: the state part's gradient is then a sum of S arrays rather than
        # a broadcast's reduction, which XLA:CPU (YNNPACK) runs about 30x slower.
        h = jnp.stack([state_part + part for part in action_part])
    for i, layer in enumerate(params["hidden"]):
        if i:
            h = _dense(layer["dense"], h)
        if "norm" in layer:
            h = _layer_norm(layer["norm"], h)
        h = jax.nn.relu(h)
    return _dense(params["head"], h)


def ensemble_apply(params: Params, obs, actions):
    """All members at once (vmap over the stacked parameters): logits (num_qs, ..., N, K). The
    PointNet encoders of all members run side by side (`pointnet_pool_members`) before the vmap."""
    if "pointnet" not in params:
        return jax.vmap(critic_apply, in_axes=(0, None, None))(params, obs, actions)
    rows = obs.reshape(obs.shape[:-1] + (-1, VEHICLE_FEATURES))
    pooled = pointnet_pool_members(params["pointnet"], rows[..., 1:, :])
    ego = jnp.broadcast_to(rows[..., 0, :], pooled.shape[:-1] + (VEHICLE_FEATURES,))
    states = jnp.concatenate([ego, pooled], axis=-1)  # (m, ..., N, 6 + H): what `encode` gives each member
    mlp = {name: value for name, value in params.items() if name != "pointnet"}
    return jax.vmap(critic_apply, in_axes=(0, 0, None))(mlp, states, actions)
