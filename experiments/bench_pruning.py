"""Token pruning saves real work: prefill compaction wall time and pruned-KV-cache decoding.

    python experiments/bench_pruning.py --json experiments/results/bench_pruning.json

In one run on the current backend (CPU here), cpu-small dimensions (d_model 128, 4 layers), batch 1:

* **Prefill** at sequence length 2048: the dense model against the same model with hard budget
  pruning on every layer and ``compaction=True`` at keep ratios 0.5, 0.25 and 0.1 (budget =
  ratio x 2048). Layer 0 runs on all tokens, the layers above on the kept ones. The measured
  speedup is reported as a fraction of the ideal one, ``ledger FLOPs (dense) / ledger FLOPs
  (compacted)`` (target >= 0.9): the median over ``--repeats`` rounds that each time every
  program once (a round's dense / compacted ratio sees one load), with each round's fraction and
  the ratio of XLA's cost-analysis FLOPs beside it.
* **Decode** at context 4096 with a 10% budget (410 slots per layer) against a full cache (4096 +
  steps slots): KV-cache bytes of the whole model, and the time of one attention layer's decode step
  (K/V write with eviction + attention over the cache + projections); also the whole model's step.

The JSON is one flat object (plus ``prefill_fraction_of_ideal``, keyed by keep ratio) with the
run's provenance (command, git revision, versions) and the 1-minute load average at its start and
end: timings from a loaded machine are not an idle machine's. The headline ratios print last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ling_jax import generate as gen  # noqa: E402
from ling_jax.config import ModelConfig, PruningConfig, get_preset  # noqa: E402
from ling_jax.layers import kv_cache  # noqa: E402
from ling_jax.layers.attention import Attention, AttentionMask  # noqa: E402
from ling_jax.ledger import ledger_from_intermediates  # noqa: E402
from ling_jax.model import Transformer, forward_with_stats, init_params  # noqa: E402
from ling_jax.provenance import Provenance  # noqa: E402
from ling_jax.timing import interleaved, median_times  # noqa: E402
from ling_jax.token_state import TokenState  # noqa: E402


def pruned(cfg: ModelConfig, budget: int, args, compaction: bool) -> ModelConfig:
    pc = PruningConfig(enabled=True, layers="all", mode="hard", inference_rule="budget", budget=budget,
                       num_sinks=args.sinks, window=args.window, compaction=compaction)
    return dataclasses.replace(cfg, pruning=pc)


# ----------------------------------------------------------------------------- prefill


def bench_prefill(cfg: ModelConfig, params, args) -> dict:
    t = args.seq_len
    tokens = jax.random.randint(jax.random.key(1), (args.batch, t), 0, cfg.vocab_size)

    configs = {"dense": cfg} | {r: pruned(cfg, max(1, round(r * t)), args, compaction=True) for r in args.ratios}
    flops, xla_flops, calls = {}, {}, {}
    for name, c in configs.items():
        model = Transformer(c)
        stats = jax.jit(lambda p, x, m=model: forward_with_stats(m, {"params": p}, x)[1])(params, tokens)
        flops[name] = ledger_from_intermediates(c, stats).computed
        compiled = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)).lower(params, tokens).compile()
        cost = compiled.cost_analysis()
        xla_flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        calls[name] = (compiled, (params, tokens))
    # every round times each program once: a round's dense / compacted ratio sees one load
    wall = {name: np.asarray(w) for name, (w, _) in interleaved(calls, args.repeats).items()}
    dense_flops, dense_s = flops["dense"], float(np.median(wall["dense"]))
    out = {"prefill_seq_len": t, "prefill_dense_ms": 1e3 * dense_s, "prefill_fraction_of_ideal": {},
           "prefill_xla_flops_dense": xla_flops["dense"]}
    print(f"prefill T={t}: dense {1e3 * dense_s:.1f} ms, {dense_flops / 1e9:.2f} GFLOP (XLA: {xla_flops['dense'] / 1e9:.2f})")
    for ratio in args.ratios:
        ideal = dense_flops / flops[ratio]
        speedups = wall["dense"] / wall[ratio]  # per round
        measured, frac = float(np.median(speedups)), float(np.median(speedups / ideal))
        key = f"{ratio:g}"
        out["prefill_fraction_of_ideal"][key] = frac
        out.update({f"prefill_fraction_of_ideal_{key}": frac, f"prefill_speedup_{key}": measured,
                    f"prefill_ideal_speedup_{key}": ideal, f"prefill_compacted_ms_{key}": 1e3 * float(np.median(wall[ratio])),
                    f"prefill_fraction_of_ideal_rounds_{key}": (speedups / ideal).tolist(),
                    f"prefill_xla_flops_{key}": xla_flops[ratio],
                    f"prefill_xla_speedup_{key}": xla_flops["dense"] / xla_flops[ratio]})
        print(f"  keep {ratio:>5g}: {1e3 * np.median(wall[ratio]):7.1f} ms  speedup {measured:5.2f}x  ideal {ideal:5.2f}x  "
              f"fraction of ideal {frac:.2f} (rounds {np.min(speedups / ideal):.2f}-{np.max(speedups / ideal):.2f})  "
              f"XLA FLOPs ratio {xla_flops['dense'] / xla_flops[ratio]:5.2f}x")
    out["prefill_fraction_of_ideal_min"] = min(out["prefill_fraction_of_ideal"].values())
    return out


# ----------------------------------------------------------------------------- decode


def filled_cache(model: Transformer, params, args, slots: int, context: int, pruned_cache: bool) -> dict:
    """A cache collection as it stands after ``context`` tokens (random keys/values): a full cache
    holds every position; a budget cache the sinks, the window and older survivors."""
    template = gen.empty_cache(model, {"params": params}, args.batch, slots)
    rng = np.random.default_rng(0)

    def fill(layer):
        s = layer["pos"].shape[1]
        if pruned_cache:
            older = np.sort(rng.choice(np.arange(args.sinks, context - args.window), s - args.sinks - args.window, replace=False))
            pos = np.concatenate([np.arange(args.sinks), older, np.arange(context - args.window, context)])
        else:
            pos = np.where(np.arange(s) < context, np.arange(s), kv_cache.EMPTY)
        pos = np.broadcast_to(pos, layer["pos"].shape).astype(np.int32)
        k = rng.normal(size=layer["k"].shape).astype(np.float32)
        return {"k": jnp.asarray(k), "v": jnp.asarray(k[::-1].copy()), "pos": jnp.asarray(pos),
                "score": jnp.asarray(rng.normal(size=pos.shape).astype(np.float32)), "keep": layer["keep"]}

    return jax.tree_util.tree_map(fill, template, is_leaf=lambda x: isinstance(x, dict) and "pos" in x)


def decode_loop(model: Transformer, steps: int, context: int):
    """Jitted: ``steps`` greedy decode steps of the whole model from a filled cache."""
    def run(params, cache, token):
        def step(state, i):
            cache, token = state
            pos = jnp.full(token.shape, context, jnp.int32) + i
            logits, cache = gen.decode_step(model, {"params": params}, cache, token, pos, jnp.ones(token.shape, bool))
            return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), None
        (cache, token), _ = jax.lax.scan(step, (cache, token), jnp.arange(steps))
        return token
    return jax.jit(run)


def attention_loop(cfg: ModelConfig, steps: int, context: int, pruned_cache: bool, args):
    """Jitted: ``steps`` decode steps of one attention layer against its cache."""
    attn = Attention(cfg)
    pc = cfg.pruning

    def run(p, cache, x):
        def step(cache, i):
            pos = jnp.full((x.shape[0], 1), context, jnp.int32) + i
            mask = AttentionMask.causal_self(pos)
            token_state = TokenState(cache_op=kv_cache.DECODE)
            if pruned_cache:
                mask = mask.replace(num_sinks=pc.num_sinks, window=pc.window, kv_keep=jnp.ones(pos.shape, bool))
                token_state = token_state.replace(prune_priority=jnp.zeros(pos.shape, jnp.float32))
            out, state = attn.apply({"params": p, "cache": cache}, x, mask, token_state, mutable=["cache"])
            return state["cache"], jnp.sum(out)
        cache, sums = jax.lax.scan(step, cache, jnp.arange(steps))
        return sums
    return jax.jit(run)


def bench_decode(cfg: ModelConfig, params, args) -> dict:
    context, steps = args.context, args.decode_steps
    budget = max(args.sinks + args.window + 1, round(args.decode_budget * context))
    full_cfg = dataclasses.replace(cfg, max_seq_len=context + steps)
    budget_cfg = pruned(full_cfg, budget, args, compaction=False)
    token = jnp.zeros((args.batch,), jnp.int32)
    x = jax.random.normal(jax.random.key(2), (args.batch, 1, cfg.d_model))
    result = {"decode_context": context, "decode_budget_slots": budget}
    bytes_, calls = {}, {}
    for name, c, slots, is_pruned in (("full", full_cfg, context + steps, False), ("budget", budget_cfg, budget, True)):
        model = gen.decoding_model(c)
        cache = filled_cache(model, params, args, slots, context, is_pruned)
        bytes_[name] = kv_cache.nbytes(cache)
        calls[name] = (decode_loop(model, steps, context), (params, cache, token))
        calls["attn_" + name] = (attention_loop(c, steps, context, is_pruned, args),
                                 (params["block_0"]["attn"], cache["block_0"]["attn"], x))
    per_step = {k: v / steps for k, v in median_times(calls, args.repeats).items()}
    times = {k: per_step[k] for k in ("full", "budget")}
    attn_times = {k: per_step["attn_" + k] for k in ("full", "budget")}
    for name, slots in (("full", context + steps), ("budget", budget)):
        print(f"decode context {context}, {name:6s} cache ({slots} slots/layer): {bytes_[name] / 2**20:7.2f} MiB, "
              f"model step {1e3 * times[name]:.3f} ms, attention layer step {1e6 * attn_times[name]:.1f} us")
    result.update({
        "decode_kv_bytes_full": bytes_["full"], "decode_kv_bytes_budget": bytes_["budget"],
        "decode_kv_bytes_ratio": bytes_["full"] / bytes_["budget"],
        "decode_step_ms_full": 1e3 * times["full"], "decode_step_ms_budget": 1e3 * times["budget"],
        "decode_step_speedup": times["full"] / times["budget"],
        "decode_attention_us_full": 1e6 * attn_times["full"], "decode_attention_us_budget": 1e6 * attn_times["budget"],
        "decode_attention_speedup": attn_times["full"] / attn_times["budget"],
    })
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", help="model dimensions (ling_jax preset)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048, help="prefill sequence length")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="prefill keep ratios")
    p.add_argument("--context", type=int, default=4096, help="decode context length")
    p.add_argument("--decode-budget", type=float, default=0.1, help="decode budget as a fraction of the context")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps per timed call")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (medians)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    prov = Provenance("experiments/bench_pruning.py", argv)

    cfg = dataclasses.replace(get_preset(args.preset).model, max_seq_len=max(args.seq_len, args.context + args.decode_steps))
    model = Transformer(pruned(cfg, 64, args, compaction=False))  # parameters with the pruners' scorers
    params = jax.jit(lambda k: nn.meta.unbox(init_params(model, k)))(jax.random.key(0))
    print(f"backend {jax.default_backend()}, {args.preset}: d_model {cfg.d_model}, {cfg.num_layers} layers, batch {args.batch}")
    result = {"backend": jax.default_backend(), "preset": args.preset, "batch": args.batch, "repeats": args.repeats,
              "load_average_1min_start": os.getloadavg()[0]}
    result.update(bench_prefill(cfg, params, args))
    result.update(bench_decode(cfg, params, args))
    result["load_average_1min_end"] = os.getloadavg()[0]
    if args.json:
        prov.write(args.json, result, config=cfg)
    fracs = ", ".join(f"{k}: {v:.2f}" for k, v in result["prefill_fraction_of_ideal"].items())
    print(f"decode at context {args.context}, budget {result['decode_budget_slots']}: KV bytes {result['decode_kv_bytes_ratio']:.1f}x "
          f"fewer (target >= 5), attention step {result['decode_attention_speedup']:.2f}x faster (target >= 3)")
    print(f"prefill compaction speedup as a fraction of ideal by keep ratio (target >= 0.9): {fracs} "
          f"(load average {result['load_average_1min_start']:.1f} at the start, {result['load_average_1min_end']:.1f} at the end)")
    return result


if __name__ == "__main__":
    main()
