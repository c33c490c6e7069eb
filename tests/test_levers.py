"""The training options our recipes use, on tiny data: crop padding, --eval-every, bf16 autocast on the CPU,
freed memory kept in the process; and the levers measured and retired, whose runs still evaluate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import config
import hardware
import train
from conftest import ROOT, assert_same_weights, metrics, tiny_args, untimed, weights
from data import PAD, Cifar, Loader
from runs import export_weights, load_model


def tiny_cifar(x: torch.Tensor) -> Cifar:
    """A dataset of the images x for the training split (their first 50 as the test split), ten classes."""
    return Cifar(x, torch.arange(len(x)) % 10, x[:50], torch.arange(50) % 10, [str(i) for i in range(10)])


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
    monkeypatch.setattr(torch.cpu, next(iter(hardware.CPU_BF16_PROBES)), lambda: True, raising=False)  # as a bf16 CPU
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
import resource, sys, torch, hardware
if sys.argv[1] == "keep":
    assert hardware.keep_freed_memory()
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


RETIRED_RUN = f"{ROOT}/tests/fixtures/retired-levers-run"


def test_a_run_with_a_retired_lever_evaluates_its_weights_and_refuses_to_resume(tiny_folder, tmp_path, capsys):
    """tests/fixtures/retired-levers-run: tiny_args + --epochs 2 --ema 0.9 --crop-sizes 24, written by train.py at
    the commit before the levers were retired. Its trained model is the weights' average (the checkpoint's ema
    entry): --eval-only, load_model and export_weights take it; --resume is refused in one line, naming the
    flags and the git tag that still has them."""
    run = tmp_path / "old"
    shutil.copytree(RETIRED_RUN, run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["config"]["ema"], ckpt["config"]["crop_sizes"]) == (0.9, [24])
    res = train.main(["--eval-only", "--resume", str(run), "--data-dir", tiny_folder, "--device", "cpu"])
    logged = metrics(run)[-1]
    assert res["test_acc"] == logged["test_acc"] and res["test_loss"] == pytest.approx(logged["test_loss"], abs=1e-6)
    assert torch.equal(load_model(str(run / "last.pt")).fc.weight, ckpt["ema"]["fc.weight"])
    assert not torch.equal(ckpt["ema"]["fc.weight"], ckpt["model"]["fc.weight"])
    assert torch.equal(export_weights(str(run), str(tmp_path / "w.pt"))["model"]["fc.weight"], ckpt["ema"]["fc.weight"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu",
                    "--epochs", "3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--ema 0.9, --crop-sizes [24]" in err and config.RETIRED_LEVERS_TAG in err and "--eval-only" in err
    assert torch.equal(torch.load(run / "last.pt", weights_only=True)["model"]["fc.weight"], ckpt["model"]["fc.weight"])


@pytest.mark.parametrize("flag", ["--ema", "--crop-sizes", "--resize-to", "--flip", "--clean-epochs", "--whiten-init"])
def test_retired_flags_are_gone(flag, tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_folder, tmp_path / "r", flag, "1"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in err
