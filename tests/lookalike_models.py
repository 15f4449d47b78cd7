"""Small PyTorch look-alikes of real architectures, with planted condensed channels (issue 10).

Each builder returns a `Lookalike`: the eval-mode module, an example input, the exporters it is
exported with, and the planted layers. The architectures reproduce the exporter patterns of the
real networks, at toy size (8-48 channels, inputs of 32x32 or less):
- `mobilenet_v3_small`: HardSwish, squeeze-excitation blocks x * hardsigmoid(fc2(relu(fc1(pool x)))),
  a residual block, a pooled Linear head;
- `pp_lcnet`: a chain of depthwise-separable blocks, each activation a HardSwish written out by hand,
  x * relu6(x + 3) / 6, between learnable scalar affines a * x + b;
- `yolo`: Conv-BN-SiLU stages, a nearest Upsample and a Concat (an FPN), two detection heads,
  dynamic H and W;
- `keras_nhwc`: NHWC input, convolutions in NCHW between Transposes, per-channel PReLU, then
  NHWC Transpose -> Flatten -> Linear, as tf2onnx writes a Keras model;
- `tf2onnx_bn_after_relu`: Conv -> Relu -> BatchNorm -> LeakyRelu, the BN left unfoldable;
- `if_branches`: a data-dependent `torch.cond` whose branches hold convolution weights (an ONNX If
  with weights used inside its then/else graphs).

Planting: some output channels are made exact copies of another channel (kernel, bias, BN and any
per-channel constant on the path, and the depthwise kernel of a depthwise-separable block), others
near copies (cosine about 0.97 or 0.995), so that every threshold from 0.9 to 1.0 merges something;
all other channels stay random, so they do not merge at high thresholds, as in trained networks.
A planted layer is named by the shape of its producer's weight (torch layout), which identifies it
in the exported graph whatever names an exporter gives the nodes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from test_mobilenet import copy_channel
from torch import nn
from torch_models import randomize_batchnorm


@dataclass
class Planted:
    """`copies` exact copies in the layer whose producer weight has `weight_shape` (torch layout).

    expect: "merge" (a pattern the README supports: the layer shrinks by exactly `copies` at
    threshold 1.0) or "skip" (left alone: the producer is listed in `skipped`, or it is a member of
    a coupled channel group whose other members do not carry the copies, so nothing merges)."""

    weight_shape: tuple
    copies: int
    expect: str


@dataclass
class Lookalike:
    name: str
    module: nn.Module
    example: torch.Tensor
    exporters: tuple
    planted: list = field(default_factory=list)
    dynamic_hw: bool = False
    outputs: tuple = ("y",)


# ---- planting -------------------------------------------------------------------------------


def plant_copies(source: int, targets, conv, *per_channel, dw=None, dw_bn=None) -> int:
    """Channels `targets` of `conv` become exact copies of `source` (with everything per-channel
    after it); returns how many copies were planted."""
    for q in targets:
        copy_channel(source, q, conv, *per_channel, dw=dw, dw_bn=dw_bn)
    return len(targets)


def plant_near_copy(source: int, target: int, conv, *per_channel, cosine: float, generator) -> None:
    """Channel `target` of `conv` becomes `source` plus noise orthogonal to it, so that the two
    kernels have about the given cosine; the per-channel constants after it are copied exactly."""
    copy_channel(source, target, conv, *per_channel)
    with torch.no_grad():
        kernel = conv.weight[source]
        noise = torch.randn(kernel.shape, generator=generator)
        noise -= (noise * kernel).sum() / (kernel * kernel).sum() * kernel
        tangent = (1.0 / cosine**2 - 1.0) ** 0.5  # |noise| / |kernel| = tan(angle)
        conv.weight[target] = kernel + noise * (tangent * kernel.norm() / noise.norm())


def _weight_shape(module: nn.Module) -> tuple:
    return tuple(module.weight.shape)


def _finish(module: nn.Module, seed: int) -> nn.Module:
    module.eval()
    randomize_batchnorm(module, torch.Generator().manual_seed(seed))
    return module


# ---- MobileNetV3-small ----------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation with MobileNetV3's hardsigmoid gate."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(scale))))


def conv_bn(inp, out, kernel=1, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(out)
    )


class InvertedResidualSE(nn.Module):
    """MobileNetV3's block: [expand 1x1 -> BN -> act] -> depthwise -> BN -> act -> SE -> project -> BN."""

    def __init__(self, inp, hidden, out, kernel, stride, act, squeeze):
        super().__init__()
        self.expand = conv_bn(inp, hidden) if hidden != inp else None
        self.dw = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, squeeze)
        self.project = conv_bn(hidden, out)
        self.act = act()
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        h = self.act(self.expand(x)) if self.expand is not None else x
        h = self.project(self.se(self.act(self.dw(h))))
        return x + h if self.residual else h


class MobileNetV3Small(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidualSE(16, 16, 16, 3, 2, nn.ReLU, 8),
            InvertedResidualSE(16, 48, 24, 5, 1, nn.Hardswish, 16),
            InvertedResidualSE(24, 32, 24, 3, 1, nn.Hardswish, 8),
        )
        self.last = conv_bn(24, 48)
        self.head = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        x = nn.functional.hardswish(self.stem(x))
        x = nn.functional.hardswish(self.last(self.blocks(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v3_small() -> Lookalike:
    torch.manual_seed(10)
    net = _finish(MobileNetV3Small(), seed=11)
    gen = torch.Generator().manual_seed(12)
    block2 = net.blocks[1]
    planted = [
        # stem -> HardSwish -> depthwise -> SE Mul: the SE gate couples the channels
        Planted(_weight_shape(net.stem[0]), plant_copies(2, (5, 6), *net.stem), "skip"),
        # SE fc1 -> Relu -> fc2: a plain 1x1 conv pair on the pooled map
        Planted(_weight_shape(block2.se.fc1), plant_copies(0, (3, 4, 5), block2.se.fc1), "merge"),
        # last 1x1 conv -> BN -> HardSwish -> GlobalAveragePool -> Flatten -> Linear
        Planted(_weight_shape(net.last[0]), plant_copies(1, range(10, 18), *net.last), "merge"),
        # Linear -> HardSwish -> Dropout -> Linear
        Planted(_weight_shape(net.head[0]), plant_copies(0, (20, 21, 22, 23), net.head[0]), "merge"),
    ]
    plant_near_copy(3, 30, *net.last, cosine=0.995, generator=gen)
    plant_near_copy(4, 31, *net.last, cosine=0.97, generator=gen)
    plant_near_copy(5, 29, net.head[0], cosine=0.97, generator=gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    return Lookalike("mobilenet_v3_small", net, x, ("torchscript", "dynamo"), planted)


# ---- PP-LCNet ---------------------------------------------------------------------------------


class LearnableAffine(nn.Module):
    """PP-LCNetV3's learnable affine block: one scalar scale and one scalar bias."""

    def __init__(self, scale: float, bias: float):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor(scale)), nn.Parameter(torch.tensor(bias))

    def forward(self, x):
        return self.scale * x + self.bias


class AffineHardSwish(nn.Module):
    """a2 * hardswish(a1 * x + b1) + b2, the HardSwish decomposed by hand: x * relu6(x + 3) / 6."""

    def __init__(self, generator):
        super().__init__()
        s = torch.rand(4, generator=generator)
        self.before = LearnableAffine(0.8 + 0.4 * float(s[0]), 0.2 * float(s[1]) - 0.1)
        self.after = LearnableAffine(0.8 + 0.4 * float(s[2]), 0.2 * float(s[3]) - 0.1)

    def forward(self, x):
        x = self.before(x)
        return self.after(x * nn.functional.relu6(x + 3.0) / 6.0)


class ConvBNAct(nn.Module):
    def __init__(self, inp, out, kernel, stride, generator, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out)
        self.act = AffineHardSwish(generator)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    def __init__(self, inp, out, stride, generator):
        super().__init__()
        self.dw = ConvBNAct(inp, inp, 3, stride, generator, groups=inp)
        self.pw = ConvBNAct(inp, out, 1, 1, generator)

    def forward(self, x):
        return self.pw(self.dw(x))


class PPLCNet(nn.Module):
    def __init__(self, generator, classes=10):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2, generator)
        self.blocks = nn.Sequential(
            *[
                DepthwiseSeparable(i, o, s, generator)
                for i, o, s in ((16, 24, 1), (24, 32, 2), (32, 32, 1), (32, 48, 2))
            ]
        )
        self.last = nn.Conv2d(48, 48, 1)
        self.last_act = AffineHardSwish(generator)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.fc(torch.flatten(self.last_act(self.last(x)), 1))


def pp_lcnet() -> Lookalike:
    torch.manual_seed(20)
    gen = torch.Generator().manual_seed(21)
    net = _finish(PPLCNet(gen), seed=22)
    first, second = net.blocks[0], net.blocks[1]
    planted = [
        # stem -> affine HardSwish -> depthwise -> ... -> pointwise: a block without expand conv
        Planted(
            _weight_shape(net.stem.conv),
            plant_copies(2, (7, 8), net.stem.conv, net.stem.bn, dw=first.dw.conv, dw_bn=first.dw.bn),
            "merge",
        ),
        # pointwise 16->24 expands into the next depthwise block
        Planted(
            _weight_shape(first.pw.conv),
            plant_copies(
                0, (9, 10, 11, 12), first.pw.conv, first.pw.bn, dw=second.dw.conv, dw_bn=second.dw.bn
            ),
            "merge",
        ),
        # 1x1 conv with bias on the pooled map -> affine HardSwish -> Flatten -> Linear
        Planted(_weight_shape(net.last), plant_copies(1, range(30, 36), net.last), "merge"),
    ]
    plant_near_copy(2, 40, net.last, cosine=0.995, generator=gen)
    plant_near_copy(3, 41, net.last, cosine=0.97, generator=gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    return Lookalike("pp_lcnet", net, x, ("torchscript",), planted)


# ---- YOLO ------------------------------------------------------------------------------------------


def conv_bn_silu(inp, out, kernel, stride):
    return nn.Sequential(*conv_bn(inp, out, kernel, stride), nn.SiLU())


class TinyYolo(nn.Module):
    """Backbone stages, an FPN (Upsample x2, Concat with the stride-2 map) and two 1x1 heads."""

    def __init__(self, outputs=12):
        super().__init__()
        self.c1, self.c2 = conv_bn_silu(3, 16, 3, 2), conv_bn_silu(16, 32, 3, 2)
        self.c3, self.c4 = conv_bn_silu(32, 32, 3, 1), conv_bn_silu(48, 24, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head_small, self.head_large = nn.Conv2d(32, outputs, 1), nn.Conv2d(24, outputs, 1)

    def forward(self, x):
        p2 = self.c1(x)
        p3 = self.c3(self.c2(p2))
        fused = self.c4(torch.cat([self.up(p3), p2], 1))
        return self.head_large(fused), self.head_small(p3)


def yolo() -> Lookalike:
    torch.manual_seed(30)
    net = _finish(TinyYolo(), seed=31)
    gen = torch.Generator().manual_seed(32)
    planted = [
        # c1 feeds c2 and the Concat: a concat group with the upsampled map, whose copies merge
        Planted(_weight_shape(net.c1[0]), plant_copies(1, (4, 5), net.c1[0], net.c1[1]), "merge"),
        # c2 -> BN -> SiLU -> c3
        Planted(_weight_shape(net.c2[0]), plant_copies(0, (20, 21, 22, 23), net.c2[0], net.c2[1]), "merge"),
        # c4 -> BN -> SiLU -> head (a graph output producer)
        Planted(_weight_shape(net.c4[0]), plant_copies(2, (10, 11, 12), net.c4[0], net.c4[1]), "merge"),
    ]
    plant_near_copy(3, 30, net.c2[0], net.c2[1], cosine=0.995, generator=gen)
    plant_near_copy(4, 31, net.c2[0], net.c2[1], cosine=0.97, generator=gen)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    return Lookalike(
        "yolo", net, x, ("torchscript", "dynamo"), planted, dynamic_hw=True, outputs=("large", "small")
    )


# ---- Keras through tf2onnx: NHWC ----------------------------------------------------------------


class KerasNHWC(nn.Module):
    """NHWC in; Conv -> Relu -> Conv -> PRelu in NCHW; NHWC Transpose -> Flatten -> Dense -> PRelu."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 12, 3, 1, 1)
        self.prelu2 = nn.PReLU(12)
        self.dense1, self.prelu3 = nn.Linear(8 * 8 * 12, 32), nn.PReLU(32)
        self.dense2 = nn.Linear(32, classes)

    def forward(self, x):
        x = self.prelu2(self.conv2(torch.relu(self.conv1(x.permute(0, 3, 1, 2)))))
        x = torch.flatten(x.permute(0, 2, 3, 1), 1)
        return self.dense2(self.prelu3(self.dense1(x)))


def _random_slopes(prelu: nn.PReLU, generator) -> None:
    with torch.no_grad():
        prelu.weight.copy_(torch.rand(prelu.weight.shape, generator=generator) * 0.4)


def keras_nhwc() -> Lookalike:
    torch.manual_seed(40)
    net = _finish(KerasNHWC(), seed=41)
    gen = torch.Generator().manual_seed(42)
    _random_slopes(net.prelu2, gen)
    _random_slopes(net.prelu3, gen)
    planted = [
        # conv1 -> Relu -> conv2
        Planted(_weight_shape(net.conv1), plant_copies(0, (5, 6, 7), net.conv1), "merge"),
        # conv2 -> PRelu -> Transpose to NHWC -> Flatten -> Dense: channel c is every 12th row
        Planted(_weight_shape(net.conv2), plant_copies(1, (8, 9), net.conv2, net.prelu2), "skip"),
        # Dense -> PRelu (slopes copied with the rows) -> Dense
        Planted(_weight_shape(net.dense1), plant_copies(3, range(24, 28), net.dense1, net.prelu3), "merge"),
    ]
    plant_near_copy(4, 30, net.dense1, net.prelu3, cosine=0.97, generator=gen)
    x = torch.randn(2, 16, 16, 3, generator=gen)
    return Lookalike("keras_nhwc", net, x, ("torchscript",), planted)


# ---- tf2onnx: BN after Relu ---------------------------------------------------------------------


class ReluThenBN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = nn.functional.leaky_relu(self.bn1(torch.relu(self.conv1(x))), 0.2)
        x = nn.functional.leaky_relu(self.bn2(torch.relu(self.conv2(x))), 0.2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tf2onnx_bn_after_relu() -> Lookalike:
    torch.manual_seed(50)
    net = _finish(ReluThenBN(), seed=51)
    gen = torch.Generator().manual_seed(52)
    planted = [
        Planted(_weight_shape(net.conv1), plant_copies(0, (3, 4, 5), net.conv1, net.bn1), "merge"),
        Planted(_weight_shape(net.conv2), plant_copies(1, (12, 13, 14, 15), net.conv2, net.bn2), "merge"),
    ]
    plant_near_copy(2, 20, net.conv2, net.bn2, cosine=0.995, generator=gen)
    plant_near_copy(3, 21, net.conv2, net.bn2, cosine=0.97, generator=gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    return Lookalike("tf2onnx_bn_after_relu", net, x, ("torchscript", "dynamo"), planted)


# ---- weights inside If branches -----------------------------------------------------------------


class IfBranches(nn.Module):
    """conv0 -> conv1 -> If(mean > 0: conv_a, else conv_b) -> pool -> dense1 -> dense2."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv_a, self.conv_b = nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 16, 1)
        self.dense1, self.dense2 = nn.Linear(16, 32), nn.Linear(32, classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(torch.relu(self.conv0(x)))))
        h = torch.cond(
            h.mean() > 0.5,
            lambda t: torch.relu(self.conv_a(t)),
            lambda t: torch.sigmoid(self.conv_b(t)),
            (h,),
        )
        h = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
        return self.dense2(torch.relu(self.dense1(h)))


def if_branches() -> Lookalike:
    torch.manual_seed(60)
    net = _finish(IfBranches(), seed=61)
    gen = torch.Generator().manual_seed(62)
    planted = [
        Planted(_weight_shape(net.conv0), plant_copies(0, (4, 5), net.conv0), "merge"),
        # conv1's output is read inside the then/else branches
        Planted(_weight_shape(net.conv1), plant_copies(1, (6, 7, 8), net.conv1, net.bn1), "skip"),
        Planted(_weight_shape(net.dense1), plant_copies(2, (20, 21, 22, 23), net.dense1), "merge"),
    ]
    plant_near_copy(3, 30, net.dense1, cosine=0.995, generator=gen)
    plant_near_copy(4, 31, net.dense1, cosine=0.97, generator=gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    return Lookalike("if_branches", net, x, ("dynamo",), planted)


# ---- ResNet-18 ----------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU-conv-BN plus the shortcut (1x1 conv + BN when the
    block changes the width or strides), then ReLU."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out)
        self.conv2, self.bn2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 or inp != out:
            self.down = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)
        return torch.relu(shortcut + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet18(nn.Module):
    """ResNet-18's layout (stem, four stages of two BasicBlocks, pooled Linear head) at a quarter of
    its widths: every stage's residual stream is one coupled group (stem or shortcut conv, and
    every block's conv2)."""

    def __init__(self, widths=(16, 32, 64, 128), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]))
        blocks, inp = [], widths[0]
        for i, out in enumerate(widths):
            blocks += [ResBlock(inp, out, 1 if i == 0 else 2), ResBlock(out, out, 1)]
            inp = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def resnet18() -> Lookalike:
    torch.manual_seed(40)
    net = _finish(ResNet18(), seed=41)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(42))
    return Lookalike("resnet18", net, x, ("torchscript", "dynamo"))


BUILDERS = {
    "mobilenet_v3_small": mobilenet_v3_small,
    "pp_lcnet": pp_lcnet,
    "yolo": yolo,
    "keras_nhwc": keras_nhwc,
    "tf2onnx_bn_after_relu": tf2onnx_bn_after_relu,
    "if_branches": if_branches,
}


# ---- export ------------------------------------------------------------------------------------


def export_lookalike(model: Lookalike, exporter: str, path) -> None:
    """Export without folding, as the real pipelines leave them: the TorchScript exporter with
    do_constant_folding=False (opset 17), or the dynamo exporter with optimize=False (opset 18).
    H and W (and the batch) are dynamic where the model says so."""
    dynamo = exporter == "dynamo"
    kwargs = {
        "dynamo": dynamo,
        "opset_version": 18 if dynamo else 17,
        "input_names": ["x"],
        "output_names": list(model.outputs),
    }
    if dynamo:
        kwargs["optimize"] = False
        if model.dynamic_hw:  # the FPN's Upsample + Concat need H and W divisible by 4
            kwargs["dynamic_shapes"] = {
                "x": {
                    2: 4 * torch.export.Dim("h4", min=2, max=64),
                    3: 4 * torch.export.Dim("w4", min=2, max=64),
                }
            }
    else:
        kwargs["do_constant_folding"] = False
        if model.dynamic_hw:
            kwargs["dynamic_axes"] = {"x": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.module, (model.example,), str(path), **kwargs)
