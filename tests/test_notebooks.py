"""The notebooks run top to bottom on CPU, each within 120 s, and are committed with their outputs stripped.

Each notebook runs in a fresh ipykernel process started from this interpreter (a kernelspec written into a
temporary directory with ipykernel's own API, so a fresh clone needs no ``jupyter kernelspec install``). The kernel
gets this process's environment without the ``XLA_FLAGS`` and the compilation cache that ``conftest.py`` sets: a
notebook sees what a user's kernel sees (one CPU device, every program compiled cold), and
``03_sharded_inference.ipynb`` asks for its 8 devices itself.
"""

import glob
import os
import sys
import time

import nbformat
import pytest

pytestmark = pytest.mark.notebook  # timed: the README runs these after the parallel suite, on their own

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
PATHS = sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))
TIME_LIMIT_S = 120  # per notebook, kernel start included
CELL_TIMEOUT_S = 120
PLOTTING = {"02_vision.ipynb", "03_sharded_inference.ipynb", "04_qat_finetune.ipynb"}  # must leave at least one PNG


def _ids(paths):
    return [os.path.basename(p) for p in paths]


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    from ipykernel.kernelspec import make_ipkernel_cmd, write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(
        str(kernels / "k25jax-test"),
        overrides={"argv": make_ipkernel_cmd(executable=sys.executable), "display_name": "k25jax tests"},
    )
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def test_notebooks_found():
    expected = {
        "01_quickstart.ipynb",
        "02_vision.ipynb",
        "03_sharded_inference.ipynb",
        "04_qat_finetune.ipynb",
        "05_serving.ipynb",
    }
    assert expected <= set(_ids(PATHS))


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_notebook_runs(path, kernel_spec_manager):
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "XLA_FLAGS" and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    }
    env["JAX_PLATFORMS"] = "cpu"
    km = KernelManager(kernel_name="k25jax-test", kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,  # any cell error raises CellExecutionError naming the cell
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    start = time.perf_counter()
    client.execute(env=env)
    elapsed = time.perf_counter() - start
    print(f"{os.path.basename(path)}: {elapsed:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert elapsed <= TIME_LIMIT_S, f"{os.path.basename(path)} took {elapsed:.1f} s (limit {TIME_LIMIT_S} s)"
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    if os.path.basename(path) in PLOTTING:
        assert pngs, f"{os.path.basename(path)}: no image/png display_data output"


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{os.path.basename(path)} cell {i}: has outputs (strip them before committing)"
            assert cell.execution_count is None, f"{os.path.basename(path)} cell {i}: execution_count is set"
