"""Sparse top-k Mixture-of-Experts feed-forward layer.

``MoE(config)(x [B, T, E], token_valid [B, T]) -> [B, T, E]`` replaces the SwiGLU MLP on MoE
layers. Per token: a router (:mod:`ling_jax.layers.moe_routers`) picks ``top_k`` of
``num_experts`` SwiGLU experts plus ``num_zero_experts`` zero-compute experts; the chosen real
experts run through the configured dispatch (:mod:`ling_jax.layers.moe_dispatch`), subject to
the capacity policy; zero-compute experts add ``weight * x`` (identity) or nothing; shared experts
run on every token. Invalid (padding) tokens are not routed, use no capacity and get only the
shared experts' output.

Recorded through ``sow("intermediates", ...)``:

* ledger counts: ``expert_evals`` (token-expert evaluations computed on real experts: valid, kept,
  zero-compute excluded), ``shared_evals`` (tokens x shared experts), ``router_tokens``;
* losses (already weighted, added by the train step): ``loss_moe_load_balance``, ``loss_moe_z``;
* diagnostics: ``moe_load`` (per-choice selections before capacity, ``[X + Z]``),
  ``moe_dropped_fraction``, ``moe_max_mean_load`` (over real experts, before capacity),
  ``moe_router_entropy``, ``moe_zero_share`` (fraction of choices that went to zero experts).

Aux-loss-free balancing: with ``bias_update_rate > 0`` the layer owns a per-choice bias in the
``moe_bias`` collection; :func:`update_router_bias` moves it after each train step. With
``routing_bias=True`` the layer owns the bias at any rate (a checkpoint's correction bias,
DeepSeek-V3's ``e_score_correction_bias``, applied at rate 0 and never moved).

Shared-expert gate (``shared_gate``, Qwen2-MoE): the shared experts' output is multiplied per
token by ``sigmoid(x . w_shared_gate)``.

Jitter: with ``jitter > 0`` the router input is multiplied by ``U(1 - jitter, 1 + jitter)`` noise
drawn from the ``"jitter"`` rng when the caller provides one (``apply(..., rngs={"jitter": key})``,
as the train step does); without that rng (evaluation, generation) the router is deterministic.

Expert parallelism: when a mesh with an ``expert`` axis > 1 is active, the routed experts run
through :func:`ling_jax.layers.moe_parallel.expert_parallel_ffn` (its capacity counts per device).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jaxtyping import Array, Bool, Float

from ling_jax.config import ModelConfig, MoEConfig
from ling_jax.layers import moe_routers as routers
from ling_jax.layers.basics import MLP, compute_dtype, dense_init, param_with_axes
from ling_jax.layers.moe_dispatch import capacity_keep, dispatch, resolve_impl
from ling_jax.ledger import sown
from ling_jax.routing import expert_capacity

BIAS_COLLECTION = "moe_bias"


class MoE(nn.Module):
    """Routed SwiGLU experts + zero-compute experts + shared experts (see the module docstring)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B T E"], token_valid: Optional[Bool[Array, "B T"]] = None) -> Float[Array, "B T E"]:
        cfg, m = self.config, self.config.moe
        dtype = compute_dtype(cfg)
        b, t, e = x.shape
        n = b * t
        f = m.expert_dim or cfg.mlp_dim
        num_x, num_c = m.num_experts, m.num_experts + m.num_zero_experts
        valid = jnp.ones((n,), bool) if token_valid is None else token_valid.reshape(n)

        router_w = param_with_axes(self, "router", dense_init(e), (e, num_c), ("embed", "expert"))
        w_gate = param_with_axes(self, "w_gate", dense_init(e), (num_x, e, f), ("expert", "embed", "mlp"))
        w_up = param_with_axes(self, "w_up", dense_init(e), (num_x, e, f), ("expert", "embed", "mlp"))
        w_down = param_with_axes(self, "w_down", dense_init(f), (num_x, f, e), ("expert", "mlp", "embed"))
        bias = None
        if m.has_routing_bias:  # aux-loss-free balancing, or a checkpoint's correction bias (rate 0)
            # asarray: an imported checkpoint's bias may be a host (NumPy) array
            bias = jnp.asarray(self.variable(BIAS_COLLECTION, "bias", jnp.zeros, (num_c,), jnp.float32).value)

        xf = x.reshape(n, e)  # [N, E]
        xr = xf.astype(jnp.float32)
        if m.jitter > 0 and self.has_rng("jitter"):
            noise = jax.random.uniform(self.make_rng("jitter"), xr.shape, jnp.float32, 1 - m.jitter, 1 + m.jitter)
            xr = xr * noise
        logits = xr @ router_w  # [N, C] float32
        r = routers.route(logits, kind=m.router, top_k=m.top_k, bias=bias, num_groups=m.num_groups,
                          top_groups=m.top_groups, normalize_weights=m.normalize_weights, route_scale=m.route_scale)

        real = valid[:, None] & (r.ids < num_x)  # [N, K] selections of real experts
        cap = expert_capacity(n, m.top_k, num_x, m.capacity_factor)
        active = capacity_keep(r.ids, real, num_x, cap)  # [N, K] computed assignments

        xc = xf.astype(dtype)
        y = self._routed(xc, r, active, cap, (w_gate, w_up, w_down), (b, t))  # [N, E] float32
        zero = valid[:, None] & (r.ids >= num_x)  # [N, K]
        if m.num_zero_experts and m.zero_expert_output == "identity":
            y = y + jnp.sum(jnp.where(zero, r.weights, 0.0), axis=-1)[:, None] * xf.astype(jnp.float32)
        out = y.astype(dtype).reshape(b, t, e)
        if m.num_shared_experts:
            shared = MLP(cfg, hidden_dim=m.num_shared_experts * f, name="shared")(x)  # [B, T, E]
            if m.shared_gate:  # Qwen2-MoE: a per-token sigmoid gate on the shared experts' output
                w_sg = param_with_axes(self, "shared_gate", dense_init(e), (e,), ("embed",))
                gate = jax.nn.sigmoid(jnp.einsum("bte,e->bt", x.astype(jnp.float32), jnp.asarray(w_sg, jnp.float32)))
                shared = shared * gate[..., None].astype(shared.dtype)  # [B, T, E]
            out = out + shared.astype(dtype)
            self.sow("intermediates", "shared_evals", jnp.float32(n * m.num_shared_experts))

        self._record(r, valid, real, active, zero, num_x, num_c)
        return out

    def _routed(self, xc, r, active, cap, weights, bt):
        """Weighted outputs of the active real-expert assignments: [N, E] float32."""
        m = self.config.moe
        w_gate, w_up, w_down = (jnp.asarray(w, xc.dtype) for w in weights)  # jnp: numpy params stay traceable
        from ling_jax.layers.moe_parallel import expert_mesh, expert_parallel_ffn

        if expert_mesh() is not None:  # expert-parallel: inactive assignments get id -1 (no expert)
            b, t = bt
            ids = jnp.where(active, r.ids, -1).reshape(b, t, -1)  # [B, T, K]
            w = jnp.where(active, r.weights, 0.0).reshape(b, t, -1)
            y = expert_parallel_ffn(xc.reshape(b, t, -1), ids, w, w_gate, w_up, w_down,
                                    capacity_factor=m.capacity_factor, dtype=xc.dtype)
            return y.reshape(b * t, -1).astype(jnp.float32)
        return dispatch(xc, r.ids, r.weights, active, w_gate, w_up, w_down, impl=m.dispatch, capacity=cap)

    def _record(self, r, valid, real, active, zero, num_x, num_c):
        m = self.config.moe
        n, k = r.ids.shape
        sow = lambda name, v: self.sow("intermediates", name, jnp.asarray(v, jnp.float32))  # noqa: E731
        sow("router_tokens", n)
        sow("expert_evals", jnp.sum(active))
        # What the dispatch implementation evaluates: the sorted / grouped-matmul paths compute the
        # active assignments only; the GShard dense path fills every expert's capacity buffer
        # (plus its one-hot dispatch and combine matmuls); the reference runs every expert on every token.
        impl = resolve_impl(m.dispatch)
        if impl in ("dense", "reference"):
            cap = n if impl == "reference" else max(min(expert_capacity(n, k, num_x, m.capacity_factor), n), 1)
            sow("expert_evals_computed", num_x * cap)
            if impl == "dense":
                e = self.config.d_model
                sow("flops_moe_dispatch", 2.0 * n * num_x * cap * (2 * e + 2 * k))
        else:
            sow("expert_evals_computed", jnp.sum(active))
        if m.load_balance_weight > 0:
            sow("loss_moe_load_balance", m.load_balance_weight * routers.load_balance_loss(r.probs, r.ids, valid))
        if m.z_loss_weight > 0:
            sow("loss_moe_z", m.z_loss_weight * routers.z_loss(r.logits, valid))
        load = jax.lax.stop_gradient(routers.choice_load(r.ids, valid, num_c))  # [C]
        selected = jnp.sum(real)
        sow("moe_load", load)
        sow("moe_dropped_fraction", jnp.where(selected > 0, (selected - jnp.sum(active)) / jnp.maximum(selected, 1), 0.0))
        sow("moe_max_mean_load", routers.max_mean_load(load[:num_x]))
        sow("moe_router_entropy", jax.lax.stop_gradient(routers.router_entropy(r.probs, valid)))
        choices = jnp.maximum(jnp.sum(valid) * k, 1)
        sow("moe_zero_share", jnp.sum(zero) / choices)


# ----------------------------------------------------------------------------- bias update


def update_router_bias(moe_cfg: MoEConfig, extra: Mapping[str, Any], intermediates: Mapping[str, Any]) -> dict:
    """Moves every MoE layer's bias by ``bias_update_rate`` toward balancing the step's loads.

    ``extra[moe_bias]`` mirrors the module tree (``{"block_1": {"moe": {"bias": [C]}}}``); the
    loads come from the ``moe_load`` each layer sowed at the same path in ``intermediates``.
    Layers whose loads are missing keep their bias. Pure jnp: runs inside the jitted train step.
    """
    if moe_cfg.bias_update_rate <= 0 or BIAS_COLLECTION not in extra:
        return dict(extra)

    loads = sown(intermediates)
    biases = traverse_util.flatten_dict(extra[BIAS_COLLECTION])  # {("block_1", "moe", "bias"): [C]}
    for path, value in biases.items():
        load = loads.get(path[:-1] + ("moe_load",)) if path[-1] == "bias" else None
        if load is not None:
            biases[path] = routers.bias_step(value, sum(jnp.asarray(v, jnp.float32) for v in load),
                                             moe_cfg.bias_update_rate)
    return {**extra, BIAS_COLLECTION: traverse_util.unflatten_dict(biases)}
