"""ling-jax: train, evaluate, sweep and size token-efficient transformers.

Commands: train, eval, sweep, calibrate, info (ling-jax COMMAND --help for each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from ling_jax.config import PRESETS, Config, ConfigError, apply_overrides, get_preset, parse_overrides

OVERRIDES_HELP = """\
config overrides:
  Any config field can be set by its dotted name, as --section.field VALUE or
  --section.field=VALUE, with sections model, train, data and mesh, for example
    ling-jax train --preset cpu-small --workdir runs/wide --model.d_model 256 --train.learning_rate 1e-3
    ling-jax train --preset cpu-tiny --workdir runs/mqar --task mqar --data.task_options num_pairs=8
  An unknown field or a bad value is an error that names the field and what is allowed.
  Options are never abbreviated: --step 10 is an error, write --steps 10.
"""


def _presets_help() -> str:
    """Each preset's name and the first paragraph of its docstring."""
    lines = ["presets:"]
    for name, make in PRESETS.items():
        about = " ".join((make.__doc__ or "").strip().split("\n\n")[0].replace("``", "").split())
        lines.append(textwrap.fill(about, 92, initial_indent=f"  {name:<18}", subsequent_indent=" " * 20))
    return "\n".join(lines) + "\n"


def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), 92)


def _workdir_config(workdir) -> Config:
    """The config a workdir was created with (``ling-jax convert`` or an earlier train), for
    ``ling-jax train --workdir W`` without ``--preset``."""
    from ling_jax.config import from_dict

    path = Path(workdir or ".") / "config.json"
    if not workdir or not path.exists():
        raise ConfigError("--preset is required unless --workdir already holds a config.json "
                          "(e.g. one written by ling-jax convert)")
    return from_dict(json.loads(path.read_text())["config"])


def build_config(args: argparse.Namespace, extra: Sequence[str], base: Config | None = None) -> Config:
    if base is not None:
        config = base
    elif getattr(args, "preset", None):
        config = get_preset(args.preset)
    else:
        config = _workdir_config(getattr(args, "workdir", None))
    overrides = parse_overrides(extra)
    if getattr(args, "steps", None) is not None:
        _shortcut(overrides, "--steps", "train.steps", str(args.steps))
    if getattr(args, "checkpoint_every", None) is not None:
        _shortcut(overrides, "--checkpoint-every", "train.checkpoint_every", str(args.checkpoint_every))
    _data_shortcuts(args, overrides)
    if getattr(args, "mesh", None):
        for part in args.mesh.split(","):
            if "=" not in part:
                raise ConfigError(f"--mesh takes axis=size pairs like data=2,fsdp=4; got {part!r}")
            axis, size = part.split("=", 1)
            _shortcut(overrides, "--mesh", f"mesh.{axis.strip()}", size.strip())
    return apply_overrides(config, overrides)


def _shortcut(overrides: dict[str, str], flag: str, key: str, value: str) -> None:
    """Sets ``key`` from a shortcut flag (``--steps`` for ``train.steps``): both spellings of one
    field may be given only if they agree."""
    given = overrides.get(key)
    if given is not None and given != value:
        raise ConfigError(f"{flag} sets {key} to {value} but --{key} {given} was also given; give one of them")
    overrides[key] = value


def _data_shortcuts(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """``--data PATH`` (text from PATH) and ``--task NAME`` as data.* overrides."""
    if getattr(args, "data", None):
        _shortcut(overrides, "--data", "data.task", "text")
        _shortcut(overrides, "--data", "data.path", args.data)
    if getattr(args, "task", None):
        _shortcut(overrides, "--task", "data.task", args.task)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data", help="text file or directory (default: the Python standard library sources)")
    g.add_argument("--task", choices=["mqar", "needle", "multihop"], help="a synthetic task instead of text")


def _train_config(args, extra) -> Config:
    """The preset plus overrides for a new workdir; for a workdir that has a config.json, its
    recorded settings plus the overrides given now (the mesh comes from the preset and --mesh)."""
    from ling_jax.workdir import recorded_config

    recorded = recorded_config(args.workdir) if Path(args.workdir).is_dir() else None
    if recorded is None:
        return build_config(args, extra)
    if args.preset and recorded.preset and recorded.preset != args.preset:
        raise ConfigError(f"workdir {args.workdir} was trained with --preset {recorded.preset}, not {args.preset}; "
                          f"resume it with --preset {recorded.preset} or use a new --workdir")
    mesh = get_preset(args.preset).mesh if args.preset else recorded.mesh
    return build_config(args, extra, base=dataclasses.replace(recorded, mesh=mesh))


def cmd_train(args, extra) -> int:
    from ling_jax.rerun import finished_eval

    config = _train_config(args, extra)
    result = None if args.force else finished_eval(config, args.workdir)
    if result is not None:
        print(f"{args.workdir} already finished training ({result['step']} steps); reusing its results "
              "(pass --force to evaluate and sweep again, or use a new --workdir to train from scratch)")
    else:
        from ling_jax.train import train

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
        # the job's own sweep file: reused when it is of the final checkpoint, redone after more training
        _sweep(args.workdir, progress=not args.no_progress, force=args.force, replace_stale=True)
    return 0


def _print_sweep(sweep: dict) -> None:
    rows, metric = sweep["rows"], sweep["metric"]
    size = f" ({sweep['batches']} validation batches, {sweep['tokens']:,} tokens)" if "tokens" in sweep else ""
    print(f"pruning sweep at step {sweep['step']}{size}; rel. loss vs the same weights with nothing pruned:")
    from ling_jax.sweep import best_within, format_table

    print(format_table(rows, metric))
    best = best_within(rows)
    if best is None:
        print("no pruned setting both computes less than dense and stays within 2% of keep-all")
    else:
        print(f"largest computed token reduction within 2%: {best['token_reduction']:.2f}x "
              f"({best['rule']} {best['value']:g})")


def _sweep(workdir, *, progress: bool, thresholds=None, budgets=None, baselines=("window",), force: bool = False,
           replace_stale: bool = False) -> list[dict]:
    """Pruning sweep of a trained workdir's latest checkpoint; prints a table and writes it to a file
    named after the settings. A file of the same settings and checkpoint is reused unless ``force``;
    one of an older checkpoint is an error unless ``force`` or ``replace_stale``."""
    from ling_jax.rerun import latest_checkpoint_step, stored_sweep, sweep_path
    from ling_jax.sweep import DEFAULT_THRESHOLDS

    out = sweep_path(workdir, thresholds, budgets, baselines, DEFAULT_THRESHOLDS)
    if not force:
        try:
            stored = stored_sweep(out, workdir)
        except ConfigError:
            if not replace_stale:
                raise
            stored = None
        if stored is not None:
            _print_sweep(stored)
            print(f"(read from {out}, written earlier for this checkpoint; pass --force to run the sweep again)")
            return stored["rows"]
    if latest_checkpoint_step(workdir) is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet: train it first (ling-jax train --workdir {workdir})")

    from ling_jax.pipeline import build_data
    from ling_jax.sweep import pruning_sweep
    from ling_jax.train import load_trained

    config, _, state = load_trained(workdir)
    data = build_data(config)
    batches = [b.as_dict() for b in data.eval_batches()]
    rows = pruning_sweep(config.model, state.variables(), batches, data.metric, progress=progress,
                         thresholds=DEFAULT_THRESHOLDS if thresholds is None else thresholds,
                         budgets=budgets, baselines=baselines)
    sweep = {"step": int(state.step), "metric": data.metric, "batches": len(batches),
             "tokens": sum(int(b["inputs"].size) for b in batches),
             "settings": {"thresholds": list(DEFAULT_THRESHOLDS if thresholds is None else thresholds),
                          "budgets": None if budgets is None else list(budgets), "baselines": list(baselines)},
             "rows": rows}
    _print_sweep(sweep)
    replaced = f" (replacing the sweep of step {json.loads(out.read_text()).get('step')})" if out.exists() else ""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(sweep, indent=1))
    tmp.replace(out)
    print(f"wrote {out}{replaced}")
    return rows


def cmd_sweep(args, extra) -> int:
    if extra:
        raise ConfigError(f"ling-jax sweep takes no config overrides, got {list(extra)}")
    _sweep(args.workdir, progress=not args.no_progress, thresholds=args.thresholds, budgets=args.budgets,
           baselines=tuple(args.baselines), force=args.force)
    return 0


def cmd_calibrate(args, extra) -> int:
    """Learn-then-Test (ling_jax/calibrate.py): the cheapest setting whose quality loss against the
    reference stays under --delta with probability 1 - --epsilon; writes DIR/policy.json."""
    from ling_jax.calibrate import calibrate, check_arguments, format_path, write_policy
    from ling_jax.train import load_trained

    check_arguments(args.delta, args.epsilon, args.requests)  # before loading anything
    config, _, state = load_trained(args.workdir)
    overrides = parse_overrides(extra)
    _data_shortcuts(args, overrides)
    config = apply_overrides(config, overrides)
    record = calibrate(config, state.variables(), int(state.step), delta=args.delta,
                       epsilon=args.epsilon, requests=args.requests, request=_request_shape(args.request),
                       grid=args.grid, batch_size=args.batch_size, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path(args.workdir) / "policy.json"
    write_policy(out, record)
    print(format_path(record))
    chosen = "the reference (no setting passed)" if record["chosen_is_reference"] else json.dumps(record["setting"])
    print(f"chosen: {chosen}: computed reduction {record['reduction_computed']:.2f}x, risk estimate "
          f"{record['risk_estimate']:.4f} (upper bound {record['risk_upper_bound']:.4f} at 1 - epsilon) for delta "
          f"{args.delta:g} on {record['requests']} requests; wrote {out}")
    print(json.dumps({k: record[k] for k in ("setting", "reduction_computed", "risk_estimate", "risk_upper_bound",
                                             "p_value", "requests", "delta", "epsilon")}))
    return 0


def _request_shape(text):
    """``--request P:C`` as (P, C); None stays None."""
    if text is None:
        return None
    try:
        prompt, continuation = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--request takes PROMPT:CONTINUATION token counts, e.g. 1024:64, got {text!r}") from None
    return prompt, continuation


def cmd_eval(args, extra) -> int:
    import jax

    from ling_jax.pipeline import build_data
    from ling_jax.train import evaluate, load_trained, make_eval_step

    config, model, state = load_trained(args.workdir)
    overrides = parse_overrides(extra)
    _data_shortcuts(args, overrides)
    trained_data, config = config.data, apply_overrides(config, overrides)
    if config.data == trained_data:  # the workdir's own data: is it still the corpus it trained on?
        _warn_if_other_corpus(args.workdir, config)
    if args.policy:
        print(json.dumps(_policy_eval(args, config, state)))
        return 0
    if args.request:
        print(json.dumps(_request_eval(args, config, state)))
        return 0
    data = build_data(config)
    result = evaluate(jax.jit(make_eval_step(model)), state, data.eval_batches(), data.metric, data.bytes_per_token())
    out = {"step": int(state.step), data.metric: result[data.metric], "loss": result["loss"]}
    print(json.dumps(out))
    return 0


def _policy_eval(args, config: Config, state) -> dict:
    """``eval --policy FILE``: the calibrated policy against its reference on requests made as in
    calibration (``--requests N``, default the calibration's count)."""
    from ling_jax.calibrate import evaluate_policy, load_policy

    if args.request:
        raise ConfigError("--policy evaluates requests of the shape the policy was calibrated on; drop --request")
    record, _ = load_policy(args.policy, config.model, int(state.step))
    out = evaluate_policy(config, state.variables(), record, requests=args.requests)
    return {"step": int(state.step), "policy": str(args.policy), **out}


def _warn_if_other_corpus(workdir, config: Config) -> None:
    from ling_jax.pipeline import data_fingerprint
    from ling_jax.workdir import data_difference, read_record

    changed = data_difference(read_record(workdir), data_fingerprint(config))
    if changed:
        print(f"ling-jax: warning: {changed}; this evaluation reads the corpus as it is now", file=sys.stderr)


def _request_eval(args, config: Config, state) -> dict:
    """``eval --request P:C``: prompts of P bytes from the validation text, prefilled with
    ``--method`` at ``--budget`` KV slots per layer, continued C bytes through the cache; bits per
    byte of the continuation and the whole request's computed FLOPs against the dense model."""
    from ling_jax.data.corpus import load_corpus
    import numpy as np

    from ling_jax.request_eval import evaluate_requests, pruning_method, text_requests

    prompt, continuation = _request_shape(args.request)
    if config.data.task != "text" or config.data.tokenizer:
        raise ConfigError("eval --request reads byte-level text (data.task=text without a tokenizer)")
    if prompt < 1 or continuation < 1 or prompt + continuation > config.model.max_seq_len:
        raise ConfigError(f"--request {args.request}: need PROMPT, CONTINUATION >= 1 and PROMPT + CONTINUATION <= "
                          f"model.max_seq_len ({config.model.max_seq_len})")
    trained = config.train.seq_len
    if prompt + continuation > trained:
        past = (f"--request {args.request}: {prompt + continuation} tokens run past the {trained} the model was trained at "
                "(train.seq_len), so positions it never trained on are scored")
        if not args.past_trained_length:
            raise ConfigError(f"{past}; pass --past-trained-length to evaluate them anyway")
        print(f"ling-jax: warning: {past}", file=sys.stderr)
    data = load_corpus(config.data.path or None, "validation", config.data.validation_fraction)
    count = 16 if args.requests is None else args.requests
    prompts, continuations = text_requests(data, count, prompt, continuation)
    scored = np.ones(continuations.shape, np.float32)
    runs = {}
    for name in ("dense", args.method):
        cfg = pruning_method(config.model, name, args.budget)
        runs[name] = evaluate_requests(cfg, state.variables(), prompts, continuations, scored, metric="bpb", batch_size=8)
    dense, mine = runs["dense"], runs[args.method]
    return {"step": int(state.step), "prompt": prompt, "continuation": continuation, "requests": count,
            "method": args.method, "budget": args.budget, "bpb": mine["quality"], "dense_bpb": dense["quality"],
            "token_reduction_computed": dense["computed_flops"] / mine["computed_flops"],
            "kv_fraction": mine["kv_bytes_per_request"] / dense["kv_bytes_per_request"]}


def _human_bytes(n: int) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _print_info(info: dict) -> None:
    """The info dict as text: counts with separators, bytes in KiB / MiB / GiB."""
    print(f"preset {info['preset']}")
    print(f"  parameters                {info['params']:,}")
    print(f"  FLOPs per token           {info['flops_per_token_forward']:,.0f} forward, "
          f"{info['flops_per_token_train']:,.0f} train step (3x)")
    print(f"  tokens per step           {info['tokens_per_step']:,}")
    print(f"  parameters (float32)      {_human_bytes(info['param_bytes'])}, AdamW moments "
          f"{_human_bytes(info['optimizer_bytes'])} (whole model, before sharding)")
    if "devices" not in info:
        return
    mesh = ",".join(f"{k}={v}" for k, v in info["mesh"].items())
    n = info["devices"]
    print(f"one train step compiled for {info['backend']}, per device, on mesh {mesh} ({n} device{'s' if n != 1 else ''}):")
    for key, name in (("param_bytes_per_device", "parameters"), ("optimizer_bytes_per_device", "optimizer state"),
                      ("batch_bytes_per_device", "batch"), ("activation_bytes_per_device", "temporaries (activations)"),
                      ("peak_bytes_per_device", "peak")):
        if key in info:
            print(f"  {name:<25} {_human_bytes(info[key])}")
    if info.get("attention") == "xla" and info["backend"] == "cpu" and info["seq_len"] >= 1024:
        print("(attention compiles as plain XLA here, with full T x T score matrices; on TPU / GPU the Pallas\n"
              " flash kernel keeps none, so run this on the accelerator for its temporaries)")
    if n == 1:
        print("this is the whole model on one device; for each device's share on a larger mesh pass --mesh\n"
              "(on a CPU machine with as many fake devices; docs/TPU.md), e.g.\n"
              f"  XLA_FLAGS=--xla_force_host_platform_device_count=8 ling-jax info --preset {info['preset']} "
              "--mesh data=1,fsdp=-1 --memory")


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
        "seq_len": t.seq_len,
    }
    if args.mesh or args.memory:
        from ling_jax.memory import memory_report

        from ling_jax.layers.attention import resolve_impl

        info.update(memory_report(config), backend=jax.default_backend(), attention=resolve_impl(config.model.attention_impl))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def cmd_convert(args, extra) -> int:
    """Hugging Face directory -> workdir (ling_jax/interop/convert.py); overrides shape the later train run."""
    from ling_jax.interop.convert import convert

    config = convert(args.hf, args.workdir, parse_overrides(extra), tokenizer=args.tokenizer)
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
    """Greedy continuation of --prompt from a workdir's latest checkpoint with the trained model's
    inference settings (pruned KV cache, adaptive depth; --budget and --exit-threshold replace
    them); text through the workdir's tokenizer or bytes."""
    import dataclasses

    import numpy as np

    from ling_jax.train import load_trained

    if extra:
        raise ConfigError(f"ling-jax generate takes no config overrides, got {list(extra)}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
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
    if args.policy:  # the calibrated setting (ling-jax calibrate) in place of the trained one
        from ling_jax.calibrate import load_policy

        if args.budget is not None or args.exit_threshold is not None:
            raise ConfigError("--policy sets the budget and thresholds itself: drop --budget and --exit-threshold")
        _, m = load_policy(args.policy, m, int(state.step))
    info: dict = {"prompt_tokens": int(len(prompt))}
    if args.budget is not None and not m.pruning.enabled:
        raise ConfigError("--budget needs a model with pruning (model.pruning.enabled)")
    if m.pruning.enabled:  # hard masks under the trained rule, threshold and budget (--budget: the budget rule)
        given = {} if args.budget is None else {"inference_rule": "budget", "budget": args.budget}
        m = dataclasses.replace(m, pruning=dataclasses.replace(m.pruning, mode="hard", **given))
        p = m.pruning
        info["pruning"] = {"inference_rule": p.inference_rule, "budget": p.budget,
                           **({"threshold": p.threshold} if p.inference_rule == "threshold" else {})}
    if args.exit_threshold is not None and not m.depth.exit_enabled:
        raise ConfigError("--exit-threshold needs a model with early exit (model.depth.exit_enabled)")
    variables = state.variables()
    if m.depth.exit_enabled or m.depth.mod_enabled:
        from ling_jax.generate_exit import generate as generate_exit

        if args.exit_threshold is not None:
            m = dataclasses.replace(m, depth=dataclasses.replace(m.depth, exit_threshold=args.exit_threshold))
        if m.depth.exit_enabled:
            info["exit_threshold"] = m.depth.exit_threshold
        out = generate_exit(m, variables, prompt[None], args.max_new_tokens)
        tokens = np.asarray(out["tokens"])[0]
        info["mean_layers_used"] = float(np.mean(np.asarray(out["layers_used"])))
    else:
        from ling_jax.generate import generate

        out = generate(m, variables, prompt[None], max_new_tokens=args.max_new_tokens)
        tokens = np.asarray(out.tokens)[0]
        info["kv_cache_bytes"] = int(out.cache_bytes)
    print(args.prompt + decode(tokens))
    print(json.dumps({**info, "new_tokens": int(len(tokens))}), file=sys.stderr)
    return 0


def _add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", allow_abbrev=False, help="import a Hugging Face model directory (config.json + *.safetensors) "
                                       "into a workdir for eval / sweep / train")
    p.add_argument("--hf", required=True, help="local Hugging Face model directory")
    p.add_argument("--workdir", required=True, help="new workdir to write (config.json + step-0 checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the one in --hf, if any)")
    p.set_defaults(fn=cmd_convert)

    main_job = get_preset("cpu-small-pruned").model.pruning
    p = sub.add_parser("generate", allow_abbrev=False, help="greedy continuation of a prompt from a workdir's latest checkpoint",
                       description=_wrap("Greedy continuation of --prompt from the latest checkpoint in --workdir, "
                       "with the trained model's inference settings: a model trained with pruning decodes with hard "
                       "masks under its model.pruning.inference_rule, threshold and budget (cpu-small-pruned: "
                       f"{main_job.inference_rule} rule, keep a token if sigmoid(score) >= {main_job.threshold:g}, "
                       f"at most {main_job.budget} KV-cache slots per pruned layer); one trained with early exit or "
                       "Mixture-of-Depths decodes with its model.depth settings. The settings used are in the JSON "
                       "line printed on stderr."), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR", help="a training workdir (or one from ling-jax convert)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--budget", type=int, metavar="B", help="model trained with pruning: decode under the budget rule "
                   "with B KV-cache slots per pruned layer (default: the trained model.pruning.inference_rule, "
                   "threshold and budget)")
    p.add_argument("--exit-threshold", type=float, metavar="T", help="model trained with early exit: exit threshold "
                   "(default: the trained model.depth.exit_threshold)")
    p.add_argument("--policy", metavar="FILE", help="apply a policy written by ling-jax calibrate (W/policy.json) "
                   "in place of the trained settings")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", allow_abbrev=False, help="write a workdir's latest checkpoint as a Hugging Face directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--hf", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--model-type", help="default: the converted model's type, else llama")
    p.set_defaults(fn=cmd_export)


def make_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a mistyped --step must be an error, not a silent --steps
    common = dict(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(prog="ling-jax", description=__doc__, epilog=_presets_help() + "\n" + OVERRIDES_HELP,
                                     **common)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (resumes from the latest checkpoint in --workdir)",
                       description=_wrap("Train a preset, resuming from the latest checkpoint in --workdir; then print "
                       "validation bits per byte beside zlib-9 and an order-2 n-gram (text) and, with pruning "
                       "enabled, sweep the pruning thresholds and budgets. A workdir that already finished is "
                       "not trained again: its results are printed (--force redoes evaluation and sweep)."),
                       epilog=_presets_help() + "\n" + OVERRIDES_HELP, **common)
    p.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                   help="model, training and data settings to start from (listed below); optional when --workdir "
                        "already holds a config.json (e.g. from ling-jax convert)")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="where config.json, metrics.jsonl, checkpoints/ and pruning_sweep.json go")
    _add_data_args(p)
    p.add_argument("--steps", type=int, metavar="N", help="training steps (default: the preset's; same as --train.steps N)")
    p.add_argument("--checkpoint-every", type=int, metavar="K", help="save a checkpoint every K steps")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=1,expert=2 (one may be -1)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--skip-baselines", action="store_true", help="do not print zlib / n-gram figures")
    p.add_argument("--skip-sweep", action="store_true", help="with pruning enabled: do not run the pruning sweep")
    p.add_argument("--force", action="store_true",
                   help="on a finished workdir: evaluate and sweep again (overwrites pruning_sweep.json)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sweep", help="pruning sweep (thresholds, budgets, baselines) of a workdir trained with pruning",
                       description=_wrap("Pruning sweep of the latest checkpoint in --workdir. The result goes to "
                       "DIR/pruning_sweep.json for the default settings, else to a file named after the settings "
                       "(e.g. pruning_sweep_b16-32_window-h2o-tova.json). An existing sweep of the same settings "
                       "and checkpoint is printed, not redone; nothing is overwritten without --force."), **common)
    p.add_argument("--workdir", required=True, metavar="DIR", help="a workdir trained with pruning enabled")
    p.add_argument("--thresholds", type=float, nargs="+", metavar="T", help="default: 0.1 0.3 0.5 0.7 0.9")
    p.add_argument("--budgets", type=int, nargs="+", metavar="B", help="keys per query (default: 1/8, 1/4, 1/2 of seq_len)")
    p.add_argument("--baselines", nargs="*", default=["window"], metavar="NAME", help="random window h2o tova oracle (oracle: tasks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="run the sweep even if its file exists, and overwrite it")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("calibrate", help="the cheapest inference policy whose quality loss stays under a bound "
                       "with a stated probability (Learn-then-Test); writes DIR/policy.json",
                       description=_wrap("Learn-then-Test over a grid of inference settings of the latest checkpoint "
                       "in --workdir (KV budget of the learned pruner; pruning, Mixture-of-Depths and early-exit "
                       "thresholds), ordered by computed FLOPs from the reference (nothing skipped) to the cheapest. "
                       "Each request's loss against the reference is the relative increase of its continuation's "
                       "bits (text) or the share of its reference-correct answers lost (tasks), in [0, 1]; a setting "
                       "passes when the null 'mean loss > delta' is rejected at level epsilon (binomial or "
                       "Hoeffding-Bentkus p-value), walking the path until the first failure. The chosen policy "
                       "keeps the expected loss under delta with probability at least 1 - epsilon. Writes "
                       "DIR/policy.json for eval --policy and generate --policy (ling_jax/calibrate.py)."),
                       epilog=OVERRIDES_HELP, **common)
    p.add_argument("--workdir", required=True, metavar="DIR", help="a trained workdir")
    _add_data_args(p)
    p.add_argument("--delta", type=float, default=0.02, help="risk bound: expected per-request quality loss (default 0.02)")
    p.add_argument("--epsilon", type=float, default=0.1, help="error level: P(risk > delta) <= epsilon (default 0.1)")
    p.add_argument("--requests", type=int, default=1024, metavar="N", help="calibration requests (default 1024)")
    p.add_argument("--request", metavar="P:C", help="text: prompt and continuation lengths (default: seq_len - 32 : 32)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="replace an axis of the default grid, reference value first (e.g. budget=none,64,32,16; "
                        "exit_threshold=1,0.95,0.9); repeatable")
    p.add_argument("--batch-size", type=int, metavar="B", help="requests per batch (default 128 for KV budgets, "
                   "1 for thresholds: early-exit and MoD buckets are chosen per batch)")
    p.add_argument("--out", metavar="FILE", help="policy file (default DIR/policy.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint; prints one JSON line",
                       description=_wrap("Evaluate the latest checkpoint in --workdir on its validation data "
                       "(or other data); prints one JSON line."), epilog=OVERRIDES_HELP, **common)
    p.add_argument("--workdir", required=True, metavar="DIR", help="a training workdir")
    _add_data_args(p)
    p.add_argument("--request", metavar="P:C", help="request-level evaluation (ling_jax/request_eval.py): prompts of P "
                   "bytes prefilled with --method, continued C bytes through the pruned KV cache")
    p.add_argument("--method", default="learned", choices=["learned", "window", "h2o", "tova", "snapkv", "random"],
                   help="--request: which method keeps the prompt's tokens (default: the trained scorer)")
    p.add_argument("--budget", type=int, default=64, metavar="B", help="--request: KV slots per layer (default 64)")
    p.add_argument("--requests", type=int, metavar="N",
                   help="--request: how many requests (default 16); --policy: default the calibration's count")
    p.add_argument("--policy", metavar="FILE", help="evaluate a policy written by ling-jax calibrate (W/policy.json) "
                   "against its reference: risk, quality and computed reduction")
    p.add_argument("--past-trained-length", action="store_true",
                   help="--request: allow P + C beyond the sequence length the model was trained at (train.seq_len), "
                        "with a warning; positions it never trained on are scored")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("info", help="parameter count, FLOPs per token, memory estimate",
                       description=_wrap("Parameter count, FLOPs per token and bytes of a preset; with --memory or "
                       "--mesh, the per-device memory of one compiled train step on that mesh over the devices "
                       "present (fake CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)."),
                       epilog=_presets_help() + "\n" + OVERRIDES_HELP, **common)
    p.add_argument("--preset", required=True, choices=list(PRESETS), metavar="PRESET", help="a preset (listed below)")
    p.add_argument("--mesh", help="device mesh the memory figure is for, e.g. data=1,fsdp=-1 (docs/TPU.md)")
    p.add_argument("--memory", action="store_true", help="compile a train step and report per-device memory")
    p.add_argument("--json", action="store_true", help="print one JSON object (sizes in bytes) instead of text")
    p.set_defaults(fn=cmd_info)

    _add_convert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ling_jax.checkpoints import CheckpointError
    from ling_jax.data import DataError
    from ling_jax.train import NonFiniteError, Preempted
    from ling_jax.workdir import WorkdirError

    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "distributed", False):
            import jax

            jax.distributed.initialize()
        return args.fn(args, extra)
    except Preempted as e:  # the last completed step is saved: rerunning the command resumes
        print(f"ling-jax: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("ling-jax: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (ConfigError, DataError, WorkdirError, CheckpointError, NonFiniteError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        print(f"ling-jax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
