"""docs/train.sbatch under a real single-node Slurm (Debian's slurm-wlm and munge, started here): a job requeued by
hand, and a job warned by SIGUSR1 that checkpoints and requeues itself, each finish with every epoch's row once.

Run alone: python -m pytest -q tests/test_slurm.py (as root: the daemons run as root, in a temporary folder)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, metrics, tiny_args

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
CONF = """ClusterName=local
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
SlurmctldPort={port}
SlurmdPort={port1}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_munge() -> None:
    """munged with the package's key (or a new one), where none runs yet."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    os.makedirs("/run/munge", exist_ok=True)
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):
        os.makedirs(os.path.dirname(key), exist_ok=True)
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    subprocess.run(["munged", "--force"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster of this machine; yields the environment its commands need."""
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing or os.geteuid() != 0:
        why = f"Slurm is not installed ({', '.join(missing)})" if missing else "the daemons need root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}: .ci/run installs slurm-wlm and munge")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=host, d=d, cpus=os.cpu_count(), port=free_port(), port1=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    start_munge()
    daemons = [subprocess.Popen([name, "-D", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    try:
        t = time.time()
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                           text=True).stdout:
            assert time.time() - t < 60, (d / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        for p in daemons:
            p.terminate()
        for p in daemons:
            p.wait(timeout=30)


def job(env, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_until(test, what: str, timeout: float = 300) -> None:
    t = time.time()
    while not test():
        assert time.time() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def submit(env, tiny_folder: str, out, tmp_path) -> str:
    args = tiny_args(tiny_folder, out, "--epochs", "12", "--save-every-steps", "2", "--dist-timeout", "2")
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/slurm-%j.out",
                        "--export=ALL,NPROC=2,RDZV_PORT=" + str(free_port()), "docs/train.sbatch", *args], env=env,
                       capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def finish(env, job_id: str, out, tmp_path) -> str:
    """Waits for the job's end; returns its output. Every epoch's row once, and one restart."""
    def ended() -> bool:
        info = job(env, job_id)
        if info.get("Reason") == "BeginTime":  # a requeued job is held two minutes before it may start again
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True)
        return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")

    wait_until(ended, "the job's end")
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    info = job(env, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-3000:])
    assert [r["epoch"] for r in metrics(out)] == list(range(1, 13)), log[-3000:]
    assert not re.search(rf'File "{re.escape(ROOT)}/\w+\.py"', log), log[-3000:]  # none of ours (torchrun's own, yes)
    return log


def test_a_job_requeued_by_hand_goes_on_where_it_stopped(slurm, tiny_folder, tmp_path):
    out = tmp_path / "run"
    job_id = submit(slurm, tiny_folder, out, tmp_path)
    wait_until(lambda: (out / "last.pt").exists(), "the first checkpoint")
    subprocess.run(["scontrol", "requeue", job_id], env=slurm, check=True)
    log = finish(slurm, job_id, out, tmp_path)
    assert "stopped by SIGTERM" in log  # Slurm stopped the job, which saved its checkpoint


def test_a_job_warned_by_sigusr1_checkpoints_and_requeues_itself(slurm, tiny_folder, tmp_path):
    out = tmp_path / "run"
    job_id = submit(slurm, tiny_folder, out, tmp_path)
    wait_until(lambda: (out / "last.pt").exists(), "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True)  # as --signal=B:USR1@90
    log = finish(slurm, job_id, out, tmp_path)
    assert "stopped by SIGUSR1 (rank 0)" in log and f"Slurm job {job_id} requeued" in log, log[-3000:]
