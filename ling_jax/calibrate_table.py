"""The loss table of a calibration (:mod:`ling_jax.calibrate`): requests, the grid of settings,
and one batched pass per setting over all requests.

**Requests.** Text: prompts of ``P`` bytes from the validation split and their true next ``C``
bytes (:func:`ling_jax.request_eval.text_requests`); the continuation is scored. Tasks: one
validation example per request, its answer positions scored.

**Two ways to run a request**, chosen by the model (:func:`evaluation_of`):

* ``"request"`` (a model with token pruning and no adaptive depth, on text): the prompt is
  prefilled with the learned pruner at a KV budget, compaction starting in the deciding layer,
  and the continuation teacher-forced through the pruned cache
  (:func:`ling_jax.request_eval.run_request`). Grid axis: ``budget`` (KV slots per pruned layer;
  ``None``: pruning off, the reference). A budget changes shapes: one compiled program per budget.
* ``"forward"`` (adaptive depth, or a task): one teacher-forced forward pass over the whole
  request with ``depth.mode="infer"`` and hard pruning by threshold; causal decisions make it
  what token-by-token decoding computes (:mod:`ling_jax.generate_exit`), and the scored positions
  are the continuation's. Grid axes: ``prune_threshold``, ``mod_threshold`` or
  ``mod_predictor_threshold``, ``exit_threshold``, all call-time thresholds of a traced
  :class:`~ling_jax.policy.InferencePolicy`: **one compiled program for the whole grid**. Masked
  pruning here saves ideal FLOPs only (a masked key is still computed); MoD routing and early
  exit save computed FLOPs (bucketed per batch; by default a batch is one request).

The reference is the first value of every axis: nothing pruned, no early exit (a MoD model keeps
its configured threshold: it has no unrouted form). Work is the ledger's ``computed`` FLOPs of each
batch, shared equally among its requests; the dense figure is the dense model's on the same
requests (``"request"``: the same request with pruning off; ``"forward"``: the dense program over
the same tokens, :func:`ling_jax.ledger.dense_forward_flops`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ling_jax.calibrate import request_losses
from ling_jax.config import Config, ConfigError, ModelConfig
from ling_jax.ledger import dense_forward_flops, ledger_from_intermediates
from ling_jax.model import Transformer, forward_with_stats
from ling_jax.policy import as_traced, inference_policy, static_config

LN2 = math.log(2.0)
# Requests per batch. Forward: one, so that each request's early-exit and MoD buckets are its own
# (a bucket is chosen by the batch's fullest row), as when a server decodes the request alone.
BATCH_SIZE = {"request": 128, "forward": 1}
AXES = ("budget", "prune_threshold", "mod_threshold", "mod_predictor_threshold", "exit_threshold")
EXIT_THRESHOLDS = {
    "margin": (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5),
    "classifier": (1.0, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8, 0.7),
    "saturation": (1.0, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9),
}


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True, eq=False)
class Requests:
    """``n`` requests as teacher-forced sequences, all [N, T]: ``inputs``, ``targets`` (the next
    token of each input) and ``scored`` (1 where the prediction counts). ``prompt_len``: text
    requests whose first ``prompt_len`` inputs are the prompt (None: a task example)."""

    inputs: np.ndarray
    targets: np.ndarray
    scored: np.ndarray
    metric: str  # "bpb" or "accuracy"
    prompt_len: Optional[int] = None

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def prompts(self) -> np.ndarray:  # [N, P]
        return self.inputs[:, :self.prompt_len]

    @property
    def continuations(self) -> np.ndarray:  # [N, C]: targets of the last C inputs
        return self.targets[:, self.prompt_len - 1:]

    def rows(self, index: np.ndarray) -> Requests:
        return dataclasses.replace(self, inputs=self.inputs[index], targets=self.targets[index], scored=self.scored[index])


def text_requests(data: np.ndarray, count: int, prompt: int, continuation: int) -> Requests:
    """``count`` requests of ``prompt`` + ``continuation`` bytes at evenly spaced offsets of ``data``."""
    from ling_jax.request_eval import text_requests as spaced

    prompts, conts = spaced(data, count, prompt, continuation)
    seq = np.concatenate([prompts, conts], axis=1)  # [N, P + C]
    scored = np.zeros((count, prompt + continuation - 1), np.float32)
    scored[:, prompt - 1:] = 1.0  # predictions of the continuation tokens
    return Requests(seq[:, :-1], seq[:, 1:], scored, "bpb", prompt)


def config_requests(config: Config, count: int, request: Optional[tuple[int, int]] = None) -> Requests:
    """The requests of a workdir's data: text from its validation split (``request`` = (P, C),
    default (seq_len - 32, 32)), or ``count`` validation examples of its synthetic task."""
    if config.data.task == "text":
        if config.data.tokenizer:
            raise ConfigError("calibrate reads byte-level text requests (data.task=text without a tokenizer)")
        from ling_jax.data.corpus import load_corpus

        t = config.train.seq_len
        prompt, continuation = request or (t - min(32, t // 4), min(32, t // 4))
        if prompt < 1 or continuation < 1 or prompt + continuation > config.model.max_seq_len:
            raise ConfigError(f"--request {prompt}:{continuation}: need PROMPT, CONTINUATION >= 1 and PROMPT + "
                              f"CONTINUATION <= model.max_seq_len ({config.model.max_seq_len})")
        data = load_corpus(config.data.path or None, "validation", config.data.validation_fraction)
        return text_requests(data, count, prompt, continuation)
    if request is not None:
        raise ConfigError("--request P:C is for text; a task's requests are its validation examples")
    from ling_jax.pipeline import build_data

    b = config.train.batch_size
    more = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_batches=-(-count // b)))
    batches = build_data(more).eval_batches()
    stack = lambda name: np.concatenate([getattr(x, name) for x in batches])[:count]  # noqa: E731
    return Requests(stack("inputs"), stack("targets"), stack("loss_mask"), "accuracy")


# ----------------------------------------------------------------------------- the grid


def evaluation_of(model: ModelConfig, requests: Requests) -> str:
    """``"request"`` or ``"forward"`` (module docstring); a model with nothing to calibrate is refused."""
    depth = model.depth.mod_enabled or model.depth.exit_enabled
    if not (depth or model.pruning.enabled):
        raise ConfigError("calibrate: this model skips no work at inference (model.pruning.enabled, "
                          "model.depth.mod_enabled and model.depth.exit_enabled are all false): nothing to calibrate")
    return "request" if model.pruning.enabled and not depth and requests.prompt_len is not None else "forward"


def default_grid(model: ModelConfig, evaluation: str, prompt_len: Optional[int] = None) -> dict[str, tuple]:
    """Each axis the model has, its reference value first (module docstring)."""
    if evaluation == "request":
        p = model.pruning
        floor = p.num_sinks + p.window + 1
        budgets = {max(floor, round(prompt_len * f)) for f in (3 / 4, 1 / 2, 3 / 8, 1 / 4, 1 / 8)}
        return {"budget": (None, *sorted((b for b in budgets if b < prompt_len), reverse=True))}
    grid: dict[str, tuple] = {}
    if model.pruning.enabled and model.pruning.baseline in ("learned", "oracle"):
        grid["prune_threshold"] = (0.0, 0.3, 0.5, 0.7, 0.9)
    d = model.depth
    if d.mod_enabled and d.mod_inference != "topk":
        name = "mod_threshold" if d.mod_inference == "threshold" else "mod_predictor_threshold"
        base = getattr(d, name)
        grid[name] = (base, *(v for v in (0.6, 0.7, 0.8, 0.9) if v > base))
    if d.exit_enabled:
        grid["exit_threshold"] = EXIT_THRESHOLDS[d.exit_confidence]
    return grid


def parse_grid(specs: Sequence[str], model: ModelConfig, evaluation: str, prompt_len: Optional[int]) -> dict[str, tuple]:
    """The default grid with axes replaced by ``NAME=V1,V2,...`` specs (reference value first)."""
    grid = default_grid(model, evaluation, prompt_len)
    for spec in specs:
        name, eq, values = spec.partition("=")
        if not eq or name not in grid:
            raise ConfigError(f"--grid takes NAME=V1,V2,... with NAME one of {sorted(grid)} for this model, got {spec!r}")
        try:
            parsed = tuple(None if v in ("none", "None") else (int(v) if name == "budget" else float(v))
                           for v in values.split(","))
        except ValueError:
            raise ConfigError(f"--grid {spec}: values must be {'integers' if name == 'budget' else 'numbers'}") from None
        grid[name] = parsed
    return grid


def settings_of(grid: dict[str, tuple]) -> list[dict]:
    """Every combination of the grid's values; the first is the reference."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def policy_config(model: ModelConfig, setting: dict, evaluation: str) -> ModelConfig:
    """The inference config of one setting (validated by the config dataclasses)."""
    from ling_jax.request_eval import pruning_method

    unknown = sorted(set(setting) - set(AXES))
    if unknown:
        raise ConfigError(f"policy setting names unknown axes {unknown}; known: {list(AXES)}")
    if evaluation == "request":
        budget, p = setting.get("budget"), model.pruning
        if budget is None:
            return pruning_method(model, "dense", p.budget)
        return pruning_method(model, "learned", int(budget), num_sinks=p.num_sinks, window=p.window)
    if evaluation != "forward":
        raise ConfigError(f"policy evaluation must be 'request' or 'forward', got {evaluation!r}")
    pruning, depth = model.pruning, model.depth
    if pruning.enabled:
        pruning = dataclasses.replace(pruning, mode="hard", inference_rule="threshold", compaction=False,
                                      compaction_start="next_layer",
                                      threshold=float(setting.get("prune_threshold", pruning.threshold)))
    if depth.mod_enabled or depth.exit_enabled:
        depth = dataclasses.replace(depth, mode="infer", **{k: float(v) for k, v in setting.items()
                                                            if k in ("mod_threshold", "mod_predictor_threshold",
                                                                     "exit_threshold")})
    return dataclasses.replace(model, pruning=pruning, depth=depth, remat="none")


# ----------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=16)
def _forward_fn(cfg: ModelConfig):
    """Jitted ``(variables, inputs, targets, scored, policy) -> (bits [B], correct [B, T], intermediates)``."""
    model = Transformer(cfg)

    def f(variables, inputs, targets, scored, policy):
        logits, inter = forward_with_stats(model, variables, inputs, policy=policy)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]
        correct = (jnp.argmax(logits, -1) == targets) & (scored > 0)
        return jnp.sum(nll * scored, axis=1) / LN2, correct, inter

    return jax.jit(f)


def _run_request(cfg: ModelConfig, variables: dict, prompts, continuations):
    from ling_jax.request_eval import run_request

    return run_request(cfg, variables, prompts, continuations)


def _batch_stats(cfg: ModelConfig, variables: dict, req: Requests, evaluation: str) -> dict:
    """bits [B], correct [B, T] and the batch's computed / ideal / dense FLOPs."""
    b, t = req.inputs.shape
    if evaluation == "request":
        out = _run_request(cfg, variables, req.prompts, req.continuations)
        cont = req.continuations
        nll = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), cont)  # [B, C]
        bits = np.asarray(jnp.sum(nll, axis=1)) / LN2
        correct = np.asarray(jnp.argmax(out.logits, -1) == cont)
        return {"bits": bits, "correct": correct, "computed": out.computed_flops, "ideal": out.ideal_flops}
    policy = as_traced(inference_policy(cfg))
    bits, correct, inter = _forward_fn(static_config(cfg))(variables, req.inputs, req.targets, req.scored, policy)
    ledger = ledger_from_intermediates(cfg, jax.device_get(inter))
    return {"bits": np.asarray(bits), "correct": np.asarray(correct), "computed": ledger.computed,
            "ideal": ledger.ideal, "dense": dense_forward_flops(cfg, b, t)}


@dataclasses.dataclass
class LossTable:
    """Per setting (row, the reference first) and request (column); rows not evaluated yet are NaN."""

    settings: list[dict]
    evaluation: str
    metric: str
    batch_size: int
    losses: np.ndarray  # [K, N] in [0, 1] against the reference (ling_jax.calibrate.request_losses)
    bits: np.ndarray  # [K, N] bits of the scored tokens
    correct: np.ndarray  # [K, N] scored tokens predicted right
    tokens: np.ndarray  # [N] scored tokens per request
    computed: np.ndarray  # [K, N] ledger computed FLOPs (the batch's, shared equally among its requests)
    ideal: np.ndarray  # [K, N] ledger ideal FLOPs (likewise)
    dense: np.ndarray  # [N] the dense model's computed FLOPs (likewise)
    seconds: np.ndarray  # [K] wall time of each setting's pass (the first of a program includes compiling it)
    reference_correct: Optional[np.ndarray] = None  # [N, S] the reference's right predictions per scored token

    @property
    def evaluated(self) -> np.ndarray:  # [K] bool
        return ~np.isnan(self.losses[:, 0])

    def reduction(self, k: int, index: Optional[np.ndarray] = None) -> float:
        """Computed token reduction factor of setting ``k`` over the requests ``index`` (all):
        dense FLOPs / FLOPs of the setting."""
        sel = slice(None) if index is None else index
        return float(self.dense[sel].sum() / self.computed[k, sel].sum())

    def quality(self, k: int, index: Optional[np.ndarray] = None) -> float:
        """Bits per scored token (bpb for byte text) or accuracy of setting ``k``."""
        sel = slice(None) if index is None else index
        return float((self.bits if self.metric == "bpb" else self.correct)[k, sel].sum() / self.tokens[sel].sum())


def empty_table(requests: Requests, settings: Sequence[dict], *, evaluation: str,
                batch_size: Optional[int] = None) -> LossTable:
    """A table with no row evaluated yet (see :func:`fill`)."""
    n, k = len(requests), len(settings)
    if n == 0 or k == 0:
        raise ValueError(f"a loss table needs at least one request and one setting, got {n} and {k}")
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    tokens = requests.scored.sum(axis=1) if evaluation == "forward" else np.full(n, requests.continuations.shape[1])
    return LossTable(settings=list(settings), evaluation=evaluation, metric=requests.metric,
                     batch_size=batch_size or BATCH_SIZE[evaluation], losses=nan(k, n), bits=nan(k, n),
                     correct=nan(k, n), tokens=np.asarray(tokens, np.float64), computed=nan(k, n), ideal=nan(k, n),
                     dense=nan(n), seconds=nan(k))


def fill(table: LossTable, rows: Sequence[int], model: ModelConfig, variables: dict, requests: Requests, *,
         progress: bool = False) -> LossTable:
    """Evaluates the settings ``rows`` of ``table`` (the reference first, if it is not yet): one
    pass of each over every request, in batches of ``table.batch_size`` (the last padded by
    repeating its final request; padded rows are dropped, their work counts in the shares), and
    prices the losses against the reference. Returns ``table``, filled in place."""
    n, b = len(requests), table.batch_size
    todo = [k for k in dict.fromkeys([0, *rows]) if not table.evaluated[k]]
    for k in tqdm(todo, desc="calibration settings", disable=not progress, leave=False):
        cfg = policy_config(model, table.settings[k], table.evaluation)
        start = time.perf_counter()
        width = requests.scored.shape[1] if table.evaluation == "forward" else requests.continuations.shape[1]
        right = np.zeros((n, width), bool)
        for lo in range(0, n, b):
            real = min(b, n - lo)
            out = _batch_stats(cfg, variables, requests.rows(np.minimum(np.arange(lo, lo + b), n - 1)), table.evaluation)
            part = slice(lo, lo + real)
            table.bits[k, part], right[part] = out["bits"][:real], out["correct"][:real]
            table.computed[k, part], table.ideal[k, part] = out["computed"] / b, out["ideal"] / b
            if k == 0:
                table.dense[part] = out.get("dense", out["computed"]) / b
        table.seconds[k] = time.perf_counter() - start
        table.correct[k] = right.sum(axis=1)
        if k == 0:
            table.reference_correct = right
        table.losses[k] = request_losses(requests.metric, {"bits": table.bits[0], "correct": table.reference_correct},
                                         {"bits": table.bits[k], "correct": right})
    return table


def loss_table(model: ModelConfig, variables: dict, requests: Requests, settings: Sequence[dict], *,
               evaluation: str, batch_size: Optional[int] = None, progress: bool = True) -> LossTable:
    """Every setting (``settings[0]``: the reference) on every request (:func:`fill`); ``batch_size``
    default: :data:`BATCH_SIZE` of the evaluation."""
    table = empty_table(requests, settings, evaluation=evaluation, batch_size=batch_size)
    return fill(table, range(len(settings)), model, variables, requests, progress=progress)
