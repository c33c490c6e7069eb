"""The figures of a run: loss and accuracy curves from metrics.jsonl, and pictures of what a trained model
gets wrong (confusion.png, mistakes.png), which train.py writes at the end of training and with --eval-only.

    python plot_curves.py runs/resnet18-... [runs/other ...] [-o curves.png] [--x epoch|time]

Train figures (dashed) are running means over each epoch's augmented batches; test (solid) and validation
(dotted) are measured after the epoch. Works on the partial log of a job that is still running.
"""

from __future__ import annotations

import os
import sys
from itertools import accumulate

import torch

from config import Parser, UserError, run_script
from runs import read_metrics


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None, x: str = "epoch",
              title: str | None = None) -> str:
    """Draw loss (left) and accuracy (right) of every run, one colour each, and save to `out`.

    x="epoch" plots against epochs; x="time" against cumulative training wall-clock seconds.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        if not rows:
            continue
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        xs = list(accumulate(r["epoch_time_s"] for r in rows)) if x == "time" else [r["epoch"] for r in rows]
        c = colors[i % len(colors)]
        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
            for split, style in (("train", "--"), ("test", "-"), ("val", ":")):
                name = f"{split}_{key}"  # test and val are missing from the epochs --eval-every skips
                pts = [(t, r[name] * scale) for t, r in zip(xs, rows) if name in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=c, marker="." if len(pts) < 30 else None,
                            label=f"{label} {split}")
    xlabel = "epoch" if x == "epoch" else "training wall-clock time (s)"
    ax_loss.set(title="Cross-entropy loss", xlabel=xlabel, ylabel="loss")
    ax_acc.set(title="Accuracy", xlabel=xlabel, ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "train (dashed: running mean over augmented batches), test (solid)", fontsize=10)
    fig.savefig(out, dpi=120)
    return out


# ----------------------------------------------------------------------------------------- a trained model


@torch.no_grad()
def predictions(model, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, its softmax probability) for raw uint8 images (N, 3, H, W), in fp32 eval mode."""
    model.eval()
    device = next(model.parameters()).device
    preds, probs = [], []
    for i in range(0, len(images), batch):
        logits = model(model.normalize(images[i:i + batch].to(device))).float()  # (b, num_classes)
        p = torch.softmax(logits, 1)
        prob, pred = p.max(1)
        preds.append(pred.cpu())
        probs.append(prob.cpu())
    return torch.cat(preds), torch.cat(probs)


def confusion_matrix(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[t, p]: test images of class t predicted as p."""
    counts = torch.bincount(true * num_classes + pred, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def plot_confusion(counts: torch.Tensor, classes: list[str], path: str, title: str = "") -> str:
    """The matrix normalised by true class (each row sums to 100%), class names on both axes, and each class's
    accuracy (the diagonal) beside it."""
    from matplotlib.figure import Figure

    k = len(classes)
    rates = 100 * counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    fig = Figure(figsize=(9.5, 7.5) if k <= 20 else (16, 14), layout="constrained")
    ax, side = fig.subplots(1, 2, width_ratios=[5, 1])
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"{title}confusion, % of each true class ({int(counts.sum())} test images)")
    ax.set_xticklabels(classes, rotation=45 if k <= 20 else 90, ha="right", fontsize=9 if k <= 20 else 5)
    ax.set_yticklabels(classes, fontsize=9 if k <= 20 else 5)
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if round(rates[t, p].item()) >= 1:
                    ax.text(p, t, f"{rates[t, p]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if rates[t, p] > 50 else "black")
    accuracy = rates.diagonal().numpy()
    side.barh(range(k), accuracy, color="C0")
    side.set(ylim=ax.get_ylim(), yticks=[], xlim=(0, 100), xlabel="accuracy %", title="per class")
    if k <= 20:
        for t, a in enumerate(accuracy):
            side.text(2, t, f"{a:.1f}", va="center", fontsize=8, color="white" if a > 15 else "black")
    fig.colorbar(im, ax=ax, shrink=0.6)
    fig.savefig(path, dpi=110)
    return path


def plot_mistakes(images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, prob: torch.Tensor,
                  classes: list[str], path: str, n: int = 24) -> list[int]:
    """The n test images the model gets most confidently wrong, each titled "true → predicted (p)". Returns
    their indices."""
    from matplotlib.figure import Figure

    wrong = (pred != true).nonzero().flatten()
    worst = wrong[prob[wrong].argsort(descending=True)][:n].tolist()
    cols = 6
    rows = max(1, -(-len(worst) // cols))
    fig = Figure(figsize=(2.1 * cols, 2.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, worst):
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{classes[true[i]]} → {classes[pred[i]]} ({prob[i]:.2f})", fontsize=8)
    fig.suptitle(f"the {len(worst)} most confident mistakes of {len(wrong)} "
                 "(true → predicted (probability))", fontsize=10)
    fig.savefig(path, dpi=110)
    return worst


def plot_model_pictures(model, images: torch.Tensor, labels: torch.Tensor, classes: list[str], out_dir: str,
                        title: str = "") -> torch.Tensor:
    """confusion.png and mistakes.png of a trained model on a test set (raw uint8 images) in out_dir. Returns
    the confusion counts."""
    pred, prob = predictions(model, images)
    counts = confusion_matrix(labels, pred, len(classes))
    plot_confusion(counts, classes, os.path.join(out_dir, "confusion.png"), title)
    plot_mistakes(images, labels, pred, prob, classes, os.path.join(out_dir, "mistakes.png"))
    return counts


def plot_command(argv: list[str] | None) -> str:
    p = Parser(prog="plot_curves.py", description="Plot loss/accuracy curves of train.py runs.")
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--out", default=None, help="output image (default: the first run's curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run")
    p.add_argument("--x", choices=("epoch", "time"), default="epoch", help="x axis: epochs or seconds")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            raise UserError(f"{run} has no metrics.jsonl")
        if not read_metrics(run):
            raise UserError(f"{run}/metrics.jsonl has no finished epoch yet")
    if args.labels and len(args.labels) != len(args.runs):
        raise UserError("give one --labels entry per run")
    out = args.out or os.path.join(args.runs[0], "curves.png")
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise UserError(f"-o {out}: folder {folder} does not exist")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()  # {"png": "Portable Network Graphics", ...}
    if os.path.splitext(out)[1].lstrip(".").lower() not in formats:
        raise UserError(f"-o {out}: name an image file ending in .png, .pdf, .svg or another of "
                        f"{', '.join(sorted(formats))}")
    try:
        plot_runs(args.runs, out, args.labels, args.x, args.title)
    except PermissionError as e:
        raise UserError(f"-o {out}: {e.strerror}") from None
    print(out)
    return out


def main(argv: list[str] | None = None) -> str:
    return run_script("plot_curves.py", plot_command, argv, (UserError,))


if __name__ == "__main__":
    main(sys.argv[1:])
