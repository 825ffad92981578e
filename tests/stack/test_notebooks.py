"""Every notebook in notebooks/ runs top to bottom on a real kernel, its asserts included, and
draws its plots; the committed files keep the outputs of such a run, so GitHub shows them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.timeout(600)
# What draws a figure in a notebook: explore.timeline, a pandas or pyplot plot.
PLOTS = re.compile(r"\btimeline\(|\.plot\b|\bplt\.")


def _outputs(notebook: Any) -> list[Any]:
    return [o for c in notebook.cells for o in c.get("outputs", [])]


def _pngs(notebook: Any) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(notebook))


def _plots(notebook: Any) -> bool:
    return any(c.cell_type == "code" and PLOTS.search(c.source) for c in notebook.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENX_REDIS_URL", redis_url)  # the kernel inherits this environment
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    notebook = nbformat.read(path, as_version=4)  # executed in memory: the file is left as it is
    for cell in notebook.cells:
        cell.pop("outputs", None)  # only what this run produces is checked
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    errors = [o for o in _outputs(notebook) if o.output_type == "error"]
    assert not errors, "\n".join(line for e in errors for line in e.traceback)
    if _plots(notebook):
        assert _pngs(notebook), f"{path.name} plots, but no image/png output came out"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_keeps_the_outputs_of_a_whole_run(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    # Executed top to bottom in one go, then saved: re-execute it after changing a cell.
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for o in _outputs(notebook) if o.output_type == "error"]
    if _plots(notebook):
        assert _pngs(notebook)


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS
