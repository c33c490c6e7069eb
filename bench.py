"""Training speed, side by side in one process: our loop against the classic CIFAR DataLoader loop.

    python bench.py --data-dir data --json benchmarks/cpu.json      # full run (minutes on a 2-core CPU)
    python bench.py --quick                                         # seconds; synthetic data

Measures, on the same model, batch size and data:
  - training images/s (median of timed windows after warm-up) of train.py's own train_one_epoch on the uint8
    on-device Loader, and of the classic loop (DataLoader, 2 workers, per-image PIL RandomCrop/Flip/ToTensor/
    Normalize, fp32 NCHW; classic.py), and with --compile of ours under torch.compile; their ratios. The loops
    alternate in --rounds rounds (a shared host drifts) and a speed-up is the median of the per-round ratios;
  - the measured matmul peak (fp32, and bf16 where the device has the bf16 arithmetic --amp needs; there our
    loop is also timed under --amp) and our model-FLOPs utilisation: training FLOPs per image
    (torch.utils.flop_counter, forward + backward) x images/s / peak; and where the step's time goes
    (torch.profiler: convolutions, BatchNorm, the rest), with the MFU of the convolutions alone;
  - peak memory (process max RSS on CPU, torch.cuda.max_memory_allocated on GPU);
  - data start-up: seconds to the first batch from a cold image folder (decode) and from the uint8 cache;
  - scaling tables: images/s and MFU against width, depth and batch size.
Figures are printed as a table and written as JSON (--json). Targets are read off these figures, never asserted.
Every loop runs with train.py's backend settings (hardware.configure_backends): cuDNN autotuning on a GPU, freed
memory kept in the process on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from classic import ClassicDataset, reference_step, sgd
from config import Parser, UserError, resolve_device, run_script
from data import DataError, Loader, load_cifar, load_cifar10
from hardware import (bf16_unavailable, channels_last_fault, compile_unavailable, configure_backends, has_tf32,
                      machine_name)
from resnet import MODEL_NAMES, build_model
from train import EpochSums, train_one_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops_per_image(arch: str, width: int, device: torch.device, batch: int = 8) -> float:
    """Forward + backward FLOPs of one training image, counted by torch.utils.flop_counter."""
    model = build_model(arch, width=width).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as fc:
        nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device=device)).backward()
    return fc.get_total_flops() / batch


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of a large square matmul, its fastest repetition: the machine's practical ceiling."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def timed_windows(run_steps, batch: int, device: torch.device, warmup: int, steps: int, windows: int) -> float:
    """Median images/s over `windows` windows of `steps` steps each, after `warmup` steps."""
    run_steps(warmup)
    sync(device)
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        run_steps(steps)
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def ours_images_per_s(x, y, arch, width, batch, device, warmup, steps, windows, channels_last=True,
                      compile=False, amp=False, profile=False) -> float | dict:
    """train.py's train_one_epoch over the uint8 on-device Loader (crop + flip + normalise in batches).

    The loaders are built (and their images copied to the device) before any timing. amp: bf16 autocast, as
    train.py --amp. profile=True: instead, where `steps` steps spend their time (see time_breakdown).
    """
    model = build_model(arch, width=width, num_classes=int(y.max()) + 1).to(device)
    channels_last = channels_last and not channels_last_fault(model, device)  # NCHW there, as train.py
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, crit = sgd(model), nn.CrossEntropyLoss(label_smoothing=0.1)
    if compile:
        model = torch.compile(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    epoch = [0]

    # an "epoch" of exactly n steps for each length timed; a new epoch number, new crops, each call
    loaders = {n: Loader(x[torch.arange(n * batch) % len(x)], y[torch.arange(n * batch) % len(y)], batch, device,
                         train=True, channels_last=channels_last) for n in {warmup, steps}}

    def run_steps(n: int) -> None:
        train_one_epoch(model, loaders[n], opt, sched, crit, EpochSums(device), epoch[0],
                        amp=torch.bfloat16 if amp else None)
        epoch[0] += 1

    if profile:
        return time_breakdown(run_steps, warmup, steps, device)
    return timed_windows(run_steps, batch, device, warmup, steps, windows)


def time_breakdown(run_steps, warmup: int, steps: int, device: torch.device) -> dict:
    """Wall-clock seconds of `steps` training steps, and the seconds of them spent in convolutions (forward and
    backward) and in BatchNorm: torch.profiler's self time of the aten ops (their kernels' time on a GPU)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" line on a CPU-only host
    from torch.profiler import ProfilerActivity, profile

    run_steps(warmup)
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t = time.perf_counter()
        run_steps(steps)
        sync(device)
        wall = time.perf_counter() - t
    ops = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
           for e in prof.key_averages() if e.key.startswith("aten::")}
    return {"wall_s": wall, "conv_s": sum(v for k, v in ops.items() if "conv" in k),
            "batchnorm_s": sum(v for k, v in ops.items() if "batch_norm" in k)}


def classic_images_per_s(x, y, arch, width, batch, device, warmup, steps, windows, workers=2) -> float:
    model = build_model(arch, width=width, num_classes=int(y.max()) + 1).to(device)
    opt, crit = sgd(model), nn.CrossEntropyLoss(label_smoothing=0.1)
    loader = torch.utils.data.DataLoader(ClassicDataset(x, y), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    it = iter(())

    def run_steps(n: int) -> None:
        nonlocal it
        model.train()
        for _ in range(n):
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                xb, yb = next(it)
            reference_step(model, xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), opt, crit)

    return timed_windows(run_steps, batch, device, warmup, steps, windows)


def startup_seconds(data_dir: str | None) -> dict:
    """Seconds to the first batch: decoding a cold image folder, and loading the uint8 cache."""
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "train")):
        return {"cold_image_folder_s": None, "uint8_cache_s": None,
                "note": "needs --data-dir with train/ and test/ image folders"}
    out = {}
    for key, use_cache in (("cold_image_folder_s", False), ("uint8_cache_s", True)):
        t = time.perf_counter()
        d = load_cifar10(data_dir, download=False, use_cache=use_cache)
        next(Loader(d.train_x, d.train_y, 128, "cpu", train=True).batches())
        out[key] = round(time.perf_counter() - t, 3)  # to the ms: a tiny cache loads in a few ms
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def get_args_parser() -> Parser:
    p = Parser(prog="bench.py", description="Benchmark our training loop against the classic DataLoader loop.")
    p.add_argument("--data-dir", default=None, help="data directory (default: synthetic images, with a note)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10", help="as train.py --dataset")
    p.add_argument("--arch", default="resnet18", choices=MODEL_NAMES, help="model for the side-by-side comparison")
    p.add_argument("--width", type=int, default=16, help="its width")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of the comparison")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--quick", action="store_true", help="a small version that runs in seconds (for tests)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the side-by-side comparison")
    p.add_argument("--compile", action="store_true", help="also time our loop under torch.compile (compiles first)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """The flags, checked (a mistake is one line, exit 2), and the device they name."""
    p = get_args_parser()
    a = p.parse_args(argv)
    overridden = [f"--{n.replace('_', '-')}" for n in ("batch_size", "windows", "steps", "rounds")
                  if getattr(a, n) != p.get_default(n)]
    if a.quick and overridden:
        p.error(f"--quick sets its own tiny batch, windows and rounds; {', '.join(overridden)} would change nothing")
    if min(a.width, a.batch_size, a.windows, a.steps, a.rounds) < 1:
        p.error("--width, --batch-size, --windows, --steps and --rounds must be at least 1")
    try:
        device = resolve_device(a.device)
    except UserError as e:
        p.error(str(e))
    if a.compile and (why := compile_unavailable(device)):
        p.error(f"--compile: {why}")
    return a, device


def bench_images(a: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training images the loops run on, and notes on what the figures mean (also sets the backends)."""
    notes = []
    if a.data_dir:
        d = load_cifar(a.data_dir, a.dataset, download=False)
        x, y = d.train_x[: 4096 if a.quick else 25_600], d.train_y[: 4096 if a.quick else 25_600]
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (4096, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(4096) % 10
        notes.append("synthetic uint8 images (no --data-dir): speed figures only")
    if a.quick:
        notes.append("--quick: tiny windows and batch 32, not comparable figures")
    if configure_backends(device, deterministic=False):  # as train.py, process-wide: the classic loop's too
        notes.append("freed memory kept in the process (as train.py on the CPU) for every loop timed here")
    if why := channels_last_fault(build_model(a.arch, width=a.width), device):
        notes.append(f"{a.arch} at width {a.width} has {why}: the 'ours' loop runs NCHW too, as train.py")
    return x, y, notes


def time_rounds(x, y, a: argparse.Namespace, batch: int, run: dict, amp: bool) -> tuple[dict, float]:
    """Images/s of every loop in interleaved rounds: a shared host drifts by 10-20% over minutes, so each round
    times every loop back to back (a speed-up is then the median of the per-round ratios). Also the peak
    memory of our loops, before the classic one runs."""
    rounds = {"ours": [], "ours_nchw": [], "classic": []} | ({"ours_compiled": []} if a.compile else {}) | \
        ({"ours_amp": []} if amp else {})
    if run["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the matmul peak set the high-water mark
    for i in range(1 if a.quick else a.rounds):
        rounds["ours"].append(ours_images_per_s(x, y, a.arch, a.width, batch, **run))
        if "ours_amp" in rounds:
            rounds["ours_amp"].append(ours_images_per_s(x, y, a.arch, a.width, batch, amp=True, **run))
        rounds["ours_nchw"].append(ours_images_per_s(x, y, a.arch, a.width, batch, channels_last=False, **run))
        if i == 0:
            mem_ours = peak_memory_mb(run["device"])
        rounds["classic"].append(classic_images_per_s(x, y, a.arch, a.width, batch, **run))
        if a.compile:  # a fresh model each round: after the first, inductor's cache makes the compile short
            rounds["ours_compiled"].append(ours_images_per_s(x, y, a.arch, a.width, batch, compile=True, **run))
    return rounds, mem_ours


def scaling(x, y, a: argparse.Namespace, batch: int, run: dict, peak32: float) -> dict:
    """Our loop's images/s and MFU as the width, the depth and the batch grow (shorter windows: bigger nets)."""
    scaling_run = dict(run, steps=max(2, run["steps"] // 4), windows=min(run["windows"], 3))

    def row(arch: str, width: int, bs: int) -> dict:
        f = train_flops_per_image(arch, width, run["device"])
        ips = ours_images_per_s(x, y, arch, width, bs, **scaling_run)
        return {"arch": arch, "width": width, "batch_size": bs, "gflop_per_image": round(f / 1e9, 4),
                "images_per_s": round(ips, 1), "mfu_fp32": round(f * ips / peak32, 4)}

    widths, depths, batches = ((16,), ("resnet20",), (32,)) if a.quick else \
        ((16, 32, 64), ("resnet20", "resnet56", "resnet110"), (64, 128, 256, 512))
    return {"width": [row("resnet18", w, batch) for w in widths], "depth": [row(d, 16, batch) for d in depths],
            "batch_size": [row(a.arch, a.width, bs) for bs in batches]}


def main(argv: list[str] | None = None) -> dict:
    a, device = parse_args(argv)
    x, y, notes = bench_images(a, device)
    batch = 32 if a.quick else a.batch_size
    run = dict(device=device, warmup=1 if a.quick else 5, steps=2 if a.quick else a.steps,
               windows=1 if a.quick else a.windows)
    n, reps = (512, 3) if a.quick else (4096 if device.type == "cpu" else 8192, 10)
    # PyTorch runs fp32 convolutions on TF32 tensor cores by default (cudnn.allow_tf32) but fp32 matmuls not: the
    # fp32 peak is measured the way the convolutions run, so MFU compares like with like (and JSON says which).
    tf32, tf32_before = has_tf32(device) and torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:  # for the matmul peaks only: what runs after bench.py in this process keeps its own setting
        peak32 = matmul_peak(device, torch.float32, n, reps)
        peak16 = None if bf16_unavailable(device) else matmul_peak(device, torch.bfloat16, n, reps)
        rounds, mem_ours = time_rounds(x, y, a, batch, run, amp=peak16 is not None)
        where = ours_images_per_s(x, y, a.arch, a.width, batch, profile=True, **run)
        peak32 = max(peak32, matmul_peak(device, torch.float32, n, reps))  # again: the host drifts
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    flops, med = train_flops_per_image(a.arch, a.width, device), {k: statistics.median(v) for k, v in rounds.items()}
    speedup = {k: round(statistics.median(o / c for o, c in zip(rounds[k], rounds["classic"])), 2)
               for k in rounds if k != "classic"}  # median of the per-round ratios
    steps = run["steps"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python bench.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"device": machine_name(device), "cpu_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": {"arch": a.arch, "width": a.width, "batch_size": batch,
                  "train_gflop_per_image": round(flops / 1e9, 4)},
        "matmul_peak_tflops": {"fp32": round(peak32 / 1e12, 4), "bf16": peak16 and round(peak16 / 1e12, 4),
                               "fp32_on_tf32_cores": tf32},
        **{f"{k}_images_per_s": round(med[k], 1) if k in med else None
           for k in ("ours", "ours_nchw", "classic", "ours_compiled", "ours_amp")},
        "speedup_vs_classic": speedup["ours"], "speedup_vs_classic_by_loop": speedup,
        "rounds": {k: [round(v, 1) for v in vals] for k, vals in rounds.items()},
        "mfu_fp32": round(flops * med["ours"] / peak32, 4), "peak_memory_mb": round(mem_ours, 1),
        # the ceiling: the FLOPs counted are the convolutions' (and the 0.004% of the final linear layer)
        "time_breakdown": {"steps": steps, "conv_share": round(where["conv_s"] / where["wall_s"], 3),
                           "batchnorm_share": round(where["batchnorm_s"] / where["wall_s"], 3),
                           "conv_only_mfu_fp32": round(flops * steps * batch / where["conv_s"] / peak32, 4)},
        "startup": startup_seconds(a.data_dir), "scaling": scaling(x, y, a, batch, run, peak32), "notes": notes,
    }
    t = result["time_breakdown"]  # how close the whole step comes to the convolutions' own speed
    t["of_conv_only_limit"] = round(result["mfu_fp32"] / t["conv_only_mfu_fp32"], 3)
    print_report(result)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_report(r: dict) -> None:
    m = r["model"]
    print(f"{r['date']}  {r['machine']['device']}, {r['machine']['cpu_cores']} cores, torch {r['machine']['torch']}")
    print(f"command: {r['command']}")
    peak = r["matmul_peak_tflops"]
    print(f"model {m['arch']} width {m['width']}, batch {m['batch_size']}: {m['train_gflop_per_image']} GFLOP "
          f"per training image; matmul peak fp32{' (TF32, as the convolutions)' * peak['fp32_on_tf32_cores']} "
          f"{peak['fp32']} TFLOP/s, bf16 {peak['bf16']}")
    print(f"{'loop':<38}{'images/s (median)':>18}{'speed-up':>10}   rounds")
    for key, name in (("ours", "ours (uint8 on device, channels_last)"), ("ours_nchw", "ours, NCHW"),
                      ("classic", "classic (DataLoader + PIL, NCHW)"), ("ours_compiled", "ours + torch.compile"),
                      ("ours_amp", "ours + bf16 autocast (--amp)")):
        if key in r["rounds"]:
            ratio = r["speedup_vs_classic_by_loop"].get(key, "")
            speed = r[key + "_images_per_s"]
            print(f"{name:<38}{speed:>18}{ratio and f'{ratio}x':>10}   {r['rounds'][key]}")
    t = r["time_breakdown"]
    print(f"speed-up {r['speedup_vs_classic']}x (median of per-round ratios), MFU (fp32) {100 * r['mfu_fp32']:.1f}%, "
          f"peak memory {r['peak_memory_mb']} MB, start-up {r['startup']}")
    rest = 1 - t["conv_share"] - t["batchnorm_share"]
    print(f"where {t['steps']} steps of ours spend their time (torch.profiler): convolutions "
          f"{100 * t['conv_share']:.0f}%, BatchNorm {100 * t['batchnorm_share']:.0f}%, the rest {100 * rest:.0f}%; "
          f"the convolutions alone run at {100 * t['conv_only_mfu_fp32']:.1f}% of the matmul peak (the MFU if "
          f"nothing else took time); the whole step reaches {100 * t['of_conv_only_limit']:.1f}% of that limit")
    for name, rows in r["scaling"].items():
        print(f"\nscaling by {name}:\n{'arch':<10}{'width':>6}{'batch':>7}{'GFLOP/img':>11}{'img/s':>9}{'MFU':>8}")
        for x in rows:
            print(f"{x['arch']:<10}{x['width']:>6}{x['batch_size']:>7}{x['gflop_per_image']:>11}"
                  f"{x['images_per_s']:>9}{100 * x['mfu_fp32']:>7.1f}%")
    for note in r["notes"]:
        print("note:", note)


if __name__ == "__main__":
    run_script("bench.py", main, sys.argv[1:], (DataError,))
