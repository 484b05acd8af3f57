"""Execute every notebook in notebooks/ top to bottom on the CPU (as CI does) and check it drew something.

A cell that raises fails the test; each notebook must produce at least one image (its plots are computed
in the notebook, the committed .ipynb files carry no outputs). Kernels run the venv's python (the `python3`
kernelspec resolves `python` to the interpreter running the tests) with the test environment: CPU only, one
device unless the notebook asks for more before importing jax, transformers offline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 1200  # seconds per cell; generous for a loaded 2-core machine


def kernel_name() -> str:
    """The python3 kernel, made to start this interpreter (installed into sys.prefix if no spec exists)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        spec = None
    if spec is None or spec.argv[0] not in ("python", "python3", sys.executable):
        from ipykernel.kernelspec import install
        install(prefix=sys.prefix, kernel_name="python3")
    return "python3"


def test_notebooks_found():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_parity_with_pytorch.ipynb", "03_inside_gated_deltanet.ipynb",
                     "04_sharding.ipynb", "05_long_context.ipynb"], names


def test_notebooks_have_no_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name(), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - start
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    print(f"{path.name}: {elapsed:.0f} s, {len(images)} image(s)")
    assert not errors
    assert images, f"{path.name} produced no image output"
