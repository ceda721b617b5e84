"""Mixture-of-experts ablation: number of experts, top-k, shared and zero-compute experts, router kinds.

Each variant replaces every MLP with an MoE layer (``model.moe``) and is trained from scratch per
(task, seed); the dense model of the same size is the reference. Per variant: quality, relative
quality loss, token reduction factor from the ledger (an MoE whose active experts are smaller
than the dense MLP, or whose tokens pick zero-compute experts, computes fewer FLOPs), prefill time
relative to dense, and router diagnostics (share of choices on zero-compute experts, max/mean
expert load, dropped fraction, router entropy). For the base variant it also records which
experts each token class (whitespace, identifiers, keywords, punctuation, digits) is routed to.

    python experiments/ablate_moe.py --preset cpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common as C  # noqa: E402
from experiments.runner import Variant, parse, run_ablation  # noqa: E402

NAME = "ablate_moe"
MEANS = ("moe_zero_share", "moe_max_mean_load", "moe_dropped_fraction", "moe_router_entropy")
TASKS = {"smoke": ("text",), "cpu": ("text",), "tpu": C.TASKS}
BASE_VARIANT = "moe_e8_k2"


def base_moe(preset: str) -> dict:
    """The base MoE: 8 experts, top-2, each expert half the dense MLP (same active FFN FLOPs as dense)."""
    mlp = C.sizes(preset).model.get("mlp_dim") or 0
    if not mlp:
        from ling_jax.config import get_preset

        mlp = get_preset(C.sizes(preset).base).model.mlp_dim
    return {"model.moe.enabled": True, "model.moe.num_experts": 8, "model.moe.top_k": 2,
            "model.moe.expert_dim": mlp // 2, "model.moe.layers": "all"}


def variants(preset: str) -> list[Variant]:
    b = base_moe(preset)
    half = b["model.moe.expert_dim"]
    v = lambda name, **over: Variant(name, {**b, **{f"model.moe.{k}": x for k, x in over.items()}})  # noqa: E731
    if preset == "smoke":
        return [Variant("dense", {}), v("zero4", num_zero_experts=4)]
    return [
        Variant("dense", {}),
        Variant(BASE_VARIANT, b),
        v("experts4", num_experts=4),
        v("experts16", num_experts=16),
        v("topk1", top_k=1),
        v("topk4", top_k=4),
        v("shared1_topk1", top_k=1, num_shared_experts=1),  # same active FLOPs as the base
        v("zero4", num_zero_experts=4),  # 4 identity experts among 12 choices
        v("sigmoid_bias", router="sigmoid", bias_update_rate=0.001, load_balance_weight=0.0),
        v("fine16_k4", num_experts=16, top_k=4, expert_dim=half // 2),  # fine-grained, same active FLOPs
    ]


# ----------------------------------------------------------------------------- expert usage by token class


def expert_usage(trained: C.Trained, batches: list) -> dict:
    """Counts, per MoE layer and token class, how often each router choice was selected."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ling_jax.layers import moe_routers as routers
    from ling_jax.layers.moe import BIAS_COLLECTION, MoE
    from ling_jax.model import Transformer

    cfg = trained.model
    m = cfg.moe
    model = Transformer(cfg)

    @jax.jit
    def route_ids(variables, tokens):
        """Router choices [N, K] of every MoE layer, recomputed from the captured layer inputs."""
        captured: dict[str, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, MoE) and context.method_name == "__call__":
                captured[context.module.scope.path[0]] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, tokens)
        out = {}
        for block, x in captured.items():
            params = variables["params"][block]["moe"]
            bias = variables.get(BIAS_COLLECTION, {}).get(block, {}).get("moe", {}).get("bias")
            logits = x.reshape(-1, x.shape[-1]).astype(jnp.float32) @ params["router"]  # [N, C]
            out[block] = routers.route(logits, kind=m.router, top_k=m.top_k, bias=bias, num_groups=m.num_groups,
                                       top_groups=m.top_groups, normalize_weights=m.normalize_weights,
                                       route_scale=m.route_scale).ids  # [N, K]
        return out

    choices = m.num_experts + m.num_zero_experts
    counts: dict[str, dict[str, np.ndarray]] = {}
    per_class = {c: 0 for c in C.TOKEN_CLASSES}
    for batch in batches:
        ids_by_layer = jax.device_get(route_ids(trained.variables, jnp.asarray(batch["inputs"])))
        flat = [c for row in np.asarray(batch["inputs"]) for c in C.token_classes(row)]
        for c in flat:
            per_class[c] += 1
        for block, ids in sorted(ids_by_layer.items()):
            layer = counts.setdefault(block.split("_")[1], {c: np.zeros(choices, np.int64) for c in C.TOKEN_CLASSES})
            for cls, row in zip(flat, np.asarray(ids)):
                np.add.at(layer[cls], row, 1)
    names = [f"e{i}" for i in range(m.num_experts)] + [f"z{i}" for i in range(m.num_zero_experts)]
    return {"classes": list(C.TOKEN_CLASSES), "choice_names": names, "tokens_per_class": per_class,
            "layers": {k: {c: v.tolist() for c, v in layer.items()} for k, layer in sorted(counts.items())}}


def picture(task: str, trained: dict, batches: list, out: Path) -> None:
    if task != "text":
        return
    for name in (BASE_VARIANT, "zero4"):
        if name in trained:
            usage = expert_usage(trained[name], batches)
            (out / f"experts_{name}.json").write_text(json.dumps({"variant": name, **usage}) + "\n")


def picture_files(names) -> callable:
    wanted = [n for n in (BASE_VARIANT, "zero4") if n in names]
    return lambda task: tuple(f"experts_{n}.json" for n in wanted) if task == "text" else ()


def main(argv=None) -> list[dict]:
    args, argv = parse(__doc__.splitlines()[0], argv)
    tasks = C.selected_tasks(args, TASKS[args.preset])
    seeds = args.seeds or (1 if args.preset in ("cpu", "smoke") else C.sizes(args.preset).seeds)  # cpu: time budget
    vs = variants(args.preset)
    records = run_ablation(NAME, args, argv, vs, tasks, seeds, means=MEANS,
                           picture=picture, picture_files=picture_files([v.name for v in vs]))
    for task in tasks:
        agg = C.aggregate([r for r in records if r["task"] == task], ("variant",), ("quality", "rel_loss", "trf"))
        for a in agg:
            C.log(f"{task} {a['variant']}: quality {a['quality_mean']:.4f}  rel loss {a['rel_loss_mean']:+.2%}  "
                  f"token reduction {a['trf_mean']:.3f}")
    return records


if __name__ == "__main__":
    main()
