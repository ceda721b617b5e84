"""Command line: ``ling-jax train | eval | sweep | info``.

Overrides use the config's dotted field names: ``--model.d_model 512`` or ``--train.steps=100``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from ling_jax.config import Config, ConfigError, apply_overrides, get_preset


def _parse_overrides(extra: Sequence[str]) -> dict[str, str]:
    """Turns ``--a.b 1 --c.d=2`` into {"a.b": "1", "c.d": "2"}; anything else is an error."""
    out, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}; overrides look like --model.d_model 512")
        key = item[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"override --{key} needs a value")
            value, i = extra[i + 1], i + 2
        if "." not in key:
            raise ConfigError(f"unknown option --{key}; overrides look like --section.field VALUE "
                              f"(sections: model, train, data, mesh)")
        out[key] = value
    return out


def _workdir_config(workdir) -> Config:
    """The config a workdir was created with (``ling-jax convert`` or an earlier train), for
    ``ling-jax train --workdir W`` without ``--preset``."""
    from ling_jax.config import from_dict

    path = Path(workdir or ".") / "config.json"
    if not workdir or not path.exists():
        raise ConfigError("--preset is required unless --workdir already holds a config.json "
                          "(e.g. one written by ling-jax convert)")
    return from_dict(json.loads(path.read_text())["config"])


def build_config(args: argparse.Namespace, extra: Sequence[str]) -> Config:
    config = get_preset(args.preset) if args.preset else _workdir_config(getattr(args, "workdir", None))
    overrides = _parse_overrides(extra)
    if getattr(args, "steps", None) is not None:
        overrides["train.steps"] = str(args.steps)
    if getattr(args, "checkpoint_every", None) is not None:
        overrides["train.checkpoint_every"] = str(args.checkpoint_every)
    if getattr(args, "data", None):
        overrides["data.task"], overrides["data.path"] = "text", args.data
    if getattr(args, "task", None):
        overrides["data.task"] = args.task
    if getattr(args, "mesh", None):
        for part in args.mesh.split(","):
            if "=" not in part:
                raise ConfigError(f"--mesh takes axis=size pairs like data=2,fsdp=4; got {part!r}")
            axis, size = part.split("=", 1)
            overrides[f"mesh.{axis.strip()}"] = size.strip()
    return apply_overrides(config, overrides)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data", help="text file or directory (default: the Python standard library sources)")
    g.add_argument("--task", choices=["mqar", "needle", "multihop"], help="a synthetic task instead of text")


def cmd_train(args, extra) -> int:
    from ling_jax.train import train

    config = build_config(args, extra)
    result = train(config, args.workdir, progress=not args.no_progress)
    print(json.dumps(result))
    if config.data.task == "text" and not args.skip_baselines:
        from ling_jax.data import load_corpus
        from ling_jax.data.baselines import ngram_bpb, zlib_bpb

        valid = load_corpus(config.data.path or None, "validation", config.data.validation_fraction)
        train_bytes = load_corpus(config.data.path or None, "train", config.data.validation_fraction)
        table = {"model": result["bpb"], "zlib-9": zlib_bpb(valid, level=9), "order-2 n-gram": ngram_bpb(train_bytes, valid, order=2)}
        print(f"validation bits per byte ({len(valid):,} bytes):")
        for name, value in table.items():
            print(f"  {name:<16} {value:.3f}")
    if config.model.pruning.enabled and not args.skip_sweep:
        _sweep(args.workdir, progress=not args.no_progress)
    return 0


def _sweep(workdir, *, progress: bool, thresholds=None, budgets=None, baselines=("window",)) -> list[dict]:
    """Pruning sweep of a trained workdir's latest checkpoint; prints a table, writes pruning_sweep.json."""
    from ling_jax.pipeline import build_data
    from ling_jax.sweep import DEFAULT_THRESHOLDS, best_within, format_table, pruning_sweep
    from ling_jax.train import load_trained

    config, _, state = load_trained(workdir)
    data = build_data(config)
    batches = [b.as_dict() for b in data.eval_batches()]
    variables = {"params": state.params, **state.extra}
    rows = pruning_sweep(config.model, variables, batches, data.metric, progress=progress,
                         thresholds=DEFAULT_THRESHOLDS if thresholds is None else thresholds,
                         budgets=budgets, baselines=baselines)
    tokens = sum(int(b["inputs"].size) for b in batches)
    print(f"pruning sweep at step {int(state.step)} ({len(batches)} validation batches, {tokens:,} tokens; "
          f"rel. loss vs the same weights with nothing pruned):")
    print(format_table(rows, data.metric))
    best = best_within(rows)
    if best is None:
        print("no pruned setting stays within 2% of keep-all")
    else:
        print(f"largest token reduction within 2%: {best['token_reduction']:.2f}x ({best['rule']} {best['value']:g})")
    out = Path(workdir) / "pruning_sweep.json"
    out.write_text(json.dumps({"step": int(state.step), "metric": data.metric, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return rows


def cmd_sweep(args, extra) -> int:
    if extra:
        raise ConfigError(f"ling-jax sweep takes no config overrides, got {list(extra)}")
    _sweep(args.workdir, progress=not args.no_progress, thresholds=args.thresholds, budgets=args.budgets,
           baselines=tuple(args.baselines))
    return 0


def cmd_eval(args, extra) -> int:
    import jax

    from ling_jax.pipeline import build_data
    from ling_jax.train import evaluate, load_trained, make_eval_step

    config, model, state = load_trained(args.workdir)
    overrides = _parse_overrides(extra)
    if args.data:
        overrides["data.task"], overrides["data.path"] = "text", args.data
    if args.task:
        overrides["data.task"] = args.task
    config = apply_overrides(config, overrides)
    data = build_data(config)
    result = evaluate(jax.jit(make_eval_step(model)), state, data.eval_batches(), data.metric, data.bytes_per_token())
    out = {"step": int(state.step), data.metric: result[data.metric], "loss": result["loss"]}
    print(json.dumps(out))
    return 0


def cmd_info(args, extra) -> int:
    import jax
    import jax.numpy as jnp

    from ling_jax.ledger import flops_per_token
    from ling_jax.model import Transformer

    config = build_config(args, extra)
    model = Transformer(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes["params"]))
    t = config.train
    param_bytes = 4 * n_params
    # AdamW: two float32 moments per parameter.
    info = {
        "preset": config.preset,
        "params": n_params,
        "flops_per_token_forward": flops_per_token(config.model, t.seq_len),
        "flops_per_token_train": 3 * flops_per_token(config.model, t.seq_len),
        "param_bytes": param_bytes,
        "optimizer_bytes": 2 * param_bytes,
        "tokens_per_step": t.batch_size * t.seq_len,
    }
    if args.mesh or args.memory:
        from ling_jax.sharding import memory_report

        info.update(memory_report(config))
    print(json.dumps(info, indent=2))
    return 0


def cmd_convert(args, extra) -> int:
    """Hugging Face directory -> workdir (ling_jax/interop/convert.py); overrides shape the later train run."""
    from ling_jax.interop.convert import convert

    config = convert(args.hf, args.workdir, _parse_overrides(extra), tokenizer=args.tokenizer)
    m = config.model
    print(json.dumps({"workdir": str(args.workdir), "preset": config.preset, "vocab_size": m.vocab_size,
                      "d_model": m.d_model, "num_layers": m.num_layers, "moe_layers": list(m.moe_layers),
                      "pruning_layers": list(m.pruning_layers), "tokenizer": config.data.tokenizer or "bytes"}))
    return 0


def cmd_export(args, extra) -> int:
    """Workdir -> Hugging Face directory (config.json + safetensors), e.g. after a retrofit fine-tune."""
    from ling_jax.interop.convert import export

    if extra:
        raise ConfigError(f"ling-jax export takes no config overrides, got {list(extra)}")
    dropped = export(args.workdir, args.hf, model_type=args.model_type)
    if dropped:
        print(f"left out (no place in the Hugging Face layout): {dropped}", file=sys.stderr)
    print(json.dumps({"hf": str(args.hf), "dropped": dropped}))
    return 0


def cmd_generate(args, extra) -> int:
    """Greedy continuation of --prompt from a workdir's latest checkpoint (pruned KV cache with
    --budget, adaptive depth with --exit-threshold); text through the workdir's tokenizer or bytes."""
    import dataclasses

    import numpy as np

    from ling_jax.train import load_trained

    if extra:
        raise ConfigError(f"ling-jax generate takes no config overrides, got {list(extra)}")
    config, _, state = load_trained(args.workdir)
    m = config.model
    if config.data.tokenizer:
        from ling_jax.interop.tokenizer import Tokenizer

        tok = Tokenizer(config.data.tokenizer)
        encode, decode = tok.encode, tok.decode
    else:
        encode = lambda text: np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)  # noqa: E731
        decode = lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    prompt = encode(args.prompt)
    if len(prompt) == 0:
        raise ConfigError("--prompt is empty after tokenization")
    if len(prompt) + args.max_new_tokens > m.max_seq_len:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds "
                          f"the model's max_seq_len ({m.max_seq_len})")
    if args.budget is not None:
        if not m.pruning.enabled:
            raise ConfigError("--budget needs a model with pruning (model.pruning.enabled)")
        m = dataclasses.replace(m, pruning=dataclasses.replace(m.pruning, mode="hard", inference_rule="budget",
                                                               budget=args.budget))
    params = state.params
    info: dict = {"prompt_tokens": int(len(prompt))}
    if args.exit_threshold is not None:
        if not m.depth.exit_enabled:
            raise ConfigError("--exit-threshold needs a model with early exit (model.depth.exit_enabled)")
        from ling_jax.generate_exit import generate as generate_exit

        m = dataclasses.replace(m, depth=dataclasses.replace(m.depth, mode="infer", exit_threshold=args.exit_threshold))
        out = generate_exit(m, params, prompt[None], args.max_new_tokens)
        tokens = np.asarray(out["tokens"])[0]
        info["mean_layers_used"] = float(np.mean(np.asarray(out["layers_used"])))
    else:
        from ling_jax.generate import generate

        out = generate(m, params, prompt[None], max_new_tokens=args.max_new_tokens)
        tokens = np.asarray(out.tokens)[0]
        info["kv_cache_bytes"] = int(out.cache_bytes)
    print(args.prompt + decode(tokens))
    print(json.dumps({**info, "new_tokens": int(len(tokens))}), file=sys.stderr)
    return 0


def _add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face model directory (config.json + *.safetensors) "
                                       "into a workdir for eval / sweep / train")
    p.add_argument("--hf", required=True, help="local Hugging Face model directory")
    p.add_argument("--workdir", required=True, help="new workdir to write (config.json + step-0 checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the one in --hf, if any)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("generate", help="greedy continuation of a prompt from a workdir's latest checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, help="KV-cache slots per pruned layer (model trained with pruning)")
    p.add_argument("--exit-threshold", type=float, help="early-exit threshold (model trained with early exit)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="write a workdir's latest checkpoint as a Hugging Face directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--hf", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--model-type", help="default: the converted model's type, else llama")
    p.set_defaults(fn=cmd_export)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ling-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (resumes from the latest checkpoint in --workdir)")
    p.add_argument("--preset", help="a named preset; optional when --workdir holds a config.json (ling-jax convert)")
    p.add_argument("--workdir", required=True)
    _add_data_args(p)
    p.add_argument("--steps", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--mesh", help="e.g. data=2,fsdp=2,tensor=1,expert=2 (one may be -1)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-baselines", action="store_true", help="do not print zlib / n-gram figures")
    p.add_argument("--skip-sweep", action="store_true", help="with pruning enabled: do not run the pruning sweep")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sweep", help="pruning sweep (thresholds, budgets, baselines) of a workdir trained with pruning")
    p.add_argument("--workdir", required=True)
    p.add_argument("--thresholds", type=float, nargs="+", help="default: 0.1 0.3 0.5 0.7 0.9")
    p.add_argument("--budgets", type=int, nargs="+", help="keys per query (default: 1/8, 1/4, 1/2 of seq_len)")
    p.add_argument("--baselines", nargs="*", default=["window"], help="random window h2o tova oracle (oracle: tasks)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint; prints one JSON line")
    p.add_argument("--workdir", required=True)
    _add_data_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("info", help="parameter count, FLOPs per token, memory estimate")
    p.add_argument("--preset", required=True)
    p.add_argument("--mesh")
    p.add_argument("--memory", action="store_true", help="compile a train step and report per-device memory")
    p.set_defaults(fn=cmd_info)

    _add_convert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ling_jax.data import DataError

    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "distributed", False):
            import jax

            jax.distributed.initialize()
        return args.fn(args, extra)
    except (ConfigError, DataError, FileNotFoundError) as e:  # InteropError is a ConfigError
        print(f"ling-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
