"""One command that proves the GPU path on a CUDA host, and writes what it saw to a report.

    python gpu_check.py --data-dir data --out gpu-check      # on a CUDA host: a few minutes on one GPU
    python gpu_check.py --data-dir data --out gpu-check      # on a CPU: the same steps at toy size, and says so

Steps: the GPU tests (tests/test_gpu.py); a per-step host-sync check (torch.cuda.set_sync_debug_mode: a training
step that makes the CPU wait for the GPU is an error); two real epochs of the default recipe, with --amp and with
--amp --compile, and of the GPU recipe uncompiled, compiled and compiled with CUDA graphs (images/s and seconds of
the second epoch, compile seconds, peak memory, test accuracy); our sync-BN through a one-rank process group (NCCL
on CUDA) against BatchNorm2d. Writes <out>/report.json and <out>/report.txt.
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
from config import Parser, UserError, parse_config, resolve_device, run_script, validate_runtime
from data import Cifar, DataError, load_cifar
from distributed import SyncBatchNorm
from hardware import amp_dtype, compile_unavailable, machine_name
from runs import read_metrics

ROOT = os.path.dirname(os.path.abspath(__file__))


def gpu_tests() -> dict:
    """tests/test_gpu.py in a fresh process: its closing line (all skipped without CUDA)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                       cwd=ROOT, capture_output=True, text=True)
    return {"exit_code": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}


def host_syncs(device: torch.device, data: Cifar, batch: int = 128, steps: int = 6) -> dict:
    """Training steps as train.py takes them (its loader, model, fused SGD, lr schedule, loss and epoch sums;
    --amp in the dtype train.py picks) with torch.cuda.set_sync_debug_mode("error") from the second step on: an
    operation that makes the host wait for the GPU raises. The epoch's start (its augmentation plan's copy to
    the GPU) and the first step (cuDNN's autotuning, allocations) run before the mode is set."""
    if device.type != "cuda":
        return {"checked": False, "why": "no CUDA: host syncs are a GPU matter"}
    cfg = parse_config(["--subset", str(batch * steps), "--batch-size", str(batch), "--out", "unused",
                        *([] if amp_dtype(device)[0] is None else ["--amp"])])
    validate_runtime(cfg, device, 1)  # --amp's dtype, by train.py's rule
    loader = train.make_loaders(cfg, data, device, 0, 1).train
    state = train.new_state(cfg, data, loader, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def error_from_step_2(step: int) -> None:
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        train.train_one_epoch(state.model, loader, state.optimizer, state.schedule, criterion, state.sums, 0,
                              amp=state.autocast(), scaler=state.scaler, after_step=error_from_step_2)
        return {"checked": True, "steps": len(loader) - 1, "syncs": 0}
    except RuntimeError as e:
        return {"checked": True, "steps": len(loader) - 1, "syncs": 1, "error": str(e).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def recipe_variants(device: torch.device, toy: bool) -> list[tuple[str, list[str]]]:
    """(name, train.py flags): the default recipe as it is, with --amp and with --amp --compile where they can
    run; the GPU recipe (--amp and --compile, which it turns off where the device cannot use them) without and
    with its compile, and compiled with CUDA graphs; two epochs each (one warm-up epoch for the GPU recipe).
    toy: one epoch of a 4-wide resnet20 on a few images, the GPU recipe at batch 64."""
    size = ["--subset", "TOY", "--epochs", "1", "--width", "4", "--arch", "resnet20"] if toy else ["--epochs", "2"]
    gpu = ["--recipe", "gpu", "--warmup-epochs", "0.5" if toy else "1", *(["--batch-size", "64"] if toy else [])]
    variants = [("default", size)]
    if amp_dtype(device)[0] is not None:  # train.py's rule: bf16 where the device has it, else fp16 on CUDA
        variants.append(("amp", [*size, "--amp"]))
        if not compile_unavailable(device) and not toy:
            variants.append(("amp-compile", [*size, "--amp", "--compile"]))
    if not toy:
        variants.append(("gpu-eager", [*size, *gpu, "--no-compile"]))
    variants.append(("gpu", [*size, *gpu]))
    if not toy and not compile_unavailable(device):
        variants.append(("gpu-graphs", [*size, *gpu, "--compile-mode", "reduce-overhead"]))
    return variants


def recipe_runs(device: torch.device, data_dir: str, out: str, toy_images: int | None) -> list[dict]:
    """recipe_variants' runs: images/s and seconds of the last epoch, compile seconds, test accuracy, peak
    memory. toy_images: the toy size's number of images."""
    rows = []
    for name, flags in recipe_variants(device, toy_images is not None):
        flags = [str(toy_images) if f == "TOY" else f for f in flags]
        run = os.path.join(out, name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary = train.main(["--data-dir", data_dir, "--out", run, "--overwrite", "--no-progress",
                              "--device", device.type, *flags])
        logged = read_metrics(run)
        rows.append({"run": name, "flags": " ".join(flags), "epochs": summary["epochs"],
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
             "run          epoch s  images/s  compile s  test acc  peak MB  train.py flags"]
    lines += [f"{r['run']:<11}  {r['epoch_s']:>7}  {r['images_per_s']:>8}  {r['compile_s'] or '-':>9}  "
              f"{r['test_acc']:>8.4f}  {r['peak_memory_mb'] or '-':>7}  {r['flags']}" for r in report["runs"]]
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data", help="the data (as train.py)")
    p.add_argument("--out", default="gpu-check", help="where the runs and the report go")
    args = p.parse_args(argv)
    device = resolve_device("auto")
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
