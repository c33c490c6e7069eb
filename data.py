"""CIFAR-10 (or CIFAR-100) as uint8 tensors, and a training loader that augments whole batches at once.

Sources (one --data-dir):
  - torchvision's layout: <dir>/cifar-10-batches-py or <dir>/cifar-100-python (downloaded there when missing
    and the machine is online);
  - an image-folder tree: <dir>/train/<class>/*.{jpg,png}, <dir>/test/<class>/*, classes in sorted order
    (CINIC-10, Kaggle exports, or the shared JPEG copy once extracted).
Either is decoded once into uint8 tensors and cached beside the data (<dir>/cifar10-uint8-cache.pt).

The loader keeps its split on the training device as uint8 (airbench's trick): per-sample random crop with
zero padding (4 pixels by default), horizontal flip and normalisation happen as one gather and one fused
multiply-add per batch. No PIL, no worker processes. Every epoch's order and augmentation are a pure function
of (seed, epoch), so a resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import socket
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the 50,000 training images' pixels
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # their pixel std (not the oft-copied 0.2023, 0.1994, 0.2010)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE_SUFFIX = "-uint8-cache.pt"  # <data-dir>/cifar10-uint8-cache.pt, cifar100-uint8-cache.pt
CACHE_NAME = "cifar10" + CACHE_SUFFIX
# --dataset -> torchvision's folder of pickled batches, and its reader
TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
PAD = 4  # random crops are taken from the image zero-padded by PAD pixels on each side


class DataError(Exception):
    """A data problem the user can fix; its message is one line."""


@dataclass
class Cifar:
    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...] = CIFAR10_MEAN  # the input normalisation nets trained on it use
    std: tuple[float, ...] = CIFAR10_STD


def pixel_stats(x: torch.Tensor, chunk: int = 5000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W), in [0, 1] units, summed in chunks (no float copy
    of the whole set)."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk].double() / 255
        s += xb.sum((0, 2, 3))
        s2 += (xb ** 2).sum((0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# ------------------------------------------------------------------------------------------------- reading


def _read_torchvision(data_dir: str, download: bool, dataset: str = "cifar10") -> Cifar:
    from torchvision.datasets import CIFAR10, CIFAR100

    reader = CIFAR100 if dataset == "cifar100" else CIFAR10
    name = "CIFAR-100" if dataset == "cifar100" else "CIFAR-10"

    def split(train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        ds = reader(data_dir, train=train, download=download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return x, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)

    try:
        train_x, train_y, classes = split(True)
        test_x, test_y, _ = split(False)
    except RuntimeError as e:  # "Dataset not found or corrupted"
        raise DataError(f"{data_dir}/{TORCHVISION_DIRS[dataset]}: {e}") from None
    except OSError as e:  # no network
        raise DataError(f"could not download {name} into {data_dir} ({e.__class__.__name__}); pass "
                        f"--data-dir with a local copy ({TORCHVISION_DIRS[dataset]} or train/ and test/ "
                        "folders)") from None
    except (KeyError, pickle.UnpicklingError, EOFError, ValueError):
        raise DataError(f"{data_dir}/{TORCHVISION_DIRS[dataset]} is not in torchvision's {name} format") \
            from None
    if dataset == "cifar100":  # its own statistics, from its training pixels
        return Cifar(train_x, train_y, test_x, test_y, classes, *pixel_stats(train_x))
    return Cifar(train_x, train_y, test_x, test_y, classes)


def _image_files(root: str) -> dict[str, list[str]]:
    """class -> sorted image paths under root/<class>/."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    return {c: sorted(e.path for e in os.scandir(os.path.join(root, c))
                      if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)) for c in classes}


def _decode(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image  # torchvision's own dependency; its torchvision.io decoders are deprecated

    try:
        with Image.open(path) as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except Exception:
        raise DataError(f"unreadable image: {path}") from None
    if img.shape[1:] != (32, 32):
        raise DataError(f"{path} is {img.shape[2]}x{img.shape[1]}; CIFAR-style data must be 32x32")
    return img


def _read_image_folder(data_dir: str) -> Cifar:
    files = {s: _image_files(os.path.join(data_dir, s)) for s in ("train", "test")}
    if list(files["train"]) != list(files["test"]):
        raise DataError(f"{data_dir}: train/ and test/ class folders differ: "
                        f"{sorted(files['train'])} vs {sorted(files['test'])}")
    classes = list(files["train"])
    tensors = []
    for s in ("train", "test"):
        paths = [(p, label) for label, c in enumerate(classes) for p in files[s][c]]
        if not paths:
            raise DataError(f"{data_dir}/{s} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
        tensors.append(torch.stack([_decode(p) for p, _ in paths]))
        tensors.append(torch.tensor([label for _, label in paths], dtype=torch.int64))
    return Cifar(*tensors, classes=classes)


def detect_layout(data_dir: str, download: bool = True, dataset: str = "cifar10") -> str:
    """"torchvision" (its cifar-10-batches-py/ or cifar-100-python/, or a missing or empty directory
    torchvision may download into) or "folder" (train/ and test/ class folders); anything else is a DataError.
    """
    batches = TORCHVISION_DIRS[dataset]
    if os.path.isdir(os.path.join(data_dir, batches)):
        return "torchvision"
    if os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "test")):
        return "folder"
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise DataError(f"{data_dir} holds neither {batches}/ nor train/ and test/ class folders")
    if not download:
        state = "is empty" if os.path.isdir(data_dir) else "does not exist"
        raise DataError(f"data directory {data_dir} {state}")
    return "torchvision"


def _signature(data_dir: str, top: str) -> str:
    """Cheap fingerprint of the files under top (names, sizes, mtimes): the cache is stale when it changes."""
    h = hashlib.sha1(os.path.relpath(top, data_dir).encode())
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            if CACHE_SUFFIX in name:
                continue
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(dirpath, top)}/{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def load_cifar10(data_dir: str, download: bool = True, use_cache: bool = True) -> Cifar:
    """Read CIFAR-10 (either layout) from data_dir as uint8 tensors, through the cache beside it."""
    return load_cifar(data_dir, "cifar10", download, use_cache)


def load_cifar(data_dir: str, dataset: str = "cifar10", download: bool = True, use_cache: bool = True) \
        -> Cifar:
    """Read CIFAR-10 or CIFAR-100 (torchvision's pickled batches, or train/ and test/ class folders of any
    number of classes) from data_dir as uint8 tensors, through the cache beside it
    (<data-dir>/<dataset>-uint8-cache.pt)."""
    layout = detect_layout(data_dir, download, dataset)
    cache = os.path.join(data_dir, dataset + CACHE_SUFFIX)
    top = os.path.join(data_dir, TORCHVISION_DIRS[dataset]) if layout == "torchvision" else data_dir
    sig = _signature(data_dir, top) if use_cache and os.path.isdir(top) else None
    if sig and os.path.exists(cache):
        try:
            c = torch.load(cache, weights_only=True)
            if c["signature"] == sig:
                return Cifar(c["train_x"], c["train_y"], c["test_x"], c["test_y"], c["classes"],
                             tuple(c.get("mean", CIFAR10_MEAN)), tuple(c.get("std", CIFAR10_STD)))
        except Exception:
            pass  # stale or broken cache: rebuild it
    existed = os.path.isdir(data_dir)
    try:
        if layout == "folder":
            data = _read_image_folder(data_dir)
        else:
            data = _read_torchvision(data_dir, download, dataset)
    except DataError:
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)  # a failed download leaves no empty directory behind
        raise
    if use_cache:
        try:  # the signature of what was read (a download has just written its files)
            tmp = f"{cache}.tmp.{socket.gethostname()}.{os.getpid()}"  # unique on a filesystem nodes share
            torch.save({"signature": sig or _signature(data_dir, top), "classes": data.classes,
                        "train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
                        "test_y": data.test_y, "mean": list(data.mean), "std": list(data.std)}, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # read-only data dir: run without a cache
    return data


def split_indices(n: int, subset: int | None, val_split: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: a seeded random subset of n images (all if subset is None), val taken from it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if subset is not None:
        perm = perm[:subset]
    return perm[val_split:], perm[:val_split]


# -------------------------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int = PAD) \
        -> torch.Tensor:
    """Random crop of the image's own size from the image zero-padded by `pad`, at offsets (dx, dy) in
    [0, 2*pad], mirrored where flip: one gather.

    x: (B, C, S, S) uint8; dx, dy, flip: (B,) integer tensors on x's device. Returns (B, C, S, S) uint8.
    """
    B, C, S, _ = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    ar = torch.arange(S, device=x.device)
    rows = dy[:, None] + ar  # (B, S)
    cols = dx[:, None] + torch.where(flip[:, None].bool(), S - 1 - ar, ar)  # (B, S), reversed if flipped
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


@functools.lru_cache(maxsize=8)
def _affine(mean: tuple, std: tuple, device: torch.device, uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x * scale + shift = (x / 255 - mean) / std, built once per device."""
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / ((255.0 if uint8 else 1.0) * std_t)).to(device), (-mean_t / std_t).to(device)


def normalize(x: torch.Tensor, channels_last: bool = False, mean=CIFAR10_MEAN, std=CIFAR10_STD) \
        -> torch.Tensor:
    """uint8 (B, 3, H, W), or floats in [0, 1] -> float32 standardised with mean/std (default CIFAR-10's)."""
    scale, shift = _affine(tuple(mean), tuple(std), x.device, x.dtype == torch.uint8)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.addcmul(shift, x.float(), scale).contiguous(memory_format=fmt)


class Loader:
    """Batches of one split, held on `device` as uint8.

    train=True: every epoch a fresh seeded permutation with crop + flip (each image mirrored with probability
    1/2), only full global batches (so every rank of a DDP run takes the same number of steps); rank r takes
    its slice of each global batch. pad: zero padding on each side before the crop, i.e. each image's
    translation range (the paper's 4).
    train=False: sequential, no augmentation; rank r takes images r, r+world, ... so each is seen exactly
    once.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str,
                 train: bool, seed: int = 0, rank: int = 0, world: int = 1, channels_last: bool = False,
                 crop_flip: bool = True, mean=CIFAR10_MEAN, std=CIFAR10_STD, pad: int = PAD):
        self.x, self.y = x.to(device), y.to(device)
        self.mean, self.std = tuple(mean), tuple(std)  # the normalisation the net is (or was) trained with
        self.crop_flip, self.pad = crop_flip, pad  # augment training batches (off only for checks and benchmarks)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world, self.channels_last = rank, world, channels_last
        self.device = torch.device(device)

    def __len__(self) -> int:
        if self.train:
            return len(self.x) // self.batch_size  # batch_size is global
        n_local = len(range(self.rank, len(self.x), self.world))
        return -(-n_local // self.batch_size)

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """(perm, dx, dy, flip) of `epoch`, each (N,) on the device: the order, and each image's crop offsets
        and mirroring. A pure function of (seed, epoch), drawn on the CPU: the same on any device."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.x)
        perm = torch.randperm(n, generator=g)
        dx, dy = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g)
        return tuple(t.to(self.device) for t in (perm, dx, dy, flip))

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs float (b, 3, 32, 32), labels (b,)) from step `start` of `epoch`."""
        if not self.train:
            idx_all = torch.arange(self.rank, len(self.x), self.world, device=self.device)
            for i in range(start * self.batch_size, len(idx_all), self.batch_size):
                idx = idx_all[i:i + self.batch_size]
                yield normalize(self.x[idx], self.channels_last, self.mean, self.std), self.y[idx]
            return
        perm, dx, dy, flip = self.augmentation(epoch)
        local = self.batch_size // self.world
        for step in range(start, len(self)):
            lo = step * self.batch_size + self.rank * local
            idx = perm[lo:lo + local]
            xb = self.x[idx]
            if self.crop_flip:
                xb = augment(xb, dx[idx], dy[idx], flip[idx], self.pad)
            yield normalize(xb, self.channels_last, self.mean, self.std), self.y[idx]
