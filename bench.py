"""Training speed, side by side in one process: our loop against the classic CIFAR DataLoader loop.

    python bench.py --data-dir data --json benchmarks/cpu.json      # full run (minutes on a 2-core CPU)
    python bench.py --quick                                         # seconds; synthetic data
    python bench.py --classic-train runs/classic --data-dir data    # the classic loop trained end to end (30 epochs)

Measures, on the same model, batch size and data:
  - training images/s (median of timed windows after warm-up) of train.py's own train_one_epoch on the uint8
    on-device Loader, and of the classic loop (DataLoader, 2 workers, per-image PIL RandomCrop/Flip/ToTensor/
    Normalize, fp32 NCHW), written out below as the baseline; their ratio. The loops alternate in --rounds rounds
    (a shared host drifts) and the speed-up is the median of the per-round ratios;
  - the measured matmul peak (fp32, and bf16 where the device has native bf16) and our model-FLOPs utilisation:
    training FLOPs per image (torch.utils.flop_counter, forward + backward) x images/s / peak;
  - peak memory (process max RSS on CPU, torch.cuda.max_memory_allocated on GPU);
  - data start-up: seconds to the first batch from a cold image folder (decode) and from the uint8 cache;
  - scaling tables: images/s and MFU against width, depth and batch size.
Figures are printed as a table and written as JSON (--json). Targets are read off these figures, never asserted.
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

from data import CIFAR10_MEAN, CIFAR10_STD, DataError, Loader, load_cifar10
from resnet import build_model
from train import append_metrics, format_row, new_totals, train_one_epoch


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


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


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


def sgd(model: nn.Module, lr: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def ours_images_per_s(x, y, arch, width, batch, device, warmup, steps, windows, channels_last=True,
                      compile=False) -> float:
    """train.py's train_one_epoch over the uint8 on-device Loader (crop + flip + normalise in batches)."""
    model = build_model(arch, width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, crit = sgd(model), nn.CrossEntropyLoss(label_smoothing=0.1)
    if compile:
        model = torch.compile(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    epoch = [0]

    def run_steps(n: int) -> None:
        need = n * batch
        idx = torch.arange(need) % len(x)  # an "epoch" of exactly n steps
        loader = Loader(x[idx], y[idx], batch, device, train=True, seed=epoch[0], channels_last=channels_last)
        train_one_epoch(model, loader, opt, sched, crit, epoch[0], new_totals(device), log_every=10**9)
        epoch[0] += 1

    return timed_windows(run_steps, batch, device, warmup, steps, windows)


class ClassicDataset(torch.utils.data.Dataset):
    """The popular repos' data path: a PIL image per sample through torchvision transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, train: bool = True):
        import torchvision.transforms as T

        self.images = x.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3) uint8, as torchvision's CIFAR10 holds them
        self.labels = y.tolist()
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        self.transform = T.Compose([*augment, T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt, crit) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic training step: fp32, NCHW, as written in every CIFAR tutorial. Returns (loss, logits)."""
    opt.zero_grad()
    logits = model(x)
    loss = crit(logits, y)
    loss.backward()
    opt.step()
    return loss, logits


def classic_images_per_s(x, y, arch, width, batch, device, warmup, steps, windows, workers=2) -> float:
    model = build_model(arch, width=width).to(device)
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


def classic_train(data_dir: str, out: str, arch: str = "resnet18", width: int = 16, epochs: int = 30,
                  workers: int = 2, seed: int = 0) -> dict:
    """The classic loop end to end, as the popular repos write it: the time-to-accuracy baseline.

    SGD lr 0.1 Nesterov, momentum 0.9, wd 5e-4, label smoothing 0.1, batch 128, lr /10 after 50% and 75% of the epochs
    (15 and 22 of 30); DataLoader workers with per-image PIL transforms; fp32 NCHW; a .item() per step. Writes
    out/metrics.jsonl in train.py's format (epoch_time_s = train + test), so plot_curves.py draws both side by side.
    """
    torch.manual_seed(seed)
    d = load_cifar10(data_dir, download=False)
    os.makedirs(out, exist_ok=True)
    train_loader = torch.utils.data.DataLoader(ClassicDataset(d.train_x, d.train_y), batch_size=128, shuffle=True,
                                               num_workers=workers)
    test_set = ClassicDataset(d.test_x, d.test_y, train=False)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=100, num_workers=workers)
    model = build_model(arch, width=width)
    opt = sgd(model, lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2, epochs * 3 // 4], gamma=0.1)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"loop": "classic", "arch": arch, "width": width, "epochs": epochs, "workers": workers,
                   "seed": seed, "data_dir": data_dir, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "milestones": sched.milestones and sorted(sched.milestones)}, f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    open(metrics_path, "w").close()
    row = {}
    for epoch in range(epochs):
        t0 = time.time()
        model.train()
        loss_sum = correct = seen = 0
        for xb, yb in train_loader:
            loss, logits = reference_step(model, xb, yb, opt, crit)
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
        train_time = time.time() - t0
        lr = opt.param_groups[0]["lr"]
        sched.step()
        model.eval()
        test_loss = test_correct = 0.0
        with torch.no_grad():
            for xb, yb in test_loader:
                logits = model(xb)
                test_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
                test_correct += (logits.argmax(1) == yb).sum().item()
        n = len(test_set)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_loss": test_loss / n, "test_acc": test_correct / n, "epoch_time_s": round(time.time() - t0, 3),
               "images_per_s": round(seen / train_time, 1)}
        append_metrics(metrics_path, row)
        print(format_row(row), flush=True)
    return row


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
        out[key] = round(time.perf_counter() - t, 2)
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Benchmark our training loop against the classic DataLoader loop.")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 directory (default: synthetic images, with a note)")
    p.add_argument("--arch", default="resnet18", help="model for the side-by-side comparison")
    p.add_argument("--width", type=int, default=16, help="its width")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of the comparison")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--quick", action="store_true", help="a small version that runs in seconds (for tests)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the side-by-side comparison")
    p.add_argument("--compile", action="store_true", help="also time our loop under torch.compile (compiles first)")
    p.add_argument("--classic-train", metavar="OUT", default=None,
                   help="instead: train the classic loop end to end (--epochs, the 30-epoch baseline) into OUT")
    p.add_argument("--epochs", type=int, default=30, help="epochs of --classic-train")
    a = p.parse_args(argv)
    if a.classic_train:
        if not a.data_dir:
            p.exit(2, "bench.py: error: --classic-train needs --data-dir\n")
        return classic_train(a.data_dir, a.classic_train, a.arch, a.width, a.epochs)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    warmup, steps, windows = (1, 2, 1) if a.quick else (5, a.steps, a.windows)
    batch = 32 if a.quick else a.batch_size
    notes = []
    if a.data_dir:
        d = load_cifar10(a.data_dir, download=False)
        x, y = d.train_x[: 4096 if a.quick else 25_600], d.train_y[: 4096 if a.quick else 25_600]
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (4096, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(4096) % 10
        notes.append("synthetic uint8 images (no --data-dir): speed figures only")
    if a.quick:
        notes.append("--quick: tiny windows and batch 32, not comparable figures")

    n = 512 if a.quick else (4096 if device.type == "cpu" else 8192)
    peak32 = matmul_peak(device, torch.float32, n, 3 if a.quick else 10)
    peak16 = matmul_peak(device, torch.bfloat16, n, 3 if a.quick else 10) if native_bf16(device) else None
    flops = train_flops_per_image(a.arch, a.width, device)
    run = dict(device=device, warmup=warmup, steps=steps, windows=windows)
    # Interleaved rounds: a shared host drifts by 10-20% over minutes, so each round times every loop back to back
    # and the speed-up is the median of the per-round ratios.
    rounds = {"ours": [], "ours_nchw": [], "classic": []}
    for i in range(1 if a.quick else a.rounds):
        rounds["ours"].append(ours_images_per_s(x, y, a.arch, a.width, batch, **run))
        rounds["ours_nchw"].append(ours_images_per_s(x, y, a.arch, a.width, batch, channels_last=False, **run))
        if i == 0:
            mem_ours = peak_memory_mb(device)  # the high-water mark of our loops, before the classic one runs
        rounds["classic"].append(classic_images_per_s(x, y, a.arch, a.width, batch, **run))
    ours, ours_nchw, classic = (statistics.median(rounds[k]) for k in ("ours", "ours_nchw", "classic"))
    speedup = statistics.median(o / c for o, c in zip(rounds["ours"], rounds["classic"]))
    ours_compiled = ours_images_per_s(x, y, a.arch, a.width, batch, compile=True, **run) if a.compile else None
    peak32 = max(peak32, matmul_peak(device, torch.float32, n, 3 if a.quick else 10))  # again: the host drifts

    scaling_run = dict(run, steps=max(2, steps // 4), windows=min(windows, 3))  # shorter windows: bigger nets

    def row(arch: str, width: int, bs: int) -> dict:
        f = train_flops_per_image(arch, width, device)
        ips = ours_images_per_s(x, y, arch, width, bs, **scaling_run)
        return {"arch": arch, "width": width, "batch_size": bs, "gflop_per_image": round(f / 1e9, 4),
                "images_per_s": round(ips, 1), "mfu_fp32": round(f * ips / peak32, 4)}

    widths, depths, batches = ((16,), ("resnet20",), (32,)) if a.quick else \
        ((16, 32, 64), ("resnet20", "resnet56", "resnet110"), (64, 128, 256, 512))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python bench.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": {"arch": a.arch, "width": a.width, "batch_size": batch, "train_gflop_per_image": round(flops / 1e9, 4)},
        "matmul_peak_tflops": {"fp32": round(peak32 / 1e12, 4), "bf16": peak16 and round(peak16 / 1e12, 4)},
        "ours_images_per_s": round(ours, 1), "ours_nchw_images_per_s": round(ours_nchw, 1),
        "ours_compiled_images_per_s": ours_compiled and round(ours_compiled, 1),
        "classic_images_per_s": round(classic, 1), "speedup_vs_classic": round(speedup, 2),
        "rounds": {k: [round(v, 1) for v in vals] for k, vals in rounds.items()},
        "mfu_fp32": round(flops * ours / peak32, 4), "peak_memory_mb": round(mem_ours, 1),
        "startup": startup_seconds(a.data_dir),
        "scaling": {"width": [row("resnet18", w, batch) for w in widths],
                    "depth": [row(dep, 16, batch) for dep in depths],
                    "batch_size": [row(a.arch, a.width, bs) for bs in batches]},
        "notes": notes,
    }
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
    print(f"model {m['arch']} width {m['width']}, batch {m['batch_size']}: {m['train_gflop_per_image']} GFLOP "
          f"per training image; matmul peak fp32 {r['matmul_peak_tflops']['fp32']} TFLOP/s, "
          f"bf16 {r['matmul_peak_tflops']['bf16']}")
    print(f"{'loop':<38}{'images/s (median)':>18}   rounds")
    for key, name in (("ours", "ours (uint8 on device, channels_last)"), ("ours_nchw", "ours, NCHW"),
                      ("classic", "classic (DataLoader + PIL, NCHW)")):
        print(f"{name:<38}{r[key + '_images_per_s']:>18}   {r['rounds'][key]}")
    if r["ours_compiled_images_per_s"]:
        print(f"{'ours + torch.compile (one round)':<38}{r['ours_compiled_images_per_s']:>18}")
    print(f"speed-up {r['speedup_vs_classic']}x (median of per-round ratios), MFU (fp32) {100 * r['mfu_fp32']:.1f}%, "
          f"peak memory {r['peak_memory_mb']} MB, start-up {r['startup']}")
    for name, rows in r["scaling"].items():
        print(f"\nscaling by {name}:\n{'arch':<10}{'width':>6}{'batch':>7}{'GFLOP/img':>11}{'img/s':>9}{'MFU':>8}")
        for x in rows:
            print(f"{x['arch']:<10}{x['width']:>6}{x['batch_size']:>7}{x['gflop_per_image']:>11}"
                  f"{x['images_per_s']:>9}{100 * x['mfu_fp32']:>7.1f}%")
    for note in r["notes"]:
        print("note:", note)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # --classic-train keeps the epochs it has logged
        print("bench.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
