"""The notebooks run top to bottom on the CPU, as a newcomer runs them, and are stored without outputs.

Each is executed in a fresh python3 kernel (nbclient), from notebooks/ as Jupyter starts it; any cell
that raises fails the test. The notebooks assert their own claims (a fresh student is the base
model, disabled adapters are the base model, saved adapters reload), so those are checked here too.
"""

import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_classifier_free_guidance", "02_distilling_guidance_into_adapters", "03_sdxl_with_adapters"]
CELL_TIMEOUT = 300  # seconds; the three together take about two minutes on one CPU thread
# One thread unless the caller sets it: the tiny models gain little from more, and on a shared
# machine two threads fighting for a busy core can run the notebooks several times slower.
KERNEL_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def read(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_the_notebooks_are_these():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
    """Outputs are made by running the notebook, never stale ones kept from an older version."""
    nb = read(name)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {i} holds outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom(name):
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no python3 Jupyter kernel installed (pip install ipykernel)")
    nb = read(name)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=KERNEL_ENV)  # raises on a cell's error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
    stderr = [o["text"] for o in outputs if o.get("name") == "stderr"]
    assert not stderr, f"{name} wrote to stderr, which a reader sees as a warning: {stderr[0][:300]}"
