"""Where a dense train step's time goes: its parts as separate jitted programs, timed side by side.

Each part is the forward + backward of one kind of op at the step's real shapes (the projection
matmuls of every layer, the attention core, the masked softmax alone, the norms, rotary
embeddings, embedding + loss), plus the optimizer update on the real parameter tree and the host
time to build one batch. All are timed round-robin in one run, so the shares are comparable on a
loaded machine. The parts are separate programs: their sum is not the step (XLA fuses across
them inside the step), but each gives the cost of that kind of work, and the matmul part gives
the ceiling: the fraction of the large-matmul rate the step would reach if everything else were
free. Used by ``bench_train.py --profile``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import Config
from ling_jax.layers.attention import AttentionMask, xla_attention
from ling_jax.layers.basics import RMSNorm, apply_rope
from ling_jax.timing import interleaved
from ling_jax.train import cross_entropy, make_optimizer


def _vjp_sum(fn: Callable, *args):
    """Forward + backward of ``fn`` with a ones cotangent: returns (outputs, input gradients)."""
    out, pull = jax.vjp(fn, *args)
    return out, pull(jax.tree_util.tree_map(jnp.ones_like, out))


def _matmul_part(config: Config, key) -> tuple[Callable, tuple, float]:
    """The projection matmuls of the step (q, k, v, o, gate, up, down per layer; head), forward
    (x @ W) and backward (g @ W^T, x^T @ g) written out: exactly 3x the forward FLOPs."""
    m, t = config.model, config.train
    n, e, f, hd = t.batch_size * t.seq_len, m.d_model, m.mlp_dim, m.resolved_head_dim
    shapes = [(e, m.num_heads * hd), (e, m.num_kv_heads * hd), (e, m.num_kv_heads * hd), (m.num_heads * hd, e),
              (e, f), (e, f), (f, e)] * m.num_layers + [(e, m.vocab_size)]
    keys = jax.random.split(key, 2 * len(shapes))
    xs = [jax.random.normal(keys[2 * i], (n, a), jnp.float32) for i, (a, _) in enumerate(shapes)]  # [N, in]
    ws = [jax.random.normal(keys[2 * i + 1], s, jnp.float32) for i, s in enumerate(shapes)]  # [in, out]

    def fn(xs, ws):
        outs = []
        for x, w in zip(xs, ws):
            y = x @ w  # [N, out]
            outs += [y, y @ w.T, x.T @ y]  # forward, dx, dW
        return outs

    flops = sum(3 * 2.0 * n * a * b for a, b in shapes)
    return fn, (xs, ws), flops


def _attention_parts(config: Config, key) -> dict[str, tuple[Callable, tuple, float]]:
    """The attention core (xla path, causal mask built from positions) and its masked softmax alone."""
    m, t = config.model, config.train
    b, s, h, hkv, d = t.batch_size, t.seq_len, m.num_heads, m.num_kv_heads, m.resolved_head_dim
    kq, kk, kv, kl = jax.random.split(key, 4)
    q = jax.random.normal(kq, (m.num_layers, b, s, h, d), jnp.float32)  # [L, B, T, H, D]
    k = jax.random.normal(kk, (m.num_layers, b, s, hkv, d), jnp.float32)  # [L, B, T, Hkv, D]
    v = jax.random.normal(kv, (m.num_layers, b, s, hkv, d), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))  # an argument: no constant-folded masks

    def core(q, k, v, positions):
        mask, bias = AttentionMask.causal_self(positions).dense()
        return [_vjp_sum(lambda q, k, v: xla_attention(q, k, v, mask, bias), q[i], k[i], v[i])
                for i in range(m.num_layers)]

    logits = jax.random.normal(kl, (m.num_layers, b, hkv, h // hkv, s, s), jnp.float32)  # [L, B, Hkv, G, T, T]

    def softmax(logits, positions):
        mask = AttentionMask.causal_self(positions).dense()[0][:, None, None]  # [B, 1, 1, T, T]

        def masked_softmax(x):
            x = jnp.where(mask, x, -1e30)
            p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
            return p / jnp.sum(p, axis=-1, keepdims=True)

        return [_vjp_sum(masked_softmax, logits[i]) for i in range(m.num_layers)]

    attn_flops = 3 * m.num_layers * 2 * (2.0 * b * s * s * h * d)  # QK^T and PV, forward + backward
    return {"attention_core": (core, (q, k, v, positions), attn_flops),
            "attention_softmax": (softmax, (logits, positions), 0.0)}


def _elementwise_parts(config: Config, key) -> dict[str, tuple[Callable, tuple, float]]:
    m, t = config.model, config.train
    b, s, e = t.batch_size, t.seq_len, m.d_model
    kx, kq, kl, kt = jax.random.split(key, 4)
    n_norms = 2 * m.num_layers + 1
    xs = jax.random.normal(kx, (n_norms, b, s, e), jnp.float32)  # [norms, B, T, E]
    norm = RMSNorm(m.norm_eps)
    scale = norm.init(key, xs[0])

    def norms(xs, scale):
        return [_vjp_sum(lambda x, p: norm.apply(p, x), xs[i], scale) for i in range(n_norms)]

    qk = jax.random.normal(kq, (m.num_layers, b, s, m.num_heads + m.num_kv_heads, m.resolved_head_dim))
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))

    def rope(qk, positions):
        return [_vjp_sum(lambda x: apply_rope(x, positions, m.rope_base), qk[i]) for i in range(m.num_layers)]

    logits = jax.random.normal(kl, (b, s, m.vocab_size), jnp.float32)
    targets = jax.random.randint(kt, (b, s), 0, m.vocab_size)
    table = jax.random.normal(kt, (m.vocab_size, e), jnp.float32)

    def embed_loss(logits, table, targets):
        ce = _vjp_sum(lambda lg: cross_entropy(lg, targets, jnp.ones((b, s)))[0], logits)
        emb = _vjp_sum(lambda tb: jnp.take(tb, targets, axis=0), table)
        return ce, emb

    return {"norms": (norms, (xs, scale), 0.0), "rope": (rope, (qk, positions), 0.0),
            "embed_and_loss": (embed_loss, (logits, table, targets), 0.0)}


def _optimizer_part(config: Config, params) -> tuple[Callable, tuple, float]:
    tx, _ = make_optimizer(config)
    opt_state = tx.init(params)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree_util.tree_map(jnp.add, params, updates), opt_state

    grads = jax.tree_util.tree_map(lambda p: p * 1e-3, params)
    return update, (grads, opt_state, params), 0.0


def profile_parts(config: Config, params, step_fn: Callable, step_args: tuple, data_fn: Callable[[int], object],
                  *, repeats: int, train_flops: float, matmul_size: int = 2048, whole: dict | None = None) -> dict:
    """Times the step, its parts and a large float32 matmul round-robin; returns a flat dict.

    Every program is timed by wall clock and by this process's CPU time (``time.process_time``):
    on a machine shared with other jobs the CPU time of a program is far steadier than its wall
    time, so shares and FLOP rates come from CPU time (min over repeats); wall figures are kept.
    ``whole``: more named (jitted fn, args) programs to time beside the step (the model's forward
    and forward + backward), so the glue between the parts shows as a residual.
    """
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    parts = {"matmuls": _matmul_part(config, k1), **_attention_parts(config, k2), **_elementwise_parts(config, k3),
             "optimizer": _optimizer_part(config, params)}
    a = jax.random.normal(k4, (2, matmul_size, matmul_size), jnp.float32)
    parts["peak_matmul"] = (lambda a: a[0] @ a[1], (a,), 2.0 * matmul_size**3)
    jitted = {"step": (step_fn, step_args), **(whole or {})}
    for name, (fn, args, _) in parts.items():
        jitted[name] = (jax.jit(fn), args)
    out: dict = {"profile_repeats": repeats}
    compiled = {}
    for name, (fn, args) in jitted.items():
        exe = fn.lower(*args).compile()  # timed below as compiled (calling `fn` would compile it again)
        analysis = exe.cost_analysis()  # XLA's count of FLOPs and bytes
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        if analysis:
            out[f"profile_{name}_xla_flops"] = float(analysis.get("flops", 0.0))
            out[f"profile_{name}_xla_bytes"] = float(analysis.get("bytes accessed", 0.0))
        jax.block_until_ready(exe(*args))  # warm-up
        compiled[name] = (exe, args)
    times = interleaved({**compiled, "data": (data_fn, (0,))}, repeats, warmup=False)  # warmed up above
    wall = {name: w for name, (w, _) in times.items()}
    cpu = {name: c for name, (_, c) in times.items()}
    w = {name: float(np.min(ts)) for name, ts in wall.items()}  # min: least disturbed by other load
    c = {name: float(np.min(ts)) for name, ts in cpu.items()}
    peak_cpu = parts["peak_matmul"][2] / c["peak_matmul"]  # FLOP per CPU-second of a large matmul
    for name in wall:
        out[f"profile_{name}_wall_s"] = w[name]
        out[f"profile_{name}_cpu_s"] = c[name]
        out[f"profile_{name}_share_of_step"] = c[name] / c["step"]
    for name, (_, _, flops) in parts.items():
        if flops:
            out[f"profile_{name}_fraction_of_matmul_peak"] = flops / c[name] / peak_cpu
    out["profile_step_fraction_of_matmul_peak"] = train_flops / c["step"] / peak_cpu
    # The step if only the matmuls (projections, QK^T and PV) cost time:
    matmul_cpu = c["matmuls"] + max(c["attention_core"] - c["attention_softmax"], 0.0)
    out["profile_matmul_only_ceiling_fraction"] = train_flops / matmul_cpu / peak_cpu
    non_matmul = c["attention_softmax"] + c["norms"] + c["rope"] + c["embed_and_loss"] + c["optimizer"]
    out["profile_non_matmul_share_of_step"] = non_matmul / c["step"]
    out["profile_matmul_share_of_step"] = matmul_cpu / c["step"]
    parts_cpu = (c["matmuls"] + c["attention_core"] + c["norms"] + c["rope"] + c["embed_and_loss"]
                 + c["optimizer"])
    out["profile_unattributed_share_of_step"] = 1.0 - parts_cpu / c["step"]
    return out
