"""MobileNetV2 (the paper's Table 2 network) and residual CNNs through both torch exporters."""

import numpy as np
import pytest
from conftest import assert_same_outputs, check_full

import condense_graph as cg

torch = pytest.importorskip("torch")
from torch_models import MobileNetV2, ResidualCNN, export, randomize_batchnorm  # noqa: E402


def copy_channel(p, q, conv, *bns, dw=None, dw_bn=None):
    """Make output channel q of `conv` (and its BNs, depthwise kernel) an exact copy of p."""
    with torch.no_grad():
        for module in (conv, *bns, dw, dw_bn):
            if module is None:
                continue
            for tensor in (
                module.weight,
                getattr(module, "bias", None),
                getattr(module, "running_mean", None),
                getattr(module, "running_var", None),
            ):
                if tensor is not None:
                    tensor[q] = tensor[p]


def test_mobilenet_v2_has_the_papers_parameter_count():
    assert sum(p.numel() for p in MobileNetV2(num_classes=10).parameters()) == 2_236_682


@pytest.fixture(scope="module")
def planted_mobilenet():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = MobileNetV2().eval()
    randomize_batchnorm(net, gen)
    stem, first_dw = net.features[0], net.features[1].conv[0]  # expansion-1 block: no expand conv
    for q in (20, 21):
        copy_channel(2, q, stem[0], stem[1], dw=first_dw[0], dw_bn=first_dw[1])
    block = net.features[4].conv  # expand 24 -> 144, depthwise, project
    for p in range(10):  # expand + depthwise channels 10..19 copy 0..9
        copy_channel(p, p + 10, block[0][0], block[0][1], dw=block[1][0], dw_bn=block[1][1])
    for q in (5, 6, 7):  # project 32 -> 16 of that block feeds features[2]
        copy_channel(1, q, net.features[1].conv[1], net.features[1].conv[2])
    head = net.features[18]  # 1x1 conv 320 -> 1280 + BN + ReLU6 -> pool -> Linear
    for q in range(100, 140):
        copy_channel(3, q, head[0], head[1])
    return net


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_planted_mobilenet_channels_are_found_and_merged(planted_mobilenet, dynamo, tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = export(planted_mobilenet, x, dynamo, tmp_path / "mnv2.onnx")
    result = cg.condense(model, threshold=0.9999)
    layers = [layer for layer in result.report["layers"] if "group" not in layer]
    streams = [layer for layer in result.report["layers"] if "group" in layer]
    widths = [(layer["width_before"], layer["width_after"]) for layer in layers]
    # every reducible layer in graph order: the stem (its depthwise block), the first project conv,
    # the sixteen expand convs (features[4]'s planted), the last project conv, the head conv
    assert widths == [
        (32, 30),
        (16, 13),
        (96, 96),
        (144, 144),
        (144, 134),
        (192, 192),
        (192, 192),
        (192, 192),
        (384, 384),
        (384, 384),
        (384, 384),
        (384, 384),
        (576, 576),
        (576, 576),
        (576, 576),
        (960, 960),
        (960, 960),
        (960, 960),
        (320, 320),
        (1280, 1240),
    ], widths
    for layer in layers:
        if "block_error" in layer:  # every reduced layer: planted copies, so rounding only
            assert layer["block_error"]["max_rel_err"] < 1e-5
        if "Conv" in layer["activation"]:  # depthwise blocks: approximate in general
            assert layer["exact"] is False
    # the residual streams (24, 32, 64, 96 and 160 channels) are coupled groups now: nothing planted
    # in them, so nothing merges at 0.9999
    assert sorted(g["width_before"] for g in streams) == [24, 32, 64, 96, 160], streams
    assert all(g["group"]["kind"] == "residual" and g["width_after"] == g["width_before"] for g in streams)
    assert all("graph output" in s["reason"] for s in result.report["skipped"]), result.report["skipped"]
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": x.numpy()}, rtol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_residual_add_channels_form_a_group_and_the_rest_reduces(dynamo, tmp_path):
    torch.manual_seed(0)
    net = ResidualCNN().eval()
    randomize_batchnorm(net, torch.Generator().manual_seed(2))
    first = net.features[3].body  # bottleneck 16 -> 8 -> 8 -> 32 (residual skip conv)
    for q in (4, 5):
        copy_channel(0, q, first[0], first[1])
    x = torch.randn(2, 3, 16, 16)
    model = export(net, x, dynamo, tmp_path / "res.onnx")
    result = cg.condense(model, threshold=0.9999)
    widths = [(layer["width_before"], layer["width_after"]) for layer in result.report["layers"]]
    assert (8, 6) in widths
    assert all(layer["exact"] for layer in result.report["layers"])
    coupled = [layer for layer in result.report["layers"] if "group" in layer]
    assert coupled and all(g["group"]["kind"] == "residual" for g in coupled), result.report["layers"]
    assert all(g["width_after"] == g["width_before"] for g in coupled)  # nothing planted there
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": x.numpy()})


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_depthwise_block_error_in_the_report_is_what_the_block_does(dynamic, tmp_path):
    """Near-parallel depthwise kernels and expand rows: the least-squares merge is approximate;
    the reported block error must match an independent reproduction of the planner's probe."""
    from conftest import run

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    nn_block = torch.nn.Sequential(  # expand, depthwise, project
        torch.nn.Conv2d(8, 24, 1, bias=False),
        torch.nn.BatchNorm2d(24),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False),
        torch.nn.BatchNorm2d(24),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(24, 8, 1, bias=False),
    ).eval()
    randomize_batchnorm(nn_block, gen)
    with torch.no_grad():
        dw = nn_block[3].weight
        expand, expand_bn = nn_block[0].weight, nn_block[1]
        for q in range(12, 24):  # kernels q ~ 1.5 * kernel (q - 12), slightly perturbed
            expand[q] = 1.2 * expand[q - 12] + 0.01 * torch.randn(expand[q].shape, generator=gen)
            expand_bn.weight[q], expand_bn.running_var[q] = (
                expand_bn.weight[q - 12],
                expand_bn.running_var[q - 12],
            )
            expand_bn.bias[q] = 1.2 * expand_bn.bias[q - 12]
            expand_bn.running_mean[q] = 1.2 * expand_bn.running_mean[q - 12]
            dw[q] = 1.5 * dw[q - 12] + 0.01 * torch.randn(dw[q].shape, generator=gen)
            bn = nn_block[4]  # BN keeps the folded kernels parallel: shift and mean scale by 1.5
            bn.weight[q], bn.running_var[q] = bn.weight[q - 12], bn.running_var[q - 12]
            bn.bias[q], bn.running_mean[q] = 1.5 * bn.bias[q - 12], 1.5 * bn.running_mean[q - 12]
    x = torch.randn(1, 8, 6, 6, generator=gen)
    model = export(nn_block, x, False, tmp_path / "block.onnx")
    probe_shape = (1, 8, 6, 6)
    if dynamic:  # batch and spatial sizes symbolic: the probe is 2 rows of 8 x 8 (plan.PROBE_ROWS,
        del model.graph.value_info[:]  # PROBE_MIN_SIDE: the block's receptive field is only 3)
        for value, names in ((model.graph.input[0], "NCHW"), (model.graph.output[0], "NCHW")):
            for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=True):
                if name != "C":
                    dim.dim_param = name
        probe_shape = (2, 8, 8, 8)
    result = cg.condense(model, threshold=0.99)
    (layer,) = result.report["layers"]
    assert (layer["width_before"], layer["width_after"], layer["exact"]) == (24, 12, False)
    # the planner's probe (plan.BlockProbe): standard normals from default_rng(0) in the producer's
    # input shape; the block cut out, expand conv to project conv, is the whole model
    feeds = {"x": np.random.default_rng(0).standard_normal(probe_shape).astype(np.float32)}
    expected, actual = (run(m, feeds)[0].astype(np.float64) for m in (model, result.model))
    abs_err = float(np.abs(actual - expected).max())
    rel_err = abs_err / float(np.abs(expected).max())
    claimed = layer["block_error"]
    assert claimed["max_rel_err"] > 1e-4, claimed  # approximate: not rounding
    assert claimed["max_abs_err"] == pytest.approx(abs_err, rel=1e-3), (claimed, abs_err)
    assert claimed["max_rel_err"] == pytest.approx(rel_err, rel=1e-3), (claimed, rel_err)
