"""A run directory and its checkpoints: what train.py writes, and what load_model, ablate.py, plot_curves.py and
classic.py read. One owner for the format.

    <run>/config.json     the config, library versions, device, world size, git commit (run_info)
    <run>/metrics.jsonl   one JSON line per finished epoch (append_metrics, read_metrics, truncate_metrics)
    <run>/last.pt         every epoch and every --save-every-steps steps; best.pt only with a validation split
    <run>/curves.png

A checkpoint is a dict of plain values and CPU tensors, read with torch.load(weights_only=True): arch,
model_kwargs, model (the state dict), optimizer, scheduler, epoch and step (its position), partial (the epoch's
running sums so far), best_val_acc, classes, config (the Config as a dict), normalization (mean, std) and rng.
Older checkpoints without normalization were all trained on CIFAR-10's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from torch import nn

from resnet import ResNet, build_model


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or for another model."""


PORT_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # ImageNet's, as that port uses


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True (pickled code never runs); every failure becomes one clear line.

    Reads train.py's checkpoints and the published nets of akamaster/pytorch_resnet_cifar10 (converted on the fly,
    see from_port_checkpoint).
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from None
    except Exception as e:  # UnpicklingError (unsafe payload), RuntimeError (truncated/corrupt zip), EOFError...
        kind = "refused as unsafe (it holds pickled objects, not plain tensors)" if "weights_only" in str(e) \
            else "unreadable (truncated or corrupt)"
        raise CheckpointError(f"checkpoint {path} is {kind}") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "model" not in ckpt:
        return from_port_checkpoint(ckpt, path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path} is neither a train.py checkpoint (no 'model'/'arch' entries) nor a "
                              "pytorch_resnet_cifar10 one (no 'state_dict')")
    return ckpt


def from_port_checkpoint(ckpt: dict, path: str = "checkpoint") -> dict:
    """akamaster/pytorch_resnet_cifar10's {"state_dict": ...} as one of our checkpoints (weights only).

    Its names are ours under other words: module.layer{k}.{i}. -> stages.{k-1}.{i}., linear -> fc; it saves no
    num_batches_tracked. The depth comes from the blocks in its stages; its nets were trained on ImageNet's mean/std.
    """
    sd = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    try:
        blocks = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in (1, 2, 3)]
        width, num_classes = sd["conv1.weight"].shape[0], sd["linear.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        raise CheckpointError(f"{path}: a 'state_dict' checkpoint, but not a pytorch_resnet_cifar10 ResNet") from None
    if len(set(blocks)) != 1 or not blocks[0] or "layer4.0.conv1.weight" in sd:
        raise CheckpointError(f"{path}: stages of {blocks} blocks are not a CIFAR ResNet (6n+2 layers)")
    model = {}
    for k, v in sd.items():
        if k.startswith("layer"):
            k = f"stages.{int(k[5]) - 1}{k[6:]}"
        model[k.replace("linear.", "fc.", 1) if k.startswith("linear.") else k] = v
    for k in [k for k in model if k.endswith(".running_var")]:
        model.setdefault(k.replace("running_var", "num_batches_tracked"), torch.tensor(0))
    return {"arch": f"resnet{6 * blocks[0] + 2}", "model": model, "epoch": None,
            "model_kwargs": {"num_classes": num_classes, "width": width}, "normalization": PORT_NORMALIZATION,
            "source": "akamaster/pytorch_resnet_cifar10"}


def model_from_checkpoint(ckpt: dict, path: str = "checkpoint") -> ResNet:
    """Rebuild the architecture named in the checkpoint, load its weights and the input normalisation it needs."""
    try:
        model = build_model(ckpt["arch"], **ckpt.get("model_kwargs", {}))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    load_weights(model, ckpt, path)
    if "normalization" in ckpt:  # older checkpoints: CIFAR-10's, the only one train.py ever used
        model.normalization = {k: [float(v) for v in ckpt["normalization"][k]] for k in ("mean", "std")}
    return model


def load_weights(model: nn.Module, ckpt: dict, path: str = "checkpoint") -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise CheckpointError(f"{path}: its weights do not fit {ckpt['arch']} (another architecture or width?)") \
            from None


def load_model(path: str, map_location: str | torch.device = "cpu") -> ResNet:
    """A trained model, in eval mode, from a train.py checkpoint (last.pt / best.pt) or a pytorch_resnet_cifar10
    one (resnet20-12fca82f.th, ...). Feed it model.normalize(images): the checkpoint's own mean/std."""
    return model_from_checkpoint(read_checkpoint(path, map_location), path).to(map_location).eval()


def progress(path: str) -> tuple[int, int] | None:
    """(epochs done, epochs planned) of the train.py run at path (a run directory or its last.pt); None when it
    has no checkpoint yet."""
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.exists(path):
        return None
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
    """Write to a temp file and rename: a crash mid-write never leaves a torn checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def format_row(row: dict) -> str:
    """One metrics row as the line printed after each epoch."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str, epochs_done: int) -> None:
    """Keep only complete lines of epochs the checkpoint has seen: no duplicates or torn lines after a resume."""
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
    os.replace(tmp, path)


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": name, "world_size": world, "threads": torch.get_num_threads(), "git_commit": commit}


def start_files(out: str, info: dict, resumed: dict | None, epochs_done: int) -> None:
    """Before the first epoch (rank 0 only): a new run's config.json; for a resumed run whose --epochs was raised,
    its new length in config.json; metrics.jsonl cut back to the epochs the checkpoint holds."""
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
