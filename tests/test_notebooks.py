"""The notebooks in notebooks/: each `.ipynb` is generated from its jupytext `py:percent` source `.py`, and CI
executes every one top to bottom on the CPU and checks it drew something.

Cheap structural tests (run always): the six notebooks are there, each `.ipynb` has its `.py` and vice versa,
both declare the pair (`formats: ipynb,py:percent`), their cells match one by one (refresh a stale `.ipynb` with
`jupytext --sync notebooks/*.py`, see notebooks/README.md), and the `.ipynb` files carry no outputs.

The slow test executes them: a cell that raises fails it; each notebook must produce at least one image (its plots
are computed in the notebook). Kernels run the venv's python (the `python3` kernelspec resolves `python` to the
interpreter running the tests) with the test environment: CPU only, one device unless the notebook asks for more
before importing jax, transformers offline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOK_DIR.glob("*.py"))
PAIRED_FORMATS = "ipynb,py:percent"
REFRESH = "edit the .py, then run `jupytext --sync notebooks/*.py` (notebooks/README.md)"
CELL_TIMEOUT = 1200  # seconds per cell; generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def jupytext():
    return pytest.importorskip("jupytext")


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
                     "04_sharding.ipynb", "05_long_context.ipynb", "06_fine_tuning.ipynb"], names


def test_notebooks_paired():
    """Every .ipynb has its .py source and every .py its .ipynb."""
    notebooks, sources = {p.stem for p in NOTEBOOKS}, {p.stem for p in SOURCES}
    assert not notebooks - sources, f".ipynb without a .py source: {sorted(notebooks - sources)}"
    assert not sources - notebooks, (f".py without its .ipynb: {sorted(sources - notebooks)}; generate it with "
                                     "`jupytext --sync notebooks/*.py`")


def _preview(source: str, width: int = 200) -> str:
    return repr(source if len(source) <= width else source[:width] + "...")


def _first_difference(a: str, b: str) -> str:
    lines_a, lines_b = a.splitlines(), b.splitlines()
    for n, (x, y) in enumerate(zip(lines_a, lines_b), 1):
        if x != y:
            return f"line {n}: .py {x!r} vs .ipynb {y!r}"
    n = min(len(lines_a), len(lines_b))
    return (f"after line {n}: .py has {len(lines_a)} lines, .ipynb {len(lines_b)}"
            if len(lines_a) != len(lines_b) else "trailing whitespace or newlines differ")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_source(path, jupytext):
    """The committed .ipynb has the cells of its py:percent source: same types and sources, one by one."""
    source_path = path.with_suffix(".py")
    if not source_path.exists():
        pytest.fail(f"{path.name}: no {source_path.name} source ({REFRESH})")
    text = jupytext.read(source_path)
    nb = nbformat.read(path, as_version=4)

    for name, metadata in ((source_path.name, text.metadata), (path.name, nb.metadata)):
        formats = metadata.get("jupytext", {}).get("formats")
        assert formats == PAIRED_FORMATS, f"{name}: jupytext formats {formats!r}, expected {PAIRED_FORMATS!r}"
    representation = text.metadata["jupytext"].get("text_representation", {})
    assert representation.get("format_name") == "percent", f"{source_path.name}: not in py:percent format"

    for i, (want, got) in enumerate(zip(text.cells, nb.cells)):
        assert want.cell_type == got.cell_type, (
            f"{path.name}: cell {i} is a {got.cell_type} cell in the .ipynb but a {want.cell_type} cell in "
            f"{source_path.name} (.py {_preview(want.source)}); {REFRESH}")
        assert want.source == got.source, (
            f"{path.name}: cell {i} ({want.cell_type}) differs from {source_path.name}, "
            f"{_first_difference(want.source, got.source)}; {REFRESH}")
    assert len(text.cells) == len(nb.cells), (
        f"{path.name}: {len(nb.cells)} cells in the .ipynb, {len(text.cells)} in {source_path.name} (the first "
        f"{min(len(nb.cells), len(text.cells))} match); {REFRESH}")


def test_notebooks_have_no_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: cell {i} has outputs; commit without outputs")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
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
