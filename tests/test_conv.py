"""Convolutional networks: planted duplicate channels in VGG-style CNNs (both torch exporters)."""

import numpy as np
import pytest
from builders import planted_rows
from conftest import assert_same_outputs, check_full

import condense_graph as cg

torch = pytest.importorskip("torch")
nn = torch.nn
from torch_models import export  # noqa: E402


def plant_conv(conv, distinct, rng):
    """Make the conv's output channels positive multiples of `distinct` kernels (+ bias)."""
    out, fan_in = conv.weight.shape[0], int(np.prod(conv.weight.shape[1:]))
    rows = planted_rows(rng, out, distinct, fan_in)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(rows[:, :-1].reshape(conv.weight.shape)))
        conv.bias.copy_(torch.from_numpy(rows[:, -1]))


class VGG(nn.Module):
    def __init__(self, pool="max", global_pool=False):
        super().__init__()
        pool_layer = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),
            nn.ReLU(),
            pool_layer,
            nn.Conv2d(12, 16, 3, padding=1, stride=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 10, 1),
            nn.ReLU(),
        )
        self.global_pool = global_pool
        features = 10 if global_pool else 10 * 4 * 4
        self.head = nn.Sequential(nn.Linear(features, 24), nn.ReLU(), nn.Linear(24, 5))

    def forward(self, x):
        x = self.features(x)
        x = x.mean((2, 3)) if self.global_pool else torch.flatten(x, 1)
        return self.head(x)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("pool,global_pool", [("max", False), ("avg", True)])
def test_vgg_with_planted_channels_reduces_exactly(pool, global_pool, dynamo, tmp_path, rng):
    module = VGG(pool, global_pool).eval()
    plant_conv(module.features[0], 5, rng)
    plant_conv(module.features[3], 7, rng)
    plant_conv(module.features[6], 4, rng)
    x = torch.from_numpy(rng.normal(size=(3, 3, 16, 16)).astype(np.float32))
    model = export(module, x, dynamo, tmp_path / "vgg.onnx")
    result = cg.condense(model, threshold=0.9999)
    layers = result.report["layers"]
    assert [layer["width_after"] for layer in layers[:3]] == [5, 7, 4], result.report["skipped"]
    assert all(layer["exact"] for layer in layers)
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": x.numpy()})


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=2), "grouped Conv"),
        (lambda: nn.ConvTranspose2d(8, 8, 2, stride=2), "ConvTranspose"),
    ],
)
def test_grouped_conv_and_conv_transpose_are_skipped_with_a_reason(make, reason, tmp_path, rng):
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), make(), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    x = torch.from_numpy(rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    model = export(module, x, False, tmp_path / "m.onnx")
    result = cg.condense(model, threshold=0.5)
    assert any(reason in s["reason"] for s in result.report["skipped"]), result.report["skipped"]
    assert result.report["layers"] == []  # neither the conv before it nor the op itself is touched
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": x.numpy()}, rtol=0.0)


class SpatialOps(nn.Module):
    """Zero padding, upsampling, cropping between convs, and a literal Reshape into the head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.pad = nn.ZeroPad2d(1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv2 = nn.Conv2d(10, 6, 3, stride=2)
        self.head = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x):
        x = self.up(self.pad(torch.relu(self.conv1(x))))[:, :, 1:, 1:]
        x = torch.relu(self.conv2(x))
        return self.head(x.reshape(-1, 6 * 5 * 5))


def test_pad_resize_slice_and_reshape_carry_channels(tmp_path, rng):
    module = SpatialOps().eval()
    plant_conv(module.conv1, 4, rng)
    plant_conv(module.conv2, 2, rng)
    x = torch.from_numpy(rng.normal(size=(2, 3, 6, 6)).astype(np.float32))
    assert module(x).shape == (2, 4)
    model = export(module, x, False, tmp_path / "m.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"Pad", "Resize", "Slice", "Reshape"} <= ops, ops
    result = cg.condense(model, threshold=0.9999)
    assert [layer["width_after"] for layer in result.report["layers"]] == [4, 2], result.report["skipped"]
    assert all(layer["exact"] for layer in result.report["layers"])
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": x.numpy()})
