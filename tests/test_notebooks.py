"""The notebooks run from top to bottom without an error, and are committed without outputs.

Each is executed with nbclient on a copy in a temporary folder, so neither the committed files nor the
repository's runs/ folder change. Together they take about four minutes on two cores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
# Optional packages a notebook needs beyond the test extra.
REQUIRES = {"03_reading_reports": "openvino"}


def test_the_notebooks_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart_api.ipynb", "02_custom_pass.ipynb",
                                           "03_reading_reports.ipynb", "04_search.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path: Path) -> None:
    notebook = nbformat.read(str(path), as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} cell {index} has outputs; clear them before committing "
                "(jupyter nbconvert --clear-output --inplace)")


# The search notebook runs a whole search (a minute here), which tests/test_search.py covers in the fast suite.
# The fast suite must stay under 15 minutes on a 2-core machine: the search notebook (minutes) and the two
# longest of the others run in the slow suite; 01_quickstart_api stays in the fast one.
SLOW_NOTEBOOKS = {"04_search", "02_custom_pass", "03_reading_reports"}
RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path: Path, example_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    if path.stem in REQUIRES:
        pytest.importorskip(REQUIRES[path.stem])
    work = tmp_path / "notebooks"
    work.mkdir()
    copy = work / path.name
    shutil.copyfile(path, copy)
    # The kernel inherits this environment: the repository to read recipes from, a folder for the runs.
    monkeypatch.setenv("OPTIMIZER_REPO", str(REPO))
    monkeypatch.setenv("OPTIMIZER_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    notebook = nbformat.read(str(copy), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{exc}")
    elapsed = time.perf_counter() - start
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    nbformat.write(notebook, str(copy))  # the executed copy, for inspection when a later assertion fails
    print(f"{path.name}: executed in {elapsed:.0f} s")
