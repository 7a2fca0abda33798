"""Small reference architectures for examples, tests and benchmarks.

Plain ``torch.nn`` only (no torchvision), so a checkpoint can be rebuilt from
``"optimizer.zoo:small_resnet"`` plus its kwargs anywhere torch is installed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "SmallResNet", "small_resnet"]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN pairs plus a shortcut.

    The shortcut is the identity when shape is unchanged and a strided 1x1
    conv + BN projection when the block downsamples or widens, as in ResNet-18.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        # bias=False: the following BatchNorm has its own shift, a conv bias would be redundant.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Separate ReLU modules (not one reused) so per-module hooks, fusion and
        # quantization passes see one activation per position in the graph.
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem + three stages (28x28 -> 14x14 -> 7x7) of basic blocks, GAP, ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 24,
                 blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        # 3x3 stride-1 stem: 28x28 inputs are too small for ResNet's 7x7/2 stem + max-pool.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = width
        for index, (out_channels, count) in enumerate(zip(widths, blocks)):
            # The first block of stages 2 and 3 halves the resolution (and doubles width),
            # so its shortcut becomes a 1x1 projection.
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(channels, out_channels, stride)]
            layers += [BasicBlock(out_channels, out_channels) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch so every block starts as the
        # identity: this makes short, high-LR schedules (a few epochs) markedly more stable.
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 24,
                 blocks: tuple[int, int, int] = (1, 1, 1)) -> nn.Module:
    """A small ResNet for 28x28 inputs (Fashion-MNIST sized).

    ``width`` is the channel count of the first stage (then 2x, 4x); ``blocks`` is
    the number of basic blocks per stage. The defaults are sized so that batch-1
    eager CPU latency is dominated by convolution compute (about 1 ms on one
    thread) while a few epochs on two cores still reach >= 90% Fashion-MNIST accuracy.
    """
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, width=width, blocks=tuple(blocks))
