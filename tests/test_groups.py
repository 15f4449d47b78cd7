"""Channel groups across producers (issue 13, analysis only): residual streams, Concat, Split and
squeeze-excitation gates, found on torch-built nets through both exporters."""

import numpy as np
import onnx
import pytest
from builders import x_to_y_model
from onnx import helper

import condense_graph as cg
from condense_graph.analysis import analyze
from condense_graph.coupled import prepare
from condense_graph.graph import subgraph_tensor_names
from condense_graph.groups import find_groups, summarize
from condense_graph.report import format_inspect_table
from passes.condense_channels import CondenseChannelsPass

torch = pytest.importorskip("torch")
from lookalike_models import BUILDERS, Lookalike, export_lookalike  # noqa: E402
from torch import nn  # noqa: E402
from torch_models import randomize_batchnorm  # noqa: E402

EXPORTERS = ("torchscript", "dynamo")


# ---- models -------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, added to the stream, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """stem -> 2 residual blocks -> pooled Linear head: the stream joins stem, block1.conv2 and
    block2.conv2."""

    def __init__(self, channels=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, channels, 3, 1, 1), nn.BatchNorm2d(channels)
        self.block1, self.block2 = BasicBlock(channels), BasicBlock(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        h = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class TwoBranchConcat(nn.Module):
    """Two conv branches (6 and 10 channels) concatenated into one 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(3, 10, 3, 1, 1)
        self.fuse = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.fuse(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1))


class SplitInTwo(nn.Module):
    """One 16-channel conv split into two halves, each read by its own conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.first, self.second = nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = torch.relu(self.conv(x)).split(8, 1)
        return self.first(a), self.second(b)


def exported(module: nn.Module, exporter: str, path, outputs=("y",)) -> onnx.ModelProto:
    module.eval()
    randomize_batchnorm(module, torch.Generator().manual_seed(1))
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    lookalike = Lookalike("net", module, example, (exporter,), outputs=outputs)
    export_lookalike(lookalike, exporter, path)
    return onnx.load(str(path))


def groups_of(model: onnx.ModelProto):
    """The channel groups, judged by `coupled.prepare`, and the single-producer analysis (whose
    skip reasons name the coupling of each group member)."""
    graph, _ = CondenseChannelsPass.analyze(model)
    subgraph = subgraph_tensor_names(model)
    analysis = analyze(graph, subgraph)
    groups = find_groups(graph, analysis, subgraph)
    prepare(graph, groups, subgraph)
    return groups, analysis


def weight_of(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> its weight initializer: names the exporters agree on."""
    return {n.name: n.input[1] for n in model.graph.node if len(n.input) > 1}


def structure(group, weights: dict[str, str]) -> tuple:
    """(kind, width, members as (weight, offset, width), consumers by weight with their slice)."""
    members = sorted((m.weight, m.offset, m.width) for m in group.members)
    consumers = sorted((weights[c.node], c.offset, c.width) for c in group.consumers)
    return group.kind, group.width, members, consumers


def coupled(groups) -> list:
    return [g for g in groups if g.coupled]


# ---- residual stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_residual_stream_joins_the_stem_and_every_blocks_last_conv(exporter, tmp_path):
    torch.manual_seed(0)
    model = exported(TinyResNet(), exporter, tmp_path / "res.onnx")
    groups, analysis = groups_of(model)
    weights = weight_of(model)
    [stream] = coupled(groups)
    assert structure(stream, weights) == (
        "residual",
        8,
        [("block1.conv2.weight", 0, 8), ("block2.conv2.weight", 0, 8), ("stem.weight", 0, 8)],
        [("block1.conv1.weight", 0, 8), ("block2.conv1.weight", 0, 8), ("head.weight", 0, 8)],
    )
    assert [j.kind for j in stream.joins] == ["residual", "residual"]
    assert (stream.reducible, stream.reason, stream.blockers) == (True, None, [])
    layers = {weights[m.producer] for g in groups if g.kind == "layer" and g.reducible for m in g.members}
    assert layers == {"block1.conv1.weight", "block2.conv1.weight"}
    assert {weights[layer.name] for layer in analysis.layers} == layers
    assert summarize(groups) == {
        "layers": 2,
        "layer_channels": 16,
        "coupled_groups": 1,
        "coupled_channels": 8,
        "coupled_groups_ready": 1,
        "coupled_channels_ready": 8,
    }
    reasons = {weights[s.name]: s.reason for s in analysis.skipped}
    for name in ("stem.weight", "block1.conv2.weight", "block2.conv2.weight"):
        assert reasons[name].startswith("residual Add '"), reasons[name]
        assert "joins these channels with another producer's" in reasons[name]
        assert reasons[name].endswith("left alone") and "\n" not in reasons[name]


def test_a_graph_input_in_a_residual_makes_the_group_unreducible(rng):
    """y = conv2(relu(conv1(x)) + x): x is a member the pass cannot rewrite."""
    w1, w2 = rng.standard_normal((4, 4, 3, 3)), rng.standard_normal((5, 4, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Add", ["r1", "x"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    model = x_to_y_model(nodes, {"w1": w1, "w2": w2}, [1, 4, 6, 6], [1, 5, 6, 6])
    groups, _ = groups_of(model)
    [group] = coupled(groups)
    assert group.kind == "residual" and group.width == 4
    assert [(m.producer, m.op, m.offset) for m in group.members] == [
        ("conv1", "Conv", 0),
        ("x", "graph input", 0),
    ]
    assert [c.node for c in group.consumers] == ["conv2"]
    assert not group.reducible
    assert group.reason == "member 'x' is a graph input (the model's interface)"


# ---- Concat and Split ---------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_concat_of_two_branches_puts_them_at_offsets_0_and_6(exporter, tmp_path):
    torch.manual_seed(0)
    model = exported(TwoBranchConcat(), exporter, tmp_path / "cat.onnx")
    groups, analysis = groups_of(model)
    [group] = coupled(groups)
    assert structure(group, weight_of(model)) == (
        "concat",
        16,
        [("left.weight", 0, 6), ("right.weight", 6, 10)],
        [("fuse.weight", 0, 16)],
    )
    assert (group.reducible, group.reason) == (True, None)
    for skipped in analysis.skipped[:2]:
        assert skipped.reason.startswith("Concat '") and "joins these channels" in skipped.reason
        assert skipped.reason.endswith("left alone")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_split_gives_each_consumer_its_half(exporter, tmp_path):
    torch.manual_seed(0)
    model = exported(SplitInTwo(), exporter, tmp_path / "split.onnx", outputs=("a", "b"))
    groups, analysis = groups_of(model)
    [group] = coupled(groups)
    assert structure(group, weight_of(model)) == (
        "split",
        16,
        [("conv.weight", 0, 16)],
        [("first.weight", 0, 8), ("second.weight", 8, 8)],
    )
    assert group.joins[0].op == ("Split" if exporter == "torchscript" else "SplitToSequence")
    [reason] = [s.reason for s in analysis.skipped if weight_of(model)[s.name] == "conv.weight"]
    assert reason.startswith(f"{group.joins[0].op} '") and reason.endswith("left alone")


# ---- squeeze-excitation gates and the look-alikes -----------------------------------------------


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("groups"), {}

    def get(name: str, exporter: str) -> onnx.ModelProto:
        if (name, exporter) not in cache:
            path = folder / f"{name}_{exporter}.onnx"
            export_lookalike(BUILDERS[name](), exporter, path)
            cache[name, exporter] = onnx.load(str(path))
        return cache[name, exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mobilenet_v3_gates_couple_the_expand_conv_with_fc2(exporter, lookalikes):
    model = lookalikes("mobilenet_v3_small", exporter)
    groups, analysis = groups_of(model)
    weights = weight_of(model)
    found = [structure(g, weights) for g in coupled(groups)]
    assert found == [
        (
            "gate",
            16,  # block 0 has no expand conv: the stem's channels are gated
            [("blocks.0.se.fc2.weight", 0, 16), ("stem.0.weight", 0, 16)],
            [("blocks.0.project.0.weight", 0, 16), ("blocks.0.se.fc1.weight", 0, 16)],
        ),
        (
            "gate",
            48,
            [("blocks.1.expand.0.weight", 0, 48), ("blocks.1.se.fc2.weight", 0, 48)],
            [("blocks.1.project.0.weight", 0, 48), ("blocks.1.se.fc1.weight", 0, 48)],
        ),
        (
            "residual",
            24,
            [("blocks.1.project.0.weight", 0, 24), ("blocks.2.project.0.weight", 0, 24)],
            [("blocks.2.expand.0.weight", 0, 24), ("last.0.weight", 0, 24)],
        ),
        (
            "gate",
            32,
            [("blocks.2.expand.0.weight", 0, 32), ("blocks.2.se.fc2.weight", 0, 32)],
            [("blocks.2.project.0.weight", 0, 32), ("blocks.2.se.fc1.weight", 0, 32)],
        ),
    ]
    reasons = {weights[s.name]: s.reason for s in analysis.skipped}
    for name in ("stem.0.weight", "blocks.1.expand.0.weight", "blocks.1.se.fc2.weight"):
        assert reasons[name].startswith("channel gate (squeeze-excitation Mul '"), reasons[name]
        assert reasons[name].endswith("left alone")
    assert reasons["blocks.2.project.0.weight"].startswith("residual Add '")


def test_hand_written_hardswish_is_no_gate(lookalikes):
    """pp_lcnet's x * relu6(x + 3) / 6 is an activation of x alone: nothing is coupled."""
    groups, analysis = groups_of(lookalikes("pp_lcnet", "torchscript"))
    assert coupled(groups) == []
    assert sorted(m.producer for g in groups if g.reducible for m in g.members) == sorted(
        layer.name for layer in analysis.layers
    )


@pytest.mark.parametrize(
    "name, exporter, summary, lines",
    [
        ("mobilenet_v3_small", "torchscript", (6, 128, 4, 120, 4, 120), 4),
        ("mobilenet_v3_small", "dynamo", (6, 128, 4, 120, 4, 120), 4),
        ("yolo", "torchscript", (2, 56, 1, 48, 1, 48), 1),
        ("yolo", "dynamo", (2, 56, 1, 48, 1, 48), 1),
    ],
)
def test_inspect_lists_groups_and_counts_their_channels(name, exporter, summary, lines, lookalikes):
    info = cg.inspect(lookalikes(name, exporter))
    keys = ("layers", "layer_channels", "coupled_groups", "coupled_channels")
    keys += ("coupled_groups_ready", "coupled_channels_ready")
    assert tuple(info["groups_summary"][k] for k in keys) == summary
    reducible = sum(g["width"] for g in info["groups"] if g["reducible"])
    assert reducible == sum(layer["width"] for layer in info["layers"]) == summary[1] + summary[5]
    assert sum(1 for layer in info["layers"] if layer["op"].endswith(" group")) == summary[4]
    text = format_inspect_table(info)
    section = text.split(f"Channel groups ({lines}):\n")[1].splitlines()[: lines + 1]
    assert all(line.endswith(": merged as one group") for line in section[:lines]), section
    assert section[lines].strip().startswith(f"channels: {summary[1]} in {summary[0]} single-producer")
    if name == "yolo":
        [concat] = [g for g in info["groups"] if g["kind"] == "concat"]
        weights = weight_of(lookalikes(name, exporter))
        members = sorted((m["weight"], m["offset"], m["width"]) for m in concat["members"])
        assert members == [("c1.0.weight", 32, 16), ("c3.0.weight", 0, 32)]
        assert sorted(weights[c] for c in concat["consumers"]) == [
            "c2.0.weight",
            "c4.0.weight",
            "head_small.weight",
        ]


def test_groups_of_a_plain_mlp_are_its_layers():
    """No joins: every producer is a one-member "layer" group, reducible as the analysis says."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2"),
    ]
    inits = {
        "w1": rng.standard_normal((5, 7)),
        "b1": rng.standard_normal(7),
        "w2": rng.standard_normal((7, 3)),
    }
    model = x_to_y_model(nodes, inits, [2, 5], [2, 3])
    groups, _ = groups_of(model)
    assert [(g.kind, g.width, g.producers, g.reducible) for g in groups] == [
        ("layer", 7, ["fc1"], True),
        ("layer", 3, ["fc2"], False),
    ]
    assert groups[1].reason == "channels reach graph output 'y' (the model's interface)"
    assert [c.node for c in groups[0].consumers] == ["fc2"]
