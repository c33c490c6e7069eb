"""Plain vs residual, reproduced: the paper's Figure 6, Table 6 and Figure 7 for CIFAR-10, with our own runs.

    python ablate.py                                  # plain/resnet 20 and 56 + plain18/resnet18, short CPU recipe
    python ablate.py --depths 20 32 44 56 110 --seeds 0 1 2
    python ablate.py --full                           # the paper's schedule (train.py --recipe paper)
    python ablate.py --epochs 5 --subset 2000 ...     # any other train.py flag passes through

Each run is a train.py run in <out>/<arch>/seed<k>/; finished runs are skipped and interrupted ones resumed, so
re-running the same command does no work twice. Writes <out>/ablation.png (Figure 6: training error dashed, test
error solid), ablation.md / ablation.csv (final errors, mean ± std over seeds, with the paper's Table 6 beside) and
responses.png (Figure 7: std of every 3x3 layer's response after BN, before the ReLU or the addition).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

import torch
from torch import nn

import train
from basic_block import BasicBlock
from config import parse_config
from data import load_cifar10, normalize
from plot_curves import read_metrics
from resnet import count_parameters, load_model, model_depth

PAPER_TABLE6 = {20: "8.75", 32: "7.51", 44: "7.17", 56: "6.97", 110: "6.43 (6.61 ± 0.16)"}  # test error %, ResNets
SHORT_RECIPE = ["--subset", "10000", "--epochs", "10"]  # CPU-affordable; the degradation shows early
PAPER_WARMUP_ITERS = 400  # 110-layer nets: lr 0.01 until training error < 80%, about 400 iterations (section 4.2)


@torch.no_grad()
def layer_responses(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Std of every 3x3 conv layer's output after its BN (stem, then bn1 and bn2 of each block), in layer order.

    As in the paper's Figure 7: taken before the ReLU or the addition; the model is put in eval mode.
    """
    bns = [model.bn1] + [bn for m in model.modules() if isinstance(m, BasicBlock) for bn in (m.bn1, m.bn2)]
    stds: list[float] = [0.0] * len(bns)
    hooks = [bn.register_forward_hook(lambda mod, inp, out, i=i: stds.__setitem__(i, out.float().std().item()))
             for i, bn in enumerate(bns)]
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return stds


def run_dir(out: str, arch: str, seed: int) -> str:
    return os.path.join(out, arch, f"seed{seed}")


def run_one(arch: str, seed: int, out: str, recipe: list[str], data_dir: str) -> None:
    """Train one cell of the grid: skip when finished, resume when interrupted."""
    d = run_dir(out, arch, seed)
    last = os.path.join(d, "last.pt")
    if os.path.exists(last):
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        if ckpt["epoch"] >= ckpt["config"]["epochs"]:
            print(f"[ablate] {arch} seed {seed}: done, skipped")
            return
        print(f"[ablate] {arch} seed {seed}: resuming from epoch {ckpt['epoch']}")
        train.main(["--resume", d, "--data-dir", data_dir, "--no-progress"])
        return
    extra = []
    if model_depth(arch) >= 110:  # the paper's warm-up for its 110-layer nets
        cfg = parse_config(["--arch", arch, *recipe])  # the run's own subset, split and batch size
        steps_per_epoch = ((cfg.subset or 50_000) - cfg.val_split) // cfg.batch_size
        warmup = min(PAPER_WARMUP_ITERS / steps_per_epoch, cfg.epochs)
        extra = ["--warmup", "constant", "--warmup-epochs", f"{warmup:.4f}"]
    print(f"[ablate] {arch} seed {seed}: training")
    train.main(["--arch", arch, "--seed", str(seed), "--out", d, "--data-dir", data_dir, "--no-progress",
                "--overwrite", *extra, *recipe])


def summarize(out: str, archs: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for arch in archs:
        runs = [read_metrics(run_dir(out, arch, s)) for s in seeds]
        train_err = [100 * (1 - r[-1]["train_acc"]) for r in runs]
        test_err = [100 * (1 - r[-1]["test_acc"]) for r in runs]
        wall = [sum(x["epoch_time_s"] for x in r) for r in runs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        depth = model_depth(arch)
        rows.append({"arch": arch, "depth": depth, "params": count_parameters(load_model(
            os.path.join(run_dir(out, arch, seeds[0]), "last.pt"))), "seeds": len(seeds), "epochs": len(runs[0]),
            "train_err": statistics.mean(train_err), "train_err_std": sd(train_err),
            "test_err": statistics.mean(test_err), "test_err_std": sd(test_err),
            "wall_min": statistics.mean(wall) / 60,
            "paper_test_err": PAPER_TABLE6.get(depth, "") if arch.startswith("resnet") else ""})
    return rows


def write_tables(rows: list[dict], out: str) -> None:
    with open(os.path.join(out, "ablation.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| arch | depth | params | final train error % | final test error % | wall time (min/run) | "
             "paper test error % (Table 6, original CIFAR-10, 64k iters) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pm = lambda m, s: f"{m:.2f} ± {s:.2f}" if r["seeds"] > 1 else f"{m:.2f}"
        lines.append(f"| {r['arch']} | {r['depth']} | {r['params']:,} | {pm(r['train_err'], r['train_err_std'])} "
                     f"| {pm(r['test_err'], r['test_err_std'])} | {r['wall_min']:.1f} | {r['paper_test_err'] or '-'} |")
    lines.append(f"\n{rows[0]['seeds']} seed(s), {rows[0]['epochs']} epochs. Train error = 1 - running accuracy "
                 "over the last epoch's augmented batches; test error = final epoch, full test set.")
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_errors(out: str, archs: list[str], seeds: list[int]) -> str:
    """Figure 6: plain nets left, residual right, one colour per depth, training error dashed, test solid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    depths = sorted({model_depth(a) for a in archs})
    for arch in archs:
        ax = axes[0] if arch.startswith("plain") else axes[1]
        runs = [read_metrics(run_dir(out, arch, s)) for s in seeds]
        n = min(len(r) for r in runs)
        mean = lambda key: [100 * (1 - statistics.mean(r[i][key] for r in runs)) for i in range(n)]
        c = f"C{depths.index(model_depth(arch)) % 10}"
        ep = list(range(1, n + 1))
        ax.plot(ep, mean("train_acc"), "--", color=c, alpha=0.8)
        ax.plot(ep, mean("test_acc"), "-", color=c, label=f"{arch}")
    for ax, name in zip(axes, ("plain", "ResNet")):
        ax.set(title=f"{name} nets (dashed: training error, solid: test error)", xlabel="epoch", ylabel="error (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    path = os.path.join(out, "ablation.png")
    fig.savefig(path, dpi=120)
    return path


def plot_responses(out: str, archs: list[str], seed: int, data_dir: str, n_images: int = 1000) -> str:
    """Figure 7: std of layer responses by layer index (top) and sorted by magnitude (bottom)."""
    from matplotlib.figure import Figure

    data = load_cifar10(data_dir)
    x = normalize(data.test_x[:n_images])
    fig = Figure(figsize=(10, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    depths = sorted({model_depth(a) for a in archs})
    for arch in archs:
        stds = layer_responses(load_model(os.path.join(run_dir(out, arch, seed), "last.pt")), x)
        c, style = f"C{depths.index(model_depth(arch)) % 10}", "--" if arch.startswith("plain") else "-"
        top.plot(range(1, len(stds) + 1), stds, style, color=c, label=arch)
        bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, color=c, label=arch)
    top.set(title=f"std of 3x3 layer responses (after BN, before ReLU/addition), {n_images} test images",
            xlabel="layer index (original order)", ylabel="std")
    bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    path = os.path.join(out, "responses.png")
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py.")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="CIFAR depths (6n+2): plain and resnet")
    p.add_argument("--archs", nargs="+", default=None,
                   help="explicit list of nets (overrides --depths; default adds plain18 and resnet18)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; tables report mean ± std")
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="ablation directory")
    p.add_argument("--data-dir", default="./data", help="CIFAR-10 directory (as train.py)")
    p.add_argument("--full", action="store_true", help="the paper's recipe (train.py --recipe paper): 182 epochs")
    p.add_argument("--response-images", type=int, default=1000, help="test images for the Figure 7 responses")
    args, recipe = p.parse_known_args(argv)
    archs = args.archs or [f"{k}{d}" for d in args.depths for k in ("plain", "resnet")] + ["plain18", "resnet18"]
    for d in args.depths:
        if (d - 2) % 6 or d < 8:
            p.exit(2, f"ablate.py: error: CIFAR depths are 6n+2 (20, 32, 44, 56, 110), got {d}\n")
    recipe = (["--recipe", "paper"] if args.full else SHORT_RECIPE) + recipe  # explicit flags come last and win
    os.makedirs(args.out, exist_ok=True)
    grid = {"recipe": recipe}
    grid_file = os.path.join(args.out, "grid.json")
    if os.path.exists(grid_file):
        with open(grid_file) as f:
            if json.load(f) != grid:
                p.exit(2, f"ablate.py: error: {args.out} holds runs made with other training flags; pass another "
                          "--out\n")
    with open(grid_file, "w") as f:
        json.dump(grid, f)
    for arch in archs:
        for seed in args.seeds:
            run_one(arch, seed, args.out, recipe, args.data_dir)
    rows = summarize(args.out, archs, args.seeds)
    write_tables(rows, args.out)
    plot_errors(args.out, archs, args.seeds)
    plot_responses(args.out, archs, args.seeds[0], args.data_dir, args.response_images)
    with open(os.path.join(args.out, "ablation.md")) as f:
        print(f.read())
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
