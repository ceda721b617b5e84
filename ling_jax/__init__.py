"""ling-jax: token-efficient transformers in JAX/Flax."""

from ling_jax.config import Config, ConfigError, ModelConfig, get_preset

__all__ = ["Config", "ConfigError", "ModelConfig", "get_preset"]
__version__ = "0.1.0"
