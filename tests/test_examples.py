"""The notebooks of examples/: stored without outputs, and executed at reduced sizes (DEEPCDI_EXAMPLES_QUICK=1)
so that they cannot rot (5-10 s each)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
#: seconds a notebook's cell may run at the reduced sizes
CELL_TIMEOUT = 120


def test_every_example_is_a_notebook_without_outputs():
    names = [path.stem for path in NOTEBOOKS]
    assert names == ["01_quick_start", "02_fine_tune_vacuum_probe", "03_epie_comparison", "04_probe_recovery",
                     "05_train_new_geometry"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), path.name
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: the first code cell sets the sizes"
        assert "DEEPCDI_EXAMPLES_QUICK" in code[0].source


def run(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Execute a notebook at reduced sizes in ``tmp_path`` (its files go there); raises on any cell error."""
    monkeypatch.setenv("DEEPCDI_EXAMPLES_QUICK", "1")
    monkeypatch.setenv("DEEPCDI_EXAMPLES_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one core, like the rest of the suite
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()


def test_quick_start_runs(tmp_path, monkeypatch):
    run(EXAMPLES / "01_quick_start.ipynb", tmp_path, monkeypatch)
    assert (tmp_path / "quick_start.h5").stat().st_size > 0


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS if not p.name.startswith("01_")])
def test_example_runs(name, tmp_path, monkeypatch):
    run(EXAMPLES / name, tmp_path, monkeypatch)
