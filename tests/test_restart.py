"""One command starts a run and restarts it (`--resume auto`), and every record of a run survives any stop
exactly: SIGKILL, SIGTERM, SIGUSR1 at every place a run can stop, Ctrl-C twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import runs
import train
from conftest import ROOT, assert_same_weights, interrupt_at, metrics, tiny_args, untimed, weights
from test_robustness import run_main_expect_exit, start_training, wait_for


class Killed(BaseException):
    """A SIGKILL at a chosen line: nothing after it runs, no handler, no checkpoint."""


def auto(data_dir: str, out, *extra: str) -> list[str]:
    return tiny_args(data_dir, out, "--resume", "auto", *extra)


def kill_at(monkeypatch, where: str, epoch: int) -> None:
    """Kill the run at the end of `epoch` (1-based): after its row is logged and before any checkpoint ("row"),
    or after best.pt and before last.pt ("last")."""
    real = train.save_atomic

    def save(obj, path):
        if obj["epoch"] == epoch and obj["step"] == 0 and (where == "row" or path.endswith("last.pt")):
            raise Killed
        real(obj, path)

    monkeypatch.setattr(train, "save_atomic", save)


def records(out) -> dict:
    """Everything a run leaves that must not depend on where it was stopped."""
    last = torch.load(out / "last.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    return {"rows": untimed(metrics(out)), "best_val": last["best_val_acc"], "best_epoch": best["epoch"],
            "best_val_in_best": best["best_val_acc"], "last": last["model"], "best": best["model"]}


def assert_same_records(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert (a["best_val"], a["best_epoch"], a["best_val_in_best"]) == \
        (b["best_val"], b["best_epoch"], b["best_val_in_best"])
    assert_same_weights(a["last"], b["last"])
    assert_same_weights(a["best"], b["best"])


@pytest.fixture(scope="module")
def unbroken(tiny_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("unbroken") / "run"
    train.main(auto(tiny_folder, out, "--val-split", "40", "--epochs", "3"))
    return records(out)


@pytest.mark.parametrize("how, epoch, step", [
    ("kill-row", 1, 0),  # the first row is logged, no checkpoint exists yet
    ("kill-row", 2, 0),  # epoch 2's row is logged, best.pt and last.pt are epoch 1's
    ("kill-last", 2, 0),  # best.pt may be epoch 2's, last.pt is epoch 1's
    ("sigterm-evaluate", 2, 0),  # a stop during evaluation
    ("sigterm-mid-epoch", 1, 2),  # inside epoch 2, after its third batch
    ("sigusr1-mid-epoch", 2, 1),  # Slurm's warning, inside epoch 3
])
def test_every_record_is_exact_whereever_the_run_stops(tiny_folder, tmp_path, monkeypatch, unbroken, how, epoch,
                                                        step):
    out = tmp_path / "run"
    args = auto(tiny_folder, out, "--val-split", "40", "--epochs", "3")
    with monkeypatch.context() as m:
        if how.startswith("kill"):
            kill_at(m, how.split("-")[1], epoch)
            with pytest.raises(Killed):
                train.main(args)
        else:
            interrupt_at(m, "evaluate" if "evaluate" in how else "batches", epoch, step,
                         signal.SIGUSR1 if how.startswith("sigusr1") else signal.SIGTERM)
            with pytest.raises(SystemExit) as e:
                train.main(args)
            assert e.value.code == 128 + (signal.SIGUSR1 if how.startswith("sigusr1") else signal.SIGTERM)
    train.main(args)  # the same command, again
    assert_same_records(records(out), unbroken)


def test_the_same_command_starts_resumes_after_sigkill_and_finishes(tiny_folder, tmp_path, capsys):
    args = ["--epochs", "3", "--save-every-steps", "2"]
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_folder, straight, *args))
    out = tmp_path / "runs" / "auto"  # its parent does not exist yet either
    proc = start_training(auto(tiny_folder, out, *args))
    wait_for(out / "last.pt", proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    train.main(auto(tiny_folder, out, *args))
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    assert untimed(metrics(out)) == untimed(metrics(straight))
    assert_same_weights(weights(out), weights(straight))
    capsys.readouterr()
    again = train.main(auto(tiny_folder, out, *args))  # a restart after the end: nothing to do
    assert "already finished" in capsys.readouterr().err and len(metrics(out)) == 3
    assert again["final_test_acc"] == metrics(straight)[-1]["test_acc"]


@pytest.mark.parametrize("setup, message", [
    ("file", "is a file, not a run directory"),
    ("foreign", "holds notes.txt, not a train.py run"),
    ("corrupt", "move it away to train"),
    ("rows-without-checkpoint", "logs 2 epochs but has no last.pt"),
    ("no-out", "--resume auto needs --out DIR"),
    ("eval-only", "--eval-only needs a checkpoint"),
])
def test_resume_auto_refuses_what_it_cannot_start_or_resume_in_one_line(tiny_folder, tmp_path, capsys, setup,
                                                                        message):
    out = tmp_path / "run"
    args = auto(tiny_folder, out)
    if setup == "file":
        out.write_text("x")
    elif setup == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif setup == "corrupt":
        out.mkdir()
        (out / "last.pt").write_bytes(b"PK\x03\x04 torn")
    elif setup == "rows-without-checkpoint":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    elif setup == "no-out":
        args = [a for a in args if a != str(out)]
        args.remove("--out")
    else:
        args = args + ["--eval-only"]
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None
    code, err = run_main_expect_exit(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    if before is not None:  # nothing there was touched
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tiny_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "train.log").write_text("started\n")
    train.main(auto(tiny_folder, out, "--epochs", "1"))
    assert [r["epoch"] for r in metrics(out)] == [1] and (out / "last.pt").exists()


def test_default_run_names_never_collide(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny_args(tiny_folder, "x", "--epochs", "1") if a not in ("--out", "x")]
    monkeypatch.setattr("config.time.strftime", lambda fmt: "20261206-120000")  # both start in one second
    first, second = train.main(args), train.main(args)
    assert (first["out"], second["out"]) == (os.path.join("runs", "resnet20-20261206-120000"),
                                             os.path.join("runs", "resnet20-20261206-120000-2"))
    assert len(metrics(tmp_path / second["out"])) == 1


def test_training_on_from_best_pt_is_refused(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_folder, out, "--val-split", "40"))
    before = (out / "metrics.jsonl").read_text(), (out / "last.pt").read_bytes()
    code, err = run_main_expect_exit(["--resume", str(out / "best.pt"), "--data-dir", tiny_folder, "--device",
                                      "cpu", "--no-progress"], capsys)
    assert code == 2 and "is not where the run stopped" in err and "--eval-only" in err
    assert ((out / "metrics.jsonl").read_text(), (out / "last.pt").read_bytes()) == before


def test_logged_lr_is_the_rate_the_epoch_trained_at(tiny_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_folder, out, "--milestones", "1", "--warmup-epochs", "0", "--lr", "0.1"))
    assert [r["lr"] for r in metrics(out)] == pytest.approx([0.1, 0.01])
    # a linear warm-up over both epochs: each row holds the rate of its epoch's last step
    warm = tmp_path / "warm"
    train.main(tiny_args(tiny_folder, warm, "--schedule", "step", "--warmup-epochs", "2", "--lr", "0.1"))
    assert [r["lr"] for r in metrics(warm)] == pytest.approx([0.05, 0.1])


def test_a_resumed_optimizer_takes_this_devices_sgd_kernel(tiny_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:  # as saved by a run that used another kernel
        group.update(fused=True, foreach=False)
    torch.save(ckpt, out / "last.pt")
    cfg = train.parse_config(tiny_args(tiny_folder, out, "--epochs", "1"))
    data = train.load_cifar(tiny_folder, "cifar10")
    loaders = train.make_loaders(cfg, data, torch.device("cpu"), 0, 1)
    state = train.new_state(cfg, data, loaders.train, torch.device("cpu"))
    fresh = [(g["fused"], g["foreach"]) for g in state.optimizer.param_groups]
    runs.restore_training(state, ckpt, str(out / "last.pt"), 0)
    assert [(g["fused"], g["foreach"]) for g in state.optimizer.param_groups] == fresh
    assert state.optimizer.state_dict()["state"].keys() == ckpt["optimizer"]["state"].keys()


STOP_TWICE = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import torch, train
    with train.StopSignal(torch.device("cpu"), 1) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs; the run would now stop at its next step
        print("recorded", stop.received == signal.SIGINT, flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: the process ends here
        time.sleep(5)
        print("still alive", flush=True)
""")


def test_a_second_ctrl_c_exits_at_once():
    r = subprocess.run([sys.executable, "-c", STOP_TWICE.format(root=ROOT)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGINT and r.stdout == "recorded True\n", (r.stdout, r.stderr)
    assert "Ctrl-C again quits at once" in r.stderr
