"""notebooks/quickstart.ipynb runs end to end in a real Jupyter kernel, on the shared JPEG copy."""

from __future__ import annotations

import os

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(real_cifar, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CIFAR10_DIR", real_cifar)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "ResNet18: 701,466 parameters" in text and "resnet110" in text  # the model table
    assert "of 12 right" in text and "test accuracy 87.67%" in text  # the shipped ResNet-18, as weights/README.md says
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images == 3  # the test images, the confusion matrix, the curves
