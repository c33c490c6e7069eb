"""Plain vs residual, reproduced: the paper's Figure 6, Table 6 and Figure 7 for CIFAR-10, with our own runs.

    python ablate.py                                  # quick: plain/resnet 20, 56 and 18; 10k images, 10 epochs
    python ablate.py --preset depth --jobs 2          # the depth result: all 50,000 images, 15 epochs, depths 20-110
    python ablate.py --preset depth --report          # tables and figures of the runs finished so far, no training
    python ablate.py --preset paper                   # the paper's schedule (train.py --recipe paper), a GPU job
    python ablate.py --responses A.pt B.th --out DIR  # Figure 7 for any checkpoints, ours or pytorch_resnet_cifar10's
    python ablate.py --depths 20 32 --seeds 0 1 2 --epochs 5 ...   # any other train.py flag passes through

Each run is a train.py run in <out>/<arch>/seed<k>/; finished runs are skipped and interrupted ones resumed, so
re-running the same command does no work twice. Writes <out>/ablation.png (Figure 6: training error dashed, test
error solid), ablation.md / ablation.csv (final errors, mean ± std over seeds, with the paper's Table 6 beside) and
responses.png (Figure 7: std of every 3x3 layer's response after BN, before the ReLU or the addition).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import train
from basic_block import BasicBlock
from config import Parser, UserError, parse_config, resolve_device, run_script
from data import DataError, load_cifar
from hardware import compile_unavailable
from resnet import build_model, count_parameters, is_plain, model_depth
from runs import (CheckpointError, finished, load_model, model_from_checkpoint, progress, read_checkpoint,
                  read_metrics)

PAPER_TABLE6 = {20: "8.75", 32: "7.51", 44: "7.17", 56: "6.97", 110: "6.43 (6.61 ± 0.16)"}  # test error %, ResNets
# name -> (train.py flags shared by every net, default depths in the order they run, out dir, add the ResNet-18 pair)
PRESETS = {
    # CPU-affordable in 40 minutes; the degradation shows early.
    "quick": (["--subset", "10000", "--epochs", "10"], [20, 56], "ablation", True),
    # The paper's depth result on all 50,000 images in a CPU budget: the `fast` recipe (2 warm-up epochs to lr 0.2,
    # then a linear decay to 0) cut to 15 epochs. A linear decay to zero ends every run converged for its budget;
    # steps would leave the short run at a high lr for most of it. The 56-layer pair runs first (the longest jobs
    # first keep `--jobs 2` busy), 20 next (with 56 the required part), then 44, 32 and 110.
    "depth": (["--recipe", "fast", "--epochs", "15"], [56, 20, 44, 32, 110], "ablation-depth", False),
    # The paper's schedule, 182 epochs on a 45k/5k split: a GPU job (about 40 h for the quick grid on this CPU).
    "paper": (["--recipe", "paper"], [20, 56], "ablation-paper", True),
}
# 110-layer nets on the paper's schedule: its warm-up (section 4.2), 0.1x the peak lr (0.01 at its 0.1) until the
# training error is below 80% ("about 400 iterations"): train.py --warmup until-error, with a tenth of the run as its
# longest. Every other recipe gives 110 layers the warm-up of every other depth: a comparison of depths changes depth.
PAPER_WARMUP_LONGEST = 0.1


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


def train_argv(arch: str, seed: int, out: str, recipe: list[str], data_dir: str, runtime: list[str] = ()) \
        -> list[str] | None:
    """train.py's arguments for one cell of the grid: None when it is finished, a resume when it was interrupted.

    runtime: flags of this process (--device, --compile), given to every run and never part of the grid's recipe.
    """
    d = run_dir(out, arch, seed)
    common = ["--data-dir", data_dir, "--no-progress", *runtime]
    done = progress(d)
    if done is not None:
        if done[0] >= done[1]:
            print(f"[ablate] {arch} seed {seed}: done, skipped", flush=True)
            return None
        print(f"[ablate] {arch} seed {seed}: resuming from epoch {done[0]}", flush=True)
        return ["--resume", d, *common]
    extra, cfg = [], parse_config(["--arch", arch, *recipe])
    if model_depth(arch) >= 110 and cfg.recipe == "paper":  # the paper's warm-up; flags in the recipe still win
        extra = ["--warmup", "until-error", "--warmup-epochs", f"{PAPER_WARMUP_LONGEST * cfg.epochs:.4g}"]
    print(f"[ablate] {arch} seed {seed}: training", flush=True)
    return ["--arch", arch, "--seed", str(seed), "--out", d, *common, "--overwrite", *extra, *recipe]


def run_one(arch: str, seed: int, out: str, recipe: list[str], data_dir: str, runtime: list[str] = ()) -> None:
    """Train one cell of the grid in this process: skip when finished, resume when interrupted."""
    argv = train_argv(arch, seed, out, recipe, data_dir, runtime)
    if argv is not None:
        train.main(argv)
        if "--compile" in runtime:  # a fresh compiler cache for the next architecture
            torch._dynamo.reset()


def run_parallel(cells: list[tuple[str, int]], jobs: int, out: str, recipe: list[str], data_dir: str,
                 runtime: list[str] = ()) -> list[str]:
    """Run the cells as train.py processes, `jobs` at a time, the machine's cores shared evenly between them.

    Each run's output goes to <run dir>/train.log. Returns the failed runs (they stay resumable). Ctrl-C or a
    SIGTERM to this process stops the runs as it would stop train.py: each saves its checkpoint, nothing new starts.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    pending, running, failed = list(cells), [], []

    def stop(signum, frame):
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                arch, seed = pending.pop(0)
                argv = train_argv(arch, seed, out, recipe, data_dir, runtime)
                if argv is None:
                    continue
                os.makedirs(run_dir(out, arch, seed), exist_ok=True)
                log = open(os.path.join(run_dir(out, arch, seed), "train.log"), "a")
                proc = subprocess.Popen([sys.executable, script, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((proc, log, arch, seed))
            time.sleep(0.5)
            for item in [r for r in running if r[0].poll() is not None]:
                proc, log, arch, seed = item
                log.close()
                running.remove(item)
                if proc.returncode:
                    failed.append(f"{arch} seed {seed}")
                    print(f"[ablate] {arch} seed {seed}: failed (exit {proc.returncode}), see "
                          f"{os.path.join(run_dir(out, arch, seed), 'train.log')}", flush=True)
                else:
                    print(f"[ablate] {arch} seed {seed}: finished", flush=True)
    except KeyboardInterrupt:  # each run saves its checkpoint and exits (a Ctrl-C reached them already)
        for proc, log, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log, _, _ in running:
            proc.wait()
            log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    return failed


def dataset_classes(dataset: str | None) -> int:
    """The classes of a --dataset, for a run whose checkpoint and data are not at hand."""
    return 100 if dataset == "cifar100" else 10


def run_parameters(run: str) -> int:
    """The parameters of a run's net: from its checkpoint, or, once that is gone, from its config.json."""
    if os.path.exists(os.path.join(run, "last.pt")):
        return count_parameters(load_model(os.path.join(run, "last.pt")))
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)["config"]
    return count_parameters(build_model(cfg["arch"], num_classes=dataset_classes(cfg.get("dataset")),
                                        width=cfg["width"]))


def summarize(out: str, archs: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for arch in archs:
        runs = [read_metrics(run_dir(out, arch, s)) for s in seeds]
        train_err = [100 * (1 - r[-1]["train_acc"]) for r in runs]
        test_err = [100 * (1 - r[-1]["test_acc"]) for r in runs]
        wall = [sum(x["epoch_time_s"] for x in r) for r in runs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        depth = model_depth(arch)
        rows.append({"arch": arch, "depth": depth, "params": run_parameters(run_dir(out, arch, seeds[0])),
            "seeds": len(seeds), "epochs": len(runs[0]),
            "train_err": statistics.mean(train_err), "train_err_std": sd(train_err),
            "test_err": statistics.mean(test_err), "test_err_std": sd(test_err),
            "wall_min": statistics.mean(wall) / 60,
            "paper_test_err": "" if is_plain(arch) else PAPER_TABLE6.get(depth, "")})
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
        ax = axes[0] if is_plain(arch) else axes[1]
        runs = [read_metrics(run_dir(out, arch, s)) for s in seeds]
        n = min(len(r) for r in runs)
        c = f"C{depths.index(model_depth(arch)) % 10}"
        for key, style, label in (("train_acc", "--", None), ("test_acc", "-", arch)):
            epochs = [i for i in range(n) if all(key in r[i] for r in runs)]  # (--eval-every skips test rows)
            err = [100 * (1 - statistics.mean(r[i][key] for r in runs)) for i in epochs]
            ax.plot([i + 1 for i in epochs], err, style, color=c, alpha=0.8 if label is None else 1, label=label)
    for ax, name in zip(axes, ("plain", "ResNet")):
        ax.set(title=f"{name} nets (dashed: training error, solid: test error)", xlabel="epoch", ylabel="error (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    path = os.path.join(out, "ablation.png")
    fig.savefig(path, dpi=120)
    return path


def measure_responses(nets: list[tuple[str, nn.Module]], images: torch.Tensor) -> list[dict]:
    """Figure 7's data: for each (label, model), the std of every 3x3 layer's response on `images` under the
    model's own normalisation (model.normalize), and whether the net is plain."""
    return [{"net": label, "plain": next(m for m in model.modules() if isinstance(m, BasicBlock)).is_plain,
             "stds": layer_responses(model, model.normalize(images))} for label, model in nets]


def read_responses(path: str) -> dict[str, dict]:
    """measure_responses' data as plot_responses saved it (<figure>-layers.csv), by net; {} when absent."""
    if not os.path.exists(path):
        return {}
    nets: dict[str, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            net = nets.setdefault(row["net"], {"net": row["net"], "plain": row["plain"] == "True", "stds": []})
            net["stds"].append(float(row["std"]))
    return nets


def plot_responses(measured: list[dict], images: int, path: str, not_drawn: tuple[str, ...] = ()) -> str:
    """Figure 7: std of layer responses by layer index (top) and sorted by magnitude (bottom), from
    measure_responses' data on `images` test images. Colour by depth; plain nets dashed, residual solid. Beside
    the figure, <path>.csv: each net's median and mean std over its layers, and <path>-layers.csv: every layer's
    std (what --report draws a net from once its checkpoint is gone); both for every net, also those in
    not_drawn (measured, left out of the figure: a net that never trained can have responses 100x the others',
    which would flatten every other curve)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    depths = sorted({len(m["stds"]) for m in measured})
    for m in measured:
        if m["net"] in not_drawn:
            continue
        stds, c, style = m["stds"], f"C{depths.index(len(m['stds'])) % 10}", "--" if m["plain"] else "-"
        top.plot(range(1, len(stds) + 1), stds, style, color=c, label=m["net"])
        bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, color=c, label=m["net"])
    left_out = f"\nnot drawn, its training at chance (in responses.csv): {', '.join(not_drawn)}" if not_drawn else ""
    top.set(title=f"std of 3x3 layer responses (after BN, before ReLU/addition), {images} test images{left_out}",
            xlabel="layer index (original order)", ylabel="std")
    bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=120)
    stem = os.path.splitext(path)[0]
    summary = [{"net": m["net"], "layers": len(m["stds"]), "median_std": round(statistics.median(m["stds"]), 4),
                "mean_std": round(statistics.fmean(m["stds"]), 4)} for m in measured]
    layers = [{"net": m["net"], "plain": m["plain"], "layer": i, "std": std} for m in measured
              for i, std in enumerate(m["stds"], 1)]
    for file, rows in ((stem + ".csv", summary), (stem + "-layers.csv", layers)):
        with open(file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def labelled_model(path: str) -> tuple[str, nn.Module]:
    """The checkpoint's model (read once), labelled resnet56 (results/ablation-depth/resnet56/seed0) or
    resnet56 (akamaster/pytorch_resnet_cifar10)."""
    ckpt = read_checkpoint(path)
    label = f"{ckpt['arch']} ({ckpt.get('source') or os.path.dirname(path) or path})"
    return label, model_from_checkpoint(ckpt, path).eval()


def get_args_parser() -> Parser:
    p = Parser(prog="ablate.py", description=__doc__.split("\n\n")[0],
               epilog="Other flags go to train.py and are part of the grid's shared recipe.")
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                   help="quick: 10k-image subset, 10 epochs, depths 20 and 56 plus the ResNet-18 pair; "
                        "depth: all 50k images, 15 epochs of the fast recipe, depths 56 20 44 32 110; "
                        "paper: the paper's schedule (182 epochs)")
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="CIFAR depths (6n+2), plain and resnet each, run in this order (default: the preset's)")
    p.add_argument("--archs", nargs="+", default=None, help="explicit list of nets (overrides --depths)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; tables report mean ± std")
    p.add_argument("--out", default=None, help="ablation directory (default runs/ablation[-PRESET])")
    p.add_argument("--data-dir", default="./data", help="data directory (as train.py)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10",
                   help="as train.py --dataset (part of the recipe when not cifar10)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side, each with its share of the CPU cores (1: one after another, all cores "
                        "each). Default: 2 on CPU (whole runs measured 8-10%% sooner than 1 on a 2-core CPU; "
                        "docs/ablation.md), 1 on CUDA")
    p.add_argument("--report", action="store_true", help="train nothing: tables and figures of the finished runs")
    p.add_argument("--response-images", type=int, default=1000, help="test images for the Figure 7 responses")
    p.add_argument("--responses", nargs="+", metavar="CHECKPOINT", default=None,
                   help="train nothing: draw Figure 7 for these checkpoints (train.py's or pytorch_resnet_cifar10's) "
                        "into <out>/responses-checkpoints.png")
    runtime = p.add_argument_group("this process, not the experiment (not part of the grid; free to change)")
    runtime.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="as train.py --device")
    runtime.add_argument("--compile", action="store_true", help="as train.py --compile")
    return p


def refuse_unused(p: Parser, args, mode: str, names: tuple[str, ...], extra: list[str] = ()) -> None:
    """A flag typed beside --responses or --report that would change nothing: one line, exit 2."""
    unused = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != p.get_default(n)]
    unused += [" ".join(extra)] if extra else []
    if unused:
        p.exit(2, f"ablate.py: error: {mode} trains nothing; {', '.join(unused)} would change nothing: drop them\n")


def open_grid(p: Parser, args, recipe: list[str]) -> tuple[list[str], list[str], str]:
    """The grid's nets, its shared train.py recipe and its directory, every flag checked before the first run
    (a typo is one line now, not a failed run later); grid.json records the recipe, and a directory holding
    runs of another recipe is refused."""
    base, depths, out_name, with_18 = PRESETS[args.preset]
    for d in args.depths or depths:
        if (d - 2) % 6 or d < 8:
            p.exit(2, f"ablate.py: error: CIFAR depths are 6n+2 (20, 32, 44, 56, 110), got {d}\n")
    archs = args.archs or [f"{k}{d}" for d in args.depths or depths for k in ("resnet", "plain")] + \
        (["resnet18", "plain18"] if with_18 else [])
    recipe = base + recipe + (["--dataset", args.dataset] if args.dataset != "cifar10" else [])  # typed flags win
    try:
        parse_config(["--arch", archs[0], "--data-dir", args.data_dir, *recipe])
    except UserError as e:
        p.exit(2, f"ablate.py: error: {e}\n")
    out = args.out or os.path.join("runs", out_name)
    os.makedirs(out, exist_ok=True)
    grid_file = os.path.join(out, "grid.json")
    if os.path.exists(grid_file):
        with open(grid_file) as f:
            if json.load(f) != {"recipe": recipe}:
                p.exit(2, f"ablate.py: error: {out} holds runs made with other training flags; pass another --out\n")
    with open(grid_file, "w") as f:
        json.dump({"recipe": recipe}, f)
    return archs, recipe, out


def report(out: str, archs: list[str], seeds: list[int], data_dir: str, dataset: str, images: int) -> list[dict]:
    """Tables, Figure 6 and Figure 7 of the nets whose every seed has finished; prints the table."""
    done = [a for a in sorted(archs, key=lambda a: (model_depth(a), not is_plain(a)))
            if all(finished(run_dir(out, a, s)) for s in seeds)]
    missing = [a for a in archs if a not in done]
    if not done:
        print(f"[ablate] not finished yet: {', '.join(missing)}", flush=True)
        return []
    rows = summarize(out, done, seeds)
    write_tables(rows, out)
    plot_errors(out, done, seeds)
    saved = read_responses(os.path.join(out, "responses-layers.csv"))  # nets whose checkpoints are gone
    kept = [a for a in done if os.path.exists(os.path.join(run_dir(out, a, seeds[0]), "last.pt")) or a not in saved]
    classes = dataset_classes(dataset)
    measured = {a: saved[a] for a in done if a not in kept}
    if kept:
        data = load_cifar(data_dir, dataset)
        classes = len(data.classes)
        nets = [(a, load_model(os.path.join(run_dir(out, a, seeds[0]), "last.pt"))) for a in kept]
        measured |= {m["net"]: m for m in measure_responses(nets, data.test_x[:images])}
    chance = 100 * (1 - 1.5 / classes)  # final training error this high: the net learned nothing
    at_chance = tuple(r["arch"] for r in rows if r["train_err"] >= chance)
    at_chance = at_chance if len(at_chance) < len(rows) else ()  # none trained (a smoke run): draw them all
    plot_responses([measured[a] for a in done], images, os.path.join(out, "responses.png"), at_chance)
    with open(os.path.join(out, "ablation.md")) as f:
        print(f.read())
    if missing:
        print(f"[ablate] not finished yet: {', '.join(missing)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = get_args_parser()
    args, recipe = p.parse_known_args(argv)
    if args.responses:
        refuse_unused(p, args, "--responses", ("preset", "depths", "archs", "seeds", "jobs", "report", "compile",
                                               "device"), recipe)
        nets = [labelled_model(c) for c in args.responses]
        os.makedirs(args.out or ".", exist_ok=True)
        images = load_cifar(args.data_dir, args.dataset).test_x[:args.response_images]
        path = plot_responses(measure_responses(nets, images), len(images),
                              os.path.join(args.out or ".", "responses-checkpoints.png"))
        print(f"[ablate] Figure 7 for {len(nets)} checkpoint(s): {path}")
        return []
    if args.report:
        refuse_unused(p, args, "--report", ("jobs", "compile", "device"))
    try:
        device = resolve_device(args.device or "auto")
    except UserError as e:
        p.exit(2, f"ablate.py: error: {e}\n")
    if args.jobs is None:
        args.jobs = 1 if device.type == "cuda" else min(2, os.cpu_count() or 1)
    if args.jobs < 1:
        p.exit(2, f"ablate.py: error: --jobs must be at least 1, got {args.jobs}\n")
    if args.compile and not args.report and (why := compile_unavailable(device)):
        p.exit(2, f"ablate.py: error: --compile: {why}\n")
    archs, recipe, out = open_grid(p, args, recipe)
    runtime_flags = (["--device", args.device] if args.device else []) + (["--compile"] if args.compile else [])
    cells, failed = [(a, s) for a in archs for s in args.seeds], []
    if not args.report and args.jobs == 1:
        for arch, seed in cells:
            run_one(arch, seed, out, recipe, args.data_dir, runtime_flags)
    elif not args.report:
        failed = run_parallel(cells, args.jobs, out, recipe, args.data_dir, runtime_flags)
    rows = report(out, archs, args.seeds, args.data_dir, args.dataset, args.response_images)
    if failed:
        p.exit(1, f"ablate.py: error: {len(failed)} run(s) failed: {', '.join(failed)}\n")
    return rows


if __name__ == "__main__":
    run_script("ablate.py", main, sys.argv[1:], (UserError, DataError, CheckpointError))
