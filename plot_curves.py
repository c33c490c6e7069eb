"""Loss and accuracy curves from one or more run directories' metrics.jsonl.

    python plot_curves.py runs/resnet18-... [runs/other ...] [-o curves.png] [--x epoch|time]

Train figures (dashed) are running means over each epoch's augmented batches; test (solid) and validation (dotted)
are measured after the epoch. Works on the partial log of a job that is still running.
"""

from __future__ import annotations

import argparse
import os
import sys

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
        if x == "time":
            xs, t = [], 0.0
            for r in rows:
                t += r["epoch_time_s"]
                xs.append(t)
        else:
            xs = [r["epoch"] for r in rows]
        c = colors[i % len(colors)]
        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
            for split, style in (("train", "--"), ("test", "-"), ("val", ":")):
                if f"{split}_{key}" in rows[0]:
                    ax.plot(xs, [r[f"{split}_{key}"] * scale for r in rows], style, color=c, marker="." if
                            len(rows) < 30 else None, label=f"{label} {split}")
    xlabel = "epoch" if x == "epoch" else "training wall-clock time (s)"
    ax_loss.set(title="Cross-entropy loss", xlabel=xlabel, ylabel="loss")
    ax_acc.set(title="Accuracy", xlabel=xlabel, ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "train (dashed: running mean over augmented batches), test (solid)", fontsize=10)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="Plot loss/accuracy curves of train.py runs.")
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--out", default=None, help="output image (default: curves.png in the first run dir)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run")
    p.add_argument("--x", choices=("epoch", "time"), default="epoch", help="x axis: epochs or wall-clock seconds")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            p.exit(2, f"plot_curves.py: error: {run} has no metrics.jsonl\n")
    if args.labels and len(args.labels) != len(args.runs):
        p.exit(2, "plot_curves.py: error: give one --labels entry per run\n")
    out = plot_runs(args.runs, args.out or os.path.join(args.runs[0], "curves.png"), args.labels, args.x, args.title)
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
