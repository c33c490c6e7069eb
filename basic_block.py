"""The residual block of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, arXiv:1512.03385).

A stack of layers is asked to fit a residual F(x) = H(x) - x instead of the mapping H(x) itself:

    H(x) = F(x) + x        if F learns zero, the block is the identity, so extra depth cannot hurt by construction.

        x ─────────────────────────────┐
        │                              │ shortcut: identity, or projection / zero-padding when the shape changes
    conv3x3(stride) → BN → ReLU        │
    conv3x3 → BN                       │
        │                              │
        └──────────── (+) ◄────────────┘
                       │
                     ReLU

With shortcut="none" the addition is removed: the "plain" block the paper compares against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# projection: 1x1 conv (with the stride) + BN when the shape changes, identity otherwise (the paper's option B).
# zeropad:    parameter-free; subsample by the stride and pad with zero channels, half before and half after
#             (option A, the paper's CIFAR nets, split as akamaster's port does so its trained nets load here).
# none:       no shortcut at all -- the plain block of the ablations.
SHORTCUTS = ("projection", "zeropad", "none")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BN that follows has its own shift.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::s, ::s] between zero channels, so the addition has matching shapes for free.

    The paper leaves open where the zeros go; like the most used CIFAR port (akamaster/pytorch_resnet_cifar10)
    we split them evenly, 16 -> 32 channels = 8 zero, the 16 subsampled, 8 zero, so its published nets compute
    the same function here. An odd count puts the extra zero channel after.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("zero-padding shortcut cannot reduce channels")
        extra = out_channels - in_channels
        self.pad_before, self.pad_after = extra // 2, extra - extra // 2
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))  # (B, C_out, H/s, W/s)


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The path x takes around the residual branch; None for a plain block."""
    if kind not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {kind!r}; choose one of {', '.join(SHORTCUTS)}")
    if kind == "none":
        return None
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()  # shapes match: the paper always uses the identity here
    if kind == "zeropad":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN, plus a shortcut: relu(F(x) + shortcut(x)), or relu(F(x)) when plain."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    @property
    def is_plain(self) -> bool:
        return self.shortcut is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C_in, H, W)
        # In-place ReLU and addition save a pass over memory; BN's backward needs its input, not its output.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))  # F(x): the residual
        if self.shortcut is not None:
            out += self.shortcut(x)  # H(x) = F(x) + x
        return F.relu(out, inplace=True)
