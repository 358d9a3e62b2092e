"""The seven steps' notebook (notebooks/seven_steps.ipynb), executed as a reader runs it, in a kernel of its own,
and held to what its prose says. The committed copy carries the outputs of one real run, in order.

`python -m tests.test_notebook` executes the notebook in place and writes it back with its fresh outputs: do that
after changing a cell, never edit an output by hand.
"""

import re
import shutil
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "seven_steps.ipynb"
CELL_TIMEOUT = 300   # seconds a cell may take: the whole notebook runs in well under that on two CPU cores


def execute(path: Path) -> dict:
    """Run every cell of the notebook at `path`, in its folder, as Jupyter would; the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def text(cell) -> str:
    """What a code cell printed."""
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output["output_type"] == "stream")


def printed(notebook) -> str:
    return "\n".join(text(cell) for cell in notebook.cells if cell.cell_type == "code")


def test_the_committed_notebook_holds_one_real_run_in_order():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run top to bottom, once"
    assert all(cell.outputs for cell in code), "every code cell shows what it did"
    assert not [output for cell in code for output in cell.outputs if output["output_type"] == "error"]
    assert any("image/png" in output.get("data", {}) for cell in code for output in cell.outputs), "the images"


def test_the_notebook_runs_and_shows_what_its_prose_says(real_data, tmp_path, monkeypatch):
    pytest.importorskip("nbclient", reason="the notebook's tests need nbclient and ipykernel: pip install -e '.[dev]'")
    folder = next(iter(real_data.values())).parent   # the kernel's environment: here, no ../data beside it
    monkeypatch.setenv("FMNIST_DATA", str(folder))
    copy = tmp_path / "notebooks" / NOTEBOOK.name
    copy.parent.mkdir()
    shutil.copy(NOTEBOOK, copy)
    out = printed(execute(copy))

    # Steps 1 to 5 on one batch: the loss falls and more of the batch is right.
    before, right_before = re.search(r"loss before: ([\d.]+), correct: (\d+) of 100", out).groups()
    after, right_after = re.search(r"after 5 updates: ([\d.]+), correct: (\d+) of 100", out).groups()
    assert float(after) < float(before) and int(right_after) > int(right_before), out
    assert 2.0 < float(before) < 2.6, "random weights: near -log(1/10)"
    # Steps 6 and 7: two epochs learn, and the exported model agrees with torch.
    accuracies = [float(a) for a in re.findall(r"epoch \d: .* test accuracy ([\d.]+)%", out)]
    assert len(accuracies) == 2 and accuracies[1] > 70, out
    assert float(re.search(r"onnxruntime's accuracy on the test images: ([\d.]+)%", out).group(1)) == accuracies[1]
    assert re.search(r"ankle-boot.png: background light, negated: True\n  Ankle boot ", out), out
    assert "out of distribution: True" in out, "the blank page is flagged"
    run = copy.parent / "seven-steps-run"
    assert {"fmnist.onnx", "blank.png", "ankle-boot.png"} <= {p.name for p in run.iterdir()}
    assert {"fmnist.pt", "metrics.jsonl", "curves.png"} <= {p.name for p in (run / "run").iterdir()}


if __name__ == "__main__":   # python -m tests.test_notebook: run it in place and keep the outputs
    import nbformat

    nbformat.write(execute(NOTEBOOK), NOTEBOOK)
    print(f"executed {NOTEBOOK}", file=sys.stderr)
