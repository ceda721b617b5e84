"""Shared fixtures. Fakes 8 CPU devices so sharding tests run on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run: the xdist workers, the CLI and training
# subprocesses and the notebook kernel inherit this environment, so a program compiled once (the
# cpu-tiny train step, say, which a dozen tests and subprocesses build afresh) is loaded, not
# recompiled, everywhere else. Made here by the first process (pytest's controller), removed when
# it exits; a cache directory the user set is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ling_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

# jaxtyping's import hook checks every annotated function of ling_jax and pallas_kernels at run
# time with beartype (argument and return types, array shapes and dtypes). Installed here, before
# any test imports either package, so CI runs the whole suite under it. LING_JAX_TYPECHECK=0 turns
# it off (for debugging a failure without the checker in the traceback).
if os.environ.get("LING_JAX_TYPECHECK", "1") != "0":
    from jaxtyping import install_import_hook

    # is_pep484_tower: an int is accepted where a float is annotated (PEP 484's numeric tower, as
    # static checkers do); beartype is stricter by default.
    install_import_hook(("ling_jax", "pallas_kernels"),
                        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _fast_xla_where_marked(request):
    """Tests marked ``fast_xla`` (a test, or a module's ``pytestmark``) compile with most XLA
    optimizations off (``ling_jax.testing.fast_compile``): for tests that compile tiny programs,
    run each once or twice and compare them with each other or check what a pipeline reports,
    not XLA's FLOP count. ``xla_optimized`` tests keep the optimizations: they assert bitwise
    equality of two programs that only XLA's optimizations make identical, or read XLA's cost
    analysis. Module-scoped fixtures are built before this runs: always by the optimized compiler."""
    if request.node.get_closest_marker("fast_xla") and not request.node.get_closest_marker("xla_optimized"):
        from ling_jax.testing import fast_compile

        with fast_compile():
            yield
    else:
        yield


@pytest.fixture
def unchecked():
    """Switches the run-time type checker off for one test: for tests of the library's own input
    validation (the errors a user without the checker sees), whose bad shapes the checker would
    refuse first."""
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


def pytest_cmdline_main(config):
    """``-n 2`` schedules by work stealing unless ``--dist`` is given: each worker starts on one
    contiguous half of the suite (a module's tests, and so its compiled module-scope fixtures, stay
    on one worker instead of being built on both) and an idle worker takes over the tail of the
    other's queue (no worker waits while the other finishes a long tail)."""
    args = config.invocation_params.args
    if getattr(config.option, "dist", "no") == "load" and not any(str(a).startswith(("--dist", "-d")) for a in args):
        config.option.dist = "worksteal"
