"""Shared fixtures. Fakes 8 CPU devices so sharding tests run on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# LING_JAX_TYPECHECK=1: jaxtyping's import hook checks every annotated function of ling_jax at run
# time with beartype (argument and return types, array shapes and dtypes). Installed here, before
# any test imports ling_jax. Opt-in until the whole suite passes under it (see README).
if os.environ.get("LING_JAX_TYPECHECK") == "1":
    from jaxtyping import install_import_hook

    install_import_hook("ling_jax", "beartype.beartype")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
