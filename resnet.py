"""Residual and plain networks for CIFAR-10, built from basic_block.BasicBlock.

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385. Section 4.2 defines the CIFAR family; ResNet-18/34 follow Table 1, adapted to 32x32 inputs
(3x3 stride-1 stem, no max-pool), as in the usual CIFAR ports.

| name      | layers | stage widths    | blocks/stage | shortcut   | params (10 classes)                  |
|-----------|--------|-----------------|--------------|------------|--------------------------------------|
| resnet18  | 18     | 16, 32, 64, 128 | 2, 2, 2, 2   | projection | 701,466 (11,173,962 with width=64)   |
| resnet34  | 34     | 16, 32, 64, 128 | 3, 4, 6, 3   | projection | 1,334,618                            |
| resnet20  | 20     | 16, 32, 64      | 3, 3, 3      | zeropad    | 269,722                              |
| resnet32  | 32     | 16, 32, 64      | 5, 5, 5      | zeropad    | 464,154                              |
| resnet44  | 44     | 16, 32, 64      | 7, 7, 7      | zeropad    | 658,586                              |
| resnet56  | 56     | 16, 32, 64      | 9, 9, 9      | zeropad    | 853,018                              |
| resnet110 | 110    | 16, 32, 64      | 18, 18, 18   | zeropad    | 1,727,962                            |
| plainNN   | NN     | as resnetNN     | as resnetNN  | none       | plain18 690,266, plain34 1,323,418   |

The CIFAR plain nets have exactly their twins' parameters (option A adds none); the ResNet-18/34 pairs differ
by their projection shortcuts. Layers count the weighted layers on the main path: stem conv + 2 per block +
the classifier (6n+2 for the CIFAR family). `python resnet.py` prints this table from the code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from basic_block import SHORTCUTS, BasicBlock
from data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, normalize


class ResNet(nn.Module):
    """stem (3x3 conv, BN, ReLU) -> stages of BasicBlocks -> global average pool -> Linear."""

    def __init__(
        self,
        blocks_per_stage: list[int],
        widths: list[int],
        num_classes: int = 10,
        shortcut: str = "projection",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        if zero_init_residual and shortcut == "none":
            # gamma = 0 on the last BN of a plain block zeroes its output: the net would output a constant.
            raise ValueError("zero_init_residual is for residual nets; on a plain net it zeroes every block")
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        stages = []
        for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2  # halve the feature map (and double the width) at every new stage
            stages.append(self._make_layer(in_channels, width, n, stride, shortcut))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_residual)
        # The input statistics this net is trained on (train.py's) and its class names; load_model sets a
        # checkpoint's own.
        self.normalization = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
        self.classes = list(CIFAR10_CLASSES) if num_classes == 10 else [str(i) for i in range(num_classes)]

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride, shortcut)]
        blocks += [BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He et al. 2015 ("Delving deep into rectifiers"), fan_out as in fb.resnet.torch and torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # every residual block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (uint8 0-255, or floats in [0, 1]; (B, 3, H, W)) -> the input this net expects."""
        return normalize(images, mean=self.normalization["mean"], std=self.normalization["std"])

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """Class indices for raw images: uint8 (B, 3, H, W) or one (3, H, W), a tensor or a numpy array, as
        read from files; model.classes[i] names them. Evaluates in eval mode, on the model's device."""
        x = torch.as_tensor(images)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"predict takes images of shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
        was_training = self.training
        self.eval()
        try:
            return self(self.normalize(x.to(self.fc.weight.device))).argmax(1)  # (B,)
        finally:
            self.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 32, 32), normalised
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, w, 32, 32)
        x = self.stages(x)  # (B, 8w, 4, 4) for ResNet-18; (B, 4w, 8, 8) for the CIFAR family
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, C)
        return self.fc(x)  # (B, num_classes)


# ----------------------------------------------------------------------------------------- the named nets


@dataclass(frozen=True)
class Arch:
    """A residual net's shape; its plain twin (plainNN) is the same without shortcuts."""

    blocks: tuple[int, ...]  # BasicBlocks per stage
    widths: tuple[int, ...]  # each stage's width, as a multiple of --width
    shortcut: str  # where the shape changes: "projection" (option B) or "zeropad" (option A)

    @property
    def depth(self) -> int:  # weighted layers on the main path: stem + 2 per block + classifier
        return 2 * sum(self.blocks) + 2


ARCHS = {
    "resnet18": Arch((2, 2, 2, 2), (1, 2, 4, 8), "projection"),  # Table 1, adapted to 32x32 inputs
    "resnet34": Arch((3, 4, 6, 3), (1, 2, 4, 8), "projection"),
    **{f"resnet{6 * n + 2}": Arch((n, n, n), (1, 2, 4), "zeropad") for n in (3, 5, 7, 9, 18)},  # section 4.2
}
MODEL_NAMES = tuple(ARCHS) + tuple(name.replace("resnet", "plain") for name in ARCHS)


def is_plain(name: str) -> bool:
    return name.startswith("plain")


def model_depth(name: str) -> int:
    return ARCHS[name.replace("plain", "resnet")].depth


def build_model(name: str, num_classes: int = 10, width: int = 16, shortcut: str | None = None,
                zero_init_residual: bool = False) -> ResNet:
    """Build a registered net (MODEL_NAMES); a residual net may take another shortcut, a plain net none."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    arch = ARCHS[name.replace("plain", "resnet")]
    if is_plain(name) and shortcut not in (None, "none"):
        raise ValueError(f"{name} is a plain net; it takes no shortcut")
    shortcut = "none" if is_plain(name) else shortcut or arch.shortcut
    widths = [m * width for m in arch.widths]
    return ResNet(list(arch.blocks), widths, num_classes, shortcut, zero_init_residual)


def ResNet18(num_classes: int = 10, width: int = 16, shortcut: str = "projection", **kw) -> ResNet:
    """Our CIFAR ResNet-18: widths w, 2w, 4w, 8w; two blocks per stage."""
    return build_model("plain18" if shortcut == "none" else "resnet18", num_classes, width,
                       None if shortcut == "none" else shortcut, **kw)


def ResNet34(num_classes: int = 10, width: int = 16, shortcut: str = "projection", **kw) -> ResNet:
    return build_model("plain34" if shortcut == "none" else "resnet34", num_classes, width,
                       None if shortcut == "none" else shortcut, **kw)


def cifar_resnet(depth: int, num_classes: int = 10, width: int = 16, shortcut: str = "zeropad", **kw) \
        -> ResNet:
    """The paper's section 4.2 nets: 6n+2 layers, three stages of n blocks at widths 16, 32, 64."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet([n, n, n], [width, 2 * width, 4 * width], num_classes, shortcut, **kw)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> list[dict]:
    """Print depth, parameter count and output shape of every registered model."""
    rows = []
    x = torch.zeros(2, 3, 32, 32)
    print(f"{'name':<10} {'depth':>5} {'params':>11}  output")
    for name in MODEL_NAMES:
        model = build_model(name).eval()
        with torch.no_grad():
            shape = tuple(model(x).shape)
        rows.append({"name": name, "depth": model_depth(name), "params": count_parameters(model),
                     "output": shape})
        print(f"{name:<10} {rows[-1]['depth']:>5} {rows[-1]['params']:>11,}  {shape}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
