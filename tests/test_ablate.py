"""ablate.py: the plain-vs-residual grid, its tables and figures, skipping finished runs, Figure 7 responses."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import ablate
import train
from basic_block import BasicBlock
from resnet import build_model


def grid_args(data_dir: str, out) -> list[str]:
    return ["--data-dir", data_dir, "--out", str(out), "--depths", "20", "32", "--seeds", "0", "--epochs", "1",
            "--jobs", "1", "--subset", "150", "--batch-size", "32", "--width", "4", "--response-images", "40"]


def test_tiny_grid_writes_figures_and_tables_then_skips(tiny_folder, tmp_path, capsys):
    out = tmp_path / "abl"
    rows = ablate.main(grid_args(tiny_folder, out))
    archs = ["plain18", "resnet18", "plain20", "resnet20", "plain32", "resnet32"]
    assert [r["arch"] for r in rows] == archs  # by depth, plain before residual
    for name in ("ablation.png", "ablation.md", "ablation.csv", "responses.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "ablation.md").read_text()
    assert all(f"| {a} |" in md for a in archs) and "| 8.75 |" in md and "| 7.51 |" in md  # Table 6 beside ours
    with open(out / "ablation.csv") as f:
        table = {r["arch"]: r for r in csv.DictReader(f)}
    assert table["plain20"]["params"] == table["resnet20"]["params"]  # option A: identical counts
    assert int(table["resnet18"]["params"]) > int(table["plain18"]["params"])  # projection shortcuts
    assert all(0 <= float(r["test_err"]) <= 100 for r in table.values())
    stamps = {a: os.path.getmtime(out / a / "seed0" / "last.pt") for a in archs}
    capsys.readouterr()
    ablate.main(grid_args(tiny_folder, out))  # same command again: no training
    assert capsys.readouterr().out.count("done, skipped") == len(archs)
    assert stamps == {a: os.path.getmtime(out / a / "seed0" / "last.pt") for a in archs}
    with pytest.raises(SystemExit) as e:  # other training flags into the same directory: refused
        ablate.main(grid_args(tiny_folder, out) + ["--lr", "0.05"])
    assert e.value.code == 2


def test_interrupted_run_is_resumed(tiny_folder, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["--data-dir", tiny_folder, "--out", str(out), "--archs", "resnet20", "--epochs", "2", "--subset", "150",
            "--jobs", "1", "--batch-size", "32", "--width", "4", "--response-images", "40"]
    ablate.main(args)
    ckpt_path = out / "resnet20" / "seed0" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    full = ckpt["model"]
    # pretend the run was cut after epoch 1: drop its last log line and mark the checkpoint one epoch back
    lines = (out / "resnet20" / "seed0" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "resnet20" / "seed0" / "metrics.jsonl").write_text(lines[0])
    ckpt["epoch"] = 1
    torch.save(ckpt, ckpt_path)
    capsys.readouterr()
    ablate.main(args)
    assert "resuming from epoch 1" in capsys.readouterr().out
    assert len((out / "resnet20" / "seed0" / "metrics.jsonl").read_text().splitlines()) == 2
    assert torch.load(ckpt_path, weights_only=True)["epoch"] == 2 and full is not None


@pytest.mark.parametrize("name", ["resnet20", "plain56", "resnet18"])
def test_layer_responses_every_3x3_layer(name):
    torch.manual_seed(0)
    model = build_model(name)
    n_blocks = sum(isinstance(m, BasicBlock) for m in model.modules())
    stds = ablate.layer_responses(model, torch.randn(16, 3, 32, 32))
    assert len(stds) == 2 * n_blocks + 1  # the stem, then two 3x3 layers per block (at least one per block)
    assert all(s > 0 for s in stds) and not model.training
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stds = ablate.layer_responses(model, x)
    with torch.no_grad():  # by hand: the stem, and the second 3x3 layer of the first block, before the addition
        h = model.bn1(model.conv1(x))
        block = model.stages[0][0]
        r = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(torch.relu(h))))))
    assert stds[0] == pytest.approx(h.std().item()) and stds[2] == pytest.approx(r.std().item())
    # the hooks are gone afterwards
    assert all(not bn._forward_hooks for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_110_layer_nets_get_the_papers_warmup_on_its_schedule_alone(monkeypatch, tmp_path):
    """Under --recipe paper: 0.1x the peak lr until the training error is below 80%, a tenth of the run at the
    longest. Any other recipe (the depth grid's) gives 110 layers the warm-up of every other depth. A warm-up the
    grid's recipe names still wins."""
    calls = []
    monkeypatch.setattr(ablate.train, "main", lambda argv: calls.append(argv))
    ablate.run_one("resnet110", 0, str(tmp_path), ["--recipe", "fast", "--epochs", "15", "--lr", "0.1"], "data")
    ablate.run_one("resnet56", 0, str(tmp_path), ["--subset", "10000", "--epochs", "10"], "data")
    ablate.run_one("plain110", 0, str(tmp_path), ["--recipe", "paper"], "data")
    ablate.run_one("plain110", 1, str(tmp_path), ["--warmup", "constant", "--warmup-epochs", "1.0256"], "data")
    a, b, c, d = (train.parse_config(argv) for argv in calls)
    fast = train.parse_config(["--recipe", "fast", "--epochs", "15"])
    assert (a.warmup, a.warmup_epochs, a.lr) == (fast.warmup, fast.warmup_epochs, 0.1) and a.warmup == "linear"
    assert (b.warmup, b.warmup_epochs) == ("linear", None)
    assert (c.warmup, c.warmup_error_threshold(), c.warmup_epochs, c.epochs) == ("until-error", 0.8, 18.2, 182)
    assert (d.warmup, d.warmup_epochs) == ("constant", 1.0256)


def test_jobs_run_side_by_side_then_report(tiny_folder, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["--data-dir", tiny_folder, "--out", str(out), "--archs", "resnet20", "plain20", "--epochs", "1",
            "--subset", "150", "--batch-size", "32", "--width", "4", "--response-images", "40", "--device", "cpu"]
    rows = ablate.main(args + ["--jobs", "2"])
    assert [r["arch"] for r in rows] == ["plain20", "resnet20"]
    for arch in ("resnet20", "plain20"):
        log = (out / arch / "seed0" / "train.log").read_text()  # each run's own output, from its own process
        assert "final test accuracy" in log, log
    recipe = json.loads((out / "grid.json").read_text())["recipe"]
    assert recipe[-8:] == args[7:15] and "--device" not in recipe  # the device is not part of the experiment
    capsys.readouterr()
    rows = ablate.main(args[:-2] + ["--report"])  # --report trains nothing
    assert [r["arch"] for r in rows] == ["plain20", "resnet20"] and "training" not in capsys.readouterr().out
    for typed in (["--jobs", "2"], ["--device", "cpu"]):  # what only training would use is refused, not ignored
        with pytest.raises(SystemExit) as e:
            ablate.main(args[:-2] + ["--report", *typed])
        assert e.value.code == 2 and f"--report trains nothing; {typed[0]} would" in capsys.readouterr().err


def test_bad_passthrough_flag_is_one_line_before_any_run(tiny_folder, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablate.main(["--data-dir", tiny_folder, "--out", str(tmp_path / "abl"), "--lr", "-1"])
    assert e.value.code == 2 and not (tmp_path / "abl" / "resnet20").exists()


def test_responses_for_a_list_of_checkpoints(tiny_folder, tmp_path):
    from test_checkpoints import save_port_checkpoint

    save_port_checkpoint(3, tmp_path / "port.th")
    torch.save({"arch": "plain20", "model_kwargs": {"width": 4}, "model": build_model("plain20", width=4).state_dict()},
               tmp_path / "ours.pt")
    ablate.main(["--responses", str(tmp_path / "port.th"), str(tmp_path / "ours.pt"), "--out", str(tmp_path / "fig"),
                 "--data-dir", tiny_folder, "--response-images", "20"])
    assert (tmp_path / "fig" / "responses-checkpoints.png").stat().st_size > 0
    assert ablate.labelled_model(str(tmp_path / "port.th"))[0] == "resnet20 (akamaster/pytorch_resnet_cifar10)"
    with pytest.raises(SystemExit) as e:  # flags of a grid beside --responses: refused, not ignored
        ablate.main(["--responses", str(tmp_path / "port.th"), "--depths", "32", "--epochs", "3"])
    assert e.value.code == 2


def test_sigterm_to_ablate_stops_its_runs_with_checkpoints(tiny_folder, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "abl"
    proc = subprocess.Popen([sys.executable, "ablate.py", "--data-dir", tiny_folder, "--out", str(out), "--archs",
                             "resnet20", "plain20", "resnet32", "--jobs", "2", "--epochs", "200", "--subset", "64",
                             "--batch-size", "32", "--width", "4", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while not all((out / a / "seed0" / "last.pt").exists() for a in ("resnet20", "plain20")):
        assert proc.poll() is None and time.time() - t < 120, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("ablate.py: interrupted"), err
    for arch in ("resnet20", "plain20"):  # both runs stopped themselves: checkpoint written, resume command logged
        assert "stopped by SIGTERM" in (out / arch / "seed0" / "train.log").read_text()
        assert torch.load(out / arch / "seed0" / "last.pt", weights_only=True)["epoch"] < 200
    assert not (out / "resnet32").exists()  # nothing new started


def test_grid_with_eval_every_reports_and_draws_the_evaluated_epochs(tiny_folder, tmp_path):
    out = tmp_path / "abl"
    args = grid_args(tiny_folder, out)
    args[args.index("--depths") + 1:args.index("--seeds")] = ["20"]
    args[args.index("--epochs") + 1] = "3"
    rows = ablate.main(args + ["--archs", "plain20", "resnet20", "--eval-every", "2"])
    assert [r["arch"] for r in rows] == ["plain20", "resnet20"] and all(r["epochs"] == 3 for r in rows)
    logged = [["test_acc" in r for r in ablate.read_metrics(str(out / a / "seed0"))] for a in ("plain20", "resnet20")]
    assert logged == [[False, True, True]] * 2
    assert (out / "ablation.png").stat().st_size > 10_000


def test_responses_leave_out_the_nets_named_but_measure_them(tmp_path, monkeypatch):
    """A net that never trained (plain110 at chance) can have responses 100x the others': the --report figure
    leaves it out, saying so in the title, and responses.csv still has its numbers."""
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    nets = [(n, build_model(n, width=4).eval()) for n in ("resnet20", "plain20")]
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    ablate.plot_responses(ablate.measure_responses(nets, images), 8, str(tmp_path / "r.png"), not_drawn=("plain20",))
    top, bottom = figures[0].axes
    assert [line.get_label() for line in top.get_lines()] == ["resnet20"] == \
        [line.get_label() for line in bottom.get_lines()]
    assert "not drawn, its training at chance (in responses.csv): plain20" in top.get_title()
    with open(tmp_path / "r.csv") as f:
        assert [row["net"] for row in csv.DictReader(f)] == ["resnet20", "plain20"]


def test_a_finished_grid_reports_without_its_checkpoints(tiny_folder, tmp_path, capsys):
    """results/ keeps a finished grid's logs, configs and measured responses, not its checkpoints: --report gives
    the same tables and Figure 7 from them, and the training command skips the runs instead of starting over."""
    out = tmp_path / "abl"
    args = ["--data-dir", tiny_folder, "--out", str(out), "--archs", "resnet20", "plain20", "--epochs", "1",
            "--subset", "150", "--batch-size", "32", "--width", "4", "--response-images", "40", "--jobs", "1"]
    with_checkpoints = ablate.main(args)
    layers = (out / "responses-layers.csv").read_text()
    for arch in ("resnet20", "plain20"):
        (out / arch / "seed0" / "last.pt").unlink()
    capsys.readouterr()
    assert ablate.main(args) == with_checkpoints  # trained nothing again: both runs finished
    assert "done, skipped" in capsys.readouterr().out and not (out / "resnet20" / "seed0" / "last.pt").exists()
    assert ablate.main(args[:-2] + ["--report", "--data-dir", str(tmp_path / "no-data")]) == with_checkpoints
    assert (out / "responses-layers.csv").read_text() == layers  # drawn from the measured data, no data needed
    assert len(layers.splitlines()) == 1 + 2 * 19 and [r["params"] for r in with_checkpoints] == [
        ablate.count_parameters(build_model(a, width=4)) for a in ("plain20", "resnet20")]
