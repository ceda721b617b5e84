"""Interoperability with other model formats.

:mod:`ling_jax.interop.hf` reads and writes Hugging Face model directories (``config.json`` +
``*.safetensors``) for the Llama, Qwen2, Qwen2-MoE, Qwen3(-MoE), Mixtral, OLMoE and DeepSeek-V3
(multi-head latent attention, :mod:`ling_jax.layers.mla`) families; :mod:`ling_jax.interop.tokenizer` wraps a ``tokenizer.json``. Both need
the optional ``hf`` extra (``pip install 'ling-jax[hf]'``: safetensors, tokenizers).
"""

from ling_jax.interop.hf_config import InteropError, config_from_hf, config_to_hf  # noqa: F401
