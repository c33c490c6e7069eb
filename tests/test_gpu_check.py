"""gpu_check.py, the one-command GPU proof, in its CPU mode: every step runs at toy size and the report says so."""

from __future__ import annotations

import json

import torch

import gpu_check


def test_the_gpu_check_runs_its_steps_at_toy_size_on_a_cpu(tiny_folder, tmp_path, capsys):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA host runs the full-size check (minutes), not this test")
    report = gpu_check.main(["--data-dir", tiny_folder, "--out", str(tmp_path / "check")])
    assert report["mode"].startswith("no CUDA here: the same steps at toy size")
    assert report["gpu_tests"]["exit_code"] == 0 and "skipped" in report["gpu_tests"]["summary"]
    assert report["host_syncs"] == {"checked": False, "why": "no CUDA: host syncs are a GPU matter"}
    assert report["sync_bn"]["backend"] == "gloo" and report["sync_bn"]["ok"]
    runs = {r["run"]: r for r in report["runs"]}
    assert {"default", "gpu"} <= set(runs) and all(r["images_per_s"] > 0 and r["epochs"] == 1 for r in runs.values())
    assert runs["gpu"]["flags"].startswith("--subset") and "--recipe gpu" in runs["gpu"]["flags"]
    assert json.loads((tmp_path / "check" / "report.json").read_text())["runs"] == report["runs"]
    text = (tmp_path / "check" / "report.txt").read_text()
    assert "toy size" in text and text in capsys.readouterr().out
