"""The time-to-accuracy levers on tiny data: progressive resizing (cropping and downscaling), crop padding,
clean last epochs, a whitening first layer, alternating flip, weight EMA, --eval-every, bf16 autocast on the CPU,
freed memory kept in the process."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import config
import train
from conftest import ROOT, assert_same_weights, interrupt_at, metrics, tiny_args, untimed, weights
from data import PAD, Cifar, Loader, augment
from resnet import ResNet, ResNet18


def bright_left(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose left half is white and right half black: a mirrored crop shows it on the other side."""
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :, :16] = 255
    return x, torch.arange(n) % 10


def tiny_cifar(x: torch.Tensor) -> Cifar:
    """A dataset of the images x for the training split (their first 50 as the test split), ten classes."""
    return Cifar(x, torch.arange(len(x)) % 10, x[:50], torch.arange(50) % 10, [str(i) for i in range(10)])


def test_smaller_crops_come_from_the_padded_image():
    x = torch.arange(1, 3 * 32 * 32 + 1).reshape(1, 3, 32, 32)  # every pixel distinct and non-zero
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    for dx, dy, flip in [(0, 0, 0), (16, 16, 0), (5, 9, 1)]:
        t = lambda v: torch.tensor([v])
        out = augment(x, t(dx), t(dy), t(flip), size=24)
        expect = padded[:, :, dy:dy + 24, dx:dx + 24]
        assert out.shape == (1, 3, 24, 24)
        assert torch.equal(out, expect.flip(3) if flip else expect)


def test_crop_sizes_give_each_epoch_its_side_and_offsets_cover_the_padded_image():
    x, y = bright_left(512)
    loader = Loader(x, y, 128, "cpu", train=True, crop_sizes=(16, 24))
    for epoch, side in [(0, 16), (1, 24), (2, 32), (5, 32)]:
        shapes = {tuple(xb.shape) for xb, _ in loader.batches(epoch)}
        assert shapes == {(128, 3, side, side)}
        _, dx, dy, _ = loader.augmentation(epoch)
        assert dx.min() == dy.min() == 0 and dx.max() == dy.max() == 32 + 2 * PAD - side
    # resuming inside a small-crop epoch replays its batches
    assert torch.equal(next(loader.batches(0, start=2))[0], list(loader.batches(0))[2][0])


def test_resize_to_scales_the_epochs_augmented_images_down_whole():
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(512) % 10
    plain = Loader(x, y, 128, "cpu", train=True, channels_last=True, pad=2)
    resized = Loader(x, y, 128, "cpu", train=True, channels_last=True, pad=2, resize_to=(16, 24))
    for epoch, side in [(0, 16), (1, 24), (2, 32)]:
        for (a, ya), (b, yb) in zip(plain.batches(epoch), resized.batches(epoch)):
            assert b.shape == (128, 3, side, side) and torch.equal(ya, yb)  # the same images, crops and flips
            expect = torch.nn.functional.interpolate(a, size=(side, side), mode="bilinear", antialias=True)
            assert torch.allclose(b, expect, atol=1e-5)  # the whole crop, scaled: nothing cut off
            assert b.is_contiguous(memory_format=torch.channels_last)
    assert resized.input_side(0) == 16 and resized.input_side(2) == plain.input_side(0) == 32


@pytest.mark.parametrize("pad", [0, 2])
def test_crop_padding_sets_the_translation_range(pad):
    x = torch.arange(1, 256 * 3 * 32 * 32 + 1).reshape(256, 3, 32, 32) % 251 + 1  # no pixel is 0 (padding)
    loader = Loader(x.to(torch.uint8), torch.arange(256) % 10, 128, "cpu", train=True, pad=pad,
                    mean=(0, 0, 0), std=(1 / 255,) * 3)  # batches hold the raw pixel values
    perm, dx, dy, flip = loader.augmentation(0)
    assert dx.min() == dy.min() == 0 and dx.max() == dy.max() == 2 * pad  # offsets cover [0, 2 * pad]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    xb = torch.cat([b for b, _ in loader.batches(0)])  # (256, 3, 32, 32) in perm order
    for row, i in enumerate(perm[:20].tolist()):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(xb[row].round().long(), crop.flip(2) if flip[i] else crop)
    assert (xb == 0).any() == (pad > 0)  # zero padding shows only where there is some


def test_crop_padding_flag_reaches_the_training_loader_only():
    x = torch.zeros(300, 3, 32, 32, dtype=torch.uint8)
    data = tiny_cifar(x)
    for argv, pad in [([], PAD), (["--crop-padding", "1"], 1)]:
        cfg = config.parse_config([*argv, "--out", "unused", "--val-split", "100"])
        loaders = train.make_loaders(cfg, data, torch.device("cpu"), 0, 1)
        assert loaders.train.pad == pad and loaders.train.crop_flip
        assert not loaders.test.train and not loaders.val.train  # evaluation never crops


def test_clean_epochs_train_on_the_images_as_they_are():
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(512) % 10
    clean = Loader(x, y, 128, "cpu", train=True, pad=2, clean_from=2)
    augmented = Loader(x, y, 128, "cpu", train=True, pad=2)
    as_they_are = Loader(x, y, 128, "cpu", train=True, pad=2, crop_flip=False)
    for epoch in range(4):
        expect = augmented if epoch < 2 else as_they_are
        assert clean.augments(epoch) == (epoch < 2)
        for (a, ya), (b, yb) in zip(clean.batches(epoch), expect.batches(epoch), strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)  # the same order in every case
    differ = [not torch.equal(a, b) for (a, _), (b, _) in zip(augmented.batches(3), as_they_are.batches(3))]
    assert all(differ)  # so the comparison above can tell augmented batches from clean ones


def test_clean_epochs_flag_reaches_the_training_loader():
    x = torch.zeros(300, 3, 32, 32, dtype=torch.uint8)
    data = tiny_cifar(x)
    for argv, clean_from in [([], None), (["--clean-epochs", "2"], 3)]:
        cfg = config.parse_config([*argv, "--epochs", "5", "--out", "unused"])
        loader = train.make_loaders(cfg, data, torch.device("cpu"), 0, 1).train
        assert loader.clean_from == clean_from
        assert [loader.augments(e) for e in range(5)] == [clean_from is None or e < clean_from for e in range(5)]


@pytest.mark.parametrize("width", [16, 64])
def test_whiten_init_makes_conv1_whiten_the_patches(width):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)  # correlated channels, and smooth images: correlated pixels
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(300, 3, 8, 8, generator=g))
    images = torch.nn.functional.interpolate(images, size=16, mode="bilinear")
    net = ResNet18(width=width)
    he = net.conv1.weight.detach().clone()
    net.whiten_conv1_(images)
    w = net.conv1.weight.detach()
    k = min(width // 2, 27)
    assert torch.equal(w[k:2 * k], -w[:k]) and torch.equal(w[2 * k:], he[2 * k:])  # the rest keep their He init
    out = torch.nn.functional.conv2d(images, w[:k]).transpose(0, 1).flatten(1)  # (k, every patch)
    moments = out @ out.T / out.shape[1]
    patches = torch.nn.functional.unfold(images, 3).transpose(1, 2).flatten(0, 1)
    variances = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)[:k]  # along each filter
    # uncorrelated, and unit variance but where eps = 5e-4 outweighs a patch direction's variance
    assert torch.allclose(moments, torch.diag(variances / (variances + 5e-4)), atol=0.01)
    assert (variances > 0.01).sum() >= min(k, 8)  # most of those compared are whitened to variance ~1


def test_whiten_init_flag_whitens_a_sample_of_the_training_split_only():
    from data import normalize

    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    data = tiny_cifar(x)
    conv1 = {}
    for argv in [[], ["--whiten-init"]]:
        cfg = config.parse_config([*argv, "--out", "unused", "--val-split", "100"])
        loaders = train.make_loaders(cfg, data, torch.device("cpu"), 0, 1)
        torch.manual_seed(0)
        conv1[bool(argv)] = train.new_state(cfg, data, loaders.train, torch.device("cpu")).model.conv1.weight
    torch.manual_seed(0)
    expect = train.build_model("resnet18")
    expect.whiten_conv1_(normalize(loaders.train.x))  # the 200 training images, not the 100 held out
    assert torch.equal(conv1[True], expect.conv1.weight) and not torch.equal(conv1[True], conv1[False])


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    x, y = bright_left(1000)
    alt = Loader(x, y, 100, "cpu", train=True, seed=3, flip="alternate")
    flips = torch.stack([alt.augmentation(e)[3] for e in range(4)])  # (epoch, image)
    assert 0.4 < flips[0].float().mean() < 0.6  # a random half in epoch 0...
    assert torch.equal(flips[1], 1 - flips[0]) and torch.equal(flips[2], flips[0])  # ...the other half next
    assert torch.equal(flips[3], flips[1])
    # the batches show it: image i's left edge is bright in exactly one of epochs 0 and 1
    for epoch in (0, 1):
        perm = alt.augmentation(epoch)[0]
        xb = torch.cat([b for b, _ in alt.batches(epoch)])  # (1000, 3, 32, 32) in perm order
        left_dark = xb[:, 0, 16, 8] < 0  # column 8 comes from columns 4-12 (white) unless mirrored
        assert torch.equal(left_dark, flips[epoch][perm].bool())
    rnd = Loader(x, y, 100, "cpu", train=True, seed=3)
    random_flips = torch.stack([rnd.augmentation(e)[3] for e in range(2)])
    assert not torch.equal(random_flips[1], 1 - random_flips[0])  # random: no such pairing
    assert torch.equal(alt.augmentation(1)[0], rnd.augmentation(1)[0])  # the order is the same in both modes


def test_weight_ema_follows_its_formula():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = train.WeightEMA(model, decay=0.9)
    expect = copy.deepcopy(model.state_dict())
    for step in range(1, 30):
        model(torch.randn(8, 3))  # BN statistics move
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(step)
        d = min(0.9, step / (9 + step))
        for k, v in model.state_dict().items():
            expect[k] = v.clone() if not v.is_floating_point() else d * expect[k] + (1 - d) * v
    got = ema.module.state_dict()
    for k in expect:
        assert torch.allclose(got[k], expect[k], atol=1e-6), k
    assert got["1.num_batches_tracked"] == 29 and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_run_evaluates_and_exports_the_averaged_weights(tiny_folder, tmp_path):
    from runs import export_weights, load_model

    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--ema", "0.9"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert not torch.equal(ckpt["ema"]["fc.weight"], ckpt["model"]["fc.weight"])
    res = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cpu"])
    assert res["test_acc"] == metrics(out)[-1]["test_acc"]
    assert res["test_loss"] == pytest.approx(metrics(out)[-1]["test_loss"], abs=1e-6)
    assert torch.equal(load_model(str(out / "last.pt")).fc.weight, ckpt["ema"]["fc.weight"])
    exported = export_weights(str(out), str(tmp_path / "w.pt"))
    assert torch.equal(exported["model"]["fc.weight"], ckpt["ema"]["fc.weight"])


@pytest.mark.parametrize("extra", [["--ema", "0.9"],
                                   ["--crop-sizes", "24", "--flip", "alternate", "--crop-padding", "2"],
                                   ["--resize-to", "16", "--crop-padding", "2"],
                                   ["--clean-epochs", "2", "--crop-padding", "2"], ["--whiten-init"]],
                         ids=["ema", "crop-alternate-pad2", "downscale-pad2", "clean-pad2", "whiten"])
def test_resume_with_levers_equals_straight_run(tiny_folder, tmp_path, monkeypatch, extra):
    args = ["--epochs", "3", *extra]
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_folder, straight, *args))
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_at(m, "batches", 0, 2)  # inside epoch 1 (the 24x24 or 16x16 one)
        with pytest.raises(SystemExit):
            train.main(tiny_args(tiny_folder, broken, *args))
    whitened = []  # the checkpoint's weights replace the initial ones: a resume computes no whitening
    monkeypatch.setattr(ResNet, "whiten_conv1_", lambda net, images: whitened.append(net))
    train.main(["--resume", str(broken), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    assert not whitened
    assert untimed(metrics(broken)) == untimed(metrics(straight))
    assert_same_weights(weights(broken), weights(straight))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (broken, straight))
    if "ema" in b:
        assert_same_weights(a["ema"], b["ema"])


def test_eval_every_skips_evaluation_between_and_always_evaluates_the_last_epoch(tiny_folder, tmp_path):
    out = tmp_path / "r"
    summary = train.main(tiny_args(tiny_folder, out, "--epochs", "5", "--eval-every", "2", "--val-split", "40"))
    rows = metrics(out)
    assert [("test_acc" in r, "val_acc" in r) for r in rows] == [(e % 2 == 0 or e == 5,) * 2 for e in range(1, 6)]
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] in (2, 4, 5) and best["best_val_acc"] == max(r["val_acc"] for r in rows if "val_acc" in r)
    # the training is the same as with an evaluation every epoch
    every = tmp_path / "every"
    train.main(tiny_args(tiny_folder, every, "--epochs", "5", "--val-split", "40"))
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("test", "val"))} for r in rs]
    assert strip(untimed(rows)) == strip(untimed(metrics(every)))
    assert_same_weights(weights(out), weights(every))
    assert (out / "curves.png").stat().st_size > 10_000


def test_amp_on_the_cpu_trains_in_bf16_and_evaluates_in_fp32(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, next(iter(config.CPU_BF16_PROBES)), lambda: True, raising=False)  # as a bf16 CPU
    seen = []  # (training?, dtype of each convolution's output)
    conv = torch.nn.Conv2d.forward

    def forward(self, x):
        out = conv(self, x)
        seen.append((self.training, out.dtype))
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", forward)
    amp = tmp_path / "amp"
    train.main(tiny_args(tiny_folder, amp, "--amp"))
    assert {d for t, d in seen if t} == {torch.bfloat16}  # training steps under autocast
    assert {d for t, d in seen if not t} == {torch.float32}  # evaluation (and the pictures) in fp32
    ckpt = torch.load(amp / "last.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32, torch.int64}  # fp32 weights, BN counts
    with open(amp / "config.json") as f:
        assert "AVX512-BF16" in json.load(f)["device"]  # the run says which bf16 units it ran on
    res = train.main(["--eval-only", "--resume", str(amp), "--data-dir", tiny_folder, "--device", "cpu"])
    assert res["test_acc"] == metrics(amp)[-1]["test_acc"]  # the logged accuracy is the checkpoint's, in fp32
    fp32 = tmp_path / "fp32"
    train.main(tiny_args(tiny_folder, fp32))
    assert not torch.equal(weights(amp)["fc.weight"], weights(fp32)["fc.weight"])  # the autocast changed the steps


FAULTS = """
import resource, sys, torch, config
if sys.argv[1] == "keep":
    assert config.keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(2**24)  # 64 MB, freed at once: the size of a large activation
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # the first round maps the memory in any case
print(faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_freed_tensors_from_faulting_back_in():
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 20 * 32  # glibc's default: each freed tensor goes back (32 pages of 2 MB at least)
    assert faults["keep"] * 4 < faults["default"], faults  # kept: reused, at most a few faults
