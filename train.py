"""Train a ResNet on CIFAR-10: SGD + momentum, label-smoothed cross-entropy, a step schedule, exact resume.

    python train.py                                  # ResNet-18 (width 16), default recipe, GPU if any
    python train.py --epochs 20 --data-dir data      # a shorter run on a local copy
    python train.py --resume runs/resnet18-...       # continue exactly where it stopped (kill -9 included)
    python train.py --eval-only --resume runs/x/last.pt
    torchrun --nproc_per_node=4 train.py ...         # DDP: --batch-size and --lr are the global batch's

Writes to the run dir: config.json, metrics.jsonl (one line per epoch), last.pt (every epoch, and every
--save-every-steps steps), best.pt (only with --val-split, chosen on validation accuracy), curves.png, and the
final model's confusion.png and mistakes.png. --dataset cifar100 trains on CIFAR-100.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import distributed
from config import (Config, UserError, explicit_flags, fit_recipe_to_device, parse_config, resolve_device, run_script,
                    validate_runtime)
from data import Cifar, DataError, Loader, load_cifar, split_indices
from distributed import (SetupError, agree, attempt, broadcast_buffers, convert_sync_batchnorm, share,
                         shared_signal, slurm_requeue)
from hardware import AMP_DTYPES, channels_last_fault, configure_backends, strict_fp32
from plot_curves import plot_model_pictures, plot_runs
from resnet import build_model
from runs import (CheckpointError, append_metrics, format_row, make_run_dir, model_from_checkpoint, model_kwargs,
                  read_checkpoint, read_metrics, restart_point, restore_training, run_info, save_atomic, start_files,
                  training_checkpoint)
from schedule import ErrorWarmup, Schedule

SMALL_LOCAL_BATCH = 32  # fewer images per process than this under torchrun: a note (BatchNorm over few images)
EVAL_BATCH = 500  # test and validation images per forward pass (no gradients: larger than the training batch)


class NonFiniteLoss(Exception):
    pass


class Interrupted(Exception):
    pass


# ----------------------------------------------------------------------------------------------- one epoch


class EpochSums:
    """An epoch's running training sums and its count of non-finite losses, kept on the device: adding to them
    never waits for the GPU; and the epoch's clock, on the host. A mid-epoch checkpoint saves the sums and the
    seconds so far (as `partial`) so a resumed epoch logs the same training loss and accuracy as an unbroken
    one, and the time of both its parts. (A checkpoint written before partials had seconds leaves its images
    `untimed`: images/s then counts only those trained since the resume.)"""

    NAMES = ("loss_sum", "correct", "count")

    def __init__(self, device: torch.device | str):
        self.loss_sum, self.correct, self.count = (torch.zeros((), device=device) for _ in self.NAMES)
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int32)
        self.skipped = torch.zeros((), device=device, dtype=torch.int32)  # fp16 steps the loss scaler skipped
        self.started = time.time()  # when the epoch began, less the seconds it trained before a resume
        self.untimed = 0.0  # images of this epoch trained for an unknown time (all ranks': loaded on rank 0)
        self.compile_s = 0.0  # seconds of this epoch spent compiling (--compile), kept out of its time

    def seconds(self) -> float:
        return time.time() - self.started

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.count += len(y)
        self.nonfinite += (~torch.isfinite(loss)).int()

    def zero_(self) -> None:
        """A new epoch: zero sums, and its clock starts now."""
        for t in (self.loss_sum, self.correct, self.count, self.nonfinite, self.skipped):
            t.zero_()
        self.started, self.untimed, self.compile_s = time.time(), 0.0, 0.0

    def load(self, partial: dict) -> None:
        for name in self.NAMES:
            getattr(self, name).copy_(partial[name])
        self.skipped.fill_(int(partial.get("skipped", 0)))
        self.started = time.time() - float(partial.get("seconds", 0.0))
        self.untimed = float(partial.get("untimed", partial["count"] if "seconds" not in partial else 0.0))

    def reduced(self, world: int) -> dict[str, torch.Tensor]:
        """The sums over every rank, as CPU tensors (under DDP a collective: every rank calls it), and this
        rank's seconds into the epoch and skipped steps (every rank skips the same: the gradients are shared)."""
        sums = torch.stack([getattr(self, name) for name in self.NAMES])
        if world > 1:
            dist.all_reduce(sums)
        return {**{name: v.clone() for name, v in zip(self.NAMES, sums.cpu())},
                "seconds": torch.tensor(self.seconds(), dtype=torch.float64),
                "untimed": torch.tensor(self.untimed, dtype=torch.float64), "skipped": self.skipped.cpu()}

    def check_finite(self, world: int, where: str) -> None:
        bad = self.nonfinite.clone()
        if world > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLoss(f"loss became non-finite in {where}")


def train_one_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, schedule, criterion,
                    sums: EpochSums, epoch: int, start: int = 0, *, amp: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    after_step: Callable[[int], None] = lambda step: None, warmup: ErrorWarmup | None = None) \
        -> None:
    """Steps start+1..len(loader) of `epoch`, adding into sums (no host sync here). amp: the autocast dtype
    (None: fp32); scaler: fp16's loss scaler. after_step(step) runs after each step: train.py's checks,
    progress, checkpoints and stops (StepPolicy). warmup: --warmup until-error's test, which may end the
    warm-up before the scheduler sets the next step's lr."""
    model.train()
    for step, (x, y) in enumerate(loader.batches(epoch, start), start=start + 1):  # 1-based in the epoch
        with torch.autocast(loader.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(x)  # (b, num_classes)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16: the loss scaled so small gradients survive; a step whose gradients overflow is skipped
            scaled = scaler.scale(loss)
            before = scaler._scale.clone()  # the scale is lowered exactly when a step is skipped: no host sync
            scaled.backward()
            scaler.step(optimizer)
            scaler.update()
            sums.skipped += (scaler._scale < before).int()
        if warmup is not None:
            warmup.add(logits, y, step, len(loader), epoch * len(loader) + step)
        schedule.step()
        sums.add(loss, logits, y)
        after_step(step)


# What stops a run at its next step, after a checkpoint: Ctrl-C, a scheduler's kill (SIGTERM) and Slurm's warning
# (`sbatch --signal=USR1@90`) before a pre-emption or the time limit. The exit code is then 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Inside `with`, the STOP_SIGNALS are recorded instead of killing the run; the loop stops at the next safe
    point, after a checkpoint. Under DDP the ranks agree at common sync points: a signal to one stops them all.
    A second Ctrl-C ends the process at once (the default action, also inside a compile or a collective that
    hangs): what it trained since the last checkpoint is lost, nothing saved is."""

    def __init__(self, device: torch.device, world: int):
        self.device, self.world = device, world
        self.received = None  # written only by the handler: a signal landing mid-agreement is never lost
        self.signum = None  # the signal the run stops for (under DDP: agreed by every rank)

    def __enter__(self) -> StopSignal:
        self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _record(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("train.py: stopping after the next step's checkpoint; Ctrl-C again quits at once",
                  file=sys.stderr, flush=True)

    def requested(self, at_sync_point: bool) -> bool:
        if self.world == 1:
            self.signum = self.received
        elif at_sync_point:  # no extra collective per step
            self.signum = shared_signal(self.received, self.device, self.world)
        return self.signum is not None


class StepPolicy:
    """train.py's after_step: every --log-every steps and at the epoch's end the non-finite check (a host
    sync) and the progress bar; every --save-every-steps steps a mid-epoch checkpoint; on a signal, a
    checkpoint and Interrupted. save(epoch, step) is called at the same step on every rank."""

    def __init__(self, cfg: Config, sums: EpochSums, stop: StopSignal, save: Callable[[int, int], None],
                 world: int):
        self.cfg, self.sums, self.stop, self.save, self.world = cfg, sums, stop, save, world
        self.compiling = cfg.compile  # until this process's first step, which compiles the model

    def start_epoch(self, epoch: int, start: int, steps: int, bar: tqdm) -> None:
        self.epoch, self.checked, self.steps, self.bar = epoch, start, steps, bar
        self.began = time.time()

    def __call__(self, step: int) -> None:
        if self.compiling:  # the compile and its one step: out of the epoch's seconds and images/s, logged apart
            if self.sums.count.device.type == "cuda":
                torch.cuda.synchronize()
            self.compiling, spent = False, time.time() - self.began
            self.sums.started += spent
            self.sums.compile_s += spent
            self.sums.untimed += self.cfg.batch_size
        self.bar.update(1)
        sync_point = step % self.cfg.log_every == 0 or step == self.steps
        save = self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0
        stop = self.stop.requested(sync_point)
        if sync_point or stop or save:
            self.sums.check_finite(self.world, f"epoch {self.epoch + 1}, steps {self.checked + 1}-{step}")
            self.checked = step
            if not self.bar.disable:
                n = self.sums.count.item()
                self.bar.set_postfix(loss=f"{self.sums.loss_sum.item() / n:.3f}",
                                     acc=f"{self.sums.correct.item() / n:.3f}", refresh=False)
        if stop:
            self.save(self.epoch, step)
            raise Interrupted
        if save and step < self.steps:
            self.save(self.epoch, step)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, num_classes: int, world: int = 1, tta: bool = False) -> dict:
    """Loss, accuracy and per-class accuracy; under DDP each rank counts its images and the sums are reduced.

    Always fp32 (also after --amp training; TF32 off on CUDA), so the logged accuracy is what --eval-only of
    the checkpoint gives. No host sync until the end: one-hot sums, deterministic too (bincount and boolean
    masks would sync on CUDA). tta=True adds "acc_tta": accuracy of the logits averaged over each image and its
    mirror image.
    """
    model.eval()
    dev = loader.device
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    correct = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    total = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    correct_tta = torch.zeros((), device=dev, dtype=torch.float64)
    with strict_fp32():  # on CUDA, cuDNN would run the convolutions in TF32
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
    if world > 1:
        dist.all_reduce(stats)
    loss_sum, correct_tta = stats[0].item(), stats[1].item()
    correct, total = stats[2:2 + num_classes], stats[2 + num_classes:]
    n = total.sum().item()
    out = {"loss": loss_sum / n, "acc": correct.sum().item() / n, "count": int(n),
           "per_class": (correct / total.clamp(min=1)).tolist()}
    if tta:
        out["acc_tta"] = correct_tta / n
    return out


# ----------------------------------------------------------------------------------------- the run's state


@dataclass
class TrainState:
    """What a checkpoint saves and --resume restores."""
    cfg: Config
    classes: list[str]
    model: nn.Module  # unwrapped (no DDP, no compile): the module saved and evaluated
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    sums: EpochSums
    epoch: int = 0  # epochs done
    step: int = 0  # steps done in the epoch after them
    best_val: float = -1.0  # best validation accuracy so far (-1: none yet)
    scaler: torch.amp.GradScaler | None = None  # with --amp in fp16

    def autocast(self) -> torch.dtype | None:
        """The dtype the training steps compute in under autocast; None: fp32."""
        return AMP_DTYPES[self.cfg.amp_dtype] if self.cfg.amp else None


def new_state(cfg: Config, data: Cifar, train_loader: Loader, device: torch.device) -> TrainState:
    """A fresh model (knowing its classes and the mean/std its loaders feed it), SGD and the lr schedule."""
    classes = data.classes
    model = build_model(cfg.arch, **model_kwargs(cfg, len(classes))).to(device)
    model.classes = list(classes)
    model.normalization = {"mean": list(data.mean), "std": list(data.std)}
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # on CUDA one fused kernel updates every parameter (the default, foreach, launches several per step)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, fused=True if device.type == "cuda" else None)
    schedule = Schedule(cfg, optimizer, len(train_loader), device, train_loader.world)
    scaler = None
    if cfg.amp and cfg.amp_dtype == "fp16":
        scaler = torch.amp.GradScaler(device.type)
        # a step the scaler skips still moves the schedule on (the lr is a function of the global step)
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    return TrainState(cfg, classes, model, optimizer, schedule, EpochSums(device), scaler=scaler)


def save_mid_epoch(state: TrainState, epoch: int, step: int, rank: int, world: int) -> None:
    """last.pt inside an epoch, with the epoch's sums so far; every rank calls it at the same step."""
    partial = {**state.sums.reduced(world), **state.schedule.window(world)}
    if rank == 0:
        save_atomic(training_checkpoint(state, epoch, step, partial), os.path.join(state.cfg.out, "last.pt"))


# --------------------------------------------------------------------------------------------------- setup


def avoid_cpu_1x1_fault(cfg: Config, device: torch.device, explicit: set[str], rank: int) -> None:
    """Train NCHW where channels_last would meet a oneDNN fault (hardware.channels_last_fault)."""
    if not cfg.channels_last:
        return
    # the shortcut convolutions do not depend on the number of classes
    if not (why := channels_last_fault(build_model(cfg.arch, **model_kwargs(cfg, 10)), device)):
        return
    why = f"{cfg.arch} at width {cfg.width} has {why}"
    if "channels_last" in explicit:
        raise UserError(f"--channels-last: {why}; drop it (NCHW is used then) or use --width 16 or more")
    cfg.channels_last = False
    if rank == 0:
        print(f"train.py: {why}: training NCHW instead", file=sys.stderr)


class Loaders(NamedTuple):
    train: Loader
    test: Loader
    val: Loader | None  # with --val-split only


def load_data(data_dir: str, dataset: str, rank: int, local_rank: int, world: int) -> Cifar:
    """One process of the whole job reads (or downloads) the data and writes its cache first: rank 0. Then local
    rank 0 of every other node (from the cache where the data directory is shared, else its own download), then
    the rest from the cache. No two processes download into, or decode into, one directory at once."""
    data = None
    for turn in (rank == 0, local_rank == 0, True):
        err = None
        if data is None and turn:
            data, err = attempt(lambda: load_cifar(data_dir, dataset), DataError)
        agree(err, world)
    return data


def make_loaders(cfg: Config, data: Cifar, device: torch.device, rank: int, world: int) -> Loaders:
    train_idx, val_idx = split_indices(len(data.train_x), cfg.subset, cfg.val_split, cfg.seed)
    kw = dict(device=device, channels_last=cfg.channels_last, rank=rank, world=world, mean=data.mean,
              std=data.std)
    train_x, train_y = data.train_x[train_idx], data.train_y[train_idx]
    val_x, val_y = data.train_x[val_idx], data.train_y[val_idx]
    val = Loader(val_x, val_y, EVAL_BATCH, train=False, **kw) if cfg.val_split else None
    train = Loader(train_x, train_y, cfg.batch_size, train=True, seed=cfg.seed, pad=cfg.crop_padding, **kw)
    return Loaders(train=train,
                   test=Loader(data.test_x, data.test_y, EVAL_BATCH, train=False, **kw), val=val)


def wrap_for_training(model: nn.Module, cfg: Config, device: torch.device, world: int) -> nn.Module:
    """The module the steps run: sync-BN (in place: `model` shares every parameter and buffer), DDP, compile.
    """
    if cfg.sync_bn:
        model = convert_sync_batchnorm(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast at each forward: BN's running statistics are used only to evaluate, and every rank
        # takes rank 0's before that (broadcast_buffers), so a collective per step would buy nothing. The
        # argument's name since torch 2.13 (the old one still works there, with a FutureWarning). Gradients
        # live in DDP's buckets: no copy into them at every step.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if renamed else "broadcast_buffers"
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True, **{sync: False})
    return torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model


def open_run(cfg: Config, explicit: set[str], rank: int, world: int) -> tuple[Config, dict | None]:
    """The run's config and, when it goes on, its checkpoint. Rank 0 alone decides (a new directory, created
    atomically, or the checkpoint to go on from) and every rank takes its decision: the ranks never disagree on a
    default name made of the time. Every rank learns the outcome: a mistake is one line on all of them, not a
    hang on all but one."""
    plan, err = attempt(lambda: plan_run(cfg, explicit) if rank == 0 else None, UserError, CheckpointError)
    agree(err, world)
    out, resume = share(plan, world)
    result, err = attempt(lambda: enter_run(cfg, explicit, out, resume, rank), UserError, CheckpointError)
    agree(err, world)
    return result


def plan_run(cfg: Config, explicit: set[str]) -> tuple[str | None, str | None]:
    """Rank 0's decision: (the new run's directory, None) or (None, the checkpoint the run goes on from)."""
    if cfg.resume == "auto":  # one command for the first launch and every restart
        last = restart_point(cfg.out)
        return (None, last) if last else (make_run_dir(cfg.out, unique=False, overwrite=True), None)
    if cfg.resume:
        if not os.path.exists(cfg.resume):
            raise UserError(f"--resume: {cfg.resume} does not exist")
        return None, cfg.resume
    return make_run_dir(cfg.out, unique="out" not in explicit, overwrite=cfg.overwrite), None


def enter_run(cfg: Config, explicit: set[str], out: str | None, resume: str | None, rank: int) \
        -> tuple[Config, dict | None]:
    """On every rank: the config of rank 0's plan, and the checkpoint it goes on from (each rank reads it)."""
    if resume is None:
        if not os.path.isdir(out):
            raise UserError(f"rank {rank} cannot see the run directory {out} that rank 0 created: put --out on a "
                            "filesystem every node shares")
        return replace(cfg, out=out, resume=None), None
    if not os.path.exists(resume):  # rank 0 has checked that it exists
        raise UserError(f"rank {rank} cannot see {resume}, which rank 0 goes on from: put the run directory on a "
                        "filesystem every node shares")
    now = replace(cfg, resume=resume)
    path = now.resume_path()
    ckpt = read_checkpoint(path) if cfg.resume != "auto" else read_restart_point(path)
    if "config" not in ckpt:
        source = ckpt.get("source", "no run")
        raise UserError(f"{path} holds trained weights ({source}), not a train.py run: evaluate it with "
                        "--eval-only, or load it with runs.load_model")
    last = os.path.join(os.path.dirname(path), "last.pt")
    if os.path.basename(path) != "last.pt" and os.path.exists(last):
        raise UserError(f"{path} is not where the run stopped ({last} is): training on from it would rewrite "
                        f"the run's later epochs. Resume {os.path.dirname(path) or '.'}, or evaluate {path} with "
                        "--eval-only")
    return Config.for_resume(ckpt["config"], now, explicit), ckpt


def read_restart_point(path: str) -> dict:
    """The checkpoint `--resume auto` found: one that cannot be read stops the restart with what to do."""
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; --resume auto cannot go on from it: move it away to train "
                              f"{os.path.dirname(path)} again from its start") from None


# ---------------------------------------------------------------------------------------------------- main


def train(cfg: Config, rank: int, world: int, local_rank: int, explicit: set[str] = frozenset()) -> dict:
    """The whole run: device, run directory (or resume), data, model, then the epoch loop.
    explicit: the flags the user typed (a resumed run compares them with its own)."""
    device = resolve_device(cfg.device, local_rank)
    if cfg.eval_only:
        return eval_only(cfg, device, explicit)
    cfg, ckpt = open_run(cfg, explicit, rank, world)
    for note in fit_recipe_to_device(cfg, device, explicit):
        if rank == 0:
            print(f"train.py: note: {note}", file=sys.stderr)
    if (note := validate_runtime(cfg, device, world)) and rank == 0:
        print(f"train.py: note: {note}", file=sys.stderr)
    if rank == 0 and world > 1 and cfg.batch_size // world < SMALL_LOCAL_BATCH:
        print(f"train.py: note: --batch-size {cfg.batch_size} over {world} processes is {cfg.batch_size // world} "
              f"images each, and BatchNorm normalises over each process's own (--sync-bn: over all of them; a "
              "larger --batch-size with its --lr: more each)", file=sys.stderr)
    avoid_cpu_1x1_fault(cfg, device, explicit, rank)
    configure_backends(device, cfg.deterministic)
    torch.manual_seed(cfg.seed)

    data = load_data(cfg.data_dir, cfg.dataset, rank, local_rank, world)
    cfg.check_data(len(data.train_x), world)
    loaders = make_loaders(cfg, data, device, rank, world)
    state = new_state(cfg, data, loaders.train, device)
    if ckpt is not None:
        restore_training(state, ckpt, cfg.resume_path(), rank)
    train_model = wrap_for_training(state.model, cfg, device, world)
    if rank == 0:
        start_files(cfg.out, run_info(cfg, device, world), ckpt, state.epoch)

    t_start = time.time()
    with StopSignal(device, world) as stop:
        try:
            row = train_epochs(state, train_model, loaders, stop, rank, world)
        except Interrupted:
            who = "" if world == 1 else f" (rank {rank})"
            print(f"train.py: stopped by {signal.Signals(stop.signum).name}{who}; checkpoint saved, resume "
                  f"with: python train.py --resume {cfg.out}", file=sys.stderr)
            if rank == 0 and stop.signum == signal.SIGUSR1 and (line := slurm_requeue()):  # Slurm's warning
                print(f"train.py: {line}", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum)
        except NonFiniteLoss as e:
            last = os.path.join(cfg.out, "last.pt")
            saved = f"the last good checkpoint {last} is intact" if os.path.exists(last) else "nothing saved"
            raise UserError(f"{e}; {saved}; try a lower --lr (now {cfg.lr})", code=1) from None
    wall = time.time() - t_start
    if rank == 0 and row:
        plot_model_pictures(state.model, data.test_x, data.test_y, data.classes, cfg.out,
                            f"{cfg.arch}: ")
    return summarize(cfg, row, state.best_val, wall, rank)


def train_epochs(state: TrainState, train_model: nn.Module, loaders: Loaders, stop: StopSignal, rank: int,
                 world: int) -> dict:
    """The epoch loop from where the state stands: train, evaluate, checkpoint, log. Returns the last row ({}
    when the run had no epoch left)."""
    cfg, sums, out = state.cfg, state.sums, state.cfg.out
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    policy = StepPolicy(cfg, sums, stop, lambda e, s: save_mid_epoch(state, e, s, rank, world), world)
    row = {}
    for epoch in range(state.epoch, cfg.epochs):
        if state.step == 0:
            sums.zero_()  # else a resumed epoch: sums and clock carry on from the checkpoint
        sums.nonfinite.zero_()
        with tqdm(total=len(loaders.train), initial=state.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                  leave=False, disable=not (rank == 0 and cfg.progress), dynamic_ncols=True) as bar:
            policy.start_epoch(epoch, state.step, len(loaders.train), bar)
            train_one_epoch(train_model, loaders.train, state.optimizer, state.schedule, criterion, sums,
                            epoch, state.step, amp=state.autocast(), scaler=state.scaler, after_step=policy,
                            warmup=state.schedule.warmup)
        state.epoch, state.step = epoch + 1, 0
        last = epoch + 1 == cfg.epochs
        row = epoch_row(state, loaders, world, evaluate_now=last or (epoch + 1) % cfg.eval_every == 0)
        improved = row.get("val_acc", -1.0) > state.best_val
        state.best_val = max(state.best_val, row.get("val_acc", -1.0))
        if rank == 0:  # the row, then best.pt, then last.pt: a stop between any two redoes the epoch exactly
            append_metrics(os.path.join(out, "metrics.jsonl"), row)
            ckpt = training_checkpoint(state, epoch + 1, 0)
            if improved:
                save_atomic(ckpt, os.path.join(out, "best.pt"))
            save_atomic(ckpt, os.path.join(out, "last.pt"))
            tqdm.write(format_row(row))
        if stop.requested(True):  # a signal during evaluation: last.pt above already holds this epoch
            raise Interrupted
    return row


def epoch_row(state: TrainState, loaders: Loaders, world: int, evaluate_now: bool = True) -> dict:
    """The metrics of the epoch just trained: its training sums over every rank; when evaluate_now, the test
    (and validation) loss and accuracy, every rank with rank 0's BN statistics (those last.pt saves); then its
    seconds (training and evaluation; a resumed epoch's include those before the stop) and images/s (all
    ranks' training images over the training seconds, both timed)."""
    sums, model, classes = state.sums.reduced(world), state.model, len(state.classes)
    n, train_seconds, untimed = sums["count"].item(), sums["seconds"].item(), sums["untimed"].item()
    steps = len(loaders.train)  # the rate of the epoch's last step (its global step is epoch * steps - 1)
    lr = state.schedule.lr(state.epoch * steps - 1)
    row = {"epoch": state.epoch, "lr": lr,
           "train_loss": sums["loss_sum"].item() / n, "train_acc": sums["correct"].item() / n}
    if state.sums.compile_s:
        row["compile_s"] = round(state.sums.compile_s, 3)
    if state.scaler is not None:  # fp16: steps skipped for overflowing gradients, and the scale at the epoch's end
        row.update(skipped_steps=int(sums["skipped"]), loss_scale=state.scaler.get_scale())
    warmup = state.schedule.warmup
    if warmup is not None and warmup.end is not None:  # --warmup until-error: when and why it ended
        row.update(warmup_end_step=warmup.end, warmup_end_error=warmup.error)
    if evaluate_now:
        broadcast_buffers(model, world)
        test = evaluate(model, loaders.test, classes, world, state.cfg.tta)
        row.update(test_loss=test["loss"], test_acc=test["acc"])
        if state.cfg.tta:
            row["test_acc_tta"] = test["acc_tta"]
        if loaders.val is not None:
            val = evaluate(model, loaders.val, classes, world)
            row.update(val_loss=val["loss"], val_acc=val["acc"])
    row.update(epoch_time_s=round(state.sums.seconds(), 3), images_per_s=round((n - untimed) / train_seconds, 1))
    return row


def summarize(cfg: Config, row: dict, best_val: float, wall: float, rank: int) -> dict:
    """The run's result (what main returns); rank 0 also draws curves.png and prints the final line."""
    if not row and rank == 0:  # resumed a finished run: report its logged result, train nothing
        row = (read_metrics(cfg.out) or [{}])[-1]
        print(f"train.py: {cfg.out} already finished its {cfg.epochs} epochs; nothing to do", file=sys.stderr)
    summary = {"out": cfg.out, "epochs": cfg.epochs, "final_test_acc": row.get("test_acc"),
               "final_test_acc_tta": row.get("test_acc_tta"),
               "final_test_loss": row.get("test_loss"), "final_train_loss": row.get("train_loss"),
               "best_val_acc": best_val if cfg.val_split else None, "wall_time_s": round(wall, 1)}
    if rank == 0 and row:
        plot_runs([cfg.out], os.path.join(cfg.out, "curves.png"),
                  title=f"{cfg.arch} (width {cfg.width}) on {cfg.data_dir}")
        tta = f" ({100 * row['test_acc_tta']:.2f}% with flip TTA)" if "test_acc_tta" in row else ""
        print(f"final test accuracy {100 * row['test_acc']:.2f}%{tta} after {cfg.epochs} epochs, "
              f"wall time {wall / 60:.1f} min; run dir {cfg.out}")
    return summary


# What --eval-only reads from the command line; any other flag typed beside it would change nothing: refused.
EVAL_ONLY_FLAGS = {"eval_only", "resume", "data_dir", "dataset", "device", "tta", "out", "deterministic", "progress"}


def eval_only(cfg: Config, device: torch.device, explicit: set[str]) -> dict:
    """--eval-only: the --resume checkpoint (ours or a peer's) on the test set, with per-class accuracy;
    confusion.png and mistakes.png go to --out, or beside the checkpoint."""
    if unused := sorted(explicit - EVAL_ONLY_FLAGS):
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UserError(f"--eval-only evaluates the checkpoint as it was trained; {flags} would change nothing: "
                        "drop them")
    configure_backends(device, cfg.deterministic)
    ckpt = read_checkpoint(cfg.resume_path())
    model = model_from_checkpoint(ckpt, cfg.resume_path()).to(device)
    # the memory format the run evaluated in (kernels differ by an image or two between formats)
    channels_last = ckpt.get("config", {}).get("channels_last", False) and not channels_last_fault(model, device)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trained_on = ckpt.get("config", {}).get("dataset", "cifar10")
    data = load_cifar(cfg.data_dir, cfg.dataset if "dataset" in explicit else trained_on)
    if len(data.classes) != len(model.classes):
        raise UserError(f"{cfg.resume_path()} classifies {len(model.classes)} classes; {cfg.data_dir} holds "
                        f"{len(data.classes)} (another --dataset?)")
    loader = Loader(data.test_x, data.test_y, EVAL_BATCH, device, train=False, channels_last=channels_last,
                    **model.normalization)
    res = evaluate(model, loader, len(data.classes), tta=cfg.tta)
    tta = f", with flip TTA {100 * res['acc_tta']:.2f}%" if cfg.tta else ""
    origin = f"checkpoint epoch {ckpt['epoch']}" if ckpt.get("epoch") is not None else ckpt.get("source", "")
    print(f"test loss {res['loss']:.4f}  test acc {100 * res['acc']:.2f}%{tta}  "
          f"({res['count']} images, {origin})")
    for name, acc in zip(data.classes, res["per_class"]):
        print(f"  {name:<12} {100 * acc:6.2f}%")
    out = cfg.out or os.path.dirname(cfg.resume_path()) or "."
    os.makedirs(out, exist_ok=True)
    counts = plot_model_pictures(model, data.test_x, data.test_y, data.classes, out, f"{ckpt['arch']}: ")
    print(f"confusion.png and mistakes.png written to {out}")
    return {"test_loss": res["loss"], "test_acc": res["acc"], "test_acc_tta": res.get("acc_tta"),
            "per_class": dict(zip(data.classes, res["per_class"])), "confusion": counts.tolist()}


def run(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    rank, world, local_rank = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        result, stop = train(cfg, rank, world, local_rank, explicit_flags(argv)), None
    except (SystemExit, UserError, SetupError) as e:  # a signal, a non-finite loss, a setup error: agreed
        result, stop = None, e
    except BaseException as e:
        distributed.teardown(world, together=False)
        if lost := distributed.peer_lost(e, rank, world):  # another process died (killed, its node lost)
            raise lost from None
        raise
    if world > 1 and isinstance(stop, SystemExit):  # a signal under torchrun: everything is saved
        distributed.exit_together(world, stop.code)
    distributed.teardown(world, together=True)
    if stop is not None:
        raise stop
    return result


def main(argv: list[str] | None = None) -> dict:
    # Ctrl-C during training is handled inside train() (a checkpoint first); here it can only come before
    return run_script("train.py", run, argv, (UserError, DataError, CheckpointError, SetupError))


if __name__ == "__main__":
    main()
