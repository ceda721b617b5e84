"""What the compiled program costs: XLA's cost analysis of a forward pass, beside the ledger.

The ledger (:mod:`ling_jax.ledger`) counts what the layers say they computed; these helpers compile
the same forward and read XLA's own FLOP count of that program, so the two can be compared
(``tests/test_realized.py``, ``experiments/bench_realized.py``).

XLA's static analysis cannot see which branch of a conditional runs (``nn.switch`` over
``depth.infer_buckets``): it prices the largest branch. :func:`compile_cost` tells whether a
compiled program has one (and whether it has a while loop, whose body XLA prices once), so a
caller knows when XLA's figure is not the cost of the run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
from jaxtyping import Array, Float, Int

from ling_jax.config import ModelConfig
from ling_jax.model import Transformer
from ling_jax.policy import InferencePolicy, as_traced, inference_policy


class CompiledCost(NamedTuple):
    """A compiled program (callable with the arguments it was lowered for) and XLA's view of it."""

    executable: Callable
    xla_flops: float
    has_conditional: bool  # branches chosen at run time: XLA prices the largest one
    has_loop: bool  # a while loop: XLA prices its body once, whatever the trip count


def compile_cost(fn: Callable, *args: Any) -> CompiledCost:
    """Compiles the jitted ``fn`` for ``args`` and reads XLA's cost analysis of that program."""
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    return CompiledCost(compiled, float(cost["flops"]), " conditional(" in text, " while(" in text)


def xla_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of ``fn(*args)`` by XLA's cost analysis of the compiled program (``fn`` is jitted)."""
    return compile_cost(fn, *args).xla_flops


@functools.lru_cache(maxsize=32)
def forward_program(cfg: ModelConfig) -> Callable:
    """``jit(params, tokens, policy) -> (logits, {"intermediates", "depth"})`` of ``Transformer(cfg)``.

    The policy is an argument, so every threshold runs through one compiled program.
    """
    model = Transformer(cfg)
    return jax.jit(lambda p, t, pol: model.apply({"params": p}, t, policy=pol, mutable=["intermediates", "depth"]))


class ForwardCost(NamedTuple):
    """One compiled forward: its outputs, what the layers recorded, and XLA's FLOPs."""

    logits: Float[Array, "B T V"]
    intermediates: dict
    depth: dict  # depth decisions (``exit_layer``, ``layers_used``), empty without adaptive depth
    xla_flops: float


def forward_cost(cfg: ModelConfig, params, tokens: Int[Array, "B T"], policy: Optional[InferencePolicy] = None,
                 **thresholds) -> ForwardCost:
    """Compiles ``Transformer(cfg)``'s forward (thresholds traced), runs it and reads XLA's FLOPs.

    ``thresholds`` (``prune_threshold=``, ``exit_threshold=``, ...) override the config's, as in
    :func:`ling_jax.policy.inference_policy`; or pass a whole ``policy``.
    """
    pol = as_traced(policy if policy is not None else inference_policy(cfg, **thresholds))
    compiled = compile_cost(forward_program(cfg), params, tokens, pol)
    logits, state = compiled.executable(params, tokens, pol)  # the program XLA priced (compiled once)
    return ForwardCost(logits, state["intermediates"], state.get("depth", {}), compiled.xla_flops)
