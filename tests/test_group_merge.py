"""Merging coupled channel groups (issue 13) on torch-built nets, through both exporters.

Each net gets planted exact duplicates (copies, and positive multiples where the path is
positively homogeneous) in *every* member of a group (residual stream, Concat branches, Split
parts, squeeze-excitation gate); everything else is random, BatchNorm statistics included. At
threshold 1.0 the group must lose exactly the planted channels, say "exact", and the reduced model
must agree with the original in ONNX Runtime to 1e-5 relative. Negative controls plant duplicates
that are incomplete (missing in one member, across Split parts, with unequal gate rows) and check
that nothing merges there.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import run
from onnx import numpy_helper

import condense_graph as cg

torch = pytest.importorskip("torch")
from lookalike_models import Lookalike, export_lookalike  # noqa: E402
from test_groups import BasicBlock  # noqa: E402  (conv-BN-ReLU-conv-BN + the stream, ReLU)
from torch import nn  # noqa: E402
from torch_models import randomize_batchnorm  # noqa: E402

EXPORTERS = ("torchscript", "dynamo")
BATCH, SIZE = 2, 16  # the dynamo export has a static batch
RTOL = 1e-5
LAMBDA = 2.5


# ---- models -------------------------------------------------------------------------------------


class ResNet(nn.Module):
    """stem conv -> BN -> ReLU -> `blocks` BasicBlocks -> pooled Linear head: the stream's members
    are the stem and every block's conv2 (each with its BN)."""

    def __init__(self, channels: int = 8, blocks: int = 3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, channels, 3, 1, 1), nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))

    def members(self) -> list[tuple[nn.Module, ...]]:
        return [(self.stem, self.bn)] + [(b.conv2, b.bn2) for b in self.blocks]


class Branches(nn.Module):
    """Two conv -> BN -> ReLU branches (6 channels each) reading x, concatenated into a 1x1 conv."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.left, self.left_bn = nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width)
        self.right, self.right_bn = nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width)
        self.fuse = nn.Conv2d(2 * width, 4, 1)

    def forward(self, x):
        left = torch.relu(self.left_bn(self.left(x)))
        right = torch.relu(self.right_bn(self.right(x)))
        return self.fuse(torch.cat([left, right], 1))


class Halves(nn.Module):
    """conv -> BN -> ReLU (16 channels) split into halves of 8, each read by its own 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.first, self.second = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = torch.relu(self.bn(self.conv(x))).split(8, 1)
        return self.first(a), self.second(b)


class GatedBlock(nn.Module):
    """MobileNetV3's block with its squeeze-excitation gate: stem -> expand 1x1 -> BN -> Hardswish
    -> depthwise 3x3 -> BN -> x * hardsigmoid(fc2(relu(fc1(pool x)))) -> project 1x1 -> BN ->
    pooled Linear head."""

    def __init__(self, inp: int = 8, hidden: int = 16, squeeze: int = 4):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, inp, 3, 1, 1), nn.BatchNorm2d(inp)
        self.expand, self.expand_bn = nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.fc1, self.fc2 = nn.Conv2d(hidden, squeeze, 1), nn.Conv2d(squeeze, hidden, 1)
        self.project, self.project_bn = nn.Conv2d(hidden, inp, 1, bias=False), nn.BatchNorm2d(inp)
        self.head = nn.Linear(inp, 10)

    def forward(self, x):
        h = torch.relu(self.stem_bn(self.stem(x)))
        h = self.dw_bn(self.dw(nn.functional.hardswish(self.expand_bn(self.expand(h)))))
        gate = self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(h, 1))))
        h = self.project_bn(self.project(h * nn.functional.hardsigmoid(gate)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


# ---- planting and measuring ---------------------------------------------------------------------


def plant(p: int, q: int, factor: float, chain, source=None) -> None:
    """Output channel q after `chain` (conv, BN, depthwise conv, BN ... in graph order) becomes
    `factor` times channel p after `source` (the same chain by default; another branch's chain for
    a Concat). Through a BatchNorm, y_q = factor y_p keeps gamma and var and scales mean and beta;
    a depthwise kernel is copied (its input is already scaled)."""
    source = chain if source is None else source
    with torch.no_grad():
        for index, (dst, src) in enumerate(zip(chain, source, strict=True)):
            scale = factor if index == 0 else 1.0  # only the first conv scales its weights
            if isinstance(dst, nn.BatchNorm2d):
                dst.weight[q], dst.running_var[q] = src.weight[p], src.running_var[p]
                dst.bias[q], dst.running_mean[q] = factor * src.bias[p], factor * src.running_mean[p]
                continue
            dst.weight[q] = scale * src.weight[p]
            if dst.bias is not None:
                dst.bias[q] = factor * src.bias[p]


def copy_gate_row(p: int, q: int, fc2: nn.Conv2d) -> None:
    """fc2's row q (weight and bias) equal to row p: the gates of p and q are equal."""
    with torch.no_grad():
        fc2.weight[q], fc2.bias[q] = fc2.weight[p], fc2.bias[p]


def fresh(build, seed: int = 0, **kwargs) -> nn.Module:
    """`build(**kwargs)` with seeded random weights and BatchNorm statistics, in eval mode (plant
    after this)."""
    torch.manual_seed(seed)
    module = build(**kwargs).eval()
    randomize_batchnorm(module, torch.Generator().manual_seed(seed + 1))
    return module


def export(module: nn.Module, exporter: str, path, outputs=("y",)) -> onnx.ModelProto:
    example = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    export_lookalike(Lookalike("net", module, example, (exporter,), outputs=outputs), exporter, path)
    return onnx.load(str(path))


def feeds(model: onnx.ModelProto, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32) for i in model.graph.input}


def relative_error(original: onnx.ModelProto, reduced: onnx.ModelProto, runs: int = 4) -> float:
    """max |y_reduced - y_orig| / max |y_orig| over every output and `runs` random inputs."""
    worst = 0.0
    for seed in range(runs):
        inputs = feeds(original, seed)
        for expected, actual in zip(run(original, inputs), run(reduced, inputs), strict=True):
            assert actual.shape == expected.shape
            assert np.all(np.isfinite(actual))
            worst = max(worst, float(np.abs(actual - expected).max() / np.abs(expected).max()))
    return worst


def declared_shapes_hold(model: onnx.ModelProto) -> list[str]:
    """The tensors whose declared shape (value_info, graph outputs) the run contradicts: a wrong
    dim_value, or one dim_param standing for different sizes (ONNX Runtime plans its buffers by
    them). Found by running a copy without value_info that outputs every declared tensor."""
    declared = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    declared = {k: v for k, v in declared.items() if v.type.HasField("tensor_type")}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in declared)
    actual = dict(zip(declared, run(probe, feeds(model, 0)), strict=True))
    wrong, symbols = [], {}
    for name, info in declared.items():
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            size = actual[name].shape[axis]
            if dim.HasField("dim_value") and dim.dim_value != size:
                wrong.append(f"{name}[{axis}] declared {dim.dim_value}, is {size}")
            if dim.HasField("dim_param"):
                symbols.setdefault(dim.dim_param, set()).add((name, axis, size))
    for symbol, uses in symbols.items():
        if len({size for _, _, size in uses}) > 1:
            wrong.append(f"dim_param {symbol!r} stands for {sorted(uses)}")
    return wrong


def outputs_finite(model: onnx.ModelProto) -> bool:
    return all(np.all(np.isfinite(y)) for y in run(model, feeds(model, 0)))


def shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {t.name: tuple(numpy_helper.to_array(t).shape) for t in model.graph.initializer}


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_of(model: onnx.ModelProto, weight: str) -> str:
    """The name of the node reading initializer `weight` as its weight (exporters differ)."""
    [name] = [n.name for n in model.graph.node if len(n.input) > 1 and n.input[1] == weight]
    return name


def group_entries(result, kind: str) -> list[dict]:
    return [e for e in result.report["layers"] if e["op"] == f"{kind} group"]


def the_group(result, kind: str) -> dict:
    [entry] = group_entries(result, kind)
    return entry


def condense_exactly(model: onnx.ModelProto, **options):
    """Condense at threshold 1.0 with verify; the reduced model agrees to RTOL (checked here with
    ONNX Runtime and by the pass's own verify). Returns (result, measured error)."""
    result = cg.condense(model, threshold=1.0, verify=True, **options)
    assert declared_shapes_hold(result.model) == []
    error = relative_error(model, result.model)
    print(f"max relative error {error:.3g}, verify {result.report['verify']['max_rel_err']:.3g}")
    assert error <= RTOL
    assert result.report["verify"]["max_rel_err"] <= RTOL
    assert result.report["verify"]["nonfinite"] == 0
    return result, error


# ---- residual stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_residual_stream_loses_a_multiple_and_a_copy_planted_in_every_member(exporter, tmp_path):
    net = fresh(ResNet, channels=8, blocks=3)
    for chain in net.members():
        plant(1, 5, LAMBDA, chain)  # y_5 = 2.5 y_1 in the stem and every block's last conv
        plant(2, 6, 1.0, chain)  # y_6 = y_2
    model = export(net, exporter, tmp_path / "res.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "residual")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (8, 6, True)
    assert entry["name"] == node_of(model, "stem.weight")
    members = ["stem.weight"] + [f"blocks.{i}.conv2.weight" for i in range(3)]
    assert sorted(entry["group"]["weights"]) == sorted(members)
    assert entry["group"]["kind"] == "residual" and entry["group"]["method"] == "condense"
    assert len(entry["group"]["consumers"]) == 4  # every block's conv1 and the head

    reduced = shapes(result.model)
    assert reduced["stem.weight"] == (6, 3, 3, 3)
    for i in range(3):
        assert reduced[f"blocks.{i}.conv2.weight"] == (6, 8, 3, 3)  # rows: the stream
        assert reduced[f"blocks.{i}.conv1.weight"] == (8, 6, 3, 3)  # columns: the stream
    assert reduced["head.weight"] == (10, 6)
    original = shapes(model)
    for name in ("bn.weight", "blocks.0.bn2.running_mean"):  # BNs: folded in or sliced
        assert name not in reduced or reduced[name] == (6,), (name, original.get(name))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_residual_stream_keeps_a_multiple_missing_in_one_member(exporter, tmp_path):
    """Channel 5 = 2.5 channel 1 in the stem and two blocks but not in the last block: the stream's
    channels 1 and 5 differ, so only the complete copy (6 = 2) merges."""
    net = fresh(ResNet, channels=8, blocks=3)
    for chain in net.members():
        plant(2, 6, 1.0, chain)
    for chain in net.members()[:-1]:
        plant(1, 5, LAMBDA, chain)
    model = export(net, exporter, tmp_path / "res.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "residual")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (8, 7, True)
    assert shapes(result.model)["stem.weight"] == (7, 3, 3, 3)
    assert shapes(result.model)["blocks.2.conv2.weight"] == (7, 8, 3, 3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_residual_stream_keeps_equal_conv_rows_behind_different_batchnorms(exporter, tmp_path):
    """Conv rows 5 = 1 in every member, but their BNs random: the folded rows differ."""
    net = fresh(ResNet, channels=8, blocks=3)
    for conv, _ in net.members():
        plant(1, 5, 1.0, (conv,))
    model = export(net, exporter, tmp_path / "res.onnx")
    result, _ = condense_exactly(model)
    assert the_group(result, "residual")["width_after"] == 8


def test_residual_stream_of_random_weights_keeps_its_width(tmp_path):
    model = export(fresh(ResNet, channels=8, blocks=2), "torchscript", tmp_path / "res.onnx")
    result, error = condense_exactly(model)
    entry = the_group(result, "residual")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (8, 8, True)
    assert error <= RTOL


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_residual_stream_drops_dead_channels_exactly(exporter, tmp_path):
    """Channels zero in every member (zero conv rows, BN gamma and beta 0) are zero wherever the
    stream is read: dropped (`group_zero`), with no NaN cosine from their zero norms; a planted
    copy next to them still merges."""
    net = fresh(ResNet, channels=8, blocks=2)
    with torch.no_grad():
        for conv, bn in net.members():
            for k in (3, 4):
                conv.weight[k] = 0.0
                if conv.bias is not None:
                    conv.bias[k] = 0.0
                bn.weight[k], bn.bias[k] = 0.0, 0.0
        for chain in net.members():
            plant(1, 6, 1.0, chain)
    model = export(net, exporter, tmp_path / "dead.onnx")
    result, error = condense_exactly(model)
    entry = the_group(result, "residual")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (8, 5, True)
    assert entry["constant_removed"] == 2
    assert outputs_finite(result.model)


class ShiftedSum(nn.Module):
    """Two conv -> BN branches added, a per-channel shift, ReLU, a padded 3x3 conv consumer."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width)
        self.b, self.b_bn = nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width)
        self.shift = nn.Parameter(torch.linspace(0.1, 0.6, width).reshape(1, width, 1, 1))
        self.out = nn.Conv2d(width, 4, 3, 1, 1)

    def forward(self, x):
        return self.out(torch.relu(self.a_bn(self.a(x)) + self.b_bn(self.b(x)) + self.shift))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dead_members_are_dropped_only_where_the_region_keeps_them_zero(exporter, tmp_path):
    """Channels 3 and 4 are zero in both members; past the join, channel 3 is shifted by 0.5 (ReLU
    keeps it 0.5: a constant the padded conv reads, kept) and channel 4 by -0.5 (ReLU maps it to 0:
    dropped)."""
    net = fresh(ShiftedSum, width=6)
    with torch.no_grad():
        for conv, bn in ((net.a, net.a_bn), (net.b, net.b_bn)):
            for k in (3, 4):
                conv.weight[k], conv.bias[k] = 0.0, 0.0
                bn.weight[k], bn.bias[k] = 0.0, 0.0
        net.shift[0, 3], net.shift[0, 4] = 0.5, -0.5
    model = export(net, exporter, tmp_path / "shift.onnx")
    result, _ = condense_exactly(model)
    entry = the_group(result, "residual")
    assert (entry["width_before"], entry["width_after"], entry["constant_removed"]) == (6, 5, 1)
    assert shapes(result.model)["out.weight"] == (4, 5, 3, 3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_dead_channel_of_a_gated_layer_is_dropped_with_its_gate_row(exporter, tmp_path):
    """Zero expand row and BNs (gamma, beta 0) at channel 5: hardswish(0) = 0, the depthwise conv
    and its BN keep 0, and 0 * gate = 0 whatever the gate: channel 5 and fc2's row 5 go."""
    net = fresh(GatedBlock)
    with torch.no_grad():
        net.expand.weight[5] = 0.0
        for bn in (net.expand_bn, net.dw_bn):
            bn.weight[5], bn.bias[5] = 0.0, 0.0
    model = export(net, exporter, tmp_path / "gated_dead.onnx")
    result, _ = condense_exactly(model)
    entry = the_group(result, "gate")
    assert (entry["width_before"], entry["width_after"], entry["constant_removed"]) == (16, 15, 1)
    assert shapes(result.model)["fc2.weight"][0] == 15


# ---- Concat branches ----------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_concat_loses_right_branch_channels_that_duplicate_left_ones(exporter, tmp_path):
    net = fresh(Branches, width=6)
    left, right = (net.left, net.left_bn), (net.right, net.right_bn)
    plant(1, 2, 1.0, right, source=left)  # right 2 (group channel 8) = left 1
    plant(4, 5, 3.0, right, source=left)  # right 5 (group channel 11) = 3 x left 4, through ReLU
    model = export(net, exporter, tmp_path / "cat.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "concat")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (12, 10, True)
    assert sorted(entry["group"]["weights"]) == ["left.weight", "right.weight"]
    reduced = shapes(result.model)
    assert reduced["left.weight"] == (6, 3, 3, 3)
    assert reduced["right.weight"] == (4, 3, 3, 3)
    assert reduced["fuse.weight"] == (4, 10, 1, 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_concat_merges_within_a_branch_and_across_branches(exporter, tmp_path):
    net = fresh(Branches, width=6)
    left, right = (net.left, net.left_bn), (net.right, net.right_bn)
    plant(0, 3, 1.0, left)  # within the left branch
    plant(0, 4, 1.0, right, source=left)  # right 4 = left 0 as well: three channels, one kept
    model = export(net, exporter, tmp_path / "cat.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "concat")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (12, 10, True)
    reduced = shapes(result.model)
    assert (reduced["left.weight"][0], reduced["right.weight"][0], reduced["fuse.weight"][1]) == (5, 5, 10)


# ---- Split parts --------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_split_merges_within_a_half_and_not_across_halves(exporter, tmp_path):
    net = fresh(Halves)
    chain = (net.conv, net.bn)
    plant(1, 3, 1.0, chain)  # first half: 3 = 1
    plant(0, 5, 2.0, chain)  # first half: 5 = 2 x 0 through ReLU
    plant(2, 9, 1.0, chain)  # across: 9 (second half) = 2 (first half): different consumers
    model = export(net, exporter, tmp_path / "split.onnx", outputs=("a", "b"))
    cut = "Split" if exporter == "torchscript" else "SplitToSequence"
    assert cut in {n.op_type for n in model.graph.node}
    result, _ = condense_exactly(model)

    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (16, 14, True)
    assert entry["group"]["weights"] == ["conv.weight"]
    assert len(entry["group"]["consumers"]) == 2
    reduced = shapes(result.model)
    assert reduced["conv.weight"] == (14, 3, 3, 3)
    assert reduced["first.weight"] == (4, 6, 1, 1)
    assert reduced["second.weight"] == (4, 8, 1, 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_split_merges_a_copy_in_each_half(exporter, tmp_path):
    net = fresh(Halves)
    plant(1, 3, 1.0, (net.conv, net.bn))  # first half
    plant(9, 12, 1.0, (net.conv, net.bn))  # second half
    model = export(net, exporter, tmp_path / "split.onnx", outputs=("a", "b"))
    result, _ = condense_exactly(model)
    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (16, 14, True)
    reduced = shapes(result.model)
    assert (reduced["first.weight"], reduced["second.weight"]) == ((4, 7, 1, 1), (4, 7, 1, 1))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_split_duplicate_across_halves_alone_does_not_merge(exporter, tmp_path):
    net = fresh(Halves)
    plant(2, 9, 1.0, (net.conv, net.bn))
    plant(6, 14, 1.0, (net.conv, net.bn))
    model = export(net, exporter, tmp_path / "split.onnx", outputs=("a", "b"))
    result, _ = condense_exactly(model)
    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"]) == (16, 16)
    assert shapes(result.model)["conv.weight"] == (16, 3, 3, 3)


# ---- squeeze-excitation gate --------------------------------------------------------------------


def gated(copy_gate: bool) -> GatedBlock:
    """Expand channel 5 an exact copy of 2 (conv, BN, depthwise kernel and BN), and with
    `copy_gate` fc2's row 5 equal to row 2."""
    net = fresh(GatedBlock)
    plant(2, 5, 1.0, (net.expand, net.expand_bn, net.dw, net.dw_bn))
    if copy_gate:
        copy_gate_row(2, 5, net.fc2)
    return net


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gated_group_loses_a_copy_with_equal_gate_rows(exporter, tmp_path):
    model = export(gated(copy_gate=True), exporter, tmp_path / "se.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "gate")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (16, 15, True)
    assert entry["group"]["weights"] == ["expand.weight"]
    assert entry["group"]["gates"] == [node_of(model, "fc2.weight")]
    reduced = shapes(result.model)
    assert reduced["expand.weight"] == (15, 8, 1, 1)
    assert reduced["dw.weight"] == (15, 1, 3, 3)
    assert reduced["fc2.weight"] == (15, 4, 1, 1)
    assert reduced["fc1.weight"] == (4, 15, 1, 1)
    assert reduced["project.weight"] == (8, 15, 1, 1)
    [dw] = [n for n in result.model.graph.node if n.op_type == "Conv" and n.input[1] == "dw.weight"]
    assert [a.i for a in dw.attribute if a.name == "group"] == [15]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gated_group_keeps_a_copy_whose_gate_rows_differ(exporter, tmp_path):
    model = export(gated(copy_gate=False), exporter, tmp_path / "se.onnx")
    result, _ = condense_exactly(model)
    entry = the_group(result, "gate")
    assert (entry["width_before"], entry["width_after"]) == (16, 16)
    assert shapes(result.model)["expand.weight"] == (16, 8, 1, 1)


# ---- requested widths, rounding, magnitude pruning ----------------------------------------------


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A 2-block ResNet (stream of 8) of random weights, per exporter."""
    folder, cache = tmp_path_factory.mktemp("group_merge"), {}

    def get(exporter: str) -> onnx.ModelProto:
        if exporter not in cache:
            net = fresh(ResNet, channels=8, blocks=2)
            cache[exporter] = export(net, exporter, folder / f"res_{exporter}.onnx")
        return cache[exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("key", ["weight", "node"])
def test_layer_width_selects_the_group_by_any_member(key, exporter, resnet):
    model = resnet(exporter)
    member = "blocks.1.conv2.weight"  # the last member, not the group's name
    name = member if key == "weight" else node_of(model, member)
    result = cg.condense(model, threshold=1.0, layer_widths={name: 5})
    entry = the_group(result, "residual")
    assert (entry["width_before"], entry["width_after"]) == (8, 5)
    reduced = shapes(result.model)
    assert reduced["stem.weight"][0] == reduced["blocks.1.conv2.weight"][0] == 5
    assert reduced["head.weight"] == (10, 5)
    assert outputs_finite(result.model)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_round_to_rounds_the_group_width_up_to_a_multiple(exporter, tmp_path):
    """Five copies leave 3 channels at threshold 1.0; round_to=4 splits one merge back off: 4,
    still exact."""
    net = fresh(ResNet, channels=8, blocks=2)
    for chain in net.members():
        for p, q in ((0, 3), (0, 4), (1, 5), (2, 6), (2, 7)):
            plant(p, q, 1.0, chain)
    model = export(net, exporter, tmp_path / "res.onnx")
    plain = the_group(cg.condense(model, threshold=1.0), "residual")
    assert plain["width_after"] == 3
    result, _ = condense_exactly(model, round_to=4)
    entry = the_group(result, "residual")
    assert (entry["width_after"], entry["exact"]) == (4, True)
    assert shapes(result.model)["stem.weight"] == (4, 3, 3, 3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_round_to_rounds_a_threshold_width_up_to_a_multiple_or_the_full_width(exporter, resnet):
    """Random weights at low thresholds: the stream's width without rounding, rounded up to a
    multiple of 3 or 4 (never above 8). The blocks' conv1 keep their widths (threshold 1.0), so
    the stream's rows do not depend on round_to."""
    model = resnet(exporter)
    fixed = {"blocks.0.conv1.weight": 1.0, "blocks.1.conv1.weight": 1.0}
    widths = []
    for threshold in (0.0, 0.02, 0.05, 0.1):
        plain = the_group(cg.condense(model, threshold=threshold, layer_thresholds=fixed), "residual")
        widths.append(plain["width_after"])
        for multiple in (3, 4):
            result = cg.condense(model, threshold=threshold, layer_thresholds=fixed, round_to=multiple)
            width = the_group(result, "residual")["width_after"]
            assert width == min(8, -(-plain["width_after"] // multiple) * multiple), (threshold, multiple)
            assert shapes(result.model)["stem.weight"][0] == width
            assert outputs_finite(result.model)
    assert len(set(widths)) > 2  # the thresholds give widths to round: the test sees rounding


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_magnitude_pruning_cuts_a_group_to_the_requested_width(exporter, resnet):
    model = resnet(exporter)
    name = node_of(model, "stem.weight")
    layers = {"blocks.0.conv1.weight": 8, "blocks.1.conv1.weight": 8}  # magnitude needs every width
    result = cg.condense(model, method="magnitude", layer_widths={name: 5, **layers})
    entry = the_group(result, "residual")
    assert (entry["name"], entry["width_after"], entry["group"]["method"]) == (name, 5, "magnitude")
    reduced = shapes(result.model)
    for weight in ("stem.weight", "blocks.0.conv2.weight", "blocks.1.conv2.weight"):
        assert reduced[weight][0] == 5
    before, after = arrays(model)["stem.weight"], arrays(result.model)["stem.weight"]
    assert all(any(np.array_equal(row, old) for old in before) for row in after)  # kept, not merged
    assert reduced["head.weight"] == (10, 5)
    assert outputs_finite(result.model)
