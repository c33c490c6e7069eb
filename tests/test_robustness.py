"""Never lose a run: bad flags, unsafe or broken checkpoints, NaN, kill -9, SIGTERM, torchrun DDP on CPU."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import hardware
import runs
import schedule
import train
from conftest import ROOT, assert_same_weights, metrics, tiny_args, untimed, weights
from runs import load_model
from runs import CheckpointError


def run_main_expect_exit(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


BAD_FLAGS = [
    (["--amp-dtype", "fp16"], "--amp-dtype fp16 is the dtype of --amp, which this run does not use"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--width", "0"], "--width must be positive"),
    (["--milestones", "1.5", "1"], "increasing"),
    (["--milestones", "1", "2"], "must lie in"),
    (["--label-smoothing", "1"], "label-smoothing"),
    (["--label-smoothing", "-0.1"], "label-smoothing"),
    (["--arch", "resnet19"], "unknown --arch"),
    (["--device", "tpu"], "invalid choice"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--subset", "5000"], "larger than the 200 training images"),
    (["--val-split", "200"], "leaves no training images"),
    (["--resume", "/no/such/run"], "does not exist"),
    (["--sync-bn"], "this run is one process"),
    (["--arch", "plain20", "--zero-init-residual"], "plain net"),
    (["--epochs", "two"], "invalid int value"),
    (["--schedule", "linear", "--milestones", "1"], "--milestones are for --schedule step"),
    (["--schedule", "cosine"], "invalid choice"),
    (["--eval-every", "0"], "--eval-every must be positive"),
    (["--dist-timeout", "0"], "--dist-timeout must be positive"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead is the mode of --compile, which this run"),
    (["--compile-mode", "fast"], "invalid choice"),
    (["--recipe", "fast16", "--epochs", "1"], "got 2.0 (--recipe fast16 sets 2.0: give --warmup-epochs for --epochs 1)"),
    (["--recipe", "fast"], "below --epochs (--recipe fast sets 2.0: give --warmup-epochs for --epochs 2)"),
    (["--warmup-error", "0.5"], "--warmup-error is the threshold of --warmup until-error; this run's warm-up is"),
    (["--warmup", "until-error", "--warmup-error", "1"], "--warmup-error must be in (0, 1), got 1.0"),
    (["--warmup", "until-error", "--recipe", "paper"],
     "--warmup until-error ends at --warmup-epochs at the latest; give it a positive value (--recipe paper sets 0.0"),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_exits_2_with_one_line(tiny_folder, tmp_path, capsys, extra, message):
    code, err = run_main_expect_exit(tiny_args(tiny_folder, tmp_path / "r") + extra, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("train.py: error:") and message in err, err


@pytest.mark.parametrize("probes", ["false", "missing"])
def test_amp_is_refused_on_a_cpu_without_bf16(tiny_folder, tmp_path, capsys, monkeypatch, probes):
    for probe in hardware.CPU_BF16_PROBES:  # private: a future torch may lack them
        if probes == "false":
            monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, probe, raising=False)
    code, err = run_main_expect_exit(tiny_args(tiny_folder, tmp_path / "r", "--amp"), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--amp: this CPU has no bf16" in err, err
    assert not any((tmp_path / "r").iterdir())  # nothing written: the same command runs once --amp is dropped
    assert not any(unit in hardware.machine_name(torch.device("cpu")) for unit in ("BF16", "AMX"))


@pytest.mark.parametrize("capability, name, dtype", [((6, 0), "Tesla P100", None), ((7, 0), "Tesla V100", "fp16"),
                                                     ((7, 5), "Tesla T4", "fp16"), ((8, 0), "A100", "bf16"),
                                                     ((9, 0), "H100", "bf16")])
def test_amp_on_cuda_is_bf16_in_hardware_else_fp16_on_tensor_cores(monkeypatch, capability, name, dtype):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4 too (it counts emulation): the rule reads the
    compute capability instead, and gives those cards fp16 with a loss scaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert hardware.amp_dtype(cuda)[0] == dtype
    assert (hardware.bf16_unavailable(cuda) is None) == (dtype == "bf16")
    if dtype != "bf16":  # asked for by name: refused in one line, whatever auto would pick
        why = hardware.amp_dtype(cuda, "bf16")[1]
        assert f"{name} (compute capability {capability[0]}.{capability[1]}) has no bf16 arithmetic" in why
    assert hardware.amp_dtype(cuda, "fp16") == ("fp16", None)
    assert hardware.has_tf32(cuda) == (capability[0] >= 8)  # bench.py says TF32 only there


def test_device_cuda_without_cuda(tiny_folder, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_main_expect_exit(tiny_args(tiny_folder, tmp_path / "r", "--device", "cuda"), capsys)
    assert code == 2 and "no CUDA device" in err


def test_bad_flag_from_the_shell_has_no_traceback():
    r = subprocess.run([sys.executable, "train.py", "--epochs", "-1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "train.py: error: --epochs must be positive, got -1"
    assert "Traceback" not in r.stderr


def test_compile_without_a_cpp_compiler_is_one_line(tiny_folder, tmp_path):
    env = {**os.environ, "CXX": "no-such-c++"}  # inductor, torch.compile's CPU backend, would call it
    r = subprocess.run([sys.executable, "train.py", *tiny_args(tiny_folder, tmp_path / "r", "--compile")], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["train.py: error: --compile: torch.compile on the CPU needs a C++ "
                                             "compiler ($CXX, or g++) and none works here; drop --compile to "
                                             "train without it"]
    assert not (tmp_path / "r" / "last.pt").exists()


def test_existing_run_dir_is_never_overwritten(tiny_folder, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    before = (out / "last.pt").read_bytes()
    code, err = run_main_expect_exit(tiny_args(tiny_folder, out, "--epochs", "1"), capsys)
    assert code == 2 and "--overwrite" in err and (out / "last.pt").read_bytes() == before
    train.main(tiny_args(tiny_folder, out, "--epochs", "1", "--overwrite", "--seed", "3"))


class Payload:
    """Pickles to a call of open(marker, 'w'): code that would run on an unsafe load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_never_runs(tiny_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"arch": "resnet20", "model": {}, "x": Payload(str(marker))}, evil)
    with open(evil, "rb") as f:  # sanity: an unsafe load would run it
        assert b"pwned" in f.read()
    code, err = run_main_expect_exit(["--eval-only", "--resume", str(evil), "--data-dir", tiny_folder,
                                      "--device", "cpu"], capsys)
    assert code == 2 and "unsafe" in err and str(evil) in err
    with pytest.raises(CheckpointError, match="unsafe"):
        load_model(str(evil))
    assert not marker.exists()


@pytest.fixture
def good_run(tiny_folder, tmp_path):
    out = tmp_path / "good"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    return out


def test_truncated_checkpoint_gives_clear_error(tiny_folder, good_run, capsys):
    path = good_run / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for args in (["--resume", str(good_run)], ["--eval-only", "--resume", str(path)]):
        code, err = run_main_expect_exit(args + ["--data-dir", tiny_folder, "--device", "cpu"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "unreadable (truncated" in err and str(path) in err


@pytest.mark.parametrize("content", [b"", b"garbage", pickle.dumps([1, 2], protocol=4), b"PK\x03\x04" + bytes(60)],
                         ids=["empty", "text", "plain-pickle", "zip-header"])
def test_a_file_that_is_no_checkpoint_is_unreadable_not_unsafe(tiny_folder, tmp_path, capsys, content):
    path = tmp_path / "not-a-checkpoint.pt"
    path.write_bytes(content)
    code, err = run_main_expect_exit(["--eval-only", "--resume", str(path), "--data-dir", tiny_folder,
                                      "--device", "cpu"], capsys)
    assert code == 2 and err == f"train.py: error: checkpoint {path} is unreadable (truncated, corrupt, or not a " \
                                "PyTorch file)"


def test_eval_only_refuses_flags_it_would_ignore(tiny_folder, good_run, capsys):
    base = ["--eval-only", "--resume", str(good_run), "--data-dir", tiny_folder, "--device", "cpu"]
    code, err = run_main_expect_exit(base + ["--lr", "0.5", "--amp", "--epochs", "3"], capsys)
    assert code == 2 and err == ("train.py: error: --eval-only evaluates the checkpoint as it was trained; --amp, "
                                 "--epochs, --lr would change nothing: drop them")
    assert train.main(base + ["--no-progress", "--deterministic", "--tta"])["test_acc_tta"] is not None


def test_faulty_channels_last_1x1_convolutions_train_nchw(tiny_folder, tmp_path, capsys):
    """ResNet-18 at width 4: its first projection shortcut is a 1x1 stride-2 convolution on 4 channels, whose
    channels_last backward hangs or crashes on an AVX2 CPU (oneDNN#6035): trained NCHW, with a note; typed
    --channels-last is refused. At width 16 nothing changes."""
    args = tiny_args(tiny_folder, tmp_path / "r", "--arch", "resnet18", "--epochs", "1")
    train.main(args)
    assert "oneDNN#6035): training NCHW instead" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["channels_last"] is False
    code, err = run_main_expect_exit(tiny_args(tiny_folder, tmp_path / "s", "--arch", "resnet18", "--channels-last"),
                                     capsys)
    assert code == 2 and "--channels-last: resnet18 at width 4 has 1x1 stride-2 convolutions on 4 channels" in err
    cfg = train.Config(arch="resnet18", width=16)
    train.avoid_cpu_1x1_fault(cfg, torch.device("cpu"), set(), 0)
    assert cfg.channels_last


def test_output_closed_early_is_one_line(tiny_folder, good_run):
    """`train.py --eval-only ... | head -1`: the reader goes away; one line, exit 141 as a shell's SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "train.py", "--eval-only", "--resume", str(good_run), "--data-dir",
                             tiny_folder, "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the child (still importing torch) has written anything
    err = proc.stderr.read()
    assert proc.wait() == 141 and "Traceback" not in err and "Exception ignored" not in err
    assert err.strip() == "train.py: output closed by the reader (broken pipe); stopped"


def test_checkpoint_of_another_architecture(tiny_folder, good_run, capsys):
    ckpt = torch.load(good_run / "last.pt", weights_only=True)
    ckpt["arch"] = "resnet32"
    torch.save(ckpt, good_run / "other.pt")
    code, err = run_main_expect_exit(["--eval-only", "--resume", str(good_run / "other.pt"),
                                      "--data-dir", tiny_folder, "--device", "cpu"], capsys)
    assert code == 2 and "do not fit resnet32" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_folder, tmp_path, monkeypatch, capsys):
    real = train.Loader.batches

    def poisoned(self, epoch=0, start=0):  # epoch 2's inputs turn to NaN, as a diverging run's would
        for x, y in real(self, epoch, start):
            yield (x * float("nan") if self.train and epoch == 1 else x), y

    monkeypatch.setattr(train.Loader, "batches", poisoned)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_folder, out, "--epochs", "3"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and "non-finite in epoch 2, steps 1-2" in err and "lower --lr" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len(metrics(out)) == 1


def test_huge_lr_stops_with_message(tiny_folder, tmp_path, capsys):
    code, err = run_main_expect_exit(tiny_args(tiny_folder, tmp_path / "r", "--lr", "1e30", "--warmup-epochs",
                                               "0"), capsys)
    assert code == 1 and "non-finite" in err and "epoch 1" in err


def start_training(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120.0) -> None:
    t = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.05)


def test_kill_9_then_resume_equals_uninterrupted_run(tiny_folder, tmp_path):
    args = ["--epochs", "3", "--save-every-steps", "2"]
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_folder, straight, *args))
    killed = tmp_path / "killed"
    proc = start_training(tiny_args(tiny_folder, killed, *args))
    wait_for(killed / "last.pt", proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 9, "lr"')  # a torn line, as a crash mid-write leaves
    train.main(["--resume", str(killed), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    assert untimed(metrics(killed)) == untimed(metrics(straight))
    assert (killed / "metrics.jsonl").read_text().count("\n") == 3
    assert_same_weights(weights(killed), weights(straight))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])  # a scheduler's stop; Slurm's warning
def test_a_stop_signal_leaves_resumable_checkpoint(tiny_folder, tmp_path, signum):
    out = tmp_path / "r"
    proc = start_training(tiny_args(tiny_folder, out, "--epochs", "8"))
    wait_for(out / "last.pt", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and "resume with: python train.py --resume" in err
    assert f"stopped by {signal.Signals(signum).name}" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] < 8
    s = train.main(["--resume", str(out), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    assert [r["epoch"] for r in metrics(out)] == list(range(1, 9)) and s["final_test_acc"] is not None


def test_out_pointing_at_a_file_is_one_line(tiny_folder, tmp_path, capsys):
    (tmp_path / "f").write_text("not a directory")
    code, err = run_main_expect_exit(tiny_args(tiny_folder, tmp_path / "f"), capsys)
    assert code == 2 and err == f"train.py: error: --out {tmp_path / 'f'} is a file, not a run directory"


def test_resume_refuses_typed_flags_that_differ_and_extends_epochs(tiny_folder, good_run, capsys):
    resume = ["--resume", str(good_run), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"]
    before = (good_run / "last.pt").read_bytes()
    code, err = run_main_expect_exit(resume + ["--lr", "0.05", "--arch", "resnet32", "--arch", "resnet20"], capsys)
    assert code == 2 and "--lr 0.05 (run: 0.1)" in err and "--arch" not in err  # resnet20 is the run's own arch
    code, err = run_main_expect_exit(resume + ["--epochs", "0"], capsys)
    assert code == 2 and "--epochs must be positive" in err
    code, err = run_main_expect_exit(resume + ["--epochs", "5", "--recipe", "fast"], capsys)
    assert code == 2 and "differ from it: --recipe fast (run: default). Only" in err  # the larger --epochs is fine
    assert (good_run / "last.pt").read_bytes() == before  # nothing touched
    summary = train.main(resume + ["--epochs", "3", "--channels-last"])  # --epochs grows; a process flag is free
    assert [r["epoch"] for r in metrics(good_run)] == [1, 2, 3] and summary["epochs"] == 3
    ckpt = torch.load(good_run / "last.pt", weights_only=True)
    assert ckpt["config"]["epochs"] == 3 and ckpt["epoch"] == 3
    # the schedule became that of a 3-epoch run: milestones at 1.5 and 2.25 epochs, so epoch 3 ends at lr x 0.01
    assert metrics(good_run)[-1]["lr"] == pytest.approx(0.1 * 0.01)
    with open(good_run / "config.json") as f:
        assert json.load(f)["config"]["epochs"] == 3


def test_gpu_trained_checkpoint_resumes_and_evaluates_on_cpu(tiny_folder, good_run):
    """--amp and --sync-bn are the process's, not the run's: a run trained with them on GPUs continues on a CPU."""
    ckpt = torch.load(good_run / "last.pt", weights_only=True)
    ckpt["config"].update(amp=True, sync_bn=True, device="cuda", compile=True)  # as a GPU run saves it
    torch.save(ckpt, good_run / "last.pt")
    res = train.main(["--eval-only", "--resume", str(good_run), "--data-dir", tiny_folder, "--device", "cpu"])
    assert res["test_acc"] == metrics(good_run)[-1]["test_acc"]
    summary = train.main(["--resume", str(good_run), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu",
                          "--epochs", "2"])
    assert summary["epochs"] == 2 and len(metrics(good_run)) == 2


def test_default_warmup_is_capped_for_short_runs():
    one = train.Config(epochs=1)
    assert one.warmup_length() == pytest.approx(0.2)  # not the whole run
    assert schedule.lr_factor(9, 100, one) == pytest.approx(0.5)  # the ramp over the first 20 steps of 100
    assert schedule.lr_factor(30, 100, one) == 1.0  # past the warm-up, before the first milestone (0.5 epochs)
    assert train.Config(epochs=50).warmup_length() == 1.0
    assert train.Config(epochs=1, warmup_epochs=1.0).warmup_length() == 1.0  # a typed value is honoured


def test_checkpoint_state_is_moved_to_the_cpu_whole():
    """to_cpu keeps the nesting of an optimizer state (dicts, lists, tuples, numbers) and moves every tensor; on a
    GPU host tests/test_gpu.py checks a real CUDA checkpoint loads without map_location."""
    state = {"state": {0: {"momentum_buffer": torch.ones(3)[::2]}}, "param_groups": [{"lr": 0.1, "params": [0]}],
             "pair": (torch.zeros(2), 5)}
    moved = runs.to_cpu(state)
    assert moved["param_groups"] == state["param_groups"] and isinstance(moved["pair"], tuple)
    assert torch.equal(moved["state"][0]["momentum_buffer"], torch.ones(2)) and moved["pair"][1] == 5
    assert all(t.device.type == "cpu" for t in (moved["state"][0]["momentum_buffer"], moved["pair"][0]))


@pytest.mark.parametrize("visible, local_rank, index", [(8, 3, 3), (1, 3, 0), (2, 3, None), (4, 0, 0)])
def test_each_process_drives_a_gpu_it_can_see(monkeypatch, visible, local_rank, index):
    """Local rank r drives GPU r where the process sees the node's GPUs, GPU 0 where a launcher shows each
    process only its own (CUDA_VISIBLE_DEVICES per process), and a one-line error otherwise."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if index is None:
        with pytest.raises(config.UserError, match=f"local rank 3 needs GPU 3, but this process sees {visible} GPUs"):
            config.resolve_device("cuda", local_rank)
    else:
        assert hardware.cuda_index(local_rank) == index
        assert config.resolve_device("cuda", local_rank) == torch.device("cuda", index)
