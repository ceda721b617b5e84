"""KV-cache decoding: pruned-cache decoding equals the teacher-forced forward pass with the same
pruning decisions, memory is O(budget), batched prompts of different lengths, sampling rules;
greedy generation equals a loop of forward passes on every Hugging Face fixture and on a model
with a routing bias."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax import cli
from ling_jax import generate as gen
from ling_jax.config import ConfigError, PruningConfig, get_preset
from ling_jax.layers import kv_cache
from ling_jax.model import Transformer, init_params
from ling_jax.testing import assert_close, greedy_by_forward
from ling_jax.token_state import TokenState

pytestmark = pytest.mark.fast_xla  # tiny programs compared with each other: see tests/conftest.py

BASE = get_preset("cpu-tiny").model
PROMPT_LENGTHS = (5, 23, 14)
NEW = 10
PRUNED = PruningConfig(enabled=True, layers="all", mode="hard", inference_rule="budget", budget=12,
                       num_sinks=2, window=3, scorer="lowrank")


def with_pruning(**kw):
    return dataclasses.replace(BASE, pruning=dataclasses.replace(PRUNED, **kw))


@pytest.fixture(scope="module")
def variables():
    model = Transformer(with_pruning())
    p = jax.jit(lambda k: nn.meta.unbox(init_params(model, k)))(jax.random.key(0))
    # Spread the scorers (bias 0) so that keep and eviction decisions differ from token to token.
    def spread(path, x):
        names = [getattr(k, "key", "") for k in path]
        return x if "scorer" not in names else jnp.zeros_like(x) if names[-1] == "b" else x * 30.0
    return {"params": jax.tree_util.tree_map_with_path(spread, p)}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return gen.left_pad([list(rng.integers(0, 256, n)) for n in PROMPT_LENGTHS])


def forward_on(cfg, variables, tokens, valid, oracle=None):
    """Teacher-forced parallel forward pass (left-padded rows, per-row positions)."""
    state = None if oracle is None else TokenState(oracle=oracle)
    run = jax.jit(lambda vs, t, v: Transformer(cfg).apply(vs, t, gen.positions_of(v), v, state=state))
    return run(variables, tokens, valid)


def check_decode_matches_forward(cfg, variables, prompts, **kw):
    tokens, valid = prompts
    out = gen.generate(cfg, variables, tokens, valid, max_new_tokens=NEW, **kw)
    full = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
    full_valid = np.concatenate([valid, np.ones(out.tokens.shape, bool)], axis=1)
    logits = forward_on(cfg, variables, full, full_valid)[:, tokens.shape[1] - 1 : -1]  # [B, NEW, V]
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), np.asarray(out.tokens))
    assert_close(out.logits, logits, dtype=jnp.bfloat16)  # float32 sums in another order
    return out


def test_pruned_cache_decoding_equals_teacher_forced_forward(variables, prompts):
    """Budget rule, low-rank scorer, cascade: the eviction decisions of the cache are the expiry
    rule of the parallel forward pass, so generated tokens and logits agree."""
    out = check_decode_matches_forward(with_pruning(), variables, prompts)
    for i in range(BASE.num_layers):  # memory O(budget): every layer holds 12 slots
        assert out.cache[f"block_{i}"]["attn"]["k"].shape[1] == PRUNED.budget
    assert int(jnp.sum(out.cache["block_0"]["attn"]["pos"] >= 0)) == 3 * PRUNED.budget  # full, nothing more


def test_threshold_rule_decoding_equals_forward(variables, prompts):
    cfg = with_pruning(inference_rule="threshold", budget=64, scorer="linear")
    out = check_decode_matches_forward(cfg, variables, prompts)
    keep = np.asarray(out.cache["block_1"]["attn"]["keep"])[np.asarray(out.cache["block_1"]["attn"]["pos"]) >= 0]
    assert 0.2 < keep.mean() < 0.8  # the threshold really prunes


def test_teacher_forced_decode_equals_forward_for_token_policies(variables, prompts):
    """Every position, decoded through the evicting cache, against the parallel budget mask (the
    oracle policy: a per-token input that must follow each token into the cache)."""
    tokens, valid = prompts
    oracle = jnp.asarray(np.random.default_rng(1).random(tokens.shape) < 0.3)
    cfg = with_pruning(baseline="oracle")
    ref = forward_on(cfg, variables, tokens, valid, oracle)
    got = gen.teacher_forced_decode(cfg, variables, tokens, valid, oracle=oracle)
    assert_close(jnp.where(valid[..., None], got, 0), jnp.where(valid[..., None], ref, 0), dtype=jnp.bfloat16)


def test_unpruned_decoding_equals_forward_and_budget_cache_is_smaller(variables, prompts):
    out = check_decode_matches_forward(BASE, variables, prompts)
    t = prompts[0].shape[1]
    assert out.cache["block_0"]["attn"]["k"].shape[1] == t + NEW  # a full cache holds the context
    pruned = gen.generate(with_pruning(), variables, *prompts, max_new_tokens=NEW)
    assert out.cache_bytes / pruned.cache_bytes == pytest.approx((t + NEW) / PRUNED.budget, rel=0.05)


def test_attention_policies_decode_and_equal_dense_when_nothing_is_evicted(variables, prompts):
    tokens, valid = prompts
    dense = forward_on(BASE, variables, tokens, valid)
    roomy = gen.teacher_forced_decode(with_pruning(baseline="tova", budget=64), variables, tokens, valid)
    assert_close(jnp.where(valid[..., None], roomy, 0), jnp.where(valid[..., None], dense, 0), dtype=jnp.bfloat16)
    out = gen.generate(with_pruning(baseline="h2o"), variables, tokens, valid, max_new_tokens=NEW)
    assert np.isfinite(np.asarray(out.logits)).all() and out.tokens.shape == (3, NEW)
    scores = np.asarray(out.cache["block_1"]["attn"]["score"])
    assert (scores > 0).all()  # every held key accumulated attention


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draw = jax.jit(gen.sample, static_argnums=2)
    greedy = draw(logits, jax.random.key(0), gen.Sampling())
    assert (np.asarray(greedy) == 0).all()
    free = np.bincount(np.asarray(draw(logits, jax.random.key(1), gen.Sampling(1.0))), minlength=4) / 4000
    np.testing.assert_allclose(free, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = np.bincount(np.asarray(draw(logits, jax.random.key(2), gen.Sampling(1.0, top_p=0.7))), minlength=4) / 4000
    assert nucleus[2] == nucleus[3] == 0  # 0.5 + 0.3 reaches 0.7: the tail is cut
    np.testing.assert_allclose(nucleus[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    cold = np.bincount(np.asarray(draw(logits, jax.random.key(3), gen.Sampling(0.25))), minlength=4) / 4000
    assert cold[0] > 0.85  # low temperature sharpens
    tiny = draw(logits, jax.random.key(4), gen.Sampling(1.0, top_p=1e-6))
    assert (np.asarray(tiny) == 0).all()  # the top token always stays


def test_sampled_generation_and_eos(variables, prompts):
    cfg = with_pruning()
    a = gen.generate(cfg, variables, *prompts, max_new_tokens=NEW, sampling=gen.Sampling(0.9, 0.95), rng=jax.random.key(5), eos_id=7)
    b = gen.generate(cfg, variables, *prompts, max_new_tokens=NEW, sampling=gen.Sampling(0.9, 0.95), rng=jax.random.key(5), eos_id=7)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # reproducible by key
    for row in np.asarray(a.tokens):
        hits = np.flatnonzero(row == 7)
        if hits.size:
            assert (row[hits[0]:] == 7).all()


def test_bad_settings_fail_clearly(variables, prompts):
    with pytest.raises(ConfigError, match=r"decoding needs model.pruning.mode='hard'"):
        gen.generate(with_pruning(mode="soft", inference_rule="threshold"), variables, *prompts, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"Sampling.top_p must be in \(0, 1\]"):
        gen.Sampling(1.0, top_p=0.0)
    with pytest.raises(ConfigError, match=r"Sampling.temperature must be >= 0"):
        gen.Sampling(-1.0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int"):
        gen.generate(BASE, variables, *prompts, max_new_tokens=0)
    with pytest.raises(TypeError, match=r"not its params alone"):
        gen.generate(BASE, variables["params"], *prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"every prompt needs at least one token"):
        gen.left_pad([[1, 2], []])
    model = Transformer(BASE)
    with pytest.raises(ValueError, match=r"decoding needs a KV cache: run a prefill first"):
        model.apply(variables, jnp.zeros((1, 1), jnp.int32), state=TokenState(cache_op=kv_cache.DECODE),
                    mutable=["cache"])


@pytest.mark.parametrize("depth", [dict(mod_enabled=True), dict(exit_enabled=True)], ids=["mod", "exit"])
def test_adaptive_depth_is_refused_with_a_pointer_to_generate_exit(variables, prompts, depth):
    cfg = dataclasses.replace(BASE, depth=dataclasses.replace(BASE.depth, **depth))
    what = "mod_enabled=True" if "mod_enabled" in depth else "exit_enabled=True"
    match = rf"fixed-depth models only.*model.depth.{what}.*ling_jax.generate_exit"
    with pytest.raises(ConfigError, match=match):
        gen.generate(cfg, variables, *prompts, max_new_tokens=2)
    with pytest.raises(ConfigError, match=match):
        gen.teacher_forced_decode(cfg, variables, *prompts)


def test_left_pad_and_positions():
    tokens, valid = gen.left_pad([[5, 6, 7], [9]])
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 9]])
    np.testing.assert_array_equal(valid, [[True] * 3, [False, False, True]])
    np.testing.assert_array_equal(np.asarray(gen.positions_of(jnp.asarray(valid))), [[0, 1, 2], [0, 0, 0]])


FIXTURES = pathlib.Path(__file__).parent / "interop" / "fixtures"
HF_FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())


def routing_bias_model():
    """The Mixtral fixture as after a fine-tune with aux-loss-free balancing (``ling-jax train
    --model.moe.bias_update_rate 0.01`` on its converted workdir): routing biases moved away from
    zero. (config, variables)."""
    from ling_jax.interop.hf import load_hf

    cfg, variables, _ = load_hf(FIXTURES / "mixtral")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_update_rate=0.01))
    choices = cfg.moe.num_experts + cfg.moe.num_zero_experts
    rng = np.random.default_rng(1)
    bias = {f"block_{i}": {"moe": {"bias": rng.normal(0, 0.1, choices).astype(np.float32)}} for i in cfg.moe_layers}
    return cfg, {**variables, "moe_bias": bias}


def generate_by_cli(hf_dir: pathlib.Path, workdir: pathlib.Path, prompt: str, steps: int, capsys) -> np.ndarray:
    """``ling-jax convert`` of ``hf_dir``, then ``ling-jax generate``: the new tokens (byte-level
    text: ASCII for a vocabulary of at most 128)."""
    assert cli.main(["convert", "--hf", str(hf_dir), "--workdir", str(workdir)]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", str(workdir), "--prompt", prompt, "--max-new-tokens", str(steps)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return np.frombuffer(out[len(prompt):-1].encode("ascii"), np.uint8)[None]


@pytest.mark.parametrize("model", [*HF_FAMILIES, "routing-bias"])
def test_greedy_generation_equals_a_loop_of_forward_passes(model, tmp_path, capsys):
    """Every committed Hugging Face fixture and a model trained with bias_update_rate > 0:
    generation applies every variable collection (the routing bias included). DeepSeek-V3 (a
    routing correction bias) goes through the CLI: ling-jax convert, then ling-jax generate."""
    pytest.importorskip("safetensors")
    from ling_jax.interop.hf import load_hf

    if model == "routing-bias":
        cfg, variables = routing_bias_model()
    else:
        cfg, variables, _ = load_hf(FIXTURES / model)
    prompt = np.load(FIXTURES / model.replace("routing-bias", "mixtral") / "input_ids.npy")[:1, :6]
    if model == "deepseek_v3":
        prompt = np.frombuffer(b"hello!", np.uint8).astype(np.int32)[None]
        tokens = generate_by_cli(FIXTURES / model, tmp_path / "w", "hello!", 3, capsys)
    else:
        out = gen.generate(cfg, variables, prompt, max_new_tokens=3)
        tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, greedy_by_forward(cfg, variables, prompt, 3))
    if model == "routing-bias":  # the bias decides the routing (the same program runs, nothing compiles)
        unbiased = {**variables, "moe_bias": jax.tree_util.tree_map(np.zeros_like, variables["moe_bias"])}
        assert not np.allclose(out.logits, gen.generate(cfg, unbiased, prompt, max_new_tokens=3).logits)
