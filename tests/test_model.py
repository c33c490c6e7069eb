"""The residual block and the networks (issue: basic_block.py and resnet.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from basic_block import BasicBlock, ZeroPadShortcut
from resnet import MODEL_NAMES, ResNet18, build_model, count_parameters
from runs import load_model

EXPECTED_PARAMS = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962,
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_every_model(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        for n in (1, 4):
            assert model(torch.randn(n, 3, 32, 32)).shape == (n, 7)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    assert model(x).shape == (4, 7)


def test_parameter_counts():
    assert count_parameters(ResNet18()) == 701_466
    assert count_parameters(ResNet18(width=64)) == 11_173_962
    assert count_parameters(build_model("plain18")) == 690_266
    for name, n in EXPECTED_PARAMS.items():
        assert count_parameters(build_model(name)) == n
        # option A shortcuts are parameter-free: the plain twin has exactly the same count
        assert count_parameters(build_model(name.replace("resnet", "plain"))) == n


def test_zero_residual_block_is_relu_identity():
    block = BasicBlock(8, 8, shortcut="projection")
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.zeros_(block.bn2.bias)
    block.train()
    x = torch.randn(4, 8, 16, 16)
    assert isinstance(block.shortcut, torch.nn.Identity)
    assert torch.equal(block(x), F.relu(x))


def test_plain_block_has_no_shortcut_path():
    block = BasicBlock(8, 8, shortcut="none")
    assert block.shortcut is None and block.is_plain
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.zeros_(block.bn2.bias)
    assert torch.equal(block(torch.randn(2, 8, 8, 8)), torch.zeros(2, 8, 8, 8))  # no x survives


def test_shortcut_kinds_on_shape_change():
    x = torch.randn(2, 16, 32, 32)
    proj = BasicBlock(16, 32, stride=2, shortcut="projection")
    assert isinstance(proj.shortcut[0], torch.nn.Conv2d) and proj(x).shape == (2, 32, 16, 16)
    zp = BasicBlock(16, 32, stride=2, shortcut="zeropad")
    s = zp.shortcut(x)  # 8 zero channels, the 16 subsampled ones, 8 zero channels (akamaster's even split)
    assert s.shape == (2, 32, 16, 16)
    assert not s[:, :8].any() and not s[:, 24:].any()
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    odd = ZeroPadShortcut(3, 8, 2)(torch.randn(1, 3, 4, 4))  # 5 extra: 2 before, 3 after
    assert [bool(odd[0, c].any()) for c in range(8)] == [False, False, True, True, True, False, False, False]
    assert sum(p.numel() for p in zp.shortcut.parameters()) == 0
    with pytest.raises(ValueError, match="unknown shortcut"):
        BasicBlock(16, 16, shortcut="highway")


def test_zero_init_residual():
    model = build_model("resnet20", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(not b.bn2.weight.any() for b in blocks)
    x = F.relu(torch.randn(2, 16, 32, 32))  # a post-ReLU input, as blocks see
    b = blocks[0].eval()
    torch.nn.init.zeros_(b.bn2.bias)
    assert torch.allclose(b(x), x)  # the block starts as the identity
    with pytest.raises(ValueError, match="plain"):
        build_model("plain20", zero_init_residual=True)


def test_he_init():
    model = build_model("resnet56")
    w = model.stages[1][1].conv1.weight  # 32 out channels, 3x3: fan_out = 288
    assert abs(w.std().item() - (2 / 288) ** 0.5) < 0.1 * (2 / 288) ** 0.5


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet20.*plain110"):
        build_model("resnet19")


def test_every_parameter_gets_finite_gradient():
    for name in ("resnet18", "resnet20", "plain20"):
        torch.manual_seed(0)
        model = build_model(name)
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"


def stem_grad_norm(name: str) -> float:
    torch.manual_seed(0)
    model = build_model(name).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    F.cross_entropy(model(x), y).backward()
    return model.conv1.weight.grad.norm().item()


def test_gradient_health_at_init():
    """Measured (seed 0): resnet 20/56/110 ~0.6/2.7/7.0; plain 20/56/110 ~1.8/1.2e3/3.9e6."""
    res = {d: stem_grad_norm(f"resnet{d}") for d in (20, 56, 110)}
    plain = {d: stem_grad_norm(f"plain{d}") for d in (20, 56, 110)}
    assert res[110] / res[20] < 30  # about an order of magnitude over 90 extra layers
    assert plain[20] < plain[56] < plain[110]  # BN plain nets: gradients explode going backwards
    assert plain[56] / plain[20] > 100 and plain[110] / plain[20] > 1e4
    assert plain[56] > 100 * res[56] and plain[110] > 1e4 * res[110]


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = build_model("resnet20")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", width=8).eval()
    path = tmp_path / "m.pt"
    torch.save({"arch": "resnet20", "model_kwargs": {"num_classes": 10, "width": 8}, "model": model.state_dict()},
               path)
    loaded = load_model(str(path))
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_import_has_no_side_effects():
    code = "import basic_block, resnet, data, config, train, plot_curves"
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_resnet_main_prints_table(capsys):
    import resnet

    rows = resnet.main([])
    out = capsys.readouterr().out
    assert len(rows) == len(MODEL_NAMES) and "1,727,962" in out and "701,466" in out
    assert all(r["output"] == (2, 10) for r in rows)
