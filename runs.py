"""A run directory and its checkpoints: what train.py writes, and what load_model, ablate.py, plot_curves.py
and classic.py read. One owner for the format.

    <run>/config.json     the config, library versions, device, world size, git commit (run_info)
    <run>/metrics.jsonl   one JSON line per finished epoch (append_metrics, read_metrics, truncate_metrics)
    <run>/last.pt         every epoch and every --save-every-steps steps; best.pt only with a validation split
    <run>/curves.png

A checkpoint is a dict of plain values and CPU tensors, read with torch.load(weights_only=True): arch,
model_kwargs, model (the state dict), optimizer, scheduler, epoch and step (its position), partial (the
epoch's running sums so far), best_val_acc, classes, config (the Config as a dict), normalization (mean, std)
and rng; with --warmup until-error also warmup (its end step, and a mid-epoch checkpoint's partial holds the
warm-up's window); with --amp in fp16 also scaler (the loss scaler's state). training_checkpoint writes it and
restore_training reads it back; read_checkpoint checks any file before either. Runs of the retired --ema lever
also hold ema, the averaged weights, which are their trained model (what was evaluated, and what load_model and
export_weights take). Older checkpoints without normalization were all trained on CIFAR-10's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import torch
from torch import nn

from config import UserError
from data import CIFAR10_MEAN, CIFAR10_STD
from hardware import machine_name
from resnet import ResNet, build_model


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or for another model."""


PORT_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # ImageNet's (akamaster)
CIFAR10_NORMALIZATION = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}  # ours, always (train.py)
KUANGLIU_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}  # its main.py's
# Published checkpoint formats: the key holding the state dict -> (where it comes from, the mean/std it used)
PEER_FORMATS = {"state_dict": ("akamaster/pytorch_resnet_cifar10", PORT_NORMALIZATION),
                "net": ("kuangliu/pytorch-cifar", KUANGLIU_NORMALIZATION)}
PEER_ARCHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34",
              **{(n, n, n): f"resnet{6 * n + 2}" for n in (3, 5, 7, 9, 18)}}


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True (pickled code never runs); every failure becomes one clear line.

    Reads train.py's checkpoints and the published nets of akamaster/pytorch_resnet_cifar10 and
    kuangliu/pytorch-cifar (converted on the fly, see from_peer_checkpoint).
    """
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from None
    except Exception as e:  # UnpicklingError (a class or function to import, or not a pickle), RuntimeError
        # (a torn or corrupt zip), EOFError (empty)... Matched on its text: torch's get_unsafe_globals_in_checkpoint
        # would name the globals, but reads only the zip format, not the legacy pickle files peers published.
        kind = "refused as unsafe (it holds pickled objects, not plain tensors)" if "Unsupported global" in str(e) \
            else "unreadable (truncated, corrupt, or not a PyTorch file)"
        raise CheckpointError(f"checkpoint {path} is {kind}") from None
    if isinstance(ckpt, dict) and "model" not in ckpt:
        peer = next((key for key in PEER_FORMATS if isinstance(ckpt.get(key), dict)), None)
        if peer is not None:
            return from_peer_checkpoint(ckpt, peer, path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path} is neither a train.py checkpoint (no 'model'/'arch' entries) nor a "
                              "pytorch_resnet_cifar10 ('state_dict') or pytorch-cifar ('net') one")
    return ckpt


def from_peer_checkpoint(ckpt: dict, key: str, path: str = "checkpoint") -> dict:
    """A published net as one of our checkpoints (weights only): akamaster/pytorch_resnet_cifar10's
    {"state_dict": ...} (resnet20-110) or kuangliu/pytorch-cifar's {"net": ..., "acc", "epoch"} (ResNet18/34).

    Their names are ours under other words: [module.]layer{k}.{i}. -> stages.{k-1}.{i}., linear -> fc; the
    architecture comes from the blocks in each stage, the width from the stem. akamaster saves no
    num_batches_tracked. Each was trained on its own mean/std (PEER_FORMATS).
    """
    source, normalization = PEER_FORMATS[key]
    sd = {k.removeprefix("module."): v for k, v in ckpt[key].items()}
    try:
        stages = sorted({int(k.split(".")[0][5:]) for k in sd if k.startswith("layer")})
        blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in stages)
        width, num_classes = sd["conv1.weight"].shape[0], sd["linear.weight"].shape[0]
    except (KeyError, AttributeError, IndexError, ValueError):
        raise CheckpointError(f"{path}: a '{key}' checkpoint, but not a {source.split('/')[1]} ResNet") \
            from None
    if blocks not in PEER_ARCHS or any(k.endswith("conv3.weight") for k in sd):
        raise CheckpointError(f"{path}: stages of {list(blocks)} blocks are not a net of ours (BasicBlock "
                              "ResNet-18/34, or a CIFAR ResNet of 6n+2 layers)")
    model = {}
    for k, v in sd.items():
        if k.startswith("layer"):
            stage, rest = k.split(".", 1)
            k = f"stages.{int(stage[5:]) - 1}.{rest}"
        model[k.replace("linear.", "fc.", 1) if k.startswith("linear.") else k] = v
    for k in [k for k in model if k.endswith(".running_var")]:
        model.setdefault(k.replace("running_var", "num_batches_tracked"), torch.tensor(0))
    return {"arch": PEER_ARCHS[blocks], "model": model, "epoch": None, "source": source,
            "model_kwargs": {"num_classes": num_classes, "width": width}, "normalization": normalization}


def model_from_checkpoint(ckpt: dict, path: str = "checkpoint") -> ResNet:
    """Rebuild the checkpoint's architecture, load its weights, class names and the normalisation it needs."""
    try:
        model = build_model(ckpt["arch"], **ckpt.get("model_kwargs", {}))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    load_weights(model, ckpt, path, key="ema" if "ema" in ckpt else "model")
    if "normalization" in ckpt:  # older checkpoints: CIFAR-10's, the only one train.py ever used
        model.normalization = {k: [float(v) for v in ckpt["normalization"][k]] for k in ("mean", "std")}
    if "classes" in ckpt:  # the peers' nets: CIFAR-10's, in torchvision's order
        model.classes = list(ckpt["classes"])
    return model


def load_weights(model: nn.Module, ckpt: dict, path: str = "checkpoint", key: str = "model") -> None:
    """ckpt[key] into model: "model", the weights training goes on from, or "ema", their average."""
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError:
        raise CheckpointError(f"{path}: its weights do not fit {ckpt['arch']} (another architecture or "
                              "width?)") from None


# ---------------------------------------------------------------------------------- a training run's checkpoint

PARTIAL_KEYS = ("loss_sum", "correct", "count", "seconds", "untimed", "skipped")  # an epoch's sums so far


def model_kwargs(cfg, num_classes: int) -> dict:
    """build_model's arguments besides the arch, as a checkpoint records them."""
    return {"num_classes": num_classes, "width": cfg.width, "zero_init_residual": cfg.zero_init_residual}


def training_checkpoint(state, epoch: int, step: int, partial: dict | None = None) -> dict:
    """The checkpoint of train.py's TrainState after `step` steps of epoch `epoch` (0: at its start), in the format
    this module documents. partial: the epoch's sums so far (a mid-epoch checkpoint); zeros at an epoch's end. CPU
    tensors: one written on a GPU loads anywhere."""
    cfg = state.cfg
    return {"arch": cfg.arch, "model_kwargs": model_kwargs(cfg, len(state.classes)),
            "model": to_cpu(state.model.state_dict()), "optimizer": to_cpu(state.optimizer.state_dict()),
            **state.schedule.state_dict(), "epoch": epoch, "step": step,
            "partial": partial or {name: torch.zeros(()) for name in PARTIAL_KEYS},
            "best_val_acc": state.best_val, "classes": state.classes, "config": dataclasses.asdict(cfg),
            "normalization": state.model.normalization,  # the mean/std the net was fed
            "rng": {"torch": torch.get_rng_state()},
            **({"scaler": state.scaler.state_dict()} if state.scaler is not None else {})}


def restore_training(state, ckpt: dict, path: str, rank: int) -> None:
    """training_checkpoint's inverse, into a fresh TrainState built for this device: weights, optimizer (with
    this device's SGD kernel, not the saved one), schedule, position, best validation accuracy, loss scale and
    random state. The epoch's saved sums are already every rank's: rank 0 alone carries them on."""
    load_weights(state.model, ckpt, path)
    kernels = [{k: group[k] for k in ("fused", "foreach")} for group in state.optimizer.param_groups]
    state.optimizer.load_state_dict(ckpt["optimizer"])
    for group, kernel in zip(state.optimizer.param_groups, kernels):
        group.update(kernel)
    state.schedule.load_state_dict(ckpt, ckpt["partial"] if rank == 0 else None)
    state.epoch, state.step, state.best_val = ckpt["epoch"], ckpt["step"], ckpt["best_val_acc"]
    if rank == 0:
        state.sums.load(ckpt["partial"])
    if state.scaler is not None and "scaler" in ckpt:  # else a run that trained in bf16 or fp32 so far
        state.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])


def load_model(path: str, map_location: str | torch.device = "cpu") -> ResNet:
    """A trained model, in eval mode, from a train.py checkpoint (last.pt / best.pt), a pytorch_resnet_cifar10
    one (resnet20-12fca82f.th, ...) or a pytorch-cifar one (ckpt.pth). model.predict(uint8_images) classifies
    raw images; model.normalize(images) is the checkpoint's own mean/std, model.classes its class names."""
    return model_from_checkpoint(read_checkpoint(path, map_location), path).to(map_location).eval()


def export_weights(run_path: str, out: str) -> dict:
    """The trained net of a train.py run (a run directory or a checkpoint) as a weights file: fp32 weights,
    arch, classes and normalisation, no optimizer state; load_model and torch.hub read it, train.py --resume
    refuses it. Returns what it wrote."""
    path = os.path.join(run_path, "last.pt") if os.path.isdir(run_path) else run_path
    ckpt = read_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"{path} is not a train.py run")
    trained = ckpt.get("ema", ckpt["model"])  # the retired --ema: the averaged weights were the ones evaluated
    weights = {"arch": ckpt["arch"], "model_kwargs": ckpt["model_kwargs"], "model": trained,
               "classes": ckpt["classes"], "normalization": ckpt.get("normalization", CIFAR10_NORMALIZATION),
               "epoch": ckpt["epoch"], "source": f"{os.path.dirname(path) or '.'}, epoch {ckpt['epoch']}"}
    save_atomic(weights, out)
    return weights


def progress(path: str) -> tuple[int, int] | None:
    """(epochs done, epochs planned) of the train.py run at path (a run directory or its last.pt); None when
    it has not saved anything yet. A run directory kept without its checkpoint (a finished run as results/
    keeps it) answers from its config.json and metrics.jsonl."""
    run = path if os.path.isdir(path) else os.path.dirname(path)
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.exists(path):
        files = [os.path.join(run, name) for name in ("config.json", "metrics.jsonl")]
        if not all(os.path.exists(f) for f in files):
            return None
        with open(files[0]) as f:
            return len(read_metrics(run)), json.load(f)["config"]["epochs"]
    ckpt = read_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"{path} holds trained weights, not a train.py run")
    return ckpt["epoch"], ckpt["config"]["epochs"]


def finished(path: str) -> bool:
    """Whether the train.py run at path (a run directory or its last.pt) has done all its epochs."""
    done = progress(path)
    return done is not None and done[0] >= done[1]


def to_cpu(state):
    """A state dict (nested dicts and lists of tensors) with every tensor on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temp file, fsync it, rename it into place and fsync the directory: neither a crash mid-write
    nor a node's crash after it (NFS, Lustre: the rename may reach the disk before the data) leaves a torn or
    empty checkpoint where a good one was."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make a rename in the directory durable (where the filesystem lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# What train.py writes in a run directory before its first checkpoint, and the logs a launcher keeps beside it
# (ablate.py's train.log, a batch script's output): a directory holding only these, and no row yet, is a run that
# stopped before it saved anything, which `--resume auto` starts again.
BEFORE_FIRST_CHECKPOINT = ("config.json", "metrics.jsonl")
LOG_SUFFIXES = (".log", ".out", ".err")


def make_run_dir(out: str, unique: bool, overwrite: bool = False) -> str:
    """Create a new run's directory with one atomic mkdir and return its name. unique (a default name): where
    the name is taken, the next free one of out-2, out-3, ..., so two jobs started in the same second never
    share a directory. Otherwise an existing directory is refused where it holds anything, unless overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a run directory")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    for k in range(1, 1000 if unique else 2):
        name = out if k == 1 else f"{out}-{k}"
        try:
            os.mkdir(name)
            return name
        except FileExistsError:
            continue
    if os.listdir(out) and not overwrite:
        raise UserError(f"run directory {out} already exists; pass --resume {out} (or --resume auto) to go on "
                        "with it, or --overwrite")
    return out


def restart_point(out: str) -> str | None:
    """For `--resume auto --out DIR`: DIR's last.pt where it has one (the run goes on from it); None where DIR
    is missing, empty or holds a run stopped before its first checkpoint (the run starts there). Anything else
    in DIR is refused: it is not a run this command can start or resume."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a run directory")
    last = os.path.join(out, "last.pt")
    if os.path.exists(last):
        return last
    if not os.path.isdir(out):
        return None
    rows = read_metrics(out) if os.path.exists(os.path.join(out, "metrics.jsonl")) else []
    if any(row.get("epoch", 0) > 1 for row in rows):  # train.py logs a row before its checkpoint: one at most
        raise UserError(f"--resume auto --out {out}: it logs {len(rows)} epochs but has no last.pt to go on from "
                        "(a finished run kept without its checkpoint?); pass another --out")
    other = sorted(name for name in os.listdir(out) if name not in BEFORE_FIRST_CHECKPOINT and
                   not name.endswith(LOG_SUFFIXES) and ".tmp" not in name)
    if other:
        raise UserError(f"--resume auto --out {out}: it holds {', '.join(other[:3])}{', ...' if other[3:] else ''}, "
                        "not a train.py run; pass another --out")
    return None


def format_row(row: dict) -> str:
    """One metrics row as the line printed after each epoch."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str, epochs_done: int) -> None:
    """Keep the complete lines of the epochs the checkpoint holds: no duplicate, no torn line on resume."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("epoch", math.inf) <= epochs_done:
                keep.append(json.dumps(row) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_metrics(run_dir: str) -> list[dict]:
    """The complete lines of run_dir/metrics.jsonl (a torn last line from a crash is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_info(cfg, device: torch.device, world: int) -> dict:
    """What config.json records: the config, library versions, device, world size and git commit."""
    import subprocess

    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"config": dataclasses.asdict(cfg), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "device": machine_name(device), "world_size": world,
            "threads": torch.get_num_threads(), "git_commit": commit}


def start_files(out: str, info: dict, resumed: dict | None, epochs_done: int) -> None:
    """Before the first epoch (rank 0 only): a new run's config.json; for a resumed run whose --epochs was
    raised, its new length in config.json; metrics.jsonl cut back to the epochs the checkpoint holds."""
    path = os.path.join(out, "config.json")
    if resumed is None:
        _write_json(path, info)
    elif info["config"]["epochs"] != resumed["config"]["epochs"] and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        saved["config"]["epochs"] = info["config"]["epochs"]
        _write_json(path, saved)
    truncate_metrics(os.path.join(out, "metrics.jsonl"), epochs_done)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
