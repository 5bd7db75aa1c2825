"""The walkthrough notebook runs top to bottom (CI executes it, so it cannot rot), and is committed
without outputs. Executed with nbclient in the interpreter running pytest (the venv's ipykernel),
in a temporary directory that receives the executed copy and the notebook's artifacts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "retrieval_head_identification.ipynb"
FIGURES = ("head_grid.png", "attention_heatmap.png", "accuracy_by_depth.png", "ablation_curve.png")


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"cells {dirty} of {NOTEBOOK.name} carry outputs: clear them before committing "
                       f"(jupyter nbconvert --clear-output --inplace {NOTEBOOK.relative_to(NOTEBOOK.parents[1])})")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is the native kernel: jupyter_client starts it with this interpreter (the venv's),
    # whatever kernels the user has installed elsewhere
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / NOTEBOOK.name)  # the executed copy, outputs and all, for inspection
    elapsed = time.perf_counter() - t0
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images == len(FIGURES)
    for name in FIGURES:
        assert (tmp_path / "artifacts" / name).stat().st_size > 1000, name
    assert (tmp_path / "artifacts" / "ablation_results.csv").exists()
    print(f"notebook executed in {elapsed:.0f} s")
