"""Train a ResNet on CIFAR-10: SGD + momentum, label-smoothed cross-entropy, a step schedule, exact resume.

    python train.py                                  # ResNet-18 (width 16), default recipe, on GPU if there is one
    python train.py --epochs 20 --data-dir data      # a shorter run on a local copy
    python train.py --resume runs/resnet18-...       # continue exactly where it stopped (kill -9 included)
    python train.py --eval-only --resume runs/x/last.pt
    torchrun --nproc_per_node=4 train.py ...         # DDP: --batch-size and --lr stay those of the global batch

Writes to the run dir: config.json, metrics.jsonl (one line per epoch), last.pt (every epoch, and every
--save-every-steps steps), best.pt (only with --val-split, chosen on validation accuracy), curves.png.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import distributed
from config import (Config, UserError, configure_backends, explicit_flags, parse_config, resolve_device, run_script,
                    validate_runtime)
from data import CIFAR10_MEAN, CIFAR10_STD, Cifar, DataError, Loader, load_cifar10, split_indices
from distributed import SetupError, agree, attempt, broadcast_buffers, convert_sync_batchnorm, shared_signal
from resnet import build_model
from runs import (CheckpointError, append_metrics, format_row, model_from_checkpoint, read_checkpoint, read_metrics,
                  run_info, save_atomic, to_cpu, truncate_metrics)


SUMS = ("loss_sum", "correct", "count")  # an epoch's running training sums, kept on the device
EVAL_BATCH = 500  # test and validation images per forward pass (no gradients: larger than the training batch)


def new_totals(device: torch.device | str) -> dict:
    """Zeroed running sums for train_one_epoch, plus its count of non-finite losses."""
    totals = {k: torch.zeros((), device=device) for k in SUMS}
    totals["nonfinite"] = torch.zeros((), device=device, dtype=torch.int32)
    return totals


class NonFiniteLoss(Exception):
    pass


class Interrupted(Exception):
    pass


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """LR multiplier as a function of the global step: warm-up, then x gamma at each milestone (epochs) or a
    linear decay that reaches 0 after the last step."""
    t = step / steps_per_epoch  # epochs done, fractional
    warmup = cfg.warmup_length()
    if t < warmup:
        return 0.1 if cfg.warmup == "constant" else (step + 1) / (warmup * steps_per_epoch)
    if cfg.schedule == "linear":
        return max(0.0, (cfg.epochs - t) / (cfg.epochs - warmup))
    return cfg.gamma ** sum(t >= m for m in cfg.milestone_epochs())


def train_one_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, scheduler, criterion,
                    epoch: int, totals: dict, start: int = 0, *, amp: bool = False, log_every: int = 20,
                    bar: tqdm | None = None, stop_requested=lambda sync: False, checkpoint=None,
                    save_every_steps: int = 0, distributed: bool = False) -> None:
    """Run steps start..len(loader) of `epoch`, accumulating into totals (device tensors, no per-step sync).

    Raises NonFiniteLoss (checked every log_every steps and at the end) or Interrupted (after a checkpoint).
    """
    model.train()
    last_checked = start
    device_type = loader.device.type

    def check(step: int) -> None:  # the only host syncs of the loop
        nonlocal last_checked
        bad = totals["nonfinite"].clone()
        if distributed:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLoss(f"loss became non-finite in epoch {epoch + 1}, steps {last_checked + 1}-{step}")
        last_checked = step
        if bar is not None:
            n = totals["count"].item()
            bar.set_postfix(loss=f"{totals['loss_sum'].item() / n:.3f}", acc=f"{totals['correct'].item() / n:.3f}",
                            refresh=False)

    for step, (x, y) in enumerate(loader.batches(epoch, start), start=start + 1):  # step: 1-based within the epoch
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)  # (b, num_classes)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            totals["loss_sum"] += loss.detach() * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum()
            totals["count"] += len(y)
            totals["nonfinite"] += (~torch.isfinite(loss)).int()
        if bar is not None:
            bar.update(1)
        sync = step % log_every == 0 or step == len(loader)
        stop = stop_requested(sync)
        if sync or stop or (save_every_steps and step % save_every_steps == 0):
            check(step)
        if stop:
            checkpoint(epoch, step)
            raise Interrupted
        if save_every_steps and step % save_every_steps == 0 and step < len(loader):
            checkpoint(epoch, step)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, num_classes: int, distributed: bool = False, tta: bool = False) \
        -> dict:
    """Loss, accuracy and per-class accuracy; under DDP each rank counts its own images and the sums are reduced.

    Always fp32 (also after --amp training), so the logged accuracy is what --eval-only of the checkpoint gives.
    No host sync until the end: one-hot sums, deterministic too (bincount and boolean masks would sync on CUDA).
    tta=True adds "acc_tta": accuracy of the logits averaged over each image and its mirror image.
    """
    model.eval()
    dev = loader.device
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    correct = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    total = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    correct_tta = torch.zeros((), device=dev, dtype=torch.float64)
    for x, y in loader.batches():  # x: (B, 3, H, W)
        logits = model(x).float()  # (B, num_classes)
        if tta:
            both = logits + model(x.flip(3)).float()  # flip the width axis
            correct_tta += (both.argmax(1) == y).sum()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        onehot = nn.functional.one_hot(y, num_classes).to(total.dtype)  # (B, num_classes)
        total += onehot.sum(0)
        correct += (onehot * (logits.argmax(1) == y).unsqueeze(1)).sum(0)
    stats = torch.cat([loss_sum.view(1), correct_tta.view(1), correct, total])
    if distributed:
        dist.all_reduce(stats)
    loss_sum, correct_tta = stats[0].item(), stats[1].item()
    correct, total = stats[2:2 + num_classes], stats[2 + num_classes:]
    n = total.sum().item()
    out = {"loss": loss_sum / n, "acc": correct.sum().item() / n, "count": int(n),
           "per_class": (correct / total.clamp(min=1)).tolist()}
    if tta:
        out["acc_tta"] = correct_tta / n
    return out


# ----------------------------------------------------------------------------------------------- main


def eval_only(cfg: Config, device: torch.device) -> dict:
    ckpt = read_checkpoint(cfg.resume_path())
    model = model_from_checkpoint(ckpt, cfg.resume_path()).to(device)
    data = load_cifar10(cfg.data_dir)
    loader = Loader(data.test_x, data.test_y, EVAL_BATCH, device, train=False, **model.normalization)
    res = evaluate(model, loader, len(data.classes), tta=cfg.tta)
    tta = f", with flip TTA {100 * res['acc_tta']:.2f}%" if cfg.tta else ""
    origin = f"checkpoint epoch {ckpt['epoch']}" if ckpt.get("epoch") is not None else ckpt.get("source", "")
    print(f"test loss {res['loss']:.4f}  test acc {100 * res['acc']:.2f}%{tta}  ({res['count']} images, {origin})")
    for name, acc in zip(data.classes, res["per_class"]):
        print(f"  {name:<12} {100 * acc:6.2f}%")
    return {"test_loss": res["loss"], "test_acc": res["acc"], "test_acc_tta": res.get("acc_tta"),
            "per_class": dict(zip(data.classes, res["per_class"]))}


def load_data(data_dir: str, local: int, world: int) -> Cifar:
    """Local rank 0 of each node reads (or downloads) the data and writes the cache first; the others then read the
    cache. No two processes download into, or decode into, the same directory at once."""
    data, err = attempt(lambda: load_cifar10(data_dir), DataError) if local == 0 else (None, None)
    agree(err, world)
    if data is None:
        data, err = attempt(lambda: load_cifar10(data_dir), DataError)
    agree(err, world)
    return data


def open_run(cfg: Config, explicit: set[str], rank: int, world: int) -> tuple[Config, dict | None]:
    """The run's config and, on --resume, its checkpoint; rank 0 creates a new run directory. Every rank learns
    the outcome: a mistake is one line on all of them, not a hang on all but one."""
    def check() -> tuple[Config, dict | None]:
        if not cfg.resume:
            if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
                raise UserError(f"--out {cfg.out} is a file, not a run directory")
            if rank == 0:
                if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
                    raise UserError(f"run directory {cfg.out} already exists; pass --resume {cfg.out} or --overwrite")
                os.makedirs(cfg.out, exist_ok=True)
            return cfg, None
        if not os.path.exists(cfg.resume):
            raise UserError(f"--resume: {cfg.resume} does not exist")
        ckpt = read_checkpoint(cfg.resume_path())
        if "config" not in ckpt:
            raise UserError(f"{cfg.resume_path()} holds trained weights ({ckpt.get('source', 'no run')}), not a "
                            "train.py run: evaluate it with --eval-only, or load it with resnet.load_model")
        return Config.for_resume(ckpt["config"], cfg, explicit), ckpt

    result, err = attempt(check, UserError, CheckpointError)
    agree(err, world)
    return result


def train(cfg: Config, rank: int, world: int, local: int, explicit: set[str] = frozenset()) -> dict:
    """explicit: the flags the user typed (a resumed run compares them with its own)."""
    device = resolve_device(cfg.device, local)
    if cfg.eval_only:
        return eval_only(cfg, device)
    cfg, ckpt = open_run(cfg, explicit, rank, world)
    validate_runtime(cfg, device, world)
    configure_backends(device, cfg.deterministic)
    out = cfg.out
    main_proc = rank == 0
    torch.manual_seed(cfg.seed)

    data = load_data(cfg.data_dir, local, world)
    cfg.check_data(len(data.train_x), world)
    train_idx, val_idx = split_indices(len(data.train_x), cfg.subset, cfg.val_split, cfg.seed)
    num_classes = len(data.classes)
    loader_kw = dict(device=device, channels_last=cfg.channels_last, rank=rank, world=world)
    train_loader = Loader(data.train_x[train_idx], data.train_y[train_idx], cfg.batch_size, train=True,
                          seed=cfg.seed, **loader_kw)
    test_loader = Loader(data.test_x, data.test_y, EVAL_BATCH, train=False, **loader_kw)
    val_loader = Loader(data.train_x[val_idx], data.train_y[val_idx], EVAL_BATCH, train=False, **loader_kw) \
        if cfg.val_split else None

    model_kwargs = {"num_classes": num_classes, "width": cfg.width, "zero_init_residual": cfg.zero_init_residual}
    model = build_model(cfg.arch, **model_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    spe = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, spe, cfg))
    start_epoch, start_step, best_val = 0, 0, -1.0
    totals = new_totals(device)
    if ckpt is not None:
        model.load_state_dict(model_from_checkpoint(ckpt, cfg.resume_path()).state_dict())
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step, best_val = ckpt["epoch"], ckpt["step"], ckpt["best_val_acc"]
        if rank == 0:  # the saved partial sums are already global: one rank carries them on
            for k, v in ckpt["partial"].items():
                totals[k] = v.to(device)
        torch.set_rng_state(ckpt["rng"]["torch"])
    train_model = model
    if cfg.sync_bn:  # in place: `model` (saved, evaluated) shares every parameter and buffer
        train_model = convert_sync_batchnorm(train_model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # With sync-BN every rank already holds the same statistics: no buffer broadcast at each forward.
        train_model = DistributedDataParallel(train_model, device_ids=[local] if device.type == "cuda" else None,
                                              broadcast_buffers=not cfg.sync_bn)
    if cfg.compile:
        train_model = torch.compile(train_model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = cfg.amp and device.type == "cuda"

    metrics_path = os.path.join(out, "metrics.jsonl")
    last_path = os.path.join(out, "last.pt")
    if main_proc:
        if ckpt is None:
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(run_info(cfg, device, world), f, indent=2)
        elif cfg.epochs != ckpt["config"]["epochs"] and os.path.exists(os.path.join(out, "config.json")):
            with open(os.path.join(out, "config.json")) as f:  # --epochs extended on resume: the run's new length
                info = json.load(f)
            info["config"]["epochs"] = cfg.epochs
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(info, f, indent=2)
        truncate_metrics(metrics_path, start_epoch)

    def make_checkpoint(epoch_done: int, step: int, partial: dict | None = None) -> dict:
        # CPU tensors: a checkpoint written on a GPU loads with torch.load(path, weights_only=True) anywhere.
        return {"format": 1, "arch": cfg.arch, "model_kwargs": model_kwargs, "model": to_cpu(model.state_dict()),
                "optimizer": to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(), "epoch": epoch_done,
                "step": step, "partial": partial or {k: torch.zeros(()) for k in SUMS},
                "best_val_acc": best_val, "classes": data.classes, "config": asdict(cfg),
                "normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},  # what the net was fed
                "rng": {"torch": torch.get_rng_state()}}

    def save_mid_epoch(epoch: int, step: int) -> None:  # called at the same step on every rank
        partial = {k: totals[k].detach().clone() for k in SUMS}
        if world > 1:
            for v in partial.values():
                dist.all_reduce(v)
        if main_proc:
            save_atomic(make_checkpoint(epoch, step, {k: v.cpu() for k, v in partial.items()}), last_path)

    signals = {"sig": None}

    def on_signal(signum, frame):
        signals["sig"] = signum

    def stop_requested(sync: bool) -> bool:
        if world == 1:
            return signals["sig"] is not None
        if not sync:  # ranks agree on stopping only at common sync points: no extra collective per step
            return False
        signals["sig"] = shared_signal(signals["sig"], device, world)  # a signal to one rank stops them all
        return signals["sig"] is not None

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start = time.time()
    row = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if start_step == 0:
                for v in totals.values():
                    v.zero_()
            totals["nonfinite"].zero_()
            t0 = time.time()
            count0 = totals["count"].item()
            bar = tqdm(total=spe, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not (main_proc and cfg.progress), dynamic_ncols=True)
            try:
                train_one_epoch(train_model, train_loader, optimizer, scheduler, criterion, epoch, totals,
                                start_step, amp=amp, log_every=cfg.log_every, bar=bar,
                                stop_requested=stop_requested, checkpoint=save_mid_epoch,
                                save_every_steps=cfg.save_every_steps, distributed=world > 1)
            finally:
                bar.close()
            start_step = 0
            stats = torch.stack([totals["loss_sum"], totals["correct"], totals["count"]])
            if world > 1:
                dist.all_reduce(stats)
            train_time = time.time() - t0
            broadcast_buffers(model, world)  # every rank evaluates with rank 0's BN statistics, which last.pt saves
            test = evaluate(model, test_loader, num_classes, world > 1, cfg.tta)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": stats[0].item() / stats[2].item(), "train_acc": stats[1].item() / stats[2].item(),
                   "test_loss": test["loss"], "test_acc": test["acc"]}
            if cfg.tta:
                row["test_acc_tta"] = test["acc_tta"]
            if val_loader is not None:
                val = evaluate(model, val_loader, num_classes, world > 1)
                row.update(val_loss=val["loss"], val_acc=val["acc"])
            row.update(epoch_time_s=round(time.time() - t0, 3),
                       images_per_s=round((totals["count"].item() - count0) * world / train_time, 1))
            if main_proc:
                save_atomic(make_checkpoint(epoch + 1, 0), last_path)
                if val_loader is not None and row["val_acc"] > best_val:
                    best_val = row["val_acc"]
                    save_atomic(make_checkpoint(epoch + 1, 0), os.path.join(out, "best.pt"))
                append_metrics(metrics_path, row)
                tqdm.write(format_row(row))
            if stop_requested(True):  # a signal during evaluation: last.pt above already holds this epoch
                raise Interrupted
    except Interrupted:
        name = signal.Signals(signals["sig"]).name
        who = "" if world == 1 else f" (rank {rank})"
        print(f"train.py: stopped by {name}{who}; checkpoint saved, resume with: python train.py --resume {out}",
              file=sys.stderr)
        raise SystemExit(128 + signals["sig"])
    except NonFiniteLoss as e:
        kept = f"the last good checkpoint {last_path} is intact" if os.path.exists(last_path) else "nothing saved"
        raise UserError(f"{e}; {kept}; try a lower --lr (now {cfg.lr})", code=1) from None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    wall = time.time() - t_start
    if not row and main_proc:  # resumed a finished run: report its logged result, train nothing
        row = (read_metrics(out) or [{}])[-1]
        print(f"train.py: {out} already finished its {cfg.epochs} epochs; nothing to do", file=sys.stderr)
    summary = {"out": out, "epochs": cfg.epochs, "final_test_acc": row.get("test_acc"),
               "final_test_acc_tta": row.get("test_acc_tta"),
               "final_test_loss": row.get("test_loss"), "final_train_loss": row.get("train_loss"),
               "best_val_acc": best_val if cfg.val_split else None, "wall_time_s": round(wall, 1)}
    if main_proc and row:
        from plot_curves import plot_runs

        plot_runs([out], os.path.join(out, "curves.png"), title=f"{cfg.arch} (width {cfg.width}) on {cfg.data_dir}")
        tta = f" ({100 * row['test_acc_tta']:.2f}% with flip TTA)" if "test_acc_tta" in row else ""
        print(f"final test accuracy {100 * row['test_acc']:.2f}%{tta} after {cfg.epochs} epochs, "
              f"wall time {wall / 60:.1f} min; run dir {out}")
    return summary


def run(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    rank, world, local = distributed.setup(cfg.device)
    try:
        result = train(cfg, rank, world, local, explicit_flags(argv))
        if world > 1:  # rank 0 still plots and logs: no rank closes its connections before all are done
            dist.barrier()
        return result
    finally:
        distributed.teardown(world)


def main(argv: list[str] | None = None) -> dict:
    # Ctrl-C during training is handled inside train() (a checkpoint first); here it can only come before
    return run_script("train.py", run, argv, (UserError, DataError, CheckpointError, SetupError))


if __name__ == "__main__":
    main()
