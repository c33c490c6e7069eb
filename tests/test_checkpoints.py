"""Checkpoints from elsewhere and their input normalisation: akamaster/pytorch_resnet_cifar10's published nets load
through our code and compute what they computed there; every checkpoint carries the mean/std its net needs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from conftest import ROOT, assert_same_weights, metrics, tiny_args, untimed, weights
from data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from resnet import build_model
from runs import load_model
from runs import PORT_NORMALIZATION

PEER_WEIGHTS = os.environ.get("PEER_WEIGHTS_DIR", os.path.join(ROOT, "..", "shared", "reference", "peer-weights"))


# ---- an independent copy of how that port builds its nets (its resnet.py, read, not imported)


class PortBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class PortResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = [16, 32, 64]
        for i, p in enumerate(planes):
            blocks = [PortBlock(planes[max(i - 1, 0)], p, 1 if i == 0 else 2)] + [PortBlock(p, p) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(out, out.size(3)).flatten(1))


def save_port_checkpoint(n: int, path) -> PortResNet:
    """A randomly initialised port net with non-trivial BN statistics, saved as the port saves (DataParallel)."""
    torch.manual_seed(n)
    net = PortResNet(n)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    sd = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"best_prec1": 91.0, "state_dict": sd}, path)
    return net.eval()


def imagenet_normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(PORT_NORMALIZATION[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x_uint8.float() / 255 - mean) / std


@pytest.mark.parametrize("n, arch", [(3, "resnet20"), (5, "resnet32")])
def test_port_checkpoint_computes_the_same_function(tmp_path, n, arch):
    path = tmp_path / "port.th"
    port = save_port_checkpoint(n, path)
    model = load_model(str(path))
    assert type(model).__name__ == "ResNet" and not model.training
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_model(arch).parameters())
    assert model.normalization == PORT_NORMALIZATION  # ImageNet's, recorded for the user
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(model.normalize(x), imagenet_normalize(x), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(model.normalize(x)), port(imagenet_normalize(x)), atol=1e-4)


def test_port_checkpoint_eval_only_uses_its_normalisation(tiny_folder, tmp_path, capsys):
    path = tmp_path / "port.th"
    port = save_port_checkpoint(3, path)
    data = load_cifar10(tiny_folder)
    with torch.no_grad():
        logits = port(imagenet_normalize(data.test_x))
    expected, loss = (logits.argmax(1) == data.test_y).sum().item(), F.cross_entropy(logits, data.test_y).item()
    res = train.main(["--eval-only", "--resume", str(path), "--data-dir", tiny_folder, "--device", "cpu"])
    assert round(res["test_acc"] * len(data.test_y)) == expected
    assert res["test_loss"] == pytest.approx(loss, rel=1e-4)  # the loss moves with any other mean/std
    assert "akamaster/pytorch_resnet_cifar10" in capsys.readouterr().out


def test_port_checkpoint_cannot_be_resumed_for_training(tiny_folder, tmp_path, capsys):
    path = tmp_path / "port.th"
    save_port_checkpoint(3, path)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(path), "--data-dir", tiny_folder, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--eval-only" in err


def test_a_state_dict_that_is_not_a_cifar_resnet_is_one_line(tmp_path):
    from runs import CheckpointError

    path = tmp_path / "other.th"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(10, 4)}}, path)
    with pytest.raises(CheckpointError, match="not a pytorch_resnet_cifar10 ResNet"):
        load_model(str(path))


def test_our_checkpoints_record_normalisation_and_old_ones_default_to_cifar10(tiny_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["normalization"] == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    assert load_model(str(out / "last.pt")).normalization == ckpt["normalization"]
    # a checkpoint that says another mean/std is used with it
    ckpt["normalization"] = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    torch.save(ckpt, out / "other.pt")
    model = load_model(str(out / "other.pt"))
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    assert torch.allclose(model.normalize(x), torch.full((1, 3, 32, 32), 2.0))
    assert torch.allclose(model.normalize(x.float() / 255), torch.full((1, 3, 32, 32), 2.0))  # floats in [0, 1]
    # the format before normalisation was recorded (no key): CIFAR-10's, the only one train.py ever used
    del ckpt["normalization"]
    torch.save(ckpt, out / "old.pt")
    assert load_model(str(out / "old.pt")).normalization == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


@pytest.mark.parametrize("name, accuracy", [("resnet20-12fca82f.th", 0.8103), ("resnet56-4bfd9763.th", 0.8320)])
def test_published_port_nets_on_the_jpeg_copy(real_cifar, name, accuracy):
    """Their own code measures 81.03% and 83.20% on the JPEG test set (docs/data.md)."""
    path = os.path.join(PEER_WEIGHTS, name)
    if not os.path.exists(path):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared peer weights are missing: {path}")
        pytest.skip(f"peer weights not found at {path}")
    res = train.main(["--eval-only", "--resume", path, "--data-dir", real_cifar, "--device", "cpu"])
    assert res["test_acc"] == pytest.approx(accuracy, abs=0.00005)  # to 0.01 points: the same images right


# ---- a run written by an older train.py

OLD_RUN = os.path.join(ROOT, "tests", "fixtures", "format1-run")


def test_a_run_written_by_the_old_code_loads_and_resumes(tiny_folder, tmp_path):
    """tests/fixtures/format1-run: tiny_args + --val-split 40, stopped by SIGTERM at epoch 2, step 3, written by
    train.py at commit 2a58917 (before train.py was split and runs.py owned the run directory)."""
    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3) and ckpt["partial"]["count"] == 96
    assert load_model(str(run / "last.pt")).normalization["mean"] == list(CIFAR10_MEAN)
    first = metrics(run)[0]
    summary = train.main(["--resume", str(run), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == first
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    # The same run straight through on this machine: close, not bit for bit, as the fixture's CPU may have had
    # other kernels (AVX2 and AVX-512 round differently: 0.07% apart here). Exactness of a resume is the kill -9
    # and SIGTERM tests' job, on one machine; this one checks the old format loads and carries on sanely.
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_folder, straight, "--val-split", "40"))
    for a, b in zip(untimed(rows), untimed(metrics(straight)), strict=True):
        if a["epoch"] == 1:  # written by the old code, which logged as lr the next epoch's rate
            a, b = {k: v for k, v in a.items() if k != "lr"}, {k: v for k, v in b.items() if k != "lr"}
        assert a == pytest.approx(b, rel=0.01, abs=0.03)  # 0.03: one of the 40 validation images
    a, b = (torch.cat([w.flatten().float() for w in weights(r).values()]) for r in (run, straight))
    assert (a - b).norm() <= 0.01 * b.norm()  # every weight and BN statistic, within 1% in norm


def test_a_resumed_epoch_logs_the_seconds_before_its_stop(tiny_folder, tmp_path):
    """A mid-epoch checkpoint carries the epoch's seconds so far: the resumed epoch's time and images/s count both
    parts, not only the one after the resume."""
    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["partial"]["seconds"] = torch.tensor(1000.0, dtype=torch.float64)  # as if stopped after 1000 s
    torch.save(ckpt, run / "last.pt")
    train.main(["--resume", str(run), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    resumed = metrics(run)[1]
    assert 1000 < resumed["epoch_time_s"] < 1300
    assert resumed["images_per_s"] == pytest.approx(160 / 1000, abs=0.05)  # 160 training images in ~1000 s


def test_epoch_sums_time_what_they_can():
    """Sums loaded from a partial with seconds carry its clock on; from an older partial (no seconds) the images
    before the stop are left out of images/s, whose time is unknown."""
    with_seconds = {"loss_sum": torch.tensor(5.0), "correct": torch.tensor(40.0), "count": torch.tensor(96.0),
                    "seconds": torch.tensor(30.0, dtype=torch.float64)}
    sums = train.EpochSums("cpu")
    sums.load(with_seconds)
    assert sums.reduced(1)["seconds"].item() == pytest.approx(30.0, abs=1.0) and sums.untimed == 0
    sums.load({k: v for k, v in with_seconds.items() if k != "seconds"})
    saved = sums.reduced(1)  # what the next mid-epoch checkpoint holds: still 96 untimed images
    assert saved["seconds"].item() < 1.0 and saved["untimed"].item() == 96 and saved["count"].item() == 96
    sums.load(saved)
    assert sums.untimed == 96
    sums.zero_()
    assert sums.untimed == 0 and sums.count.item() == 0


# ---- kuangliu/pytorch-cifar's checkpoints, and predicting from raw images


class KuangliuBlock(PortBlock):
    """That repository's BasicBlock (its models/resnet.py, read, not imported): the same residual branch as the
    port's, with a projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class KuangliuResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes, layers = 64, []
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(KuangliuBlock(planes, width, stride), KuangliuBlock(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.avg_pool2d(out, 4), 1))


def kuangliu_normalize(x_uint8: torch.Tensor) -> torch.Tensor:  # its main.py's transforms.Normalize
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


def test_kuangliu_checkpoint_computes_the_same_function(tmp_path):
    torch.manual_seed(0)
    theirs = KuangliuResNet18()
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    theirs.eval()
    path = tmp_path / "ckpt.pth"  # its main.py under DataParallel: module. prefix
    torch.save({"net": {f"module.{k}": v for k, v in theirs.state_dict().items()}, "acc": 95.1, "epoch": 199}, path)
    model = load_model(str(path))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert model.normalization == {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = theirs(kuangliu_normalize(x))
        assert torch.allclose(model(model.normalize(x)), expected, atol=1e-4)
    assert torch.equal(model.predict(x), expected.argmax(1))


def test_predict_classifies_raw_uint8_images_in_one_line(tiny_folder, tmp_path):
    """load_model(path).predict(images): raw uint8 (tensor or numpy, batch or one image) -> class indices, the
    same as the logged test accuracy counts; model.classes names them."""
    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    data = load_cifar10(tiny_folder)
    model = load_model(str(out / "last.pt"))
    pred = model.predict(data.test_x)
    assert pred.shape == (len(data.test_y),) and pred.dtype == torch.int64
    assert (pred == data.test_y).float().mean().item() == pytest.approx(metrics(out)[-1]["test_acc"])
    assert model.predict(data.test_x[3].numpy()).tolist() == [pred[3].item()]
    assert model.classes == data.classes and not model.training
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.predict(data.test_x[:2].permute(0, 2, 3, 1))
