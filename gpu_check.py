"""One command that proves the GPU path on a CUDA host, and writes what it saw to a report.

    python gpu_check.py --data-dir data --out gpu-check      # on a CUDA host: a few minutes on one GPU
    python gpu_check.py --data-dir data --out gpu-check      # on a CPU: the same steps at toy size, and says so

Steps: the GPU tests (tests/test_gpu.py); a per-step host-sync check (torch.cuda.set_sync_debug_mode: a training
step that makes the CPU wait for the GPU is an error); real epochs of the default recipe with and without --amp
and --compile (images/s, seconds per epoch, peak memory, final test accuracy); our sync-BN through a one-rank
process group (NCCL on CUDA) against BatchNorm2d. Writes <out>/report.json and <out>/report.txt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import train
from config import Parser, UserError, run_script
from data import Cifar, DataError, Loader, load_cifar
from distributed import SyncBatchNorm
from hardware import bf16_unavailable, compile_unavailable, machine_name
from resnet import build_model
from runs import read_metrics

ROOT = os.path.dirname(os.path.abspath(__file__))


def gpu_tests() -> dict:
    """tests/test_gpu.py in a fresh process: its closing line (all skipped without CUDA)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                       cwd=ROOT, capture_output=True, text=True)
    return {"exit_code": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}


def host_syncs(device: torch.device, data: Cifar) -> dict:
    """Training steps under torch.cuda.set_sync_debug_mode("error"): any operation that makes the host wait
    for the GPU raises. The first step (cuDNN's autotuning, allocations) runs before the mode is set."""
    if device.type != "cuda":
        return {"checked": False, "why": "no CUDA: host syncs are a GPU matter"}
    loader = Loader(data.train_x[:128 * 6], data.train_y[:128 * 6], 128, device, train=True, channels_last=True)
    model = build_model("resnet18").to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched, crit = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), nn.CrossEntropyLoss(label_smoothing=0.1)
    sums = train.EpochSums(device)
    train.train_one_epoch(model, Loader(loader.x[:128], loader.y[:128], 128, device, train=True,
                                        channels_last=True), opt, sched, crit, sums, 0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        train.train_one_epoch(model, loader, opt, sched, crit, sums, 1, amp=not bf16_unavailable(device))
        torch.cuda.set_sync_debug_mode("default")
        return {"checked": True, "steps": len(loader), "syncs": 0}
    except RuntimeError as e:
        torch.cuda.set_sync_debug_mode("default")
        return {"checked": True, "steps": len(loader), "syncs": 1, "error": str(e).splitlines()[0]}


def recipe_runs(device: torch.device, data_dir: str, out: str, toy_images: int | None) -> list[dict]:
    """A few epochs of the default recipe, then with --amp and with --compile where they can run; toy_images:
    one epoch of a 4-wide resnet20 on that many images instead."""
    toy = toy_images is not None
    size = ["--subset", str(toy_images), "--epochs", "1", "--width", "4", "--arch", "resnet20"] if toy \
        else ["--epochs", "2"]
    variants = [("default", [])]
    if not bf16_unavailable(device):
        variants.append(("amp", ["--amp"]))
    if not compile_unavailable(device) and not toy:
        variants.append(("compile", ["--compile"]))
    rows = []
    for name, flags in variants:
        run = os.path.join(out, name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary = train.main(["--data-dir", data_dir, "--out", run, "--overwrite", "--no-progress",
                              "--device", device.type, *size, *flags])
        logged = read_metrics(run)
        rows.append({"run": name, "flags": " ".join(flags) or "(none)", "epochs": summary["epochs"],
                     "epoch_s": logged[-1]["epoch_time_s"], "images_per_s": logged[-1]["images_per_s"],
                     "compile_s": logged[0].get("compile_s"), "test_acc": summary["final_test_acc"],
                     "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                     if device.type == "cuda" else None})
    return rows


def sync_bn(device: torch.device) -> dict:
    """Our SyncBatchNorm's sync path on a one-rank group (NCCL on CUDA, gloo on a CPU) against BatchNorm2d."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group(backend, init_method=f"file://{d}/pg", rank=0, world_size=1)
        real = dist.get_world_size
        dist.get_world_size = lambda group=None: 2  # the sync path, on one process
        try:
            x = torch.randn(32, 16, 8, 8, device=device) * 3 + 5
            ours, ref = SyncBatchNorm(16).to(device).train(), nn.BatchNorm2d(16).to(device).train()
            diff = (ours(x) - ref(x)).abs().max().item()
        finally:
            dist.get_world_size = real
            dist.destroy_process_group()
    return {"backend": backend, "max_abs_diff_vs_batchnorm": diff, "ok": diff < 1e-4}


def write_report(report: dict, out: str) -> str:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"{report['date']}  {report['machine']}, torch {report['torch']}, CUDA {report['cuda']}",
             report["mode"], f"GPU tests: {report['gpu_tests']['summary']}",
             f"host syncs: {report['host_syncs']}", f"sync-BN: {report['sync_bn']}",
             "run       flags      epoch s  images/s  compile s  test acc  peak MB"]
    lines += [f"{r['run']:<9} {r['flags']:<10} {r['epoch_s']:>7}  {r['images_per_s']:>8}  {r['compile_s'] or '-':>9}  "
              f"{r['test_acc']:.4f}  {r['peak_memory_mb'] or '-':>7}" for r in report["runs"]]
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data", help="the data (as train.py)")
    p.add_argument("--out", default="gpu-check", help="where the runs and the report go")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = device.type != "cuda"
    os.makedirs(args.out, exist_ok=True)
    data = load_cifar(args.data_dir)  # a missing data dir is one line now, not after the tests
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_name(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "mode": "no CUDA here: the same steps at toy size, a check of this script "
              "only" if toy else "CUDA: full size", "gpu_tests": gpu_tests(),
              "host_syncs": host_syncs(device, data), "sync_bn": sync_bn(device),
              "runs": recipe_runs(device, args.data_dir, args.out, min(512, len(data.train_x)) if toy else None)}
    print(write_report(report, args.out))
    return report


if __name__ == "__main__":
    run_script("gpu_check.py", main, sys.argv[1:], (UserError, DataError))
