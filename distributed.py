"""torchrun: the process group, ranks agreeing on setup failures, signals and BN statistics, and a small
sync-BN.

Every helper is a no-op (or the plain single-process answer) when world == 1, so train.py calls them
unconditionally.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.rendezvous import rendezvous

from config import resolve_device


class SetupError(Exception):
    """A setup step failed on some rank; every rank raises it with that rank's one-line message."""


def setup(device_flag: str, timeout_min: float = 30.0) -> tuple[int, int, int]:
    """(rank, world, local rank). NCCL when the run is on CUDA, gloo on CPU (--device cpu, or no GPU).
    timeout_min (--dist-timeout) bounds every collective, those of setup too: the ranks wait in one while local
    rank 0 downloads and decodes the data, and at the first step while each compiles."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local)  # before the process group: every rank sees the same, says it
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=timeout_min)
    try:
        # the ranks swap addresses through torchrun's store, which outlives a restart: under a prefix of their
        # attempt, a restarted rank never reads a dead rank's address from the attempt before (and fails to connect)
        store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistBackendError, DistNetworkError, a rendezvous timeout...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SetupError(f"rank {rank}: the process group did not form ({first}): a peer process died or cannot "
                         "be reached; start the job again (with --resume auto it goes on from its last "
                         "checkpoint)") from None
    return rank, world, local


def teardown(world: int, together: bool) -> None:
    """Leave the process group. together: every rank stopped at the same point (the run finished, or a stop or
    an error they agreed on), so they first wait for each other and no rank closes its connections while
    another still uses them."""
    if world > 1:
        if together:
            dist.barrier()
        dist.destroy_process_group()


def exit_together(world: int, code: int) -> None:
    """End a torchrun process that stops for a signal, once every rank is here (its checkpoint is saved):
    os._exit without destroying the process group or finalizing the interpreter, where gloo's threads
    sometimes abort the process ("terminate called without an active exception", about 1 stop in 25 on this
    CPU)."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# What a collective raises when a peer process is gone (gloo's and NCCL's words; torch's DistError covers newer ones)
PEER_GONE = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe")


def peer_lost(e: BaseException, rank: int, world: int) -> SetupError | None:
    """The one line for a collective that failed because another process died: nothing since the last
    checkpoint is saved, and a restart with --resume auto goes on from it. None for any other error."""
    if world == 1 or not (isinstance(e, dist.DistError) or
                          isinstance(e, RuntimeError) and any(word in str(e) for word in PEER_GONE)):
        return None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return SetupError(f"rank {rank}: another process of the job stopped answering ({first}); the steps since the "
                      "last checkpoint are lost, nothing saved is: start the job again (with --resume auto it goes "
                      "on from its last checkpoint)")


def agree(error: str | None, world: int) -> None:
    """Called by every rank after a setup step with its own outcome (None: fine). If any rank failed, every
    rank raises SetupError with the first failure's message, instead of the others waiting for it until a
    timeout."""
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise SetupError(first)


def attempt(step, *errors: type[Exception]) -> tuple[object, str | None]:
    """(step(), None), or (None, message) when it raises one of `errors`: the outcome agree() shares."""
    try:
        return step(), None
    except errors as e:
        return None, str(e)


def slurm_requeue() -> str | None:
    """Inside a Slurm job (SLURM_JOB_ID set), put it back in the queue: `scontrol requeue`, as PyTorch
    Lightning's SLURMEnvironment(auto_requeue=True) does when Slurm warns a job (`--signal=USR1@90`) that it is
    about to be stopped. The requeued job runs the same script again, which goes on with `--resume auto`. The
    line to print; None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):  # an array task
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not requeue Slurm job {job} ({type(e).__name__}): submit the same script again"
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["no reason given"])[0]
        return f"scontrol requeue {job} failed ({why}; was it submitted with --requeue?): submit the same script again"
    return f"Slurm job {job} requeued: it goes on from the checkpoint when it runs again"


def share(obj, world: int):
    """Rank 0's obj (anything picklable), on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_signal(signum: int | None, device: torch.device, world: int) -> int | None:
    """The signal any rank received (the largest number when several did), known to every rank."""
    if world == 1:
        return signum
    flag = torch.tensor(signum or 0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def broadcast_buffers(model: nn.Module, world: int) -> None:
    """Give every rank rank 0's BN running statistics (the ones last.pt saves) before evaluating: one
    broadcast per dtype (the statistics, the batch counts), not one per buffer."""
    if world == 1:
        return
    buffers = list(model.buffers())
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every rank
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, 0)
        for b, part in zip(group, flat.split([b.numel() for b in group])):
            b.copy_(part.view_as(b))


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) through autograd: the gradient of a sum over ranks is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch in training: one differentiable all-reduce of the
    per-channel sum, sum of squares and count per layer, and no host sync (PyTorch's SyncBatchNorm indexes
    with a boolean mask, about three syncs per layer and step, and refuses CPU). In eval mode, or alone, it is
    BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        C = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least (also --amp)
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_full((1,), xf.numel() // C)])
        total = _AllReduceSum.apply(local)  # (2C + 1,): sums over all ranks
        n = total[2 * C]
        mean = total[:C] / n
        var = (total[C:2 * C] / n - mean * mean).clamp_min(0)  # biased, as BN normalises with
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)  # unbiased
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        # in fp32, rounded once at the end, as cuDNN's BatchNorm: under --amp, x*scale + shift in bf16 would round
        # twice and cancel against shift = -mean*scale where a channel's mean is large against its spread
        y = (xf - mean.view(1, C, 1, 1)) * scale.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The same net with every BatchNorm2d a SyncBatchNorm sharing its parameters and buffers (so the original
    module, which is saved and evaluated, sees every update)."""
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
