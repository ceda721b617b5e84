"""Writes the tiny Hugging Face checkpoints the interop tests load (run once by a developer).

Each family gets a random-weight model of a few layers (d_model 32-64, vocab 128) built with
Hugging Face transformers in float32, saved with ``save_pretrained`` (safetensors + config.json;
Qwen2 sharded through model.safetensors.index.json), plus ``input_ids.npy`` and the model's
``logits.npy`` on them. Norm scales, biases and DeepSeek's correction bias are randomised so the
comparison exercises every tensor. DeepSeek-V3 also saves one MoE layer's input and output
(``moe_in.npy``/``moe_out.npy``) and its first attention layer's (``attn_in.npy``/``attn_out.npy``).

Needs torch and transformers (not ling-jax dependencies), e.g.::

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
    /tmp/hfvenv/bin/python tests/interop/make_fixtures.py            # writes tests/interop/fixtures/
    /tmp/hfvenv/bin/python tests/interop/make_fixtures.py deepseek_v3_yarn   # one family only

CI never runs this: the outputs are committed.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parent / "fixtures"
VOCAB, SEQ = 128, 24
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "llama31": ("llama", dict(hidden_size=64, rope_theta=500_000.0, max_position_embeddings=64,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[0],
                                    norm_topk_prob=False, use_sliding_window=False)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                                    use_sliding_window=False)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "olmoe": ("olmoe", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                            clip_qkv=None)),
    "deepseek_v3": ("deepseek_v3", dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                                        moe_intermediate_size=16, first_k_dense_replace=1, q_lora_rank=16,
                                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    # MLA without the query bottleneck, rotate-half rotary layout, YaRN with DeepSeek's softmax mscale,
    # value heads wider than the query/key heads.
    "deepseek_v3_yarn": ("deepseek_v3", dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                             topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                                             n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
                                             q_lora_rank=None, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6,
                                             v_head_dim=12, rope_interleave=False,
                                             rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                                              "original_max_position_embeddings": 16, "mscale": 1.0,
                                                              "mscale_all_dim": 0.7, "beta_fast": 32.0,
                                                              "beta_slow": 1.0})),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise * (1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def make_tokenizer(path: pathlib.Path) -> None:
    """A 128-token BPE (tokenizers package) trained on a little Python source."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    text = pathlib.Path(json.__file__).read_text() + pathlib.Path(shutil.__file__).read_text()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], limit_alphabet=80)
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(path))


def main(names: list[str]) -> int:
    """Writes the fixtures of ``names`` (default: every family; each family's seed is its index)."""
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, SEQ)).astype(np.int64)
    for i, (name, (model_type, extra)) in enumerate(FAMILIES.items()):
        if names and name not in names:
            continue
        cfg = transformers.CONFIG_MAPPING[model_type](**{**COMMON, **extra})
        cfg._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
        randomise(model, seed=100 + i)
        target = OUT / name
        shutil.rmtree(target, ignore_errors=True)
        model.save_pretrained(target, max_shard_size="40KB" if name == "qwen2" else "50MB")
        captured = {}
        if name == "deepseek_v3":
            mlp = model.model.layers[1].mlp
            mlp.register_forward_hook(lambda m, inp, out: captured.update(moe_in=inp[0], moe_out=out))
        if model_type == "deepseek_v3":  # one MLA layer alone: its input and output
            model.model.layers[0].self_attn.register_forward_hook(
                lambda m, args, kwargs, out: captured.update(attn_in=kwargs["hidden_states"], attn_out=out[0]),
                with_kwargs=True)
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits.float().numpy()
        np.save(target / "input_ids.npy", ids.astype(np.int32))
        np.save(target / "logits.npy", logits.astype(np.float32))
        for key, value in captured.items():
            np.save(target / f"{key}.npy", value.float().numpy())
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} params -> {target}")
    if not names or "llama" in names:
        make_tokenizer(OUT / "llama" / "tokenizer.json")
    (OUT / "VERSIONS.json").write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                                   "python": sys.version.split()[0]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
