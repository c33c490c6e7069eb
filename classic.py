"""The classic CIFAR training loop, as the popular repositories write it: the baseline bench.py measures against.

    python classic.py runs/classic-30ep --data-dir data      # 30 epochs end to end: the time-to-accuracy baseline

A DataLoader with 2 worker processes doing per-image PIL RandomCrop/RandomHorizontalFlip/ToTensor/Normalize, fp32,
NCHW, SGD lr 0.1 Nesterov (momentum 0.9, wd 5e-4), label smoothing 0.1, batch 128, lr /10 after 50% and 75% of the
epochs, a .item() per step. Same model (resnet.py) and data (data.py) as ours; only the loop differs.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

from config import Parser, UserError, resolve_device, run_script
from data import CIFAR10_MEAN, CIFAR10_STD, DataError, load_cifar10
from resnet import MODEL_NAMES, build_model
from hardware import machine_name
from runs import append_metrics, format_row


def sgd(model: nn.Module, lr: float = 0.01) -> torch.optim.Optimizer:
    """The popular repos' optimiser: SGD, Nesterov momentum 0.9, weight decay 5e-4 on every parameter."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


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


def classic_train(data_dir: str, out: str, arch: str = "resnet18", width: int = 16, epochs: int = 30,
                  workers: int = 2, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """The classic loop end to end, as the popular repos write it: the time-to-accuracy baseline.

    SGD lr 0.1 Nesterov, momentum 0.9, wd 5e-4, label smoothing 0.1, batch 128, lr /10 after 50% and 75% of the epochs
    (15 and 22 of 30); DataLoader workers with per-image PIL transforms; fp32 NCHW; a .item() per step. Writes
    out/metrics.jsonl in train.py's format (epoch_time_s = train + test), so plot_curves.py draws both side by side.
    On CUDA: pinned host batches copied without blocking and cuDNN autotuning, as those repos do on a GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    torch.manual_seed(seed)
    d = load_cifar10(data_dir, download=False)
    os.makedirs(out, exist_ok=True)
    train_loader = torch.utils.data.DataLoader(ClassicDataset(d.train_x, d.train_y), batch_size=128, shuffle=True,
                                               **loader_kw)
    test_set = ClassicDataset(d.test_x, d.test_y, train=False)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=100, **loader_kw)
    model = build_model(arch, width=width).to(device)
    opt = sgd(model, lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2, epochs * 3 // 4], gamma=0.1)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"loop": "classic", "arch": arch, "width": width, "epochs": epochs, "workers": workers,
                   "seed": seed, "data_dir": data_dir, "device": machine_name(device),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "milestones": sched.milestones and sorted(sched.milestones)}, f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    open(metrics_path, "w").close()
    row = {}
    for epoch in range(epochs):
        t0 = time.time()
        model.train()
        loss_sum = correct = seen = 0
        for xb, yb in train_loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
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
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
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


def main(argv: list[str] | None = None) -> dict:
    p = Parser(prog="classic.py", description="Train with the classic CIFAR loop (the time-to-accuracy baseline).")
    p.add_argument("out", help="run directory: config.json and metrics.jsonl in train.py's format")
    p.add_argument("--data-dir", required=True, help="CIFAR-10 directory (image folders or cifar-10-batches-py)")
    p.add_argument("--arch", default="resnet18", choices=MODEL_NAMES, help="model (resnet.py)")
    p.add_argument("--width", type=int, default=16, help="its width")
    p.add_argument("--epochs", type=int, default=30, help="epochs (lr /10 after 50%% and 75%% of them)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if there is one")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.width < 1:
        p.error("--epochs and --width must be at least 1")
    return classic_train(a.data_dir, a.out, a.arch, a.width, a.epochs, device=resolve_device(a.device))


if __name__ == "__main__":
    run_script("classic.py", main, sys.argv[1:], (DataError, UserError))
