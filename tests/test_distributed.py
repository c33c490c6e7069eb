"""torchrun on CPU with 2 gloo processes: data loaded once per node and downloaded once per job, setup errors on
every rank, a worker killed and the job restarted by torchrun, a signal to one rank, BN statistics that evaluation
and last.pt share, sync-BN equal to one process on the global batch (and as accurate as BatchNorm2d under bf16),
the warm-up's switch agreed by every rank."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import torch

import train
from conftest import ROOT, assert_same_weights, metrics, tiny_args, untimed, weights, write_image_folder
from runs import load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Counts which ranks decode the image folder (the slow part of a cold start) and records the process group's
# timeout, then runs train.py.
COUNTING_LAUNCHER = """
import os, sys
sys.path.insert(0, {root!r})
import data
real = data._read_image_folder
def counted(d):
    with open({log!r}, "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return real(d)
data._read_image_folder = counted
import torch.distributed as dist
real_init = dist.init_process_group
def init(*args, timeout=None, **kw):
    with open({log!r} + ".timeout", "a") as f:
        f.write(str(timeout.total_seconds()) + "\\n")
    return real_init(*args, timeout=timeout, **kw)
dist.init_process_group = init
import train
train.main(sys.argv[1:])
"""


def torchrun(args: list[str], script: str = "train.py", timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def test_two_processes_decode_once_and_evaluate_what_they_save(tmp_path):
    data_dir = str(tmp_path / "data")
    write_image_folder(data_dir)  # no cache yet: a cold start
    log, launcher = tmp_path / "decoded.txt", tmp_path / "launch.py"
    launcher.write_text(COUNTING_LAUNCHER.format(root=ROOT, log=str(log)))
    out = tmp_path / "ddp"
    r = torchrun(tiny_args(data_dir, out, "--dist-timeout", "45"), script=str(launcher))
    assert r.returncode == 0, r.stderr[-3000:]
    assert log.read_text().split() == ["0"]  # rank 1 read the cache rank 0 wrote
    assert (tmp_path / "decoded.txt.timeout").read_text().split() == ["2700.0", "2700.0"]  # --dist-timeout, minutes
    assert r.stdout.count("final test accuracy") == 1  # only rank 0 prints
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # e.g. DDP's FutureWarning for an argument's old name
    note = "train.py: note: --batch-size 32 over 2 processes is 16 images each, and BatchNorm normalises over"
    assert r.stderr.count(note) == 1, r.stderr[-3000:]  # rank 0 says it once
    rows = metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert sorted(p for p in os.listdir(out) if p.endswith(".pt")) == ["last.pt"]
    assert load_model(str(out / "last.pt")).fc.out_features == 10  # single-process, no "module." keys
    res = train.main(["--eval-only", "--resume", str(out / "last.pt"), "--data-dir", data_dir, "--device", "cpu"])
    # every test image counted once, and with the BN statistics last.pt holds (rank 0's): the same numbers
    assert res["test_acc"] == rows[-1]["test_acc"]
    assert abs(res["test_loss"] - rows[-1]["test_loss"]) < 1e-6


# Two processes that stand for two nodes (each its node's local rank 0) sharing one empty data directory; the
# download is faked (writes a tiny torchvision-format CIFAR-10) and logs the rank that ran it.
TWO_NODES_LAUNCHER = """
import os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
import torchvision.datasets.cifar as cifar
from conftest import write_cifar_batches
def download(self):
    if self._check_integrity():  # as torchvision's: present already
        return
    with open({log!r}, "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    write_cifar_batches(self.root)
cifar.CIFAR10.download = download
cifar.CIFAR10._check_integrity = lambda self: os.path.isdir(os.path.join(self.root, "cifar-10-batches-py"))
cifar.check_integrity = lambda *a, **k: True  # the tiny copy's md5 sums are not CIFAR-10's
import train
train.main(sys.argv[1:])
"""


def test_one_process_of_the_job_downloads_into_a_shared_data_dir(tmp_path):
    data_dir, log, launcher = tmp_path / "shared-data", tmp_path / "downloads.txt", tmp_path / "launch.py"
    launcher.write_text(TWO_NODES_LAUNCHER.format(root=ROOT, log=str(log)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(launcher), *tiny_args(str(data_dir), tmp_path / "run",
                                       "--epochs", "1", "--dist-timeout", "2")], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert log.read_text().split() == ["0"]  # rank 1 waited, then read what rank 0 wrote
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1]


def test_setup_errors_reach_every_rank(tiny_folder, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "something").write_text("keep me")
    for args, message in ((tiny_args(tiny_folder, out), "already exists"),
                          (tiny_args(tiny_folder, tmp_path / "x", "--resume", str(tmp_path / "nope")),
                           "does not exist")):
        t = time.time()
        r = torchrun(args, timeout=120)
        assert r.returncode != 0 and time.time() - t < 100  # no rank waits for a timeout
        # each rank writes its one line (two writes at once may land on one line of the merged stream)
        assert r.stderr.count("train.py: error:") == 2 and r.stderr.count(message) == 2, r.stderr[-3000:]
    assert (out / "something").read_text() == "keep me"


# Rank 1 stands for a node that does not share the run directory's filesystem: it cannot see the directory.
UNSHARED_LAUNCHER = """
import os, sys
sys.path.insert(0, {root!r})
import train
if os.environ["RANK"] == "1":
    real = os.path.isdir
    train.os.path.isdir = lambda p: False if os.path.abspath(p) == {out!r} else real(p)
train.main(sys.argv[1:])
"""


def test_a_run_directory_not_shared_by_every_node_is_one_line_on_each(tiny_folder, tmp_path):
    out, launcher = tmp_path / "run", tmp_path / "launch.py"
    launcher.write_text(UNSHARED_LAUNCHER.format(root=ROOT, out=str(out)))
    r = torchrun(tiny_args(tiny_folder, out, "--resume", "auto"), script=str(launcher), timeout=120)
    assert r.returncode != 0 and 'File "' + ROOT + '/train.py"' not in r.stderr, r.stderr[-3000:]  # torchrun's own
    assert r.stderr.count("train.py: error: rank 1 cannot see the run directory") == 2, r.stderr[-3000:]
    assert r.stderr.count("filesystem every node shares") == 2


def rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers."""
    pids = {}
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env:
            pids[int(env[b"RANK"])] = int(child)
    return pids


def test_sigterm_to_one_rank_stops_both_cleanly(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *tiny_args(tiny_folder, out, "--epochs", "50")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while not (out / "last.pt").exists():
        assert proc.poll() is None and time.time() - t < 120, proc.communicate()
        time.sleep(0.1)
    os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)  # only rank 1, as a pre-empted node would be
    _, err = proc.communicate(timeout=120)
    for r in (0, 1):  # each rank its own line (two writes at once may share a line of the merged stream)
        assert err.count(f"train.py: stopped by SIGTERM (rank {r}); checkpoint saved, resume with: "
                         f"python train.py --resume {out}") == 1, err[-3000:]
    assert "exitcode  : 143" in err, err  # each rank exited 128 + SIGTERM
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] < 50


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_goes_on_exactly(tiny_folder, tmp_path):
    """The same command on the first launch and on torchrun's restart: --resume auto."""
    args = ["--epochs", "3", "--save-every-steps", "2", "--dist-timeout", "1"]
    unbroken = tmp_path / "unbroken"
    assert torchrun(tiny_args(tiny_folder, unbroken, *args)).returncode == 0
    out = tmp_path / "restarted"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--max-restarts=1", "train.py",
                             *tiny_args(tiny_folder, out, "--resume", "auto", *args)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while not (out / "last.pt").exists():
        assert proc.poll() is None and time.time() - t < 120, proc.communicate()
        time.sleep(0.05)
    os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)  # no handler, no checkpoint: a node that died
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # the rank that lost its peer says so in one line
    assert "did not form" not in err, err[-3000:]  # the restart found its own peers, not the dead one's address
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    assert untimed(metrics(out)) == untimed(metrics(unbroken))
    assert_same_weights(weights(out), weights(unbroken))


def test_sync_bn_on_two_processes_equals_one_process(tiny_folder, tmp_path):
    args = ("--epochs", "1", "--subset", "80", "--batch-size", "40", "--warmup-epochs", "0")  # two steps
    train.main(tiny_args(tiny_folder, tmp_path / "one", *args))
    for name, extra in (("sync", ["--sync-bn"]), ("local", [])):
        r = torchrun(tiny_args(tiny_folder, tmp_path / name, *args, *extra))
        assert r.returncode == 0, r.stderr[-3000:]

    def max_diff(name: str) -> float:
        a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a if "num_batches" not in k)

    # the same global batch: with sync-BN the two processes take one process's steps, up to summation order (a
    # few steps more and that order alone moves tiny nets by 1e-3); without it each normalises its half batch
    assert max_diff("sync") < 1e-4 and max_diff("local") > 100 * max_diff("sync"), (max_diff("sync"),
                                                                                       max_diff("local"))




# Logs, on every rank, the warm-up's state after each step of --warmup until-error, then runs train.py.
WARMUP_LAUNCHER = """
import os, sys
sys.path.insert(0, {root!r})
import schedule, train
real = schedule.ErrorWarmup.add
def logged(self, logits, y, step, steps, global_step):
    real(self, logits, y, step, steps, global_step)
    with open({log!r} + os.environ["RANK"], "a") as f:
        f.write(f"{{global_step}} {{self.end}}\\n")
schedule.ErrorWarmup.add = logged
train.main(sys.argv[1:])
"""


def test_error_keyed_warmup_ends_at_the_same_step_on_every_rank(tiny_folder, tmp_path):
    """The window's error is summed over both ranks (each sees other images): both switch at one step, the one
    a single process on the same global batch switches at (sync-BN: the same predictions)."""
    args = ("--epochs", "3", "--subset", "80", "--batch-size", "40", "--sync-bn", "--warmup", "until-error",
            "--warmup-error", "0.9", "--warmup-epochs", "2.5")  # two steps an epoch, 5 at the longest
    log = tmp_path / "rank"
    launcher = tmp_path / "launch.py"
    launcher.write_text(WARMUP_LAUNCHER.format(root=ROOT, log=str(log)))
    r = torchrun(tiny_args(tiny_folder, tmp_path / "ddp", *args), script=str(launcher))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [(tmp_path / f"rank{k}").read_text().splitlines() for k in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 6
    train.main(tiny_args(tiny_folder, tmp_path / "one", *[a for a in args if a != "--sync-bn"]))
    ends = [metrics(tmp_path / d)[-1]["warmup_end_step"] for d in ("ddp", "one")]
    assert ends[0] == ends[1] < 5 and ranks[0][-1] == f"6 {ends[0]}", (ends, ranks[0])  # ended by the error


def test_sync_bn_under_bf16_is_as_accurate_as_batchnorm(monkeypatch, tmp_path):
    """Our SyncBatchNorm on bf16 activations (what --amp feeds it), its sync path on a one-process gloo group,
    against an fp64 reference: output and input gradient no worse than BatchNorm2d's on the same input, also
    where a channel's mean is large against its spread (where an affine step in bf16 cancels)."""
    assert_sync_bn_as_accurate_as_batchnorm(torch.device("cpu"), "gloo", monkeypatch, tmp_path)


def assert_sync_bn_as_accurate_as_batchnorm(device: torch.device, backend: str, monkeypatch, tmp_path) -> None:
    """Max abs error of output and input gradient against an fp64 BatchNorm2d, of BatchNorm2d and of our
    SyncBatchNorm (its sync path, on a one-process group of `backend`) on the same bf16 input: ours within 1.5x."""
    import torch.distributed as dist

    from distributed import SyncBatchNorm

    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # take the sync path on one process
        g = torch.Generator().manual_seed(0)
        mean = torch.tensor([0.0, 3.0, 30.0, -60.0]).view(1, 4, 1, 1)
        x64 = (torch.randn(16, 4, 8, 8, generator=g, dtype=torch.float64) + mean)
        x64 = x64.to(torch.bfloat16).double().to(device)  # exactly representable in bf16
        weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
        bias = torch.randn(4, generator=g, dtype=torch.float64)
        upstream = torch.randn(16, 4, 8, 8, generator=g, dtype=torch.float64).to(device)

        def run(bn: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            bn = bn.to(device)
            with torch.no_grad():
                bn.weight.copy_(weight), bn.bias.copy_(bias)
            x = x64.to(dtype).clone().requires_grad_()  # a leaf of its own
            out = bn.train()(x)
            (out.double() * upstream).sum().backward()
            return out.double(), x.grad.double()

        ref_out, ref_grad = run(torch.nn.BatchNorm2d(4).double(), torch.float64)
        errors = {}
        for name, bn in (("batchnorm", torch.nn.BatchNorm2d(4)), ("sync", SyncBatchNorm(4))):
            out, grad = run(bn, torch.bfloat16)
            errors[name] = ((out - ref_out).abs().max().item(), (grad - ref_grad).abs().max().item())
    finally:
        dist.destroy_process_group()
    (out_err, grad_err), (bn_out_err, bn_grad_err) = errors["sync"], errors["batchnorm"]
    assert out_err <= 1.5 * bn_out_err and grad_err <= 1.5 * bn_grad_err, errors
