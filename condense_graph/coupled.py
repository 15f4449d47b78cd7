"""Coupled groups ready to merge: where every channel of a channel group lives (issue 13).

`condense_graph.groups` finds the tensors that carry the same channels across producers (a
residual stream, the branches of a Concat, the parts of a Split, a squeeze-excitation gate).
This module turns such a group into what its merge reads and writes (`CoupledGroup`):

  members   producers whose output rows are group channels offset .. offset + width - 1, each
            with the affine ops right after it (folded into its rows, eq. 3) and a *slot*: the
            input it reads and its geometry. Members in one slot compute comparable rows (the two
            branches of a Concat reading one tensor); members in different slots are concatenated
            (a residual stream: the paper's eq.-3 vector of a channel is all its members' rows).
  gates     squeeze-excitation fc2 nodes: their rows are group channels too, but pass a Sigmoid,
            so two channels merge exactly only when their gate rows are equal (not parallel).
  region    the per-channel ops between members and consumers, with the constants sliced with the
            channels (a BatchNormalization after an Add, a depthwise kernel, a gate's bias).
  consumers Gemm/MatMul/Conv nodes reading group channels through their input's index map.
  cuts      Split/Slice/SplitToSequence nodes whose part sizes follow the kept channels.

Every tensor of the group has an index map (`groups.Piece`s: which group channel each of its
channels is); region nodes, consumers, cuts and Reshape literals are laid out by the index map of
the tensor they act on, so a group channel that sits at several positions of a tensor (C2f's
Concat of b and b + m(b)) is sliced and folded at each of them.

Each group channel has a *signature*: the ops (type and attributes) on its path and the consumers
reading it. Only channels with one signature may merge: they go through the same computation and
reach the same consumers, so a consumer reading the removed channel also reads its main one.

A group whose structure this module cannot rewrite is returned as `Skipped` with the reason. This
module only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from condense_graph import ops
from condense_graph.analysis import (
    ChannelConstant,
    Consumer,
    Producer,
    Skipped,
    _per_channel_inputs,
    as_consumer,
    as_producer,
    nonfinite_reason,
)
from condense_graph.groups import ChannelGroup, Layout, find_gates, layout_channels, layout_width

_MATRIX_OPS = ("Gemm", "MatMul", "Conv")
_CUTS = ("Split", "Slice", "SplitToSequence", "SequenceAt")


@dataclass
class Member:
    """A producer whose output channels are group channels offset .. offset + width - 1."""

    producer: Producer
    offset: int
    width: int  # as analyzed (`Producer.width` reads the weight, which a rewrite replaces)
    pre: list[gs.Node]  # affine ops right after the producer, folded into its rows
    end: gs.Tensor  # the tensor after `pre`
    slot: tuple  # (input tensor, op, geometry, index): members of one slot have comparable rows

    @property
    def span(self) -> range:
        return range(self.offset, self.offset + self.width)


@dataclass
class GateMember:
    """A squeeze-excitation fc2 whose output rows gate group channels offset .. offset + width."""

    producer: Producer
    offset: int
    width: int

    @property
    def span(self) -> range:
        return range(self.offset, self.offset + self.width)


class _Laid:
    """Something laid out by a tensor's index map: `pieces` (`groups.Piece`)."""

    pieces: Layout

    @property
    def width(self) -> int:
        return layout_width(self.pieces)

    @property
    def channels(self) -> np.ndarray:
        """The group channel at each of the tensor's channels (one may occur several times)."""
        return layout_channels(self.pieces)


@dataclass
class RegionNode(_Laid):
    """A per-channel op on tensors of group channels laid out by `pieces` (its input's)."""

    node: gs.Node
    pieces: Layout
    constants: list[ChannelConstant] = field(default_factory=list)
    # "pre": folded into a member's rows; "path": on the channels' way to the consumers; "gate":
    # on a gate's way to its Mul (gate values must be equal, not scaled); "join": Add, Mul, Concat
    role: str = "path"
    homogeneous: bool = True  # f(l x) = l f(x) for the channels it carries (l > 0)


@dataclass
class GroupConsumer(_Laid):
    """A consumer reading group channels laid out by `pieces`, `block` features each."""

    consumer: Consumer
    pieces: Layout
    block: int = 1

    def reads(self, channel: int) -> bool:
        return any(p.offset <= channel < p.offset + p.width for p in self.pieces)


@dataclass
class Cut:
    """A Split/Slice/SplitToSequence cutting its source (laid out by `source`) into parts (each
    laid out by its pieces); `start`: a Slice's first channel in its source; `axis_index`: a
    Slice's entry for the channel axis."""

    node: gs.Node
    parts: list[Layout]
    source: Layout
    axis_index: int = 0
    start: int = 0


@dataclass
class ReshapeShape(_Laid):
    """A Reshape target holding a channel count literally (`index`: its position)."""

    shape: gs.Constant
    index: int
    pieces: Layout
    block: int


@dataclass
class CoupledGroup:
    name: str  # the first member's producer name: what --layer-width and the report call it
    kind: str  # residual, concat, split or gate
    width: int
    members: list[Member]
    gates: list[GateMember]
    region: list[RegionNode]
    consumers: list[GroupConsumer]
    cuts: list[Cut]
    reshapes: list[ReshapeShape]
    tensors: dict[str, Layout]  # every group tensor: its index map

    @property
    def keys(self) -> list[str]:
        """The names that select this group: every member's producer and weight names."""
        nodes = [m.producer.node for m in self.members]
        return [n.name or n.outputs[0].name for n in nodes] + [m.producer.weight.name for m in self.members]

    @property
    def activation(self) -> str:
        kinds = []
        for entry in self.region:
            if entry.role == "path" and entry.node.op not in kinds and entry.node.op != "Identity":
                kinds.append(entry.node.op)
        return "+".join(kinds) or "none"

    def homogeneous_path(self) -> np.ndarray:
        """[width] bool: every op on the channel's path (past the members' folded affine ops, and
        not on a gate's path) is positively homogeneous: then exact multiples merge exactly."""
        result = np.ones(self.width, dtype=bool)
        for entry in self.region:
            if entry.role in ("path", "join") and not entry.homogeneous:
                result[entry.channels] = False
        return result

    def path_entries(self) -> list[RegionNode]:
        """The region past the members' folded affine ops, in graph order."""
        return [e for e in self.region if e.role != "pre"]

    def signatures(self) -> list[tuple]:
        """Each channel's signature: the region ops (type, attributes) on its path in graph order
        and the consumers reading it, with the piece of the tensor's index map it sits in. Channels
        merge only within one signature: then a channel merged away sits in every piece its main
        channel sits in, and each piece folds it into its main (eq. 10)."""
        paths = [[] for _ in range(self.width)]
        for entry in self.path_entries():
            key = (entry.node.op, _attributes(entry.node))
            for piece_index, piece in enumerate(entry.pieces):
                for k in range(piece.offset, piece.offset + piece.width):
                    paths[k].append(key + (piece_index,))
        for index, reader in enumerate(self.consumers):
            for piece_index, piece in enumerate(reader.pieces):
                for k in range(piece.offset, piece.offset + piece.width):
                    paths[k].append(("consumer", index, piece_index))
        for gate in self.gates:
            for k in gate.span:
                paths[k].append(("gate", gate.producer.node.name))
        return [tuple(p) for p in paths]


def prepare(graph: gs.Graph, groups: list[ChannelGroup], subgraph_tensors=frozenset()):
    """The coupled groups of `groups` that can be merged, and the others as `Skipped`. Sets each
    coupled group's `reducible` and `reason` accordingly."""
    outputs = {t.name for t in graph.outputs}
    gates = find_gates(graph)
    ready, skipped = [], []
    for group in groups:
        if not group.coupled:
            continue
        name = group.members[0].producer if group.members else group.kind
        if group.blockers:
            group.reducible, group.reason = False, group.blockers[0]
            skipped.append(Skipped(name, f"channel group ({group.kind}): {group.blockers[0]}"))
            continue
        result = layout(graph, group, gates, outputs, subgraph_tensors)
        if isinstance(result, str):
            group.reducible, group.reason = False, result
            skipped.append(Skipped(name, f"channel group ({group.kind}): {result}"))
        else:
            group.reducible, group.reason = True, None
            ready.append(result)
    return ready, skipped


def layout(graph, group: ChannelGroup, gates, outputs, subgraph_tensors) -> CoupledGroup | str:
    """The group as `CoupledGroup`, or why it cannot be merged."""
    if group.width is None or any(layout_width(t) is None for t in group.tensors.values()):
        return "a tensor of the group has an unknown channel count"
    tensors = dict(group.tensors)
    fc2s = {id(g.fc2): g for g in gates.values() if g.mul.outputs[0].name in tensors}
    builder = _Layout(group, tensors, fc2s, outputs, subgraph_tensors)
    for node in graph.nodes:
        reason = builder.visit(node)
        if reason:
            return reason
    return builder.finish()


class _Layout:
    def __init__(self, group, tensors, fc2s, outputs, subgraph_tensors):
        self.group, self.tensors, self.fc2s = group, tensors, fc2s
        self.outputs, self.subgraph_tensors = outputs, subgraph_tensors
        self.members, self.gates, self.region, self.consumers = [], [], [], []
        self.cuts, self.reshapes = [], []
        self.pre_nodes: set[int] = set()
        self.slots: dict[tuple, list[range]] = {}
        self.gate_muls = {id(g.mul) for g in fc2s.values()}
        self.gate_path = {id(n) for g in fc2s.values() for n in g.path}

    def span_of(self, tensor: gs.Tensor) -> Layout | None:
        return self.tensors.get(tensor.name)

    def visit(self, node: gs.Node) -> str | None:
        carried_in = [t for t in node.inputs if t.name in self.tensors]
        carried_out = [t for t in node.outputs if t.name in self.tensors]
        if node.op in _MATRIX_OPS and not ops.is_depthwise_conv(node):
            for tensor in carried_in:
                reason = self.consumer(node, tensor)
                if reason:
                    return reason
            if carried_out:
                return self.member(node)
            return None
        if id(node) in self.pre_nodes or not carried_in:
            return None
        if node.op in _CUTS:
            return self.cut(node, carried_in[0])
        if _is_join(node):
            span = self.tensors[node.outputs[0].name]
            gate = id(node) in self.gate_muls
            homogeneous = node.op in ("Add", "Sub", "Concat") or gate
            self.region.append(RegionNode(node, span, role="join", homogeneous=homogeneous))
            return None
        return self.region_node(node, carried_in, carried_out)

    def consumer(self, node: gs.Node, tensor: gs.Tensor) -> str | None:
        consumer = as_consumer(node, tensor)
        if isinstance(consumer, str):
            return consumer
        pieces = self.tensors[tensor.name]
        width = layout_width(pieces)
        rows = consumer.weight.values.shape[consumer.axis]
        if rows % width:
            return f"consumer '{node.name}' reads {rows} features of {width} channels"
        block = rows // width
        if node.op == "Conv" and block != 1:
            return f"Conv '{node.name}' reads the channels on another axis"
        self.consumers.append(GroupConsumer(consumer, pieces, block))
        return None

    def member(self, node: gs.Node) -> str | None:
        producer = as_producer(node, self.outputs, self.subgraph_tensors)
        if isinstance(producer, str):
            return producer
        pieces = self.tensors[node.outputs[0].name]
        if len(pieces) != 1:
            return f"'{node.name}' writes channels that sit at several positions of the group"
        offset, width = pieces[0].offset, pieces[0].width
        if width != producer.width:
            return f"'{node.name}' writes {producer.width} channels where the group has {width}"
        if id(node) in self.fc2s:
            self.gates.append(GateMember(producer, offset, width))
            return None
        pre, end = self.pre_chain(node.outputs[0])
        self.members.append(Member(producer, offset, width, pre, end, self.slot(node, producer, offset)))
        return None

    def pre_chain(self, start: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor]:
        """The single-user affine ops right after a member (a BatchNormalization, a bias Add)."""
        region = set(self.tensors)
        chain, cur = [], start
        while (
            len(cur.outputs) == 1 and ops.is_affine(cur.outputs[0], region) and cur.name not in self.outputs
        ):
            node = cur.outputs[0]
            if any(
                isinstance(t, gs.Constant) and t.values.size > 1 and len(t.outputs) > 1 for t in node.inputs
            ):
                break  # a shared per-channel constant: left in the region, where it is checked
            chain.append(node)
            self.pre_nodes.add(id(node))
            self.region.append(self.sliced(node, self.tensors[cur.name], "pre"))
            cur = node.outputs[0]
        return chain, cur

    def slot(self, node: gs.Node, producer: Producer, offset: int) -> tuple:
        kernel = tuple(producer.weight.values.shape[2:]) if node.op == "Conv" else ()
        key = (node.inputs[0].name, node.op, kernel, _attributes(node), producer.axis)
        span = range(offset, offset + producer.width)
        index = 0
        while any(_overlap(span, taken) for taken in self.slots.get(key + (index,), [])):
            index += 1
        self.slots.setdefault(key + (index,), []).append(span)
        return key + (index,)

    def cut(self, node: gs.Node, source: gs.Tensor) -> str | None:
        if node.op == "SequenceAt":
            return None
        if node.op == "SplitToSequence":
            parts = [
                self.tensors[u.outputs[0].name]
                for u in node.outputs[0].outputs
                if u.outputs[0].name in self.tensors
            ]
            if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
                return f"SplitToSequence '{node.name}' has no constant split sizes"
        else:
            parts = [self.tensors[t.name] for t in node.outputs if t.name in self.tensors]
        whole = self.tensors[source.name]
        if sum(layout_width(p) for p in parts) != layout_width(whole) and node.op != "Slice":
            return f"{node.op} '{node.name}' parts do not cover its input"
        if node.op == "Split" and "split" not in node.attrs:
            if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
                return f"Split '{node.name}' has no constant split sizes"
        for tensor in node.inputs[1:]:
            if isinstance(tensor, gs.Constant) and len(tensor.outputs) > 1:
                return f"{node.op} '{node.name}' shares its constant '{tensor.name}' with other nodes"
        axis_index, start = 0, 0
        if node.op == "Slice":
            axis_index = self.slice_axis(node, source)
            if axis_index is None:
                return f"Slice '{node.name}' cuts the channel axis with bounds not known"
            first = int(np.asarray(node.inputs[1].values).reshape(-1)[axis_index])
            width = layout_width(whole)
            start = min(max(first + width if first < 0 else first, 0), width)
        self.cuts.append(Cut(node, parts, whole, axis_index, start))
        return None

    def slice_axis(self, node: gs.Node, source: gs.Tensor) -> int | None:
        """The position of the channel axis in a Slice's axes (its starts and ends are constants)."""
        if len(node.inputs) < 4 or not all(isinstance(t, gs.Constant) for t in node.inputs[1:4]):
            return None
        axes = np.asarray(node.inputs[3].values).reshape(-1)
        rank = len(source.shape) if source.shape is not None else None
        axis = 1 if any(m.producer.node.op == "Conv" for m in self.members) else -1
        for i, a in enumerate(axes):
            if (rank is not None and a % rank == axis % rank) or (rank is None and a == axis):
                return i
        return None

    def region_node(self, node: gs.Node, carried_in, carried_out) -> str | None:
        if not carried_out and not any(o.name in self.outputs for o in node.outputs):
            return None  # a shape-only use (Shape, Size): reads no values
        span = self.span_of(carried_in[0])
        entry = self.sliced(node, span, "gate" if id(node) in self.gate_path else "path")
        if node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
            reason = self.reshape(node, span, carried_out[0])
            if reason:
                return reason
        self.region.append(entry)
        return None

    def sliced(self, node: gs.Node, span: Layout, role: str) -> RegionNode:
        constants = [ChannelConstant(t, axis) for t, axis in _per_channel_inputs(node, layout_width(span))]
        homogeneous = ops.is_homogeneous(node, set(self.tensors))
        return RegionNode(node, span, constants, role, homogeneous)

    def reshape(self, node: gs.Node, span: Layout, out: gs.Tensor) -> str | None:
        values = np.asarray(node.inputs[1].values).reshape(-1)
        out_width = layout_width(self.tensors[out.name])
        for index, value in enumerate(values):
            if value > 0 and value % out_width == 0 and value // out_width >= 1 and index > 0:
                if len(node.inputs[1].outputs) > 1:
                    return f"Reshape shape '{node.inputs[1].name}' is shared with other nodes"
                self.reshapes.append(ReshapeShape(node.inputs[1], index, span, int(value // out_width)))
                return None
        return None

    def finish(self) -> CoupledGroup | str:
        if not self.members:
            return "no member is a Gemm/MatMul/Conv producer whose rows can be compared"
        if not self.consumers:
            return "the channels reach no Gemm/MatMul/Conv consumer"
        region_nodes = {id(e.node) for e in self.region}
        for entry in self.region:
            for const in entry.constants:
                if any(id(user) not in region_nodes for user in const.tensor.outputs):
                    return f"per-channel constant '{const.tensor.name}' is also used outside the group"
                reason = nonfinite_reason(const.tensor)
                if reason:
                    return reason
        if any(e.node.op == "Transpose" for e in self.region):
            return "a Transpose moves the channels"
        group = self.group
        name = next(m.producer.node.name or m.producer.node.outputs[0].name for m in self.members)
        return CoupledGroup(
            name,
            group.kind,
            group.width,
            self.members,
            self.gates,
            self.region,
            self.consumers,
            self.cuts,
            self.reshapes,
            self.tensors,
        )


def _is_join(node: gs.Node) -> bool:
    """An Add/Sub/Mul/Div of two computed tensors (a residual join or a gate), or a Concat."""
    data = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
    return node.op == "Concat" or (node.op in ops.BINARY and len(data) == 2 and data[0] is not data[1])


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def _attributes(node: gs.Node) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))
