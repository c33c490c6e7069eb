"""torch.hub: an entry point per registered net, and the shipped weights with their documented accuracy."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import torch

import hubconf
from conftest import ROOT
from resnet import MODEL_NAMES

# The paper's parameter counts (Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M) and ours for ResNet-18 at width 16.
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


def documented_weights() -> dict[str, tuple[float, str]]:
    """weights/README.md's table: file -> (test accuracy on the JPEG copy's 10,000 images, sha256)."""
    with open(os.path.join(ROOT, "weights", "README.md")) as f:
        rows = re.findall(r"^\| `([^`]+\.pt)` .*\*\*(\d+\.\d+)%\*\* \| `([0-9a-f]{64})` \|$", f.read(), re.M)
    return {file: (float(acc) / 100, sha) for file, acc, sha in rows}


SHIPPED_TEST_ACC = {name: documented_weights()[file][0] for name, file in hubconf.PRETRAINED.items()}


def hub(name: str, **kw):
    return torch.hub.load(ROOT, name, source="local", **kw)


def test_every_registered_net_is_an_entry_point():
    from resnet import build_model

    for name in MODEL_NAMES:  # (torch.hub.list reads GitHub repositories only)
        model = hub(name)
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_model(name).parameters())


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_hub_builds_the_papers_nets_with_their_parameter_counts(depth):
    for kind in ("resnet", "plain"):
        n = sum(p.numel() for p in hub(f"{kind}{depth}").parameters())
        assert round(n / 1e6, 2 if depth < 110 else 1) == PAPER_PARAMS_M[depth], (kind, n)
    wide = hub("resnet20", width=32, num_classes=100)
    assert wide.fc.out_features == 100 and wide.conv1.out_channels == 32


def test_hub_resnet18_and_its_refusals():
    assert sum(p.numel() for p in hub("resnet18").parameters()) == 701_466
    with pytest.raises(ValueError, match="no trained weights ship for plain56; pretrained=True is available for: "
                                         "resnet18, resnet20, resnet56"):
        hub("plain56", pretrained=True)
    with pytest.raises(ValueError, match="takes no width"):
        hub("resnet20", pretrained=True, width=32)


def test_every_shipped_file_is_documented_with_its_sha256():
    documented = documented_weights()
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "weights")) if f.endswith(".pt"))
    assert sorted(documented) == shipped == sorted(hubconf.PRETRAINED.values())
    for file, (_, sha) in documented.items():
        with open(os.path.join(ROOT, "weights", file), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, file


@pytest.mark.parametrize("name", sorted(SHIPPED_TEST_ACC))
def test_shipped_weights_give_their_documented_accuracy(real_cifar, name):
    from data import load_cifar10

    model = hub(name, pretrained=True)
    data = load_cifar10(real_cifar)
    pred = torch.cat([model.predict(data.test_x[i:i + 1000]) for i in range(0, len(data.test_x), 1000)])
    assert model.classes == data.classes and not model.training
    assert (pred == data.test_y).float().mean().item() == pytest.approx(SHIPPED_TEST_ACC[name], abs=5e-5)
