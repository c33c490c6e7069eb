"""The learning rate of every step: a warm-up (linear, constant, or the paper's error-keyed switch), then steps at
milestones or a linear decay to zero. The rate is a pure function of the global step (lr_factor), so a resumed run,
mid-epoch too, lands on the same rate; the one piece of state is where --warmup until-error ended, saved and
restored with the rest (Schedule.state_dict / load_state_dict)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from config import Config


def lr_factor(step: int, steps_per_epoch: int, cfg: Config, warmup_end: int | None = None) -> float:
    """LR multiplier as a function of the global step: warm-up, then x gamma at each milestone (epochs) or a
    linear decay that reaches 0 after the last step. warmup_end: the step at which --warmup until-error ended
    (None while it runs: it lasts --warmup-epochs at the longest); the schedule then runs as if the warm-up had
    been set to that length."""
    t = step / steps_per_epoch  # epochs done, fractional
    warmup = cfg.warmup_length() if warmup_end is None else warmup_end / steps_per_epoch
    if t < warmup:
        return (step + 1) / (warmup * steps_per_epoch) if cfg.warmup == "linear" else 0.1
    if cfg.schedule == "linear":
        return max(0.0, (cfg.epochs - t) / (cfg.epochs - warmup))
    return cfg.gamma ** sum(t >= m for m in cfg.milestone_epochs())


class ErrorWarmup:
    """--warmup until-error, the paper's rule for its 110-layer nets (section 4.2: "0.01 until the training error
    is below 80%, then back to 0.1"): the lr stays at 0.1x --lr until the training error over the batches of the
    last WINDOW steps, all processes' together, falls below --warmup-error; the schedule then starts at the next
    step. At --warmup-epochs it ends whatever the error: a net that does not learn is not kept at the low rate
    for the whole run. The error is tested every WINDOW steps of an epoch and at its last step (a host sync,
    only while the warm-up lasts), so no window spans two epochs; `end`, the global step the schedule starts
    at, is part of every checkpoint, and so is a window's partial sums in a mid-epoch one."""

    WINDOW = 20

    def __init__(self, threshold: float, longest: int, device: torch.device | str, world: int):
        self.threshold, self.longest, self.world = threshold, longest, world  # longest: in global steps
        self.sums = torch.zeros(2, device=device)  # the window's correct predictions, images
        self.end: int | None = None  # the global step the schedule starts at; None while warming up
        self.error: float | None = None  # the window's error that ended it (None: it ran to its longest)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, y: torch.Tensor, step: int, steps: int, global_step: int) -> None:
        """After optimizer step `step` of `steps` in the epoch (1-based), `global_step` steps in all, before
        the scheduler sets the next step's lr."""
        if self.end is not None:
            return
        if global_step >= self.longest:
            self.end = self.longest
            return
        self.sums += torch.stack([(logits.argmax(1) == y).sum(), torch.tensor(len(y), device=y.device)])
        if step % self.WINDOW and step != steps:
            return
        correct, count = self.reduced(self.world).tolist()
        self.sums.zero_()
        if 1 - correct / count < self.threshold:
            self.end, self.error = global_step, 1 - correct / count

    def reduced(self, world: int) -> torch.Tensor:
        """The window's sums over every rank, on the CPU (under DDP a collective: every rank calls it)."""
        sums = self.sums.clone()
        if world > 1:
            dist.all_reduce(sums)
        return sums.cpu()

    def state_dict(self) -> dict:
        return {"end": -1 if self.end is None else self.end, "error": -1.0 if self.error is None else self.error}

    def load_state_dict(self, saved: dict, window: torch.Tensor | None) -> None:
        """saved: state_dict()'s; window: the partial sums of a mid-epoch checkpoint (all ranks', loaded on one)."""
        self.end = None if saved["end"] < 0 else int(saved["end"])
        self.error = None if saved["error"] < 0 else float(saved["error"])
        self.sums.copy_(window if window is not None else torch.zeros(2))


class Schedule:
    """The run's lr, set before every step: LambdaLR over lr_factor, and with --warmup until-error its switch.
    step(...) after each optimizer step: the warm-up's test, then the next step's rate. Checkpoints hold
    state_dict() (the keys "scheduler" and, with the switch, "warmup") and a mid-epoch one also window()."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                 device: torch.device | str, world: int):
        self.warmup = ErrorWarmup(cfg.warmup_error_threshold(), max(1, round(cfg.warmup_length() * steps_per_epoch)),
                                  device, world) if cfg.warmup == "until-error" else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, steps_per_epoch, cfg, self.warmup.end if self.warmup is not None else None))

    def step(self) -> None:
        self.scheduler.step()

    def lr(self, global_step: int) -> float:
        """The rate global step `global_step` (0-based) trains at."""
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](global_step)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(),
                **({"warmup": self.warmup.state_dict()} if self.warmup is not None else {})}

    def window(self, world: int) -> dict:
        """What a mid-epoch checkpoint adds to its partial sums: the warm-up's window (a collective under DDP)."""
        return {"warmup_window": self.warmup.reduced(world)} if self.warmup is not None else {}

    def load_state_dict(self, ckpt: dict, partial: dict | None) -> None:
        """ckpt: a checkpoint holding state_dict()'s keys; partial: its partial sums on the rank that carries
        them on (None on the others)."""
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.warmup is not None:
            self.warmup.load_state_dict(ckpt["warmup"], (partial or {}).get("warmup_window"))
