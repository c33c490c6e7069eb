"""data.py: both layouts, the cache, clear errors, and the batched augmentation."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import data
from conftest import CLASSES, write_cifar_batches, write_image_folder
from data import CIFAR10_MEAN, CIFAR10_STD, DataError, Loader, augment, load_cifar10, normalize, split_indices


def test_image_folder_and_cache_give_identical_tensors(tmp_path):
    written = write_image_folder(str(tmp_path))
    first = load_cifar10(str(tmp_path), download=False)  # decodes every file, writes the cache
    assert os.path.exists(tmp_path / data.CACHE_NAME)
    second = load_cifar10(str(tmp_path), download=False)  # from the cache
    assert first.classes == second.classes == CLASSES
    for name in ("train_x", "train_y", "test_x", "test_y"):
        a, b = getattr(first, name), getattr(second, name)
        assert torch.equal(a, b) and a.dtype == b.dtype
    # files are read in class order, so compare as sets of (image, label) via sorting by label then content
    x, y = written["train"]
    order = torch.argsort(y, stable=True)
    assert torch.equal(first.train_x, x[order]) and torch.equal(first.train_y, y[order])
    assert first.train_x.dtype == torch.uint8 and first.train_x.shape == (200, 3, 32, 32)


def test_cache_is_rebuilt_when_files_change(tmp_path):
    write_image_folder(str(tmp_path))
    n = len(load_cifar10(str(tmp_path), download=False).train_x)
    os.remove(next((tmp_path / "train" / "cat").iterdir()))
    assert len(load_cifar10(str(tmp_path), download=False).train_x) == n - 1


def test_torchvision_layout_matches_image_folder(tmp_path, skip_md5):
    written = write_cifar_batches(str(tmp_path / "tv"))
    tv = load_cifar10(str(tmp_path / "tv"), download=False)
    assert tv.classes == CLASSES
    assert torch.equal(tv.train_x, written["train"][0]) and torch.equal(tv.test_y, written["test"][1])
    cached = load_cifar10(str(tmp_path / "tv"), download=False)
    assert torch.equal(cached.train_x, tv.train_x)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("other", "neither cifar-10-batches-py"),
    ("classes_differ", "class folders differ"),
    ("bad_image", "unreadable image"),
    ("no_images", "holds no images"),
    ("wrong_size", "must be 32x32"),
])
def test_clear_errors(tmp_path, case, message):
    root = tmp_path / "d"
    if case != "missing":
        root.mkdir()
    if case == "other":
        (root / "readme.txt").write_text("hi")
    if case in ("classes_differ", "bad_image", "wrong_size"):
        write_image_folder(str(root), 20, 10)
    if case == "classes_differ":
        shutil.rmtree(root / "test" / "cat")
    if case == "bad_image":
        (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    if case == "no_images":
        for s in ("train", "test"):
            (root / s / "cat").mkdir(parents=True)
    if case == "wrong_size":
        from PIL import Image
        Image.new("RGB", (40, 40)).save(root / "train" / "dog" / "big.png")
    with pytest.raises(DataError, match=message) as e:
        load_cifar10(str(root), download=False)
    assert "\n" not in str(e.value)


def test_download_impossible_says_to_pass_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="--data-dir"):
        load_cifar10(str(tmp_path / "new"), download=True)
    assert not (tmp_path / "new").exists()  # no empty directory left behind


def test_split_indices_seeded_subset_and_val():
    tr, va = split_indices(1000, subset=300, val_split=50, seed=3)
    assert len(tr) == 250 and len(va) == 50 and not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = split_indices(1000, subset=300, val_split=50, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert tr.max() > 300  # a random subset, never the first N (image-folder order is sorted by class)


def test_augment_crops_stay_inside_padded_image():
    x = torch.arange(1, 2 * 3 * 32 * 32 + 1).reshape(2, 3, 32, 32)  # every pixel distinct and non-zero
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for dx, dy, flip in [(0, 0, 0), (8, 8, 0), (3, 5, 1), (8, 0, 1)]:
        t = lambda v: torch.tensor([v, v])
        out = augment(x, t(dx), t(dy), t(flip))
        expect = padded[:, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out, expect.flip(3) if flip else expect)
    out = augment(torch.full((4, 3, 32, 32), 7, dtype=torch.uint8), torch.tensor([0, 8, 4, 2]),
                  torch.tensor([8, 0, 4, 6]), torch.tensor([1, 0, 1, 0]))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 32, 32)
    assert ((out == 0) | (out == 7)).all() and (out[2] == 7).all()  # zero padding only; centre crop untouched


def test_loader_batches_shapes_flips_and_normalisation():
    n = 512
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    x[:, :, :, :16] = 0  # left half dark: a flip shows as a bright left edge
    x[:, :, :, 16:] = 255
    y = torch.arange(n) % 10
    loader = Loader(x, y, 128, "cpu", train=True, seed=0)
    assert len(loader) == 4
    batches = list(loader.batches(epoch=0))
    assert len(batches) == 4
    xb, yb = batches[0]
    assert xb.shape == (128, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    allx = torch.cat([b[0] for b in batches])
    lo = (0 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    hi = (1 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    flipped = (allx[:, 0, 16, 12] - hi[0]).abs() < 1e-4  # column 12 is bright only when mirrored
    assert 0.4 < flipped.float().mean() < 0.6
    assert torch.isclose(allx[:, :, 16, 16:20].min(), lo.min(), atol=1e-4) or allx.min() >= lo.min() - 1e-4
    # seeded: same epoch -> same batches; next epoch -> another order
    again = next(Loader(x, y, 128, "cpu", train=True, seed=0).batches(epoch=0))
    assert torch.equal(again[0], xb)
    assert not torch.equal(next(loader.batches(epoch=1))[0], xb)
    # resuming at step 2 replays exactly steps 2 and 3
    assert torch.equal(next(loader.batches(epoch=0, start=2))[0], batches[2][0])


def test_normalize_uses_cifar_constants():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, channels_last=True)
    expect = (1 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    assert torch.allclose(out[0, :, 0, 0], expect) and out.is_contiguous(memory_format=torch.channels_last)


def test_normalize_builds_its_scale_and_shift_once_per_device():
    """No host-to-device copy of the constants per batch (on CUDA, the loop's only per-step sync otherwise)."""
    import data

    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    normalize(x)
    before = data._affine.cache_info()
    for _ in range(5):
        normalize(x)
    after = data._affine.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 5


def test_eval_loader_shards_cover_every_image_once():
    x = torch.zeros(1003, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(1003)
    seen = torch.cat([yb for r in range(3) for _, yb in Loader(x, y, 100, "cpu", train=False, rank=r,
                                                               world=3).batches()])
    assert sorted(seen.tolist()) == list(range(1003))


def test_train_loader_ranks_take_disjoint_slices_of_global_batch():
    x = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(256)
    single = [yb for _, yb in Loader(x, y, 64, "cpu", train=True, seed=1).batches(0)]
    ranks = [[yb for _, yb in Loader(x, y, 64, "cpu", train=True, seed=1, rank=r, world=2).batches(0)]
             for r in range(2)]
    for step, yb in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), yb)


def test_cifar100_reader_on_torchvisions_format(tmp_path, skip_md5):
    from conftest import write_cifar100

    splits = write_cifar100(str(tmp_path))
    d = data.load_cifar(str(tmp_path), "cifar100", download=False)
    assert torch.equal(d.train_x, splits["train"][0]) and torch.equal(d.test_y, splits["test"][1])
    assert len(d.classes) == 100 and d.classes[7] == "class07"  # the fine labels
    x = splits["train"][0].double() / 255
    assert d.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-4)  # its own statistics
    assert d.std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=1e-4)
    assert (tmp_path / "cifar100-uint8-cache.pt").exists()
    again = data.load_cifar(str(tmp_path), "cifar100", download=False)  # from the cache, statistics included
    assert again.mean == d.mean and again.classes == d.classes
    with pytest.raises(data.DataError, match="neither cifar-10-batches-py/"):
        data.load_cifar(str(tmp_path), "cifar10", download=False)


def test_the_cache_is_written_under_a_name_no_other_host_or_process_uses(tmp_path, monkeypatch):
    """Two nodes sharing the data directory over a network filesystem may both write the cache at once: each
    writes its own temporary file (host and pid in its name), then renames it into place."""
    import socket

    write_image_folder(str(tmp_path), n_train=20, n_test=10)
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((a, b)), real(a, b)))
    load_cifar10(str(tmp_path), download=False)
    [(tmp, cache)] = renamed
    assert tmp == f"{cache}.tmp.{socket.gethostname()}.{os.getpid()}" and os.path.exists(cache)
