"""Shared fixtures: tiny CIFAR-10 copies written by the tests, and the shared real data when present."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plot_curves  # noqa: E402  (after the path is set)
import train  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHARED_TGZ = os.environ.get("CIFAR10_JPEG_TGZ", os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz"))


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random 32x32 RGB uint8 images whose class is visible (a bright class-dependent band), labels balanced."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randint(0, 120, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for i in range(n):
        x[i, y[i] % 3, 3 * y[i]:3 * y[i] + 3, :] = 250
    return x, y


def write_image_folder(root: str, n_train: int = 200, n_test: int = 100) -> tuple:
    """train/<class>/NNNN.png and test/<class>/NNNN.png (lossless, so pixels round-trip exactly)."""
    from PIL import Image

    splits = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = make_images(n, seed)
        for c in CLASSES:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(os.path.join(root, split, CLASSES[y[i]], f"{i:04d}.png"))
        splits[split] = (x, y)
    return splits


def write_cifar_batches(root: str, n_train: int = 200, n_test: int = 100) -> tuple:
    """A tiny cifar-10-batches-py in torchvision's own pickle format (5 train batches, test_batch, batches.meta)."""
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    xtr, ytr = make_images(n_train, 1)
    xte, yte = make_images(n_test, 2)
    chunks = torch.arange(n_train).chunk(5)
    for k, idx in enumerate(chunks, 1):
        with open(os.path.join(d, f"data_batch_{k}"), "wb") as f:
            pickle.dump({"data": xtr[idx].reshape(len(idx), -1).numpy(), "labels": ytr[idx].tolist()}, f)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({"data": xte.reshape(n_test, -1).numpy(), "labels": yte.tolist()}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return {"train": (xtr, ytr), "test": (xte, yte)}


def write_cifar100(root: str, n_train: int = 300, n_test: int = 200) -> dict:
    """A tiny cifar-100-python in torchvision's own format: pickled train, test and meta, with fine_labels (and
    coarse_labels) and fine_label_names."""
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    splits = {}
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.arange(n) % 100
        with open(os.path.join(d, split), "wb") as f:
            pickle.dump({"data": x.reshape(n, -1).numpy(), "fine_labels": y.tolist(),
                         "coarse_labels": (y // 5).tolist()}, f)
        splits[split] = (x, y)
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"super{i:02d}" for i in range(20)]}, f)
    return splits


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision checks the md5 of the real CIFAR-10 files; our tiny copy has other sums."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tiny_folder"))
    write_image_folder(root)
    return root


@pytest.fixture(scope="session")
def real_cifar(tmp_path_factory) -> str:
    """The shared JPEG CIFAR-10 extracted once per test run; skipped where absent, required under CI=true."""
    if not os.path.exists(SHARED_TGZ):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared CIFAR-10 copy is missing: {SHARED_TGZ}")
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_TGZ}")
    root = str(tmp_path_factory.mktemp("cifar10_jpeg"))
    with tarfile.open(SHARED_TGZ) as t:  # extraction filters came with Python 3.11.4 (and 3.8.17, 3.9.17...)
        t.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return root


# ---- helpers for the tests that run train.py on tiny data

METRIC_KEYS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s"}
TIMING = {"epoch_time_s", "images_per_s"}


def tiny_args(data_dir: str, out: str, *extra: str) -> list[str]:
    return ["--data-dir", data_dir, "--arch", "resnet20", "--width", "4", "--epochs", "2", "--batch-size", "32",
            "--out", str(out), "--no-progress", "--log-every", "2", "--device", "cpu", *extra]


def metrics(run_dir) -> list[dict]:
    return plot_curves.read_metrics(str(run_dir))


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def interrupt_at(monkeypatch, where: str, epoch: int, step: int = 0, signum: int = signal.SIGTERM):
    """Send ourselves SIGTERM (or signum) at a chosen point, as a scheduler pre-empting the job would."""
    if where == "evaluate":  # after the epoch's training: the stop lands on an epoch boundary
        real, calls = train.evaluate, []

        def evaluate(*a, **k):
            calls.append(1)
            if len(calls) == epoch:
                os.kill(os.getpid(), signum)
            return real(*a, **k)

        monkeypatch.setattr(train, "evaluate", evaluate)
    else:  # mid-epoch
        real_batches = train.Loader.batches

        def batches(self, e=0, start=0):
            for i, b in enumerate(real_batches(self, e, start), start=start):
                if self.train and e == epoch and i == step:
                    os.kill(os.getpid(), signum)
                yield b

        monkeypatch.setattr(train.Loader, "batches", batches)
