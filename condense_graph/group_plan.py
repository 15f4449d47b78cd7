"""Plan the merge of a coupled channel group (issue 13) on the weight store.

A coupled group (`condense_graph.coupled`) carries the same channels through several producers:
a residual stream (stem and every block's last conv), the branches of a Concat, the parts of a
Split, a squeeze-excitation gate. Channel p of the group is what *every* member computes at p, so:

  vector of p  = the concatenation of every member's eq.-3 row [s w, s b + t] at p, members in one
                 slot (same input, same geometry: two Concat branches reading one tensor) sharing
                 columns. Two channels are parallel only when they are parallel in every member,
                 with one factor lambda = ||v_q|| / ||v_p|| for all of them (eq. 10).
  constants    everything on p's path past the members must agree: per-channel constants of the
                 region (a BatchNormalization after the Add, depthwise kernels) and the gate rows
                 of a squeeze-excitation fc2 (they pass a Sigmoid, so they must be equal, not
                 parallel). `similarity.constant_agreement` turns them into a similarity.
  signature    only channels with one signature (same ops on the path, same consumers) merge.

Merging q into p keeps p in every member, region constant and gate, and folds q's consumer columns
into p's with factor lambda (eq. 10-12, 36-38) in every consumer, through the index map of the
tensor each consumer reads: where a group channel sits at several positions of that tensor (C2f's
Concat of b and b + m(b)), q's column folds into p's at each of them. Split sizes, Slice bounds
and literal Reshape widths follow the kept channels. With exact positive multiples in every member
(one factor) and a positively homogeneous path (or factor 1 through any path) and equal constants,
the merge is exact.

With calibration data a data-aware rule selects instead (`with_statistics`): structured OBS sums
its costs over every consumer of the group, on the consumers' input statistics; the pass then
refits the consumers. Its predicted relative cost at every group width (`group_costs`: each
signature class's OBS curve at the class's share of the width, summed) is the group's curve in
the global allocation (`allocate.removal_curves`). Dead channels (zero in every member, and kept
zero by the region up to every consumer: `group_zero`) are dropped before any selection, exactly;
a constant channel that is not zero is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from condense_graph import ops
from condense_graph.chain_eval import affine_coefficients
from condense_graph.coupled import CoupledGroup, Member
from condense_graph.errors import InternalError
from condense_graph.group_zero import zero_channels
from condense_graph.groups import layout_channels
from condense_graph.merge import ChannelMap, channel_map
from condense_graph.plan import WeightStore, channel_first, merge_into_consumer
from condense_graph.selectors import DEFAULT, SELECTORS, Grouping, Rows, Selector
from condense_graph.similarity import COSINE_TOLERANCE, cosine_similarity, neuron_similarity, split_to_width

FACTOR_TOLERANCE = 1e-6  # a merge factor this close to 1 is an exact copy (any path is exact)


@dataclass
class GroupPlan:
    """The merge of one coupled group: its map over group channels and what the report says."""

    group: CoupledGroup
    cmap: ChannelMap
    threshold: float | None
    exact: bool
    min_cosine: float | None
    method: str
    vectors: np.ndarray | None = field(default=None, repr=False)
    groups: list[np.ndarray] = field(default_factory=list, repr=False)
    attributes: list[tuple] = field(default_factory=list, repr=False)  # (node, name, value) to set
    refit = None
    costs = None
    dead = 0  # channels dropped for being zero wherever the consumers read them
    block_error = None
    probe = None

    @property
    def name(self) -> str:
        return self.group.name

    def measure(self) -> GroupPlan:
        return self

    def report(self) -> dict:
        refit = {"refit": self.refit} if self.refit is not None else {}
        return refit | {
            "name": self.group.name,
            "op": f"{self.group.kind} group",
            "activation": self.group.activation,
            "width_before": self.cmap.width_before,
            "width_after": self.cmap.width_after,
            "threshold": self.threshold,
            "exact": self.exact,
            "constant_removed": self.dead,
            "zero_output_removed": 0,
            "min_group_cosine": self.min_cosine,
            "group": {
                "kind": self.group.kind,
                "members": [m.producer.node.name for m in self.group.members],
                "weights": [m.producer.weight.name for m in self.group.members],
                # each member's output channels after the merge (a Concat branch keeps its own)
                "member_widths": [len(kept_in(self.cmap, m.offset, m.width)) for m in self.group.members],
                "gates": [g.producer.node.name for g in self.group.gates],
                "consumers": [c.consumer.node.name for c in self.group.consumers],
                "method": self.method,
            },
        }


def plan_group(
    group: CoupledGroup,
    store: WeightStore,
    grouping: Grouping,
    versions,
    selector: Selector | None = None,
    statistics: list | None = None,
) -> GroupPlan:
    """Select the group's merges with `selector` at `grouping` (per signature class, widths shared
    out by class size), then write the merged arrays into `store`. A data-aware selector reads
    `statistics` (`calibration.ReaderStatistics` per consumer, on the network reduced so far): the
    channel Gram at the first consumer reading a class, and every consumer's OBS term over the
    class's channels (costs summed over the group's consumers); without them, or when a consumer is
    too wide to gather, the paper's rule selects."""
    selector = selector or SELECTORS[DEFAULT]
    if selector.needs_calibration and not usable(statistics, selector):
        selector = SELECTORS[DEFAULT]
    vectors = group_vectors(group, store, versions)
    constants = path_constants(group, store)
    path = PathSimilarity.of(group, store, versions)
    # dead channels (zero where every consumer reads them) are dropped, exactly; one is kept
    # when nothing else is left
    dead = zero_channels(group, store, vectors, versions)
    if dead.all():
        dead[0] = False
    classes = [c[~dead[c]] for c in signature_classes(group, constants, path)]
    classes = [c for c in classes if len(c)]
    sizes = [len(c) for c in classes]
    widths = class_widths(grouping.width, sizes)
    merged, curves = [], []
    for channels, width in zip(classes, widths, strict=True):
        if len(channels) == 1:
            merged.append(channels)
            curves.append({1: 0.0})
            continue
        rows = Rows(vectors[channels], [vectors[channels]] + path.parallel(channels), path.scalars(channels))
        if selector.needs_calibration:
            rows = with_statistics(rows, group, channels, store, statistics)
        target = replace(grouping, width=width, round_to=1)
        selection = selector.select(rows, target)
        if width is not None and len(selection.groups) > width:
            # negative cosines never merge: a width that the path's vectors (a gate's rows, the
            # depthwise kernels) keep out of reach is met on the members' rows alone
            selection = selector.select(Rows(vectors[channels], [vectors[channels]]), target)
        merged += [channels[g] for g in selection.groups]
        curves.append(selection.costs)
    groups = [g for g in merged if len(g)]
    threshold = grouping.threshold if grouping.width is None and selector.name == DEFAULT else None
    if grouping.width is None and grouping.round_to > 1:
        groups = round_up(groups, vectors, grouping.round_to)
    cmap = channel_map(vectors, groups, np.ones(group.width), np.zeros(group.width), {})
    min_cosine = _min_cosine(vectors, groups) if selector.name == DEFAULT else None
    exact = selector.name == DEFAULT and is_exact(group, groups, cmap, constants, min_cosine)
    attributes = apply_group_map(group, store, cmap)
    plan = GroupPlan(group, cmap, threshold, exact, min_cosine, selector.name, vectors, groups, attributes)
    plan.dead = int(dead.sum())
    if grouping.width is not None:
        plan.costs = group_costs(sizes, curves, grouping.width, group.width)
    return plan


def group_costs(
    sizes: list[int], curves: list[dict | None], floor: int, full: int | None = None
) -> dict[int, float] | None:
    """The group's predicted relative cost at every width from `floor` to its full width: at width
    w each signature class gets its share (`class_widths`, as `plan_group` plans it) and costs
    what its curve says there; widths a class's curve does not reach down to take its lowest
    point (its curve was measured down to its share of `floor`), widths above it cost nothing
    (exact merges). The classes' relative costs are summed, each over the mean energy of its own
    consumers (`obs.RemovalOrder.relative_cost`): for one class (a residual stream, a gate) it is
    that class's curve; for several it over-counts, never under-counts, a removal. None when a
    class has no curve (the paper's rule selected it)."""
    if any(curve is None for curve in curves):
        return None
    costs = {}
    for width in range(floor, max(full or 0, sum(sizes)) + 1):  # above sum(sizes): dead channels
        total = 0.0
        for share, curve in zip(class_widths(width, sizes), curves, strict=True):
            if share >= max(curve):
                continue
            total += curve.get(share, curve[min(curve)] if share < min(curve) else 0.0)
        costs[width] = total
    return costs


def usable(statistics: list | None, selector: Selector) -> bool:
    """Statistics a data-aware selector can select a group on: gathered, and (for OBS) every
    consumer's Hessian at full width."""
    if statistics is None:
        return False
    return not selector.needs_consumer_statistics or all(s.hessian is not None for s in statistics)


def with_statistics(rows: Rows, group: CoupledGroup, channels: np.ndarray, store: WeightStore, statistics):
    """`rows` with the class's channel Gram and its consumers' OBS terms (`plan.restrict` of each
    consumer's term to the class's channels, which every consumer of the class reads)."""
    from condense_graph.compensate import weight_rows
    from condense_graph.obs import ConsumerTerm
    from condense_graph.plan import restrict

    readers = [(r, s) for r, s in zip(group.consumers, statistics, strict=True) if r.reads(channels[0])]
    first, stats = readers[0]
    local = positions_of(first, channels)[0]
    terms = []
    for reader, reader_stats in readers:
        consumer = reader.consumer
        weights = consumer.scale * weight_rows(consumer, store[consumer.weight.name]).astype(np.float64)
        bias = consumer.bias_scale * store.bias(consumer.bias, weights.shape[1])
        term = ConsumerTerm(reader_stats.hessian, np.vstack([weights, bias[None, :]]), reader_stats.block)
        # a consumer reading the channels at several positions: one term per position (the cross
        # terms between the positions are left out)
        terms += [restrict(term, positions) for positions in positions_of(reader, channels)]
    return replace(rows, gram=stats.channels[np.ix_(local, local)], terms=terms)


def positions_of(reader, channels: np.ndarray) -> list[np.ndarray]:
    """Where `channels` (of one signature: they sit in the same pieces) are in the reader's input,
    for each piece of its index map that holds them."""
    return [
        p.position + channels - p.offset
        for p in reader.pieces
        if p.offset <= channels[0] < p.offset + p.width
    ]


# ---- what a channel is ----------------------------------------------------------------------


def member_rows(member: Member, store: WeightStore, versions) -> np.ndarray:
    """[width, d]: the member's rows [s w, s b + t] with its affine ops folded in (eq. 3)."""
    producer = member.producer
    weights = channel_first(store[producer.weight.name], producer.axis) * producer.scale
    width = len(weights)
    bias = store.bias(producer.bias, width) * producer.bias_scale
    rank = producer.rank or 2
    shape = (width,) if producer.node.op != "Conv" else (width,) + (1,) * (rank - 2)
    dtype = store[producer.weight.name].dtype
    s, t = affine_coefficients(
        member.pre, producer.node.outputs[0], member.end, store, shape, dtype, versions
    )
    s, t = s.reshape(width), t.reshape(width)
    return np.concatenate([s[:, None] * weights.reshape(width, -1), (s * bias + t)[:, None]], axis=1)


def group_vectors(group: CoupledGroup, store: WeightStore, versions) -> np.ndarray:
    """[group width, D]: each channel's rows in every member, slot by slot (zeros where a slot's
    members do not cover the channel)."""
    slots: dict[tuple, list[tuple[Member, np.ndarray]]] = {}
    for member in group.members:
        slots.setdefault(member.slot, []).append((member, member_rows(member, store, versions)))
    blocks = []
    for entries in slots.values():
        block = np.zeros((group.width, entries[0][1].shape[1]))
        for member, rows in entries:
            block[member.offset : member.offset + member.width] = rows
        blocks.append(block)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def path_constants(group: CoupledGroup, store: WeightStore) -> list[np.ndarray]:
    """Per channel: the values on its path that must agree for a merge, in graph order: region
    constants past the members (depthwise kernels: every tap) and the gate rows [w, b]."""
    values = [[] for _ in range(group.width)]
    for entry in group.path_entries():
        for const in entry.constants:
            array = channel_first(store[const.tensor.name], const.axis).reshape(entry.width, -1)
            for local, k in enumerate(entry.channels):
                values[k].append(array[local])
    for gate in group.gates:
        rows = gate_rows(gate, store)
        for local, k in enumerate(gate.span):
            values[k].append(rows[local])
    return [np.concatenate(v).astype(np.float64) if v else np.zeros(0) for v in values]


@dataclass
class PathSimilarity:
    """What the selection compares on a channel's path past the members, by position along it:
    vectors that must be parallel (a depthwise kernel with the affine ops right after it folded
    in, as the paper's A.3 judges a depthwise block; a gate's row [w, b]) and scalars that must
    agree (`similarity.constant_agreement`: a BatchNormalization or PRelu slope between two
    activations). Equality of all of them is what exactness asks (`path_constants`)."""

    vectors: list[list[np.ndarray]]  # per channel
    values: list[np.ndarray]  # per channel: its scalars

    @classmethod
    def of(cls, group: CoupledGroup, store: WeightStore, versions) -> PathSimilarity:
        vectors = [[] for _ in range(group.width)]
        values = [[] for _ in range(group.width)]
        folded: set[int] = set()
        entries = group.path_entries()
        for i, entry in enumerate(entries):
            if id(entry.node) in folded:
                continue
            if ops.is_depthwise_conv(entry.node):
                rows, chain = depthwise_rows(entry, entries[i + 1 :], group, store, versions)
                folded |= {id(n) for n in chain}
                for local, k in enumerate(entry.channels):
                    vectors[k].append(rows[local])
                continue
            for const in entry.constants:
                array = channel_first(store[const.tensor.name], const.axis).reshape(entry.width, -1)
                for local, k in enumerate(entry.channels):
                    values[k].append(array[local])
        for gate in group.gates:
            rows = gate_rows(gate, store)
            for local, k in enumerate(gate.span):
                vectors[k].append(rows[local])
        flat = [np.concatenate(v).astype(np.float64) if v else np.zeros(0) for v in values]
        return cls(vectors, flat)

    def key(self, k: int) -> tuple:
        return (len(self.values[k]),) + tuple(len(v) for v in self.vectors[k])

    def parallel(self, channels: np.ndarray) -> list[np.ndarray]:
        first = self.vectors[channels[0]]
        return [
            np.stack([self.vectors[k][i] for k in channels]).astype(np.float32) for i in range(len(first))
        ]

    def scalars(self, channels: np.ndarray) -> list[np.ndarray]:
        return list(np.stack([self.values[k] for k in channels]).T)


def depthwise_rows(entry, after, group: CoupledGroup, store: WeightStore, versions):
    """[width, k*k + 1]: a depthwise conv's kernels and bias with the single-user affine ops right
    after it folded in (eq. 40, 52), and those ops."""
    node = entry.node
    region = set(group.tensors)
    chain, cur = [], node.outputs[0]
    nodes = {id(e.node): e.node for e in after}
    while len(cur.outputs) == 1 and id(cur.outputs[0]) in nodes and ops.is_affine(cur.outputs[0], region):
        chain.append(cur.outputs[0])
        cur = cur.outputs[0].outputs[0]
    kernels = store[node.inputs[1].name].reshape(entry.width, -1).astype(np.float64)
    bias = store[node.inputs[2].name].reshape(-1) if len(node.inputs) > 2 and node.inputs[2].name else 0.0
    shape = (entry.width,) + (1,) * (store[node.inputs[1].name].ndim - 2)
    dtype = store[node.inputs[1].name].dtype
    s, t = affine_coefficients(chain, node.outputs[0], cur, store, shape, dtype, versions)
    s, t = s.reshape(-1), t.reshape(-1)
    return np.concatenate([s[:, None] * kernels, (s * bias + t)[:, None]], axis=1), chain


def gate_rows(gate, store: WeightStore) -> np.ndarray:
    """[width, d + 1]: a squeeze-excitation fc2's rows [w, b] (alpha and beta applied)."""
    producer = gate.producer
    weights = channel_first(store[producer.weight.name], producer.axis).reshape(gate.width, -1)
    bias = store.bias(producer.bias, gate.width) * producer.bias_scale
    return np.concatenate([weights * producer.scale, bias[:, None]], axis=1)


def signature_classes(
    group: CoupledGroup, constants: list[np.ndarray], path: PathSimilarity
) -> list[np.ndarray]:
    """The channels by signature (and lengths of what is compared on the path), in channel order."""
    classes: dict[tuple, list[int]] = {}
    for k, signature in enumerate(group.signatures()):
        classes.setdefault((signature, len(constants[k]), path.key(k)), []).append(k)
    return [np.array(c) for c in classes.values()]


def class_widths(width: int | None, sizes: list[int]) -> list[int | None]:
    """A group width shared out over its classes in proportion to their sizes (each >= 1)."""
    if width is None:
        return [None] * len(sizes)
    total = sum(sizes)
    shares = [max(1, int(np.floor(width * n / total))) for n in sizes]
    order = np.argsort([-(width * n / total - s) for n, s in zip(sizes, shares, strict=True)], kind="stable")
    i = 0
    while sum(shares) < width and i < 4 * len(sizes):
        k = order[i % len(sizes)]
        if shares[k] < sizes[k]:
            shares[k] += 1
        i += 1
    return [min(s, n) for s, n in zip(shares, sizes, strict=True)]


def round_up(groups: list[np.ndarray], vectors: np.ndarray, multiple: int) -> list[np.ndarray]:
    """Split off the least similar merged channels until the width is a multiple of `multiple`."""
    wanted = len(groups) + (-len(groups) % multiple)
    return split_to_width(cosine_similarity(vectors), groups, min(wanted, sum(len(g) for g in groups)))


def _min_cosine(vectors: np.ndarray, groups: list[np.ndarray]) -> float | None:
    merged = [g for g in groups if len(g) > 1]
    if not merged:
        return None
    lowest = 1.0
    for g in merged:
        similarity = neuron_similarity(vectors[g].astype(np.float32))
        lowest = min(lowest, float(similarity[0, 1:].min()))
    return lowest


def is_exact(group: CoupledGroup, groups, cmap: ChannelMap, constants, min_cosine: float | None) -> bool:
    """Every merged channel parallel to its main one in every member (one factor), equal path
    constants and gate rows, and a positively homogeneous path unless the factor is 1."""
    if all(len(g) == 1 for g in groups):
        return True
    if min_cosine is not None and min_cosine < 1.0 - COSINE_TOLERANCE:
        return False
    homogeneous = group.homogeneous_path()
    for g in groups:
        main = int(g[0])
        for k in g[1:]:
            if not np.array_equal(constants[k], constants[main]):
                return False
            if not homogeneous[k] and abs(cmap.factor[k] - 1.0) > FACTOR_TOLERANCE:
                return False
    return True


# ---- writing the merge ----------------------------------------------------------------------


def kept_in(cmap: ChannelMap, offset: int, width: int) -> np.ndarray:
    """The kept channels of group channels offset .. offset + width - 1, as local indices."""
    keep = cmap.keep
    return keep[(keep >= offset) & (keep < offset + width)] - offset


def kept_positions(cmap: ChannelMap, pieces) -> np.ndarray:
    """The channels of a tensor laid out by `pieces` (its index map) that hold kept group
    channels, in position order: what the tensor keeps."""
    return np.flatnonzero(np.isin(layout_channels(pieces), cmap.keep))


def sub_map(cmap: ChannelMap, pieces) -> ChannelMap:
    """The map over the channels of a tensor laid out by `pieces` (what one consumer reads). A
    channel merged away folds into its main channel's position in the same piece: signatures make
    sure every piece holding a merged channel holds its main one."""
    channels = layout_channels(pieces)
    kept = kept_positions(cmap, pieces)
    new_index = np.full(len(channels), -1, dtype=np.int64)
    new_index[kept] = np.arange(len(kept))
    target = np.full(len(channels), -1, dtype=np.int64)
    for piece in pieces:
        for i in range(piece.width):
            k, t = piece.offset + i, cmap.target[piece.offset + i]
            if t < 0:
                continue
            main = int(cmap.keep[t])
            if not piece.offset <= main < piece.offset + piece.width:
                raise InternalError(f"channel {k} merges into {main}, outside the consumer's channels")
            target[piece.position + i] = new_index[piece.position + main - piece.offset]
    return ChannelMap(kept, target, cmap.factor[channels], cmap.offset[channels])


def apply_group_map(group: CoupledGroup, store: WeightStore, cmap: ChannelMap) -> list[tuple]:
    """Keep the main channels in every member, gate and region constant; fold the others into the
    consumers; resize cuts and Reshape literals. Returns the node attributes to set."""
    for member in group.members + group.gates:
        producer, keep = member.producer, kept_in(cmap, member.offset, member.width)
        store.set(producer.weight.name, np.take(store[producer.weight.name], keep, producer.axis))
        bias = store.get(producer.bias)
        if bias is not None and bias.size == member.width:
            store.set(producer.bias, bias.reshape(-1)[keep].reshape(bias.shape[:-1] + (-1,)))
    attributes = []
    for entry in group.region:
        keep = kept_positions(cmap, entry.pieces)
        for const in entry.constants:
            store.set(const.tensor.name, np.take(store[const.tensor.name], keep, axis=const.axis))
        if entry.node.op == "Conv":  # a depthwise conv: one filter per channel
            attributes.append((entry.node, "group", len(keep)))
    for reader in group.consumers:
        merge_into_consumer(reader.consumer, store, sub_map(cmap, reader.pieces), reader.block)
    for cut in group.cuts:
        attributes += resize_cut(cut, store, cmap)
    for reshape in group.reshapes:
        values = store[reshape.shape.name].copy()
        values[reshape.index] = len(kept_positions(cmap, reshape.pieces)) * reshape.block
        store.set(reshape.shape.name, values)
    return attributes


def resize_cut(cut, store: WeightStore, cmap: ChannelMap) -> list[tuple]:
    """New part sizes of a Split/SplitToSequence, or new bounds of a Slice of the channel axis."""
    sizes = [len(kept_positions(cmap, part)) for part in cut.parts]
    node = cut.node
    if node.op == "Slice":
        start = int(np.count_nonzero(kept_positions(cmap, cut.source) < cut.start))
        for index, value in ((1, start), (2, start + sizes[0])):
            values = np.array(store[node.inputs[index].name]).copy()
            values.reshape(-1)[cut.axis_index] = value
            store.set(node.inputs[index].name, values)
        return []
    if node.op == "Split" and "split" in node.attrs:
        return [(node, "split", sizes)]
    split = node.inputs[1]  # a scalar chunk size becomes the list of part sizes
    store.set(split.name, np.asarray(sizes, dtype=np.asarray(split.values).dtype))
    return []
