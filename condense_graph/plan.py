"""Plan the reduction of each layer: group its neurons and compute the new weight arrays.

Layers are planned one after another in graph order on a `WeightStore` of current arrays, so a
layer is judged on weights that already include the merges of the layer before it (the paper
reduces layer by layer). Planning reads the graph structure from the analysis and never edits
the graph; `passes.condense_channels` writes the arrays back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from condense_graph.analysis import Consumer, Layer, Producer
from condense_graph.chain_eval import affine_coefficients, evaluate_chain, float32_if_half
from condense_graph.merge import ChannelMap, channel_map, least_squares_rows, merge_consumer
from condense_graph.refit import activation_cosine, projection_factors
from condense_graph.similarity import cosine_similarity, greedy_groups, groups_for_width, round_up_groups


class WeightStore:
    """Current values of the arrays a plan reads and writes, by initializer name.

    Half-precision arrays (float16, bfloat16) are handed out as float32: the math runs in float32
    and `original_dtype` says what to write back."""

    def __init__(self, constants: dict[str, gs.Constant]):
        self._constants = constants
        self.changed: dict[str, np.ndarray] = {}
        self.created: dict[str, gs.Node] = {}  # new bias arrays and the node that will use them

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
        return np.zeros(width) if bias is None else np.broadcast_to(bias.reshape(-1), (width,)).astype(np.float64)

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
    threshold: float | None   # None for magnitude pruning
    exact: bool
    constant_channels: int   # removed: zero incoming weights, constant output folded
    silent_channels: int     # removed: zero outgoing weights
    min_cosine: float | None  # lowest cosine between a merged neuron and its main neuron
    block_error: dict | None = None  # depthwise blocks: the merge's error measured on the block
    vectors: np.ndarray | None = field(default=None, repr=False)  # what was grouped (for plots)
    groups: list[np.ndarray] = field(default_factory=list, repr=False)
    refit: list[dict] | None = None  # with calibration data: each consumer's refit errors

    def report(self) -> dict:
        return {
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
        } | ({"block_error": self.block_error} if self.block_error else {}) \
          | ({"refit": self.refit} if self.refit is not None else {})


def channel_first(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def probe_shape(layer: Layer, tensor: gs.Tensor) -> tuple:
    """Shape of one probe row for chain evaluation: channels on the layer's channel axis."""
    width = layer.producer.width
    if layer.channels.axis == -1:
        return (width,)
    rank = len(tensor.shape) if tensor.shape is not None else layer.producer.rank
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


def pre_affine(layer: Layer, store: WeightStore, versions) -> tuple[np.ndarray, np.ndarray]:
    """Scale and shift of the affine ops between the producer and the nonlinearity."""
    dtype = store[layer.producer.weight.name].dtype
    return affine_coefficients(layer.pre, layer.start, layer.middle_input, store,
                               probe_shape(layer, layer.start), dtype, versions)


def producer_bias(producer: Producer, store: WeightStore, width: int) -> np.ndarray:
    return store.bias(producer.bias, width) * producer.bias_scale


def plan_layer(layer: Layer, store: WeightStore, grouping: Grouping, versions: tuple[int, int],
               activations: np.ndarray | None = None) -> LayerPlan:
    """Group the layer's neurons (`grouping`: a threshold, or a target width), then update
    `store` with the merged arrays.
    With `activations` (the Gram matrix of the channels' calibration activations) neurons are
    grouped by the cosine of their activation vectors instead of their weight vectors, and merged
    with the least-squares factor <a_k, a_main> / <a_main, a_main>."""
    if layer.depthwise is not None:
        return plan_depthwise_layer(layer, store, grouping, versions)
    vectors = neuron_vectors(layer, store, versions)
    width, dtype = len(vectors), store[layer.producer.weight.name].dtype
    a, c = affine_coefficients(layer.post, layer.middle_output, layer.end, store,
                               probe_shape(layer, layer.middle_output), dtype, versions)
    outgoing = [consumer_rows(k, store, layer) for k in layer.consumers]
    silent = np.logical_and.reduce([np.all(u == 0, axis=1) for u in outgoing])
    constant = constant_channels(layer, vectors, a)
    # a conv layer keeps its zero-scale channels, alone: no group can be merged into them
    alone = np.flatnonzero((a == 0) & ~constant & ~silent)
    candidates = np.flatnonzero(~constant & ~silent & (a != 0))
    if grouping.magnitude:
        local_groups, threshold, cosine = largest(vectors[candidates], grouping.width), None, None
    elif activations is None:
        cosine = cosine_similarity(vectors[candidates].astype(np.float32))
    else:
        cosine = activation_cosine(activations[np.ix_(candidates, candidates)])
    if cosine is not None:
        local_groups, threshold = grouping(cosine)
    groups = keep_one([candidates[g] for g in local_groups] + [np.array([k]) for k in alone], silent)
    folded = {}
    if constant.any():
        outputs = constant_outputs(layer, store, vectors[:, -1], a, c, versions)
        folded = {int(k): float(outputs[k]) for k in np.flatnonzero(constant & ~silent)}
    if activations is None:
        cmap = channel_map(vectors, groups, a, c, folded)
    else:  # activations already include the post-activation affine ops: plain factors
        cmap = channel_map(vectors, groups, np.ones(width), np.zeros(width), folded,
                           factors=projection_factors(activations, groups))
    # the data-free merge of exact multiples is exact; pruning and activation projections are not
    exact = is_exact(layer, store, groups, cmap) and not grouping.magnitude and activations is None
    apply_map(layer, store, cmap)
    return LayerPlan(layer, cmap, threshold, exact, int(constant.sum()),
                     int((silent & ~constant).sum()), min_group_cosine(cosine, local_groups),
                     vectors=vectors, groups=groups)


@dataclass
class Grouping:
    """How a layer's neurons are grouped: at a threshold, or at the threshold landing on a width."""

    threshold: float = 0.95
    round_to: int = 1
    width: int | None = None
    magnitude: bool = False   # the pruning baseline: keep the largest neurons, merge nothing

    def __call__(self, cosine: np.ndarray) -> tuple[list[np.ndarray], float]:
        """The groups (main neuron first) and the threshold that produced them."""
        if self.width is not None:
            return groups_for_width(cosine, max(self.width, 1))
        groups = greedy_groups(cosine, self.threshold)
        if self.round_to > 1:
            groups = round_up_groups(cosine, groups, self.round_to)
        return groups, self.threshold


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


def largest(vectors: np.ndarray, width: int) -> list[np.ndarray]:
    """Magnitude pruning (Torch-Pruning's MagnitudeImportance, p=2): the `width` neurons with the
    largest L2 norm, each alone; the others are dropped, not merged."""
    order = np.argsort(-np.linalg.norm(vectors.astype(np.float64), axis=1), kind="stable")
    return [np.array([k]) for k in sorted(order[:width])]


def min_group_cosine(cosine: np.ndarray | None, groups: list[np.ndarray]) -> float | None:
    merged = [g for g in groups if len(g) > 1]
    if not merged or cosine is None:
        return None
    mains = np.concatenate([np.full(len(g) - 1, g[0]) for g in merged])
    others = np.concatenate([g[1:] for g in merged])
    return float(cosine[mains, others].min())


def is_exact(layer: Layer, store: WeightStore, groups, cmap: ChannelMap) -> bool:
    """Exact up to the threshold: homogeneous g, equal per-channel constants of g in each group,
    and no constant offsets that a padded Conv consumer would see differently at its borders."""
    if not layer.homogeneous:
        return False
    if np.any(cmap.offset) and any(k.pads_borders for k in layer.consumers):
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
    view = channel_first(weight, consumer.axis)            # [C*block, out, (k, k)]
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
    bias = store[node.inputs[2].name].reshape(-1) if len(node.inputs) > 2 and node.inputs[2].name \
        else np.zeros(width)
    sink = layer.depthwise_affine[-1].outputs[0] if layer.depthwise_affine else node.outputs[0]
    s, t = affine_coefficients(layer.depthwise_affine, node.outputs[0], sink, store,
                               probe_shape(layer, node.outputs[0]), kernels.dtype, versions)
    return np.concatenate([s[:, None] * kernels.reshape(width, -1), (s * bias + t)[:, None]], axis=1)


def plan_depthwise_layer(layer: Layer, store: WeightStore, grouping: Grouping, versions) -> LayerPlan:
    """Reduce a depthwise-separable block (paper A.3): group on the depthwise kernels, keep the main
    kernel, merge the consumer columns by eq. 48 and the producer rows by least squares."""
    dw = depthwise_vectors(layer, store, versions)
    width, dtype = len(dw), store[layer.producer.weight.name].dtype
    a, c = affine_coefficients(layer.post, layer.middle_output, layer.end, store,
                               probe_shape(layer, layer.middle_output), dtype, versions)
    outgoing = np.concatenate([consumer_rows(k, store, layer) for k in layer.consumers], axis=1)
    silent = np.all(outgoing == 0, axis=1)
    alone = np.flatnonzero(~silent & (a == 0))
    candidates = np.flatnonzero(~silent & (a != 0))
    if grouping.magnitude:
        local_groups, threshold, cosine = largest(dw[candidates], grouping.width), None, None
    else:
        cosine = cosine_similarity(dw[candidates].astype(np.float32))
        local_groups, threshold = grouping(cosine)
    groups = keep_one([candidates[g] for g in local_groups] + [np.array([m]) for m in alone], silent)
    cmap = channel_map(dw, groups, a, c, {})
    alpha = neuron_vectors(layer, store, versions)
    rows = least_squares_rows(alpha, outgoing, cmap)
    s, t = pre_affine(layer, store, versions)
    before = block_arrays(layer, store)
    apply_map(layer, store, cmap)
    write_producer_rows(layer, store, rows, s[cmap.keep], t[cmap.keep])
    error = block_error(layer, before, store, versions) if cmap.width_after < width else None
    return LayerPlan(layer, cmap, threshold, False, 0, int(silent.sum()),
                     min_group_cosine(cosine, local_groups), error, vectors=dw,
                     groups=groups)


def block_nodes(layer: Layer) -> list[gs.Node]:
    return [layer.producer.node] + layer.pre + layer.middle + layer.post + [layer.consumers[0].node]


def block_arrays(layer: Layer, store: WeightStore) -> dict[str, np.ndarray]:
    """Current values of every constant the block reads."""
    return {t.name: store[t.name] for n in block_nodes(layer) for t in n.inputs
            if isinstance(t, gs.Constant)}


def block_error(layer: Layer, before: dict, store: WeightStore, versions, runs: int = 2) -> dict:
    """Max error of the block's output (first consumer) after the merge, on random inputs."""
    source, sink = layer.producer.node.inputs[0], layer.consumers[0].node.outputs[0]
    shape = [d if isinstance(d, int) else 1 for d in (source.shape or [])]
    rng = np.random.default_rng(0)
    err = scale = 0.0
    for _ in range(runs):
        x = rng.standard_normal([1] + shape[1:]).astype(store[layer.producer.weight.name].dtype)
        expected = evaluate_chain(block_nodes(layer), source, sink, before, x, versions)
        actual = evaluate_chain(block_nodes(layer), source, sink, store, x, versions)
        err = max(err, float(np.abs(expected.astype(np.float64) - actual).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return {"max_abs_err": err, "max_rel_err": err / scale if scale else 0.0}


def write_producer_rows(layer: Layer, store: WeightStore, rows: np.ndarray, s, t) -> None:
    """Store raw producer weights and bias whose pre-affine image is `rows` ([weights, bias])."""
    producer = layer.producer
    weight = store[producer.weight.name]
    safe = np.where(s != 0, s, 1.0)
    raw = rows[:, :-1] / (safe[:, None] * producer.scale)
    view = channel_first(weight, producer.axis)
    store.set(producer.weight.name, np.moveaxis(raw.reshape(view.shape).astype(weight.dtype), 0, producer.axis))
    store.set_bias(producer.bias, producer.node, (rows[:, -1] - t) / safe / producer.bias_scale, weight.dtype)
