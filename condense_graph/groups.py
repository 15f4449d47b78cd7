"""Channel groups: the tensors that carry the same channels, across producers (issue 13).

A *channel group* is a set of tensors whose channels are one and the same: a producer's output
and everything per-channel ops compute from it (`condense_graph.ops`), the two data inputs and
the output of an elementwise Add/Sub/Mul/Div of equal shape (a residual stream), the inputs of a
Concat on the channel axis (each at an offset into the output's channels), the parts of a
Split/Slice on the channel axis (each at an offset of the input's channels), and the two sides of
a squeeze-excitation gate `x * Sigmoid(fc2(act(fc1(pool(x)))))`, whose fc2 output rows are x's
channels. Groups are found by a union-find over tensors that keeps each tensor's offset into the
group's channels; a channel of a member is group channel `offset + k`.

A tensor's *index map* (its `Piece`s) says which group channel each of its channels is: most
tensors are one piece (channels `offset ..` from position 0), but a Concat can hold one group
channel at several positions. YOLOv8's C2f concatenates a split part b and its residual successor
b + m(b), which carry the same channels: Concat([a, b, b2]) holds group channels h .. 2h - 1 at
positions h and 2h. Such a Concat output is a *composite*: its pieces point into the union-find
tensors it concatenates, and per-channel ops, cuts and further Concats carry the pieces on.

A group's *members* are the producers (Gemm, MatMul, Conv) whose output channels are group
channels; its *consumers* are the Gemm/MatMul/Conv nodes that read a group tensor as their data.
Today's single-producer layer (`condense_graph.analysis.Layer`) is the one-member group of kind
"layer"; whether it is reducible is what the analysis says. Whether a group that joins producers
can be merged is judged by `condense_graph.coupled.prepare` (which sets `reducible` and `reason`);
its `blockers` name what keeps it unreducible here already: a member that is a graph input or
comes from an op that is not a producer, a group tensor that is a graph output or is read inside a
subgraph, channels that reach an op that does not act per channel, a weight that is not a constant...

This module only reads the graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from condense_graph import ops
from condense_graph.analysis import Analysis, as_consumer, as_producer
from condense_graph.ops import Channels

COUPLED = "coupled across producers: not laid out yet (`coupled.prepare`)"
_MATRIX_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
_GATE_ACTIVATIONS = ("Sigmoid", "HardSigmoid")
_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")
# shape-only ops a gate passes through on its way back to [N, C, 1, 1]
_RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast")


@dataclass(frozen=True)
class Member:
    """A tensor whose channels are group channels offset .. offset + width - 1.

    `producer` is the producing node's name (a graph input's own name); `op` its op type, or
    "graph input"; `weight` the producer's weight initializer, None for a non-producer."""

    producer: str
    op: str
    weight: str | None
    tensor: str
    offset: int
    width: int | None


@dataclass(frozen=True)
class Piece:
    """Channels `position .. position + width - 1` of a tensor are group channels `offset ..`."""

    position: int
    offset: int
    width: int | None


Layout = tuple  # a tensor's index map: its Pieces in position order


def single(offset: int, width: int | None) -> Layout:
    """The index map of a tensor whose channels are group channels offset .. offset + width - 1."""
    return (Piece(0, offset, width),)


def layout_width(layout: Layout) -> int | None:
    widths = [p.width for p in layout]
    return None if None in widths else sum(widths)


def layout_channels(layout: Layout) -> np.ndarray:
    """The group channel of each of the tensor's channels, in position order."""
    if not layout:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(p.offset, p.offset + p.width) for p in layout]).astype(np.int64)


@dataclass(frozen=True)
class GroupConsumer:
    """A Gemm/MatMul/Conv reading `tensor`, whose channels are group channels by `pieces` (one
    piece: offset .. offset + width - 1; `offset` is the lowest group channel read, `width` the
    tensor's channel count)."""

    node: str
    op: str
    tensor: str
    offset: int
    width: int | None
    pieces: Layout = ()


@dataclass(frozen=True)
class Join:
    """The node that couples channels: kind residual, concat, split or gate."""

    kind: str
    op: str
    node: str


@dataclass
class ChannelGroup:
    """Tensors carrying the same channels; `kind` is "layer" for one producer and no join, else
    the kind of the group's first join in graph order."""

    kind: str
    members: list[Member]
    consumers: list[GroupConsumer]
    width: int | None
    joins: list[Join] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # what keeps it unreducible besides coupling
    # every tensor carrying group channels: name -> its index map (Pieces), widths None when unknown
    tensors: dict[str, Layout] = field(default_factory=dict)
    reducible: bool = False
    reason: str | None = None

    @property
    def coupled(self) -> bool:
        return self.kind != "layer"

    @property
    def producers(self) -> list[str]:
        return [m.producer for m in self.members]


@dataclass(frozen=True)
class Gate:
    """A squeeze-excitation gate: mul = x * gate, gate computed by fc2(act(fc1(pool(x))))."""

    mul: gs.Node
    x: gs.Tensor
    fc1: gs.Node
    fc2: gs.Node
    path: tuple  # the nodes between fc2's output and the Mul


def find_groups(graph: gs.Graph, analysis: Analysis, subgraph_tensors: set[str] = frozenset()) -> list:
    """Every channel group of `graph` (toposorted, as analyzed), in the order of its first member."""
    builder = _Builder(graph, subgraph_tensors)
    for node in graph.nodes:
        builder.visit(node)
    return builder.groups(analysis)


def summarize(groups: list[ChannelGroup]) -> dict:
    """Channels of reducible single-producer layers against channels of coupled groups (those
    merged as groups, `coupled.prepare` having judged them, are `coupled_channels_ready`)."""
    layers = [g for g in groups if not g.coupled and g.reducible]
    coupled = [g for g in groups if g.coupled]
    ready = [g for g in coupled if g.reducible]
    return {
        "layers": len(layers),
        "layer_channels": sum(g.width or 0 for g in layers),
        "coupled_groups": len(coupled),
        "coupled_channels": sum(g.width or 0 for g in coupled),
        "coupled_groups_ready": len(ready),
        "coupled_channels_ready": sum(g.width or 0 for g in ready),
    }


def group_entry(group: ChannelGroup) -> dict:
    """The group as plain data (inspect's JSON)."""
    return {
        "kind": group.kind,
        "width": group.width,
        "members": [
            {"producer": m.producer, "op": m.op, "weight": m.weight, "tensor": m.tensor}
            | {"offset": m.offset, "width": m.width}
            for m in group.members
        ],
        "consumers": [c.node for c in group.consumers],
        "joins": [{"kind": j.kind, "op": j.op, "node": j.node} for j in group.joins],
        "reducible": group.reducible,
        "reason": group.reason,
    }


# ---- squeeze-excitation gates ---------------------------------------------------------------


def find_gates(graph: gs.Graph) -> dict[int, Gate]:
    """The squeeze-excitation Muls of `graph`, by node id."""
    gates = {}
    for node in graph.nodes:
        data = [t for t in node.inputs if _is_data(t)]
        if node.op != "Mul" or len(data) != 2:
            continue
        gate = gate_of(node, data[0], data[1]) or gate_of(node, data[1], data[0])
        if gate:
            gates[id(node)] = gate
    return gates


def gate_of(mul: gs.Node, x: gs.Tensor, gate: gs.Tensor) -> Gate | None:
    """The gate when `gate` = Sigmoid/HardSigmoid(fc2(act(fc1(pool(x))))) (reshapes allowed
    around fc1 and after the sigmoid, a bias Add after a MatMul), else None. The HardSwish
    x * relu6(x + 3) / 6 is no gate: its second factor is computed from x without a pool."""
    path, tensor = [], gate
    node = _through(_producer(tensor), _RESHAPES, path)
    if node is None or node.op not in _GATE_ACTIVATIONS:
        return None
    path.append(node)
    fc2 = _through(_producer(node.inputs[0]), _RESHAPES + ("Add",), path)
    if not _is_matrix(fc2):
        return None
    fc1 = _producer(_per_channel_source(fc2.inputs[0]))
    if not _is_matrix(fc1):
        return None
    pool = _through(_producer(fc1.inputs[0]), _RESHAPES, [])
    if pool is None or pool.op not in _POOLS or pool.inputs[0] is not x:
        return None
    return Gate(mul, x, fc1, fc2, tuple(path))


def _through(node: gs.Node | None, kinds: tuple, path: list) -> gs.Node | None:
    """Walk back from `node` over single-data-input ops of `kinds`, adding them to `path`."""
    while node is not None and node.op in kinds:
        data = [t for t in node.inputs if _is_data(t)]
        if len(data) != 1:
            return None
        path.append(node)
        node = _producer(data[0])
    return node


def _per_channel_source(tensor: gs.Tensor, limit: int = 12) -> gs.Tensor | None:
    """Walk back over per-channel ops (x * Sigmoid(x) included) to a matrix op's output."""
    for _ in range(limit):
        node = _producer(tensor)
        if node is None or _is_matrix(node):
            return tensor
        data = [t for t in node.inputs if _is_data(t)]
        if node.op in ops.BINARY and len(data) == 2:
            a, b = data
            tensor = a if _derives_from(b, a) else (b if _derives_from(a, b) else None)
        elif len(data) == 1 and (ops.is_per_channel_op(node) or node.op in _RESHAPES):
            tensor = data[0]
        else:
            return None
        if tensor is None:
            return None
    return None


def _derives_from(tensor: gs.Tensor, source: gs.Tensor, depth: int = 4) -> bool:
    """True when `tensor` is computed from `source` alone within `depth` single-input steps."""
    for _ in range(depth):
        node = _producer(tensor)
        data = [t for t in node.inputs if _is_data(t)] if node is not None else []
        if len(data) != 1:
            return False
        tensor = data[0]
        if tensor is source:
            return True
    return False


# ---- the union-find ---------------------------------------------------------------------------


class _Tensors:
    """Union-find over tensor names with offsets: offset(t) = offset(parent(t)) + delta(t)."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.delta: dict[str, int] = {}
        self.info: dict[str, _Carrier] = {}
        self.joins = defaultdict(list)
        self.blockers = defaultdict(list)

    def __contains__(self, name: str) -> bool:
        return name in self.parent

    def add(self, name: str, carrier: _Carrier) -> None:
        if name not in self.parent:
            self.parent[name], self.delta[name], self.info[name] = name, 0, carrier

    def find(self, name: str) -> tuple[str, int]:
        """The root of `name` and the offset of `name` into the root's channels."""
        path = []
        while self.parent[name] != name:
            path.append(name)
            name = self.parent[name]
        offset = 0
        for node in reversed(path):  # compress: every node on the path points at the root
            offset += self.delta[node]
            self.delta[node], self.parent[node] = offset, name
        return name, offset

    def union(self, a: str, b: str, delta: int, where: str) -> None:
        """offset(a) = offset(b) + delta."""
        root_a, off_a = self.find(a)
        root_b, off_b = self.find(b)
        if root_a == root_b:
            if off_a != off_b + delta:
                self.block(a, f"{where} meets these channels again at another offset")
            return
        self.parent[root_a], self.delta[root_a] = root_b, off_b + delta - off_a
        self.joins[root_b] += self.joins.pop(root_a, [])
        self.blockers[root_b] += self.blockers.pop(root_a, [])

    def join(self, name: str, join: Join) -> None:
        self.joins[self.find(name)[0]].append(join)

    def block(self, name: str, reason: str) -> None:
        found = self.blockers[self.find(name)[0]]
        if reason not in found:
            found.append(reason)


@dataclass(frozen=True)
class _Carrier:
    """What a channel-carrying tensor is: its width, its channel axis, whether a Flatten is on
    the way (then its rank is only known from shapes), the rank its producer gives."""

    width: int | None
    axis: int
    flat: bool = False
    rank: int | None = None

    @property
    def channels(self) -> Channels:
        return Channels(self.width or 0, self.axis)

    def resized(self, width: int | None) -> _Carrier:
        return _Carrier(width, self.axis, self.flat, self.rank)


# ---- building groups --------------------------------------------------------------------------


class _Builder:
    """One pass over the nodes in graph order: seed producers, propagate, join."""

    def __init__(self, graph: gs.Graph, subgraph_tensors: set[str]):
        self.outputs = {t.name for t in graph.outputs}
        self.subgraph_tensors = subgraph_tensors
        self.gates = find_gates(graph)
        self.gate_path = {id(n) for g in self.gates.values() for n in g.path}
        self.tensors = _Tensors()
        self.producers: list[gs.Node] = []
        self.foreign: list[gs.Tensor] = []
        self.consumers: list[tuple[gs.Node, gs.Tensor]] = []
        self.sequences: dict[str, tuple[gs.Tensor, list[int] | None]] = {}
        # a tensor holding group channels at several positions: its pieces (position, base tensor,
        # start in the base, width), bases being union-find tensors with an offset
        self.composites: dict[str, list[tuple[int, str, int, int]]] = {}
        self.order = {id(n): i for i, n in enumerate(graph.nodes)}

    # -- visiting

    def visit(self, node: gs.Node) -> None:
        if node.op == "SequenceAt" and node.inputs[0].name in self.sequences:
            return self._sequence_at(node)
        data = [t for t in node.inputs if t.name in self.tensors]
        if _is_matrix(node):
            return self._matrix(node, data)
        if not data:
            return None
        if node.op in ("If", "Loop", "Scan"):
            return self._block_all(data, f"channels enter control flow ({node.op} '{_name(node)}')")
        handler = {
            "Concat": self._concat,
            "Split": self._split,
            "SplitToSequence": self._split_to_sequence,
        }.get(node.op)
        if handler:
            return handler(node, data)
        if node.op == "Slice" and self._slices_channels(node, data[0]):
            return self._slice(node, data[0])
        if node.op in ops.BINARY and len([t for t in node.inputs if _is_data(t)]) == 2:
            return self._binary(node)
        if id(node) in self.gate_path and len(data) == 1:
            return self._carry(node, data[0])
        return self._per_channel(node, data)

    def _matrix(self, node: gs.Node, data: list[gs.Tensor]) -> None:
        """A Gemm/MatMul/Conv reads group channels (a consumer) and seeds its own output's group."""
        for tensor in data:
            self.consumers.append((node, tensor))
            consumer = as_consumer(node, tensor) if tensor is node.inputs[0] else None
            if tensor is not node.inputs[0]:
                self.tensors.block(
                    tensor.name, f"{node.op} '{_name(node)}' reads these channels as its weight"
                )
            elif isinstance(consumer, str):
                self.tensors.block(tensor.name, consumer)
        out = node.outputs[0]
        self._add(out, _Carrier(_producer_width(node), 1 if "Conv" in node.op else -1, rank=_seed_rank(node)))
        self.producers.append(node)
        reason = as_producer(node, self.outputs, self.subgraph_tensors)
        if isinstance(reason, str):
            self.tensors.block(out.name, reason)

    def _per_channel(self, node: gs.Node, data: list[gs.Tensor]) -> None:
        reason = self._per_channel_reason(node, data)
        if reason:
            return self._block_all(data, reason)
        return self._carry(node, data[0])

    def _per_channel_reason(self, node: gs.Node, data: list[gs.Tensor]) -> str | None:
        if not ops.is_per_channel_op(node) or node.domain not in (None, "", "ai.onnx"):
            return f"channels reach {node.op} '{_name(node)}', which does not act per channel"
        if len(data) != 1:
            return f"{node.op} '{_name(node)}' mixes these channels with other channels"
        carrier = self.tensors.info[data[0].name]
        reason = ops.check_node(node, {data[0].name}, carrier.channels, self._rank(data[0]))
        if reason:
            return reason
        if any(extra.outputs for extra in node.outputs[1:]):
            return f"{node.op} '{_name(node)}' uses its second output"
        return None

    def _carry(self, node: gs.Node, source: gs.Tensor) -> None:
        """The node's output carries `source`'s channels at the same offset."""
        carrier = self.tensors.info[source.name]
        flat = carrier.flat or node.op in ops.LAYOUT
        self._add(node.outputs[0], _Carrier(carrier.width, carrier.axis, flat, carrier.rank))
        self._alias(node.outputs[0], source, f"{node.op} '{_name(node)}'")

    def _alias(self, tensor: gs.Tensor, source: gs.Tensor, where: str) -> None:
        """`tensor`'s channels are `source`'s, position for position (pieces and all)."""
        self.tensors.union(tensor.name, source.name, 0, where)
        if source.name in self.composites:
            self.composites[tensor.name] = list(self.composites[source.name])

    def _binary(self, node: gs.Node) -> None:
        """x * gate(x), a residual Add/Sub/Mul/Div of equal shape, or a per-channel x op f(x)."""
        a, b = [t for t in node.inputs if _is_data(t)]
        where = f"{node.op} '{_name(node)}'"
        gate = self.gates.get(id(node))
        if gate is not None:
            other = b if gate.x is a else a
            if any(t.name in self.composites for t in (a, b)):
                return self._block_all(
                    [t for t in (a, b) if t.name in self.tensors],
                    f"{where} gates channels that sit at several positions of one tensor",
                )
            return self._join_equal(node, gate.x, other, Join("gate", node.op, _name(node)))
        carried = [t for t in (a, b) if t.name in self.tensors]
        if len(carried) == 2 and self._same_layout(a, b):
            return self._carry(node, a)  # SiLU, decomposed GELU / HardSwish: per channel
        if gate is None and any(t.name in self.composites for t in carried):
            return self._block_all(
                carried, f"{where} joins channels that sit at several positions of one tensor"
            )
        if _broadcasts(a, b):
            other = next(t for t in (a, b) if t is not carried[0])
            return self._block_all(
                carried, f"{where} broadcasts these channels against computed '{other.name}'"
            )
        if len(carried) == 2 and self._width(a) != self._width(b):
            return self._block_all(carried, f"{where} adds channels of different widths")
        return self._join_equal(
            node, carried[0], b if carried[0] is a else a, Join("residual", node.op, _name(node))
        )

    def _join_equal(self, node: gs.Node, x: gs.Tensor, other: gs.Tensor, join: Join) -> None:
        """`other` and the node's output carry x's channels at x's offset."""
        if x.name not in self.tensors:
            x, other = other, x
        if other.name not in self.tensors:
            self._add_foreign(other, self.tensors.info[x.name])
        self.tensors.union(other.name, x.name, 0, f"{join.op} '{join.node}'")
        self.tensors.join(x.name, join)
        self._carry(node, x)

    def _concat(self, node: gs.Node, data: list[gs.Tensor]) -> None:
        carrier = self.tensors.info[data[0].name]
        rank = self._rank(node.outputs[0]) or self._rank(data[0])
        axis = node.attrs.get("axis", 0)
        if (axis % rank if rank else axis) != (carrier.axis % rank if rank else carrier.axis):
            return self._block_all(data, f"Concat '{_name(node)}' stacks these channels along axis {axis}")
        widths = [self._input_width(t, axis) for t in node.inputs]
        if any(isinstance(t, gs.Constant) for t in node.inputs) or None in widths:
            reason = (
                f"Concat '{_name(node)}' joins these channels with a constant or a tensor of unknown width"
            )
            return self._block_all(data, reason)
        out = node.outputs[0]
        self._add(out, carrier.resized(sum(widths)))
        positions = [sum(widths[:i]) for i in range(len(widths))]
        for tensor, width in zip(node.inputs, widths, strict=True):
            if tensor.name not in self.tensors:
                self._add_foreign(tensor, carrier.resized(width))
        where = f"Concat '{_name(node)}'"
        if self._repeats(node.inputs, positions):
            self._concat_pieces(out, node.inputs, positions, where)
        else:
            for tensor, position in zip(node.inputs, positions, strict=True):
                self.tensors.union(tensor.name, out.name, position, where)
        self.tensors.join(out.name, Join("concat", "Concat", _name(node)))

    def _repeats(self, inputs: list[gs.Tensor], positions: list[int]) -> bool:
        """True when the Concat output would hold a group channel at two positions: an input holds
        channels at several positions already, or two inputs of one group are not placed where
        their offsets say (C2f's b and b + m(b): the same channels, side by side)."""
        if any(t.name in self.composites for t in inputs):
            return True
        starts = {}
        for tensor, position in zip(inputs, positions, strict=True):
            root, offset = self.tensors.find(tensor.name)
            if starts.setdefault(root, offset - position) != offset - position:
                return True
        return False

    def _concat_pieces(self, out: gs.Tensor, inputs, positions, where: str) -> None:
        """The output is a composite of its inputs' pieces. Inputs of other groups join the first
        input's group where the Concat puts them (the consumer reads them all)."""
        anchor, shift = self._reference(inputs[0])
        pieces = []
        for tensor, position in zip(inputs, positions, strict=True):
            ref, ref_shift = self._reference(tensor)
            if self.tensors.find(ref)[0] != self.tensors.find(anchor)[0]:
                self.tensors.union(ref, anchor, position - positions[0] + shift - ref_shift, where)
            pieces += [(position + p, base, start, w) for p, base, start, w in self._pieces(tensor.name)]
        self.tensors.union(out.name, anchor, 0, where)  # in the group; its channels are its pieces
        self.composites[out.name] = pieces

    def _pieces(self, name: str) -> list[tuple[int, str, int, int]]:
        return self.composites.get(name) or [(0, name, 0, self.tensors.info[name].width)]

    def _reference(self, tensor: gs.Tensor) -> tuple[str, int]:
        """A union-find tensor and the start in it of `tensor`'s first channel."""
        _, base, start, _ = self._pieces(tensor.name)[0]
        return base, start

    def _resolved(self, name: str) -> tuple:
        """`name`'s pieces as (position, root, group channel, width) by the union-find so far."""
        pieces = []
        for position, base, start, width in self._pieces(name):
            root, offset = self.tensors.find(base)
            pieces.append((position, root, offset + start, width))
        return tuple(pieces)

    def _same_layout(self, a: gs.Tensor, b: gs.Tensor) -> bool:
        return self._resolved(a.name) == self._resolved(b.name)

    def _split(self, node: gs.Node, data: list[gs.Tensor]) -> None:
        source = node.inputs[0]
        if data != [source]:
            return self._block_all(data, f"Split '{_name(node)}' reads these channels as its split sizes")
        parts = node.outputs
        sizes = self._split_sizes(node, source, len(parts))
        self._cut(node, source, parts, sizes, node.attrs.get("axis", 0))

    def _split_to_sequence(self, node: gs.Node, data: list[gs.Tensor]) -> None:
        """The dynamo exporter's split: SplitToSequence, then SequenceAt of constant indices."""
        source, seq = node.inputs[0], node.outputs[0]
        users = seq.outputs
        if data != [source] or node.attrs.get("keepdims", 1) != 1 or any(u.op != "SequenceAt" for u in users):
            return self._block_all(data, f"SplitToSequence '{_name(node)}' is not split into its parts")
        axis = node.attrs.get("axis", 0)
        if not self._on_channel_axis(source, axis):
            self.sequences[seq.name] = (source, None)
            return None
        width = self._width(source)
        split = node.inputs[1] if len(node.inputs) > 1 and _is_data_or_const(node.inputs[1]) else None
        sizes = _chunk_sizes(width, split)
        if sizes is None:
            return self._block_all(data, f"SplitToSequence '{_name(node)}' has split sizes not known")
        self.sequences[seq.name] = (source, sizes)
        self.tensors.join(source.name, Join("split", "SplitToSequence", _name(node)))
        return None

    def _sequence_at(self, node: gs.Node) -> None:
        source, sizes = self.sequences[node.inputs[0].name]
        if source.name not in self.tensors:
            return None
        index = _constant_ints(node.inputs[1])
        if index is None:
            return self.tensors.block(source.name, f"SequenceAt '{_name(node)}' has a computed index")
        if sizes is None:
            return self._carry(node, source)
        i = index[0] % len(sizes)
        return self._part(node.outputs[0], source, sum(sizes[:i]), sizes[i], f"SequenceAt '{_name(node)}'")

    def _cut(self, node, source, parts, sizes, axis) -> None:
        if not self._on_channel_axis(source, axis):
            for part in parts:
                self._add(part, self.tensors.info[source.name])
                self._alias(part, source, f"{node.op} '{_name(node)}'")
            return None
        if sizes is None:
            return self.tensors.block(source.name, f"{node.op} '{_name(node)}' has split sizes not known")
        offset = 0
        for part, size in zip(parts, sizes, strict=False):
            self._part(part, source, offset, size, f"{node.op} '{_name(node)}'")
            offset += size
        self.tensors.join(source.name, Join("split", node.op, _name(node)))
        return None

    def _part(self, part: gs.Tensor, source: gs.Tensor, offset: int, width: int, where: str) -> None:
        """`part` is `source`'s channels offset .. offset + width - 1."""
        self._add(part, self.tensors.info[source.name].resized(width))
        if source.name not in self.composites:
            return self.tensors.union(part.name, source.name, offset, where)
        pieces = []
        for position, base, start, size in self.composites[source.name]:
            low, high = max(position, offset), min(position + size, offset + width)
            if low < high:
                pieces.append((low - offset, base, start + low - position, high - low))
        if len(pieces) == 1:  # within one piece: an ordinary part of its base
            return self.tensors.union(part.name, pieces[0][1], pieces[0][2], where)
        self.tensors.union(part.name, source.name, 0, where)
        self.composites[part.name] = pieces
        return None

    def _slices_channels(self, node: gs.Node, data: gs.Tensor) -> bool:
        axes = _constant_ints(_input(node, 3))
        return (
            data is node.inputs[0] and axes is not None and any(self._on_channel_axis(data, a) for a in axes)
        )

    def _slice(self, node: gs.Node, data: gs.Tensor) -> None:
        """A Slice of the channel axis with step 1: its output is a part at the start offset."""
        starts, ends, axes = (_constant_ints(_input(node, i)) for i in (1, 2, 3))
        steps = _constant_ints(_input(node, 4)) or [1] * len(axes)
        width = self._width(data)
        if starts is None or ends is None or width is None:
            return self.tensors.block(
                data.name, f"Slice '{_name(node)}' of the channel axis has computed bounds"
            )
        i = next(k for k, a in enumerate(axes) if self._on_channel_axis(data, a))
        if steps[i] != 1:
            return self.tensors.block(data.name, f"Slice '{_name(node)}' takes every {steps[i]}th channel")
        start, end = (_clamp(v, width) for v in (starts[i], ends[i]))
        self._part(node.outputs[0], data, start, max(end - start, 0), f"Slice '{_name(node)}'")
        self.tensors.join(data.name, Join("split", "Slice", _name(node)))
        return None

    # -- helpers

    def _add(self, tensor: gs.Tensor, carrier: _Carrier) -> None:
        self.tensors.add(tensor.name, carrier)
        if tensor.name in self.outputs:
            self.tensors.block(
                tensor.name, f"channels reach graph output '{tensor.name}' (the model's interface)"
            )
        if tensor.name in self.subgraph_tensors:
            self.tensors.block(
                tensor.name, f"channels reach '{tensor.name}', which an If/Loop/Scan subgraph reads"
            )

    def _add_foreign(self, tensor: gs.Tensor, carrier: _Carrier) -> None:
        """A tensor no producer's group holds joins one: a member that cannot be rewritten."""
        self._add(tensor, carrier)
        self.foreign.append(tensor)
        node = _producer(tensor)
        if node is None:
            reason = f"member '{tensor.name}' is a graph input (the model's interface)"
        else:
            reason = (
                f"member '{tensor.name}' comes from {node.op} '{_name(node)}', not from a Gemm/MatMul/Conv"
            )
        self.tensors.block(tensor.name, reason)

    def _block_all(self, tensors: list[gs.Tensor], reason: str) -> None:
        for tensor in tensors:
            if tensor.name in self.tensors:
                self.tensors.block(tensor.name, reason)

    def _width(self, tensor: gs.Tensor) -> int | None:
        return self.tensors.info[tensor.name].width

    def _rank(self, tensor: gs.Tensor) -> int | None:
        if tensor.shape is not None:
            return len(tensor.shape)
        carrier = self.tensors.info.get(tensor.name)
        return None if carrier is None or carrier.flat else carrier.rank

    def _on_channel_axis(self, tensor: gs.Tensor, axis: int) -> bool:
        carrier, rank = self.tensors.info[tensor.name], self._rank(tensor)
        if rank is None:
            return axis == carrier.axis
        return axis % rank == carrier.axis % rank

    def _input_width(self, tensor: gs.Tensor, axis: int) -> int | None:
        if tensor.name in self.tensors:
            return self._width(tensor)
        shape = tensor.shape
        if shape is None or not shape or not isinstance(shape[axis % len(shape)], int):
            return None
        return shape[axis % len(shape)]

    def _split_sizes(self, node: gs.Node, source: gs.Tensor, parts: int) -> list[int] | None:
        sizes = node.attrs.get("split")
        if sizes is None and len(node.inputs) > 1 and _is_data_or_const(node.inputs[1]):
            sizes = _constant_ints(node.inputs[1])
        if sizes is not None:
            return [int(s) for s in sizes]
        width = self._width(source)
        if width is None:
            return None
        chunk = -(-width // parts)  # the last part is smaller when the width does not divide
        return [min(chunk, width - i * chunk) for i in range(parts)]

    # -- the groups

    def groups(self, analysis: Analysis) -> list[ChannelGroup]:
        by_root = defaultdict(list)
        for name in self.tensors.parent:
            by_root[self.tensors.find(name)[0]].append(name)
        layers = {layer.name for layer in analysis.layers}
        skipped = {s.name: s.reason for s in analysis.skipped}
        found = [self._group(root, set(names), layers, skipped) for root, names in by_root.items()]
        return [group for _, group in sorted(found, key=lambda pair: pair[0])]

    def _group(self, root, names, layers, skipped):
        offsets = {n: self.tensors.find(n)[1] for n in names if n not in self.composites}
        low = min(offsets.values())
        layouts = {n: self._layout(n, offsets, low) for n in names}
        members = [
            self._member(n.outputs[0], n, offsets, low) for n in self.producers if n.outputs[0].name in names
        ]
        members += [self._member(t, None, offsets, low) for t in self.foreign if t.name in names]
        members.sort(key=lambda m: m.offset)  # stable: producers in graph order at one offset
        consumers = [
            GroupConsumer(
                _name(n),
                n.op,
                t.name,
                min(p.offset for p in layouts[t.name]),
                self._width(t),
                layouts[t.name],
            )
            for n, t in self.consumers
            if t.name in names
        ]
        widths = [
            offsets[n] - low + self.tensors.info[n].width
            for n in offsets
            if self.tensors.info[n].width is not None
        ]
        known = len(widths) == len(offsets)
        joins, blockers = self.tensors.joins.get(root, []), self.tensors.blockers.get(root, [])
        group = ChannelGroup(
            joins[0].kind if joins else "layer",
            members,
            consumers,
            max(widths) if known and widths else None,
            list(joins),
            list(blockers),
            layouts,
        )
        _judge(group, layers, skipped)
        first = min((self.order.get(id(_producer_node(m, self.producers)), 0) for m in members), default=0)
        return first, group

    def _layout(self, name: str, offsets: dict, low: int) -> Layout:
        """The tensor's index map: its one piece, or a composite's pieces in its bases' offsets."""
        if name not in self.composites:
            return single(offsets[name] - low, self.tensors.info[name].width)
        return tuple(
            Piece(position, offsets[base] - low + start, width)
            for position, base, start, width in self.composites[name]
        )

    def _member(self, tensor: gs.Tensor, node: gs.Node | None, offsets: dict, low: int) -> Member:
        width = self._width(tensor)
        if node is not None:
            weight = node.inputs[1].name if len(node.inputs) > 1 else None
            return Member(_name(node), node.op, weight, tensor.name, offsets[tensor.name] - low, width)
        source = _producer(tensor)
        producer, op = (_name(source), source.op) if source is not None else (tensor.name, "graph input")
        return Member(producer, op, None, tensor.name, offsets[tensor.name] - low, width)


def _judge(group: ChannelGroup, layers: set[str], skipped: dict[str, str]) -> None:
    """A one-producer group is what the analysis says; a coupled one is not reducible yet."""
    if not group.coupled and len(group.members) == 1:
        name = group.members[0].producer
        group.reducible = name in layers
        group.reason = None if group.reducible else skipped.get(name) or next(iter(group.blockers), None)
        return
    group.reducible = False
    group.reason = group.blockers[0] if group.blockers else COUPLED


def _producer_node(member: Member, producers: list[gs.Node]) -> gs.Node | None:
    return next((n for n in producers if _name(n) == member.producer), None)


# ---- graph helpers ----------------------------------------------------------------------------


def _producer(tensor: gs.Tensor | None) -> gs.Node | None:
    if tensor is None or isinstance(tensor, gs.Constant) or not tensor.inputs:
        return None
    return tensor.inputs[0]


def _is_matrix(node: gs.Node | None) -> bool:
    return node is not None and node.op in _MATRIX_OPS and not ops.is_depthwise_conv(node)


def _is_data(tensor: gs.Tensor) -> bool:
    """A computed (or graph input) tensor: not a constant, not an empty optional input."""
    return bool(tensor.name) and not isinstance(tensor, gs.Constant)


def _is_data_or_const(tensor: gs.Tensor) -> bool:
    return bool(tensor.name)


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input `index`, None when it is absent or empty."""
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _constant_ints(tensor: gs.Tensor | None) -> list[int] | None:
    if not isinstance(tensor, gs.Constant):
        return None
    return [int(v) for v in np.asarray(tensor.values).reshape(-1)]


def _chunk_sizes(width: int | None, split: gs.Tensor | None) -> list[int] | None:
    """SplitToSequence's parts: of `split` sizes, chunks of a scalar `split`, or single channels."""
    if width is None:
        return None
    if split is None:
        return [1] * width
    values = _constant_ints(split)
    if values is None:
        return None
    if np.asarray(split.values).ndim == 0:
        chunk = values[0]
        return [min(chunk, width - start) for start in range(0, width, chunk)]
    return values


def _clamp(value: int, width: int) -> int:
    value = value + width if value < 0 else value
    return min(max(value, 0), width)


def _broadcasts(a: gs.Tensor, b: gs.Tensor) -> bool:
    """True when one of the shapes has a 1 where the other has not (or the ranks differ)."""
    if a.shape is None or b.shape is None:
        return False
    if len(a.shape) != len(b.shape):
        return True
    return any((x == 1) != (y == 1) for x, y in zip(a.shape, b.shape, strict=True))


def _producer_width(node: gs.Node) -> int | None:
    """How many output channels a Gemm/MatMul/Conv has, from its weight or its output shape."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(weight, gs.Constant) and weight.values.ndim >= 2:
        shape = weight.values.shape
        if node.op == "Conv":
            return int(shape[0])
        if node.op == "ConvTranspose":
            return int(shape[1]) * int(node.attrs.get("group", 1))
        if node.op == "Gemm" and node.attrs.get("transB", 0):
            return int(shape[0])
        return int(shape[-1])
    shape = node.outputs[0].shape
    axis = 1 if "Conv" in node.op else -1
    if shape and isinstance(shape[axis], int):
        return shape[axis]
    return None


def _seed_rank(node: gs.Node) -> int | None:
    if node.op == "Gemm":
        return 2
    if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
        return node.inputs[1].values.ndim
    shape = node.outputs[0].shape
    return len(shape) if shape is not None else None


def _name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name
