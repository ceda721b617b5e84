"""Executes notebooks/ablations.ipynb end to end (nbclient) on its tiny live-ablation setting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from ling_jax.testing import FAST_COMPILE_ENV

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "ablations.ipynb"


def _ensure_kernel() -> str:
    """A kernel spec that runs this interpreter (installed for the user if missing)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    name = "python3"
    try:
        spec = manager.get_kernel_spec(name)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve() or spec.argv[0] in ("python", "python3"):
            return name
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    name = "ling-jax-test"
    install(user=True, kernel_name=name, display_name="ling-jax (tests)")
    return name


def test_ablations_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel compiles with most XLA optimizations off: its tiny live ablation is all compile time
    env = {"LING_JAX_NOTEBOOK_TINY": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO), **FAST_COMPILE_ENV}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        client = NotebookClient(nb, timeout=110, kernel_name=_ensure_kernel(), resources={"metadata": {"path": str(REPO)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "tiny=True" in outputs
    assert "learned " in outputs and "token reduction" in outputs  # the live ablation printed its table


def test_committed_notebook_carries_its_plots():
    """The saved notebook shows its figures without being run (GitHub renders saved outputs): it
    was executed in the tiny setting, cleanly, and stays small."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 10, f"{len(images)} embedded plots; re-execute the notebook and save it with its outputs"
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for o in outputs)
    assert "tiny=True" in text and "token reduction" in text
    assert not [o for o in outputs if o.get("output_type") == "error" or o.get("name") == "stderr"]
    assert NOTEBOOK.stat().st_size < 1_000_000
