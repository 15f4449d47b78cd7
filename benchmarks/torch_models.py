"""PyTorch architectures for the benchmarks and the tests (torchvision cannot be installed here).

`MobileNetV2` follows torchvision's definition (the paper's Table 2 network): with 10 classes it
has exactly 2,236,682 parameters. `ResidualCNN` is a small ResNet-style network with residual
Adds; `resnet50_like` builds a ResNet-50-sized CNN (about 25M parameters) from bottlenecks.
`digits_data` is the image data they train on here (scikit-learn's digits, upsampled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnx


def conv_bn_relu6(inp, out, kernel=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp, out, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == out
        layers = [conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes=10, first_stride=1):
        super().__init__()
        features = [conv_bn_relu6(3, 32, stride=first_stride)]  # stride 1 for 32x32 inputs
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(conv_bn_relu6(inp, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class Bottleneck(nn.Module):
    def __init__(self, inp, width, stride=1):
        super().__init__()
        out = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(inp, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.skip = (
            nn.Sequential()
            if stride == 1 and inp == out
            else nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResidualCNN(nn.Module):
    """stem -> bottlenecks -> pooled linear head; `stages` = (blocks, width) per stage."""

    def __init__(self, stages=((1, 8), (1, 16)), num_classes=10, stem=16):
        super().__init__()
        layers = [nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
        inp = stem
        for i, (blocks, width) in enumerate(stages):
            for b in range(blocks):
                layers.append(Bottleneck(inp, width, 2 if b == 0 and i > 0 else 1))
                inp = width * 4
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(inp, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def resnet50_like(num_classes=1000):
    """ResNet-50's bottleneck layout (3, 4, 6, 3 blocks): about 25M parameters."""
    return ResidualCNN(((3, 64), (4, 128), (6, 256), (3, 512)), num_classes, stem=64)


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm realistic running statistics and affine parameters."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def export(
    module: nn.Module, example: torch.Tensor, dynamo: bool, path, dynamic_batch: bool = False
) -> onnx.ModelProto:
    """Export with the TorchScript (dynamo=False, opset 17) or the dynamo exporter (opset 18);
    `dynamic_batch` makes the TorchScript export's batch dimension symbolic."""
    import warnings

    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamo=dynamo,
            opset_version=18 if dynamo else 17,
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch and not dynamo else None,
        )
    return onnx.load(str(path))


def digits_data(seed: int, size: int = 32) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """scikit-learn's digits upsampled to `size` x `size`, 3 channels, standardized on the train
    split: 300 test, 300 validation, the rest train (seeded permutation), and a description."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1).numpy()
    perm = np.random.default_rng(seed).permutation(len(x))
    test, val, train = perm[:300], perm[300:600], perm[600:]
    mean, std = x[train].mean(), x[train].std()
    x = ((x - mean) / std).astype(np.float32)
    source = (
        f"scikit-learn digits, NOT CIFAR-10 ({len(x):,} 8x8 grayscale images upsampled to {size}x{size}, "
        f"3 channels: {len(train):,} train, {len(val):,} validation, {len(test):,} test)"
    )
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}, source
