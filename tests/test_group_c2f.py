"""YOLOv8's C2f block (issue 13): one group's channels at several positions of one Concat.

C2f: cv1 (1x1 conv -> BN -> act) is split into halves a, b; each bottleneck adds its output to
its input (b2 = b + m(b), b3 = b2 + m(b2)); Concat([a, b, b2, b3]) -> cv2. The residual Adds make
b, b2, b3 and every bottleneck's last conv carry the same channels, so the Concat holds group
channels h .. 2h - 1 at positions h, 2h and 3h: the group's index map puts a channel at several
positions of one tensor, and a merge slices and folds (eq. 10) every one of them.

Planted exact duplicates in every member (cv1's rows and every bottleneck's cv2) reduce exactly
(<= 1e-5 relative against ONNX Runtime) through both exporters; a duplicate missing in one member
stays.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from test_group_merge import (  # noqa: E402
    EXPORTERS,
    condense_exactly,
    export,
    fresh,
    node_of,
    plant,
    shapes,
    the_group,
)
from test_groups import groups_of, weight_of  # noqa: E402
from torch import nn  # noqa: E402

LAMBDA = 2.5
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


class ConvBnAct(nn.Module):
    def __init__(self, inp: int, out: int, kernel: int = 1, stride: int = 1, act=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(inp, out, kernel, stride, kernel // 2, bias=False)
        self.bn, self.act = nn.BatchNorm2d(out), act()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def chain(self) -> tuple[nn.Module, ...]:
        return (self.conv, self.bn)


class Bottleneck(nn.Module):
    def __init__(self, channels: int, act=nn.SiLU):
        super().__init__()
        self.cv1 = ConvBnAct(channels, channels, 3, act=act)
        self.cv2 = ConvBnAct(channels, channels, 3, act=act)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """cv1 -> split in halves (a, b); bottlenecks on b with residual Adds; concat of all -> cv2."""

    def __init__(self, inp: int = 3, out: int = 16, blocks: int = 2, act=nn.SiLU):
        super().__init__()
        self.hidden = out // 2
        self.cv1 = ConvBnAct(inp, 2 * self.hidden, act=act)
        self.m = nn.ModuleList(Bottleneck(self.hidden, act) for _ in range(blocks))
        self.cv2 = ConvBnAct((2 + blocks) * self.hidden, out, act=act)

    def forward(self, x):
        parts = list(self.cv1(x).split(self.hidden, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class C2fNet(nn.Module):
    """A YOLOv8n-style backbone in small: stem, C2f, strided conv, C2f, pooled Linear head."""

    def __init__(self, act=nn.SiLU):
        super().__init__()
        self.stem = ConvBnAct(3, 8, 3, 2, act=act)
        self.c1 = C2f(8, 16, 1, act=act)
        self.down = ConvBnAct(16, 16, 3, 2, act=act)
        self.c2 = C2f(16, 16, 2, act=act)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.c2(self.down(self.c1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def plant_a(c2f: C2f, p: int, q: int, factor: float) -> None:
    """First half: channel q of cv1 is `factor` times channel p (cv1 is the only member there)."""
    plant(p, q, factor, c2f.cv1.chain())


def plant_b(c2f: C2f, p: int, q: int, factor: float, blocks=None) -> None:
    """Second half: channel q is `factor` times p in cv1 (at h + p, h + q) and in the last conv of
    every bottleneck in `blocks` (all by default): then b, b2, b3 have q = factor p."""
    h = c2f.hidden
    plant(h + p, h + q, factor, c2f.cv1.chain())
    for block in c2f.m if blocks is None else blocks:
        plant(p, q, factor, block.cv2.chain())


# ---- the group --------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_c2f_group_holds_the_second_half_at_every_concat_position(exporter, tmp_path):
    model = export(fresh(C2f), exporter, tmp_path / "c2f.onnx")
    groups, _ = groups_of(model)
    weights = weight_of(model)
    [group] = [g for g in groups if g.coupled]
    assert (group.reducible, group.reason, group.blockers) == (True, None, [])
    assert group.width == 16
    members = sorted((m.weight, m.offset, m.width) for m in group.members)
    assert members == [
        ("cv1.conv.weight", 0, 16),
        ("m.0.cv2.conv.weight", 8, 8),
        ("m.1.cv2.conv.weight", 8, 8),
    ]
    readers = {weights[c.node]: [(p.position, p.offset, p.width) for p in c.pieces] for c in group.consumers}
    assert readers == {
        "m.0.cv1.conv.weight": [(0, 8, 8)],
        "m.1.cv1.conv.weight": [(0, 8, 8)],
        "cv2.conv.weight": [(0, 0, 8), (8, 8, 8), (16, 8, 8), (24, 8, 8)],
    }


# ---- exact merges ---------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_c2f_loses_copies_and_multiples_planted_in_every_member(exporter, tmp_path):
    """ReLU: copies and positive multiples in both halves: 16 -> 12, the concat 32 -> 24."""
    net = fresh(C2f, act=nn.ReLU)
    plant_a(net, 0, 3, 1.0)
    plant_a(net, 1, 6, LAMBDA)
    plant_b(net, 1, 5, 1.0)
    plant_b(net, 2, 6, LAMBDA)
    model = export(net, exporter, tmp_path / "c2f.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (16, 12, True)
    assert entry["name"] == node_of(model, "cv1.conv.weight")
    assert sorted(entry["group"]["weights"]) == [
        "cv1.conv.weight",
        "m.0.cv2.conv.weight",
        "m.1.cv2.conv.weight",
    ]
    assert entry["group"]["member_widths"] == [12, 6, 6]
    reduced = shapes(result.model)
    assert reduced["cv1.conv.weight"] == (12, 3, 1, 1)
    for i in range(2):
        assert reduced[f"m.{i}.cv2.conv.weight"] == (6, 8, 3, 3)  # rows: the second half
        assert reduced[f"m.{i}.cv1.conv.weight"] == (8, 6, 3, 3)  # columns: the second half
    assert reduced["cv2.conv.weight"] == (16, 6 + 3 * 6, 1, 1)  # a, b, b2, b3


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_c2f_with_silu_loses_exact_copies(exporter, tmp_path):
    net = fresh(C2f, act=nn.SiLU)
    plant_a(net, 2, 7, 1.0)
    plant_b(net, 0, 4, 1.0)
    model = export(net, exporter, tmp_path / "c2f.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (16, 14, True)
    reduced = shapes(result.model)
    assert reduced["cv1.conv.weight"] == (14, 3, 1, 1)
    assert reduced["m.1.cv2.conv.weight"] == (7, 8, 3, 3)
    assert reduced["m.1.cv1.conv.weight"] == (8, 7, 3, 3)
    assert reduced["cv2.conv.weight"] == (16, 7 + 3 * 7, 1, 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_c2f_net_reduces_both_blocks(exporter, tmp_path):
    net = fresh(C2fNet, act=nn.ReLU)
    plant_a(net.c1, 0, 1, 1.0)
    plant_b(net.c1, 3, 7, LAMBDA)
    plant_b(net.c2, 0, 2, 1.0)
    plant_b(net.c2, 1, 5, LAMBDA)
    model = export(net, exporter, tmp_path / "c2f_net.onnx")
    result, _ = condense_exactly(model)

    entries = {e["name"]: e for e in result.report["layers"] if e["op"] == "split group"}
    first, second = (
        entries[node_of(model, "c1.cv1.conv.weight")],
        entries[node_of(model, "c2.cv1.conv.weight")],
    )
    assert (first["width_before"], first["width_after"], first["exact"]) == (16, 14, True)
    assert (second["width_before"], second["width_after"], second["exact"]) == (16, 14, True)
    reduced = shapes(result.model)
    assert reduced["c1.cv1.conv.weight"] == (14, 8, 1, 1)
    assert reduced["c1.m.0.cv2.conv.weight"] == (7, 8, 3, 3)
    assert reduced["c1.cv2.conv.weight"] == (16, 7 + 2 * 7, 1, 1)
    assert reduced["c2.cv1.conv.weight"] == (14, 16, 1, 1)
    assert reduced["c2.m.1.cv2.conv.weight"] == (6, 8, 3, 3)
    assert reduced["c2.cv2.conv.weight"] == (16, 8 + 3 * 6, 1, 1)


# ---- negative controls ------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_c2f_keeps_a_duplicate_missing_in_one_member(exporter, tmp_path):
    """Second half: 5 = 1 in cv1 and the first bottleneck, not in the second: b3's channels 1 and
    5 differ, so they stay; the first half's copy (3 = 0) merges."""
    net = fresh(C2f, act=nn.SiLU)
    plant_a(net, 0, 3, 1.0)
    plant_b(net, 1, 5, 1.0, blocks=net.m[:1])
    model = export(net, exporter, tmp_path / "c2f.onnx")
    result, _ = condense_exactly(model)

    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"], entry["exact"]) == (16, 15, True)
    reduced = shapes(result.model)
    assert reduced["cv1.conv.weight"] == (15, 3, 1, 1)
    assert reduced["m.0.cv2.conv.weight"] == (8, 8, 3, 3)
    assert reduced["cv2.conv.weight"] == (16, 7 + 3 * 8, 1, 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_c2f_keeps_a_duplicate_across_the_halves(exporter, tmp_path):
    """cv1's channel 8 + 2 (second half) a copy of 2 (first half): they reach different positions
    and consumers, so nothing merges."""
    net = fresh(C2f, act=nn.SiLU)
    plant(2, 10, 1.0, net.cv1.chain())
    model = export(net, exporter, tmp_path / "c2f.onnx")
    result, _ = condense_exactly(model)
    entry = the_group(result, "split")
    assert (entry["width_before"], entry["width_after"]) == (16, 16)
    assert shapes(result.model)["cv2.conv.weight"] == (16, 32, 1, 1)
