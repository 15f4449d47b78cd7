"""Plan the reduction of each layer: group its neurons and compute the new weight arrays.

Layers are planned one after another in graph order on a `WeightStore` of current arrays, so a
layer is judged on weights that already include the merges of the layer before it (the paper
reduces layer by layer). Every channel count used while planning comes from those current arrays,
never from tensor shapes recorded before earlier merges. Planning reads the graph structure from
the analysis and never edits the graph; `passes.condense_channels` writes the arrays back.
Which neurons merge is decided by a selection rule (`condense_graph.selectors`): dense, conv and
depthwise layers hand it the same `Rows` of candidate channels and apply its `Selection`.

Every reduced layer reports `block_error`: the error its merge makes at the output of its first
consumer, measured with ONNX Runtime on a fixed random probe (`BlockProbe`). A depthwise block
whose measured error breaks its budget (`error_budget`) is rolled back and left unreduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from condense_graph.analysis import Consumer, Layer, Producer
from condense_graph.chain_eval import affine_coefficients, evaluate_chain, float32_if_half
from condense_graph.compensate import weight_rows
from condense_graph.errors import CondenseError
from condense_graph.merge import ChannelMap, channel_map, least_squares_rows, merge_consumer, norm_ratios
from condense_graph.obs import ConsumerTerm
from condense_graph.refit import LayerStatistics, feature_indices
from condense_graph.selectors import DEFAULT, SELECTORS, Grouping, Rows, Selection, Selector
from condense_graph.similarity import COSINE_TOLERANCE

PROBE_ROWS = 2  # batch of the block-error probe when the model's batch size is dynamic
PROBE_MIN_SIDE = 8  # a dynamic spatial size is at least this, and large enough for the kernels
EXACT_BUDGET = 1e-4  # the smallest relative block error budget (float rounding): threshold 1.0


class WeightStore:
    """Current values of the arrays a plan reads and writes, by initializer name.

    Half-precision arrays (float16, bfloat16) are handed out as float32: the math runs in float32
    and `original_dtype` says what to write back."""

    def __init__(self, constants: dict[str, gs.Constant], shapes: dict[str, list] | None = None):
        self._constants = constants
        self.changed: dict[str, np.ndarray] = {}
        self.created: dict[str, gs.Node] = {}  # new bias arrays and the node that will use them
        # tensor shapes as analyzed, before any rewrite forgot them: only their spatial and
        # batch dimensions are used (merges never change those), channel counts come from arrays
        self._shapes = dict(shapes or {})

    def shape(self, tensor: gs.Tensor) -> list | None:
        """The tensor's shape as analyzed (its current one when none was recorded)."""
        return self._shapes.get(tensor.name, tensor.shape)

    def snapshot(self) -> tuple[dict, dict]:
        """What `restore` needs to undo every write made after this call (arrays are replaced,
        never modified in place, so shallow copies suffice)."""
        return dict(self.changed), dict(self.created)

    def restore(self, snapshot: tuple[dict, dict]) -> None:
        self.changed, self.created = dict(snapshot[0]), dict(snapshot[1])

    def __contains__(self, name: str) -> bool:
        return name in self.changed or name in self._constants

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.changed:
            return self.changed[name]
        return float32_if_half(np.asarray(self._constants[name].values))

    def original_dtype(self, name: str):
        return np.asarray(self._constants[name].values).dtype if name in self._constants else None

    def get(self, name: str):
        return self[name] if name in self else None

    def set(self, name: str, values: np.ndarray) -> None:
        self.changed[name] = values

    def bias(self, key: str, width: int) -> np.ndarray:
        """The bias array `key` as float64 [width]; zeros when the node has none yet."""
        bias = self.get(key)
        return (
            np.zeros(width)
            if bias is None
            else np.broadcast_to(bias.reshape(-1), (width,)).astype(np.float64)
        )

    def set_bias(self, key: str, node: gs.Node, values: np.ndarray, dtype) -> None:
        """Write a bias; a node without one gets a new one (unless it would be all zeros)."""
        if self.get(key) is None:
            if not np.any(values):
                return
            self.created[key] = node
        self.set(key, np.asarray(values).astype(dtype))


@dataclass
class LayerPlan:
    layer: Layer
    cmap: ChannelMap
    threshold: float | None  # None for magnitude pruning
    exact: bool
    constant_channels: int  # removed: zero incoming weights, constant output folded
    silent_channels: int  # removed: zero outgoing weights
    min_cosine: float | None  # lowest cosine ([w, b] or w alone) between a merged neuron and its main
    probe: BlockProbe | None = field(default=None, repr=False)  # measures the merge's block error
    vectors: np.ndarray | None = field(default=None, repr=False)  # what was grouped (for plots)
    groups: list[np.ndarray] = field(default_factory=list, repr=False)
    refit: list[dict] | None = None  # with calibration data: each consumer's refit errors
    rejected: str | None = None  # why a merge was measured and not applied
    costs: dict[int, float] | None = None  # the selector's predicted error per width (OBS)
    # the merge's error at the first consumer's output (`BlockProbe`): None until `measure` ran
    block_error: dict | None = None

    @property
    def name(self) -> str:
        return self.layer.name

    def measure(self) -> LayerPlan:
        """Measure `block_error` with ONNX Runtime (a reduced layer only; planning many times, as
        width searches do, measures nothing until the plan that is kept)."""
        if self.probe is not None:
            self.block_error = self.probe.error()
        return self

    def report(self) -> dict:
        return (
            {
                "name": self.layer.name,
                "op": self.layer.producer.node.op,
                "activation": self.layer.activation,
                "width_before": self.cmap.width_before,
                "width_after": self.cmap.width_after,
                "threshold": self.threshold,
                "exact": self.exact,
                "constant_removed": self.constant_channels,
                "zero_output_removed": self.silent_channels,
                "min_group_cosine": self.min_cosine,
            }
            | ({"block_error": self.block_error} if self.block_error is not None else {})
            | ({"rejected": self.rejected} if self.rejected else {})
            | ({"refit": self.refit} if self.refit is not None else {})
        )


def channel_first(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def current_width(layer: Layer, store: WeightStore) -> int:
    """The layer's width now: the producer weight's output-channel axis in the store."""
    return store[layer.producer.weight.name].shape[layer.producer.axis]


def probe_shape(layer: Layer, tensor: gs.Tensor, store: WeightStore) -> tuple:
    """Shape of one probe row for chain evaluation: channels on the layer's channel axis."""
    width = current_width(layer, store)
    if layer.channels.axis == -1:
        return (width,)
    shape = store.shape(tensor)
    rank = len(shape) if shape is not None else layer.producer.rank
    return (width,) + (1,) * (rank - 2)


def neuron_vectors(layer: Layer, store: WeightStore, versions: tuple[int, int]) -> np.ndarray:
    """Rows v_k = [weights, bias] of what each channel computes before its activation (eq. 3,
    15-16: a conv kernel is flattened), with the affine ops right after the producer (bias Add,
    BatchNormalization) folded in, so similarity is judged on what the channel computes."""
    producer = layer.producer
    weights = channel_first(store[producer.weight.name], producer.axis) * producer.scale
    width = len(weights)
    weights = weights.reshape(width, -1)
    bias = producer_bias(producer, store, width)
    s, t = pre_affine(layer, store, versions)
    return np.concatenate([s[:, None] * weights, (s * bias + t)[:, None]], axis=1)


def chain_affine(layer: Layer, nodes, source: gs.Tensor, sink: gs.Tensor, store: WeightStore, versions):
    """Scale and shift of an affine per-channel chain of the layer (`affine_coefficients`), probed
    in the layer's dtype with the channel count of the current arrays."""
    dtype = store[layer.producer.weight.name].dtype
    shape = probe_shape(layer, source, store)
    return affine_coefficients(nodes, source, sink, store, shape, dtype, versions)


def pre_affine(layer: Layer, store: WeightStore, versions) -> tuple[np.ndarray, np.ndarray]:
    """Scale and shift of the affine ops between the producer and the nonlinearity."""
    return chain_affine(layer, layer.pre, layer.start, layer.middle_input, store, versions)


def post_affine(layer: Layer, store: WeightStore, versions) -> tuple[np.ndarray, np.ndarray]:
    """Scale a and shift c of the affine ops between the nonlinearity and the consumers."""
    return chain_affine(layer, layer.post, layer.middle_output, layer.end, store, versions)


def producer_bias(producer: Producer, store: WeightStore, width: int) -> np.ndarray:
    return store.bias(producer.bias, width) * producer.bias_scale


def plan_layer(
    layer: Layer,
    store: WeightStore,
    grouping: Grouping,
    versions: tuple[int, int],
    selector: Selector | None = None,
    statistics: LayerStatistics | None = None,
) -> LayerPlan:
    """Group the layer's neurons with `selector` (`condense_graph.selectors`, the paper's weight
    cosine by default) at `grouping` (a threshold, or a target width), then update `store` with the
    merged arrays, and attach the probe that measures the merge's block error. A depthwise block
    whose measured error breaks its budget is rolled back (store and plan). `statistics` (the
    layer's calibration statistics, `refit.LayerStatistics`) is what a selector that
    `needs_calibration` reads."""
    selector = (selector or SELECTORS[DEFAULT]).for_layer(layer.depthwise is not None)
    if selector.needs_calibration and statistics is None:
        raise CondenseError(f"{selector.label} needs calibration data")
    snapshot, before = store.snapshot(), block_arrays(layer, store)
    terms = consumer_terms(layer, store, statistics) if selector.needs_consumer_statistics else None
    build = plan_dense_or_conv_layer if layer.depthwise is None else plan_depthwise_layer
    plan = build(layer, store, Choice(selector, grouping, statistics, terms), versions)
    if plan.cmap.width_after == plan.cmap.width_before:
        return plan
    plan.probe = BlockProbe.of(layer, before, store, versions)
    budget = error_budget(plan, grouping)
    if layer.depthwise is None or budget is None:
        return plan  # other layers only report their error (`LayerPlan.measure`)
    error = plan.measure().block_error["max_rel_err"]
    if not error <= budget:  # NaN breaks it too
        store.restore(snapshot)
        reason = f"block error {error:.3g} > budget {budget:.3g} at threshold {grouping.threshold:g}"
        return unreduced_plan(layer, store, plan.threshold, reason)
    return plan


def consumer_terms(layer: Layer, store: WeightStore, statistics: LayerStatistics) -> list[ConsumerTerm]:
    """Each consumer's OBS term on the current arrays: its input-feature Hessian and its weights as
    feature rows [features + 1, outputs] (last row: bias), with the op's alpha/beta applied. A
    proxy consumer (features not gathered) reads the channels with its weights folded per channel."""
    terms = []
    for consumer, hessian, block, proxy in zip(
        layer.consumers, statistics.hessians, statistics.blocks, statistics.proxy, strict=True
    ):
        weight = store[consumer.weight.name]
        rows = consumer_rows(consumer, store, layer) if proxy else weight_rows(consumer, weight)
        rows = consumer.scale * rows.astype(np.float64)
        bias = np.zeros(rows.shape[1])
        if not proxy:
            bias = consumer.bias_scale * store.bias(consumer.bias, rows.shape[1])
        terms.append(ConsumerTerm(hessian, np.vstack([rows, bias[None, :]]), 1 if proxy else block))
    return terms


@dataclass
class Choice:
    """How a layer's channels are selected: the rule, its target and its calibration statistics
    (the channels' activation Gram matrix, and the consumers' OBS terms when the rule reads them)."""

    selector: Selector
    grouping: Grouping
    statistics: LayerStatistics | None = None
    terms: list[ConsumerTerm] | None = None  # over every channel of the layer

    def select(self, rows: Rows, candidates, alone, silent) -> tuple[Selection, list[np.ndarray]]:
        """The selection among `candidates` (local indices) and the layer's groups (layer indices):
        the selected groups, then each channel of `alone` by itself (`keep_one` if none)."""
        if self.selector.needs_calibration:  # only then are there statistics
            rows = replace(rows, gram=self.statistics.gram[np.ix_(candidates, candidates)])
        if self.terms is not None:
            rows = replace(rows, terms=[restrict(term, candidates) for term in self.terms])
        grouping = self.grouping
        if grouping.width is not None:  # a layer width: the channels kept alone count in it
            grouping = replace(grouping, width=max(1, grouping.width - len(alone)))
        selection = self.selector.select(rows, grouping)
        if selection.costs is not None:  # keyed by layer widths too
            selection = replace(selection, costs={w + len(alone): c for w, c in selection.costs.items()})
        groups = [candidates[g] for g in selection.groups] + [np.array([k]) for k in alone]
        return selection, keep_one(groups, silent)


def restrict(term: ConsumerTerm, channels: np.ndarray) -> ConsumerTerm:
    """`term` over `channels` only (their feature blocks, and the bias row / ones column)."""
    keep = feature_indices(channels, term.block, len(term.weights) - 1)
    return ConsumerTerm(term.hessian[np.ix_(keep, keep)], term.weights[keep], term.block)


def spread(factors: np.ndarray | None, candidates: np.ndarray, width: int) -> np.ndarray | None:
    """Candidates' factors as a layer's: 1 for the other channels (kept alone, or dropped)."""
    if factors is None:
        return None
    full = np.ones(width)
    full[candidates] = factors
    return full


def plan_dense_or_conv_layer(layer: Layer, store: WeightStore, choice: Choice, versions) -> LayerPlan:
    """The paper's merge (eq. 10-12, 36-38) of a layer without a depthwise conv."""
    vectors = neuron_vectors(layer, store, versions)
    width = len(vectors)
    a, c = post_affine(layer, store, versions)
    outgoing = [consumer_rows(k, store, layer) for k in layer.consumers]
    silent = np.logical_and.reduce([np.all(u == 0, axis=1) for u in outgoing])
    constant = constant_channels(layer, vectors, a)  # dense: the constant folds into the consumer bias
    zero = zero_channels(layer, store, vectors, versions) & ~constant  # conv: dropped, exactly
    constant |= zero
    # a conv layer keeps its zero-scale channels, alone: no group can be merged into them
    alone = np.flatnonzero((a == 0) & ~constant & ~silent)
    candidates = np.flatnonzero(~constant & ~silent & (a != 0))
    rows = Rows(vectors[candidates], [vectors[candidates]], middle_constants(layer, store, candidates))
    selection, groups = choice.select(rows, candidates, alone, silent)
    folded = {}
    if (constant & ~zero).any():
        outputs = constant_outputs(layer, store, vectors[:, -1], a, c, versions)
        folded = {int(k): float(outputs[k]) for k in np.flatnonzero(constant & ~zero & ~silent)}
    factors = spread(selection.factors, candidates, width)
    if factors is None:
        cmap = channel_map(vectors, groups, a, c, folded)
    else:  # measured on what the consumers read (post-activation affine ops included): plain factors
        cmap = channel_map(vectors, groups, np.ones(width), np.zeros(width), folded, factors=factors)
    min_cosine = min_group_cosine(selection.cosine, selection.groups)
    # the data-free merge of exact multiples is exact; pruning and activation projections are not
    exact = selection.merges_exactly and is_exact(layer, store, groups, cmap, min_cosine)
    apply_map(layer, store, cmap)
    return LayerPlan(
        layer,
        cmap,
        selection.threshold,
        exact,
        int(constant.sum()),
        removed_silent(silent & ~constant, cmap),
        min_cosine,
        vectors=vectors,
        groups=groups,
        costs=selection.costs,
    )


def removed_silent(silent: np.ndarray, cmap: ChannelMap) -> int:
    """Channels dropped for their zero outgoing weights (one may be kept: `keep_one`)."""
    return int((silent & (cmap.target < 0)).sum())


def unreduced_plan(layer: Layer, store: WeightStore, threshold: float | None, reason: str) -> LayerPlan:
    """The plan of a layer left as it is (a merge was measured and rejected)."""
    width = current_width(layer, store)
    identity = ChannelMap(
        keep=np.arange(width), target=np.arange(width), factor=np.ones(width), offset=np.zeros(width)
    )
    return LayerPlan(layer, identity, threshold, False, 0, 0, None, rejected=reason)


def error_budget(plan: LayerPlan, grouping: Grouping) -> float | None:
    """The relative block error a merge at this threshold may make: the distance between two
    unit vectors at cosine = threshold, sqrt(2 (1 - t)), for approximate merges; float rounding
    (EXACT_BUDGET, the floor). None for width targets and pruning: the user asked for a width."""
    if grouping.width is not None or plan.threshold is None:
        return None
    return max(float(np.sqrt(2.0 * max(1.0 - grouping.threshold, 0.0))), EXACT_BUDGET)


def middle_constants(layer: Layer, store: WeightStore, candidates: np.ndarray) -> list[np.ndarray]:
    """The candidates' per-channel constants inside the nonlinearity (PRelu slopes, a BN or Mul
    between two activations), which must agree for them to group (`similarity.constant_agreement`):
    with different constants, parallel neurons compute different functions. The depthwise kernels
    and their BN are judged by the depthwise vectors instead (paper A.3)."""
    judged = set()
    if layer.depthwise is not None:
        judged = {id(t) for n in [layer.depthwise] + layer.depthwise_affine for t in n.inputs}
    width = current_width(layer, store)
    return [
        channel_first(store[t.name], _axis_of(layer, t)).reshape(width)[candidates]
        for t in layer.middle_constants
        if id(t) not in judged
    ]


def zero_channels(layer: Layer, store: WeightStore, vectors: np.ndarray, versions) -> np.ndarray:
    """Channels whose consumer input is identically zero: a zero neuron vector (say a BN folded with
    scale 0 and shift 0) that the nonlinearity and the post ops map to zero everywhere. Removing
    them changes nothing, also at the borders of a padded conv consumer (which pads with zeros)."""
    zero = ~np.any(vectors != 0, axis=1)
    if not zero.any() or layer.channels.axis == -1:
        return np.zeros_like(zero)  # dense layers fold every constant channel (`constant_channels`)
    nodes = layer.middle + layer.post
    shape = data_shape(layer.middle_input, store, len(vectors), False, nodes, layer.producer.rank or 4)
    x = np.zeros(shape, dtype=store[layer.producer.weight.name].dtype)
    out = evaluate_chain(nodes, layer.middle_input, layer.end, store, x, versions)
    silent = ~np.any(out.reshape(shape[0], len(vectors), -1) != 0, axis=(0, 2))
    return zero & silent


def data_shape(
    tensor: gs.Tensor,
    store: WeightStore,
    channels: int,
    channel_last: bool,
    nodes: list[gs.Node],
    default_rank: int,
) -> list[int]:
    """A concrete shape for data at `tensor` with `channels` channels (from the current arrays):
    batch and spatial sizes as analyzed; a dynamic batch is PROBE_ROWS, a dynamic spatial size the
    receptive field of `nodes` (never 1, which a kernel may not fit), other dynamic sizes 1."""
    shape = store.shape(tensor)
    dims = list(shape) if shape is not None else [None] * max(default_rank, 2)
    batch = dims[0] if isinstance(dims[0], int) else PROBE_ROWS
    if channel_last:
        return [batch] + [d if isinstance(d, int) else 1 for d in dims[1:-1]] + [channels]
    side = receptive_side(nodes, store)
    return [batch, channels] + [d if isinstance(d, int) else side for d in dims[2:]]


def receptive_side(nodes: list[gs.Node], store: WeightStore) -> int:
    """A spatial size on which every conv and pooling kernel of `nodes` fits without padding: the
    receptive field of one output position of the chain (at least PROBE_MIN_SIDE)."""
    side = 1
    for node in reversed(nodes):
        extent = kernel_extent(node, store)
        if extent:
            side = (side - 1) * max(node.attrs.get("strides", [1])) + extent
    return max(side, PROBE_MIN_SIDE)


def kernel_extent(node: gs.Node, store: WeightStore) -> int | None:
    """The largest dilated kernel side of a Conv or pooling node (None for other ops)."""
    if node.op == "Conv":
        weight = node.inputs[1]
        kernel = (store[weight.name] if weight.name in store else np.asarray(weight.values)).shape[2:]
    elif node.op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = node.attrs.get("kernel_shape", [1])
    else:
        return None
    dilations = node.attrs.get("dilations", [1] * len(kernel))
    return max(((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)), default=1)


def constant_channels(layer: Layer, vectors: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Channels with zero incoming weights (or zero post scale) output a constant.

    Only dense layers fold that constant into the consumer bias: for a convolution, pooling and
    zero padding make a constant channel non-constant at the borders, so it is kept.
    """
    if layer.channels.axis != -1 or layer.block != 1:
        return np.zeros(len(vectors), dtype=bool)
    return np.all(vectors[:, :-1] == 0, axis=1) | (a == 0)


def constant_outputs(layer, store, bias, a, c, versions) -> np.ndarray:
    """o_k = a_k g_k(b_k) + c_k: what a channel with zero incoming weights outputs, b_k being
    its pre-activation bias (the last entry of its neuron vector)."""
    z = bias[None, :].astype(store[layer.producer.weight.name].dtype)
    g = evaluate_chain(layer.middle, layer.middle_input, layer.middle_output, store, z, versions)[0]
    return a * g.astype(np.float64) + c


def keep_one(groups: list[np.ndarray], silent: np.ndarray) -> list[np.ndarray]:
    """A layer keeps at least one channel: one whose outgoing weights are zero changes nothing."""
    if groups:
        return groups
    return [np.array([int(np.argmax(silent))])]


def min_group_cosine(cosine: np.ndarray | None, groups: list[np.ndarray]) -> float | None:
    """The lowest similarity between a merged neuron and its group's main neuron."""
    merged = [g for g in groups if len(g) > 1]
    if not merged or cosine is None:
        return None
    mains = np.concatenate([np.full(len(g) - 1, g[0]) for g in merged])
    others = np.concatenate([g[1:] for g in merged])
    return float(cosine[mains, others].min())


def is_exact(layer: Layer, store: WeightStore, groups, cmap: ChannelMap, min_cosine: float | None) -> bool:
    """Exact: every merged neuron a positive multiple of its main one to float rounding (both
    cosines >= 1 - COSINE_TOLERANCE), homogeneous g, equal per-channel constants of g in each
    group, and no constant offsets that a padded Conv consumer would see differently at its borders."""
    if np.any(cmap.offset) and any(k.pads_borders for k in layer.consumers):
        return False
    if all(len(group) == 1 for group in groups):
        return True  # nothing merged: dead channels dropped or folded, whatever the activation
    if not layer.homogeneous or (min_cosine is not None and min_cosine < 1.0 - COSINE_TOLERANCE):
        return False
    main_of = np.arange(cmap.width_before)
    for group in groups:
        main_of[group] = group[0]
    for const in layer.middle_constants:
        values = channel_first(store[const.name], _axis_of(layer, const))
        if not np.array_equal(values, values[main_of]):
            return False
    return True


def _axis_of(layer: Layer, tensor: gs.Constant) -> int:
    return next(c.axis for c in layer.channel_constants if c.tensor is tensor)


def apply_map(layer: Layer, store: WeightStore, cmap: ChannelMap) -> None:
    """Keep the main channels in the producer and the region; merge them in the consumers."""
    producer = layer.producer
    store.set(producer.weight.name, np.take(store[producer.weight.name], cmap.keep, producer.axis))
    bias = store.get(producer.bias)
    if bias is not None and bias.size == cmap.width_before:
        store.set(producer.bias, bias.reshape(-1)[cmap.keep].reshape(bias.shape[:-1] + (-1,)))
    for const in layer.channel_constants:
        store.set(const.tensor.name, np.take(store[const.tensor.name], cmap.keep, axis=const.axis))
    for shape in layer.reshape_shapes:  # a literal C*H*W in a Reshape target
        values = store[shape.name].copy()
        values[1] = values[1] // cmap.width_before * cmap.width_after
        store.set(shape.name, values)
    for consumer in layer.consumers:
        merge_into_consumer(consumer, store, cmap, layer.block)


def consumer_rows(consumer: Consumer, store: WeightStore, layer: Layer) -> np.ndarray:
    """The consumer weights that read each channel, one row per channel."""
    view = channel_first(store[consumer.weight.name], consumer.axis)
    return view.reshape(len(view) // layer.block, -1)


def merge_into_consumer(consumer: Consumer, store: WeightStore, cmap: ChannelMap, block: int) -> None:
    """Eq. 10-12 (dense), 36-38 (conv), block-wise after a Flatten (H*W rows per channel)."""
    weight = store[consumer.weight.name]
    view = channel_first(weight, consumer.axis)  # [C*block, out, (k, k)]
    rest = view.shape[1:]
    merged, bias_delta = merge_consumer(view.reshape((cmap.width_before, block) + rest), cmap)
    merged = merged.reshape((cmap.width_after * block,) + rest)
    store.set(consumer.weight.name, np.moveaxis(merged, 0, consumer.axis))
    # constant channels feed scale * sum_k o_k u_k into every output; beta*C absorbs it
    per_output = bias_delta.reshape((block,) + rest)
    per_output = per_output.sum(axis=tuple(i for i in range(per_output.ndim) if i != 1))
    if not np.any(per_output):
        return
    delta = consumer.scale * per_output / consumer.bias_scale
    bias = store.get(consumer.bias)
    store.set_bias(consumer.bias, consumer.node, delta if bias is None else bias + delta, weight.dtype)


def depthwise_vectors(layer: Layer, store: WeightStore, versions) -> np.ndarray:
    """Rows [s v_k, s b_k + t] of the depthwise kernels with the BatchNormalization that follows
    them folded in (eq. 40, 52): the paper judges a depthwise block's condensation on these."""
    node = layer.depthwise
    kernels = store[node.inputs[1].name]
    width = len(kernels)
    bias = (
        store[node.inputs[2].name].reshape(-1)
        if len(node.inputs) > 2 and node.inputs[2].name
        else np.zeros(width)
    )
    sink = layer.depthwise_affine[-1].outputs[0] if layer.depthwise_affine else node.outputs[0]
    s, t = chain_affine(layer, layer.depthwise_affine, node.outputs[0], sink, store, versions)
    return np.concatenate([s[:, None] * kernels.reshape(width, -1), (s * bias + t)[:, None]], axis=1)


def plan_depthwise_layer(layer: Layer, store: WeightStore, choice: Choice, versions) -> LayerPlan:
    """Reduce a depthwise-separable block (paper A.3): keep the main kernel, merge the consumer
    columns by eq. 48 and the producer rows by least squares (eq. 47-48, 61-63).

    A block channel is the pair (producer row alpha_k, depthwise vector v_k): channels group when
    both are parallel (all four cosines, [w, b] and w alone, meet the threshold). Parallel kernels
    alone say nothing about the rows that feed them (think of 5x5 kernels with one non-zero tap)."""
    dw = depthwise_vectors(layer, store, versions)
    alpha = neuron_vectors(layer, store, versions)
    a, c = post_affine(layer, store, versions)
    outgoing = np.concatenate([consumer_rows(k, store, layer) for k in layer.consumers], axis=1)
    silent = np.all(outgoing == 0, axis=1)
    alone = np.flatnonzero(~silent & (a == 0))
    candidates = np.flatnonzero(~silent & (a != 0))
    kernels, rows_in = dw[candidates], alpha[candidates]  # both must be parallel (paper A.3)
    seen = Rows(kernels, [kernels, rows_in], middle_constants(layer, store, candidates))
    selection, groups = choice.select(seen, candidates, alone, silent)
    cmap, rows = block_merge(dw, alpha, outgoing, groups, a, c, layer.homogeneous)
    s, t = pre_affine(layer, store, versions)
    apply_map(layer, store, cmap)
    write_producer_rows(layer, store, rows, s[cmap.keep], t[cmap.keep])
    return LayerPlan(
        layer,
        cmap,
        selection.threshold,
        False,
        0,
        removed_silent(silent, cmap),
        min_group_cosine(selection.cosine, selection.groups),
        vectors=dw,
        groups=groups,
        costs=selection.costs,
    )


def block_merge(dw, alpha, outgoing, groups, a, c, homogeneous: bool) -> tuple[ChannelMap, np.ndarray]:
    """The map and the merged producer rows of a depthwise block (eq. 47-48, least squares).

    Through positively homogeneous activations channel k is lambda_k mu_k times its main channel,
    lambda_k = ||v_k|| / ||v_main|| (the depthwise vectors, eq. 48) and mu_k = ||alpha_k|| /
    ||alpha_main|| (the producer rows, eq. 10), so the least squares runs on the rows rescaled to the
    main row's norm, alpha_k / mu_k, with factors lambda_k mu_k: exact for exact multiples. Other
    activations (ReLU6, a BN between activations) do not commute with the scale: there mu = 1, the
    paper's rule unchanged (measured: with rows 4x apart through ReLU6, 0.34 against 1.4)."""
    lam = np.ones(len(dw))
    mu = np.ones(len(dw))
    dw_norms = np.linalg.norm(dw.astype(np.float64), axis=1)
    alpha_norms = np.linalg.norm(alpha.astype(np.float64), axis=1)
    for group in groups:
        lam[group] = norm_ratios(dw_norms, group, int(group[0]))
        if homogeneous:
            mu[group] = norm_ratios(alpha_norms, group, int(group[0]))
    mu = np.where(mu > 0, mu, 1.0)  # a zero row is alone: nothing to rescale
    cmap = channel_map(dw, groups, a, c, {}, factors=lam * mu)
    return cmap, least_squares_rows(alpha / mu[:, None], outgoing, cmap)


def block_nodes(layer: Layer) -> list[gs.Node]:
    """Producer, region and first consumer, with the bias Adds a rewrite inserted after the producer
    or the consumer (`passes.condense_channels.add_bias`: a model reduced before). Planning itself
    never writes the graph: the biases it creates are attached by `with_planned_biases`."""
    nodes = []
    for node in [layer.producer.node] + layer.pre + layer.middle + layer.post + [layer.consumers[0].node]:
        nodes.append(node)
        nodes += [n for n in node.outputs[0].outputs if n.op == "Add" and n.name == f"{node.name}.bias_add"]
    return nodes


def block_arrays(layer: Layer, store: WeightStore) -> dict[str, np.ndarray]:
    """Current values of every constant the block reads, and of the producer's and first consumer's
    biases when planning created them (they are not in the graph yet)."""
    arrays = {
        t.name: store[t.name] for n in block_nodes(layer) for t in n.inputs if isinstance(t, gs.Constant)
    }
    for key in (layer.producer.bias, layer.consumers[0].bias):
        if key in store:
            arrays[key] = store[key]
    return arrays


@dataclass
class BlockProbe:
    """A layer's block (producer, region, first consumer) before and after the merge, and the probe
    the merge's error is measured on: standard normals drawn from `np.random.default_rng(0)` in
    `shape` (`data_shape` of the producer's input). The error is max |after - before| over the first
    consumer's output, and that over max |before| (relative to the output's scale). ONNX Runtime
    runs both on first use only; the nodes are detached copies, so later rewrites cannot change them."""

    nodes: list[gs.Node]  # detached copies of `block_nodes`
    biased: list[tuple[int, str]]  # (index in nodes, bias key) of the producer and the consumer
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    source: str
    sink: str
    shape: list[int]
    dtype: np.dtype
    versions: tuple[int, int]
    _error: dict | None = None

    @classmethod
    def of(cls, layer: Layer, before: dict, store: WeightStore, versions) -> BlockProbe:
        producer = layer.producer
        weight = store[producer.weight.name]
        dense = producer.node.op != "Conv"
        fan_in = weight.shape[1 - producer.axis] if dense else weight.shape[1]  # Conv: group 1
        nodes = block_nodes(layer)
        shape = data_shape(
            producer.node.inputs[0],
            store,
            fan_in,
            dense,
            nodes,
            (producer.rank or 2) if dense else weight.ndim,
        )
        biased = [(0, producer.bias), (nodes.index(layer.consumers[0].node), layer.consumers[0].bias)]
        return cls(
            detached(nodes, before),
            biased,
            before,
            block_arrays(layer, store),
            producer.node.inputs[0].name,
            nodes[-1].outputs[0].name,
            shape,
            weight.dtype,
            versions,
        )

    def after_refit(self, store: WeightStore) -> BlockProbe:
        """The same probe, with the block's arrays as `store` holds them now (after a refit)."""
        after = {name: store[name] for name in self.after if name in store}
        after |= {key: store[key] for _, key in self.biased if key in store}
        return BlockProbe(
            self.nodes,
            self.biased,
            self.before,
            after,
            self.source,
            self.sink,
            self.shape,
            self.dtype,
            self.versions,
        )

    def error(self) -> dict:
        if self._error is None:
            self._error = self.measure()
        return self._error

    def measure(self) -> dict:
        x = np.random.default_rng(0).standard_normal(self.shape).astype(self.dtype)
        expected, actual = (self.run(arrays, x) for arrays in (self.before, self.after))
        err = float(np.abs(actual - expected).max())
        scale = float(np.abs(expected).max())
        return {"max_abs_err": err, "max_rel_err": err / scale if scale else (0.0 if err == 0 else np.inf)}

    def run(self, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        nodes = with_planned_biases(detached(self.nodes, arrays), arrays, self.biased)
        source, sink = gs.Variable(self.source), gs.Variable(self.sink)
        out = evaluate_chain(nodes, source, sink, arrays, x, self.versions)
        return out.astype(np.float64)


def detached(nodes: list[gs.Node], arrays: dict) -> list[gs.Node]:
    """Copies of `nodes` on fresh tensors of the same names (constants from `arrays`)."""

    def fresh(t: gs.Tensor) -> gs.Tensor:
        if not t.name:
            return gs.Variable.empty()
        if isinstance(t, gs.Constant):
            return gs.Constant(t.name, arrays[t.name] if t.name in arrays else t.values)
        return gs.Variable(t.name)

    return [
        gs.Node(
            n.op,
            n.name,
            dict(n.attrs),
            [fresh(t) for t in n.inputs],
            [fresh(t) for t in n.outputs],
            domain=n.domain,
        )
        for n in nodes
    ]


def with_planned_biases(nodes: list[gs.Node], arrays: dict, biased: list[tuple[int, str]]) -> list[gs.Node]:
    """`nodes` with the biases that planning created for nodes[index] (by key) attached the way the
    rewrite will attach them (a bias input, or an Add after a MatMul)."""
    read = {t.name for n in nodes for t in n.inputs}
    result = list(nodes)
    for index, key in sorted(biased, reverse=True):  # from the back: indices stay valid
        if key in arrays and key not in read:
            result[index : index + 1] = _with_bias(nodes[index], gs.Constant(key, arrays[key]))
    return result


def _with_bias(node: gs.Node, bias: gs.Constant) -> list[gs.Node]:
    """A detached node with `bias` attached: Gemm (beta 1) and Conv take it as an input."""
    if node.op in ("Gemm", "Conv"):
        while len(node.inputs) > 2:  # an empty optional bias input
            node.inputs.pop()
        node.inputs.append(bias)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return [node]
    out = node.outputs[0]
    raw = gs.Variable(f"{out.name}.nobias")
    node.outputs[0] = raw
    return [node, gs.Node("Add", f"{node.name}.bias_add", {}, [raw, bias], [out])]


def write_producer_rows(layer: Layer, store: WeightStore, rows: np.ndarray, s, t) -> None:
    """Store raw producer weights and bias whose pre-affine image is `rows` ([weights, bias])."""
    producer = layer.producer
    weight = store[producer.weight.name]
    safe = np.where(s != 0, s, 1.0)
    raw = rows[:, :-1] / (safe[:, None] * producer.scale)
    view = channel_first(weight, producer.axis)
    store.set(
        producer.weight.name, np.moveaxis(raw.reshape(view.shape).astype(weight.dtype), 0, producer.axis)
    )
    store.set_bias(producer.bias, producer.node, (rows[:, -1] - t) / safe / producer.bias_scale, weight.dtype)
