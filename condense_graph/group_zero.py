"""Which channels of a coupled group are identically zero wherever its consumers read them.

A channel that is zero in every member (its eq.-3 row [s w, s b + t] is all zeros: trained nets
leave such dead channels, and exporters fold a BatchNorm of scale 0 and shift 0 into one) is zero
at every member's output, for every input. Past the members it stays zero only if the region keeps
it so, which this module decides by carrying each position's value, where it is one constant
for every input of the network, node by node along the region, without data:

  Concat, cuts      carry each position's value (Split parts, a Slice's window; Reshape too)
  one data input    any per-channel op with constants only besides (BatchNormalization, the
                    activations, a depthwise conv, pooling, Pad, Clip, Add of a per-channel
                    shift): run by ONNX Runtime on an input holding the known constants
                    (`chain_eval.evaluate_chain`); known where its output is one constant at
                    every position (a padded depthwise conv of a non-zero constant is not)
  Add / Sub / Sum   of group tensors: known where every input is known
  Mul               of group tensors: zero where any input is zero (the other factor is finite:
                    a gate), known where every input is known
  anything else     unknown (a tensor outside the group, a gate)

A dead channel is dropped when its value is zero at every position of every consumer's input
(BN(0) = t < 0 then ReLU: zero; a shift t > 0 then ReLU: a constant t, kept).

Removing a channel that is zero at every consumer's input changes nothing the consumers compute,
also at the borders of a padded conv (which pads with zeros), whatever the activation: it is
exact. A constant channel that is not zero is left alone (folding it into a conv consumer's bias
would be wrong at padded borders). This module only reads.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from condense_graph.chain_eval import evaluate_chain
from condense_graph.coupled import CoupledGroup, Cut
from condense_graph.groups import layout_channels, layout_width
from condense_graph.plan import WeightStore, data_shape

_ADDS = ("Add", "Sub", "Sum")
_MULS = ("Mul",)
_CARRY = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def zero_channels(group: CoupledGroup, store: WeightStore, vectors: np.ndarray, versions) -> np.ndarray:
    """[group width] bool: channels zero in every member (`vectors`: `group_plan.group_vectors`,
    every member's eq.-3 rows side by side) that the region maps to zero at every consumer
    reading them."""
    dead = ~np.any(vectors != 0, axis=1)
    if not dead.any() or not channel_first(group, store):
        return np.zeros(group.width, dtype=bool)
    values = {m.end.name: np.where(dead[m.span], 0.0, np.nan) for m in group.members}
    for gate in group.gates:  # a gate's value is not known
        values[gate.producer.node.outputs[0].name] = np.full(gate.width, np.nan)
    pending = [e.node for e in group.path_entries()] + list(group.cuts)
    while pending:  # the region in dependency order: a node waits for its group inputs
        ready = [n for n in pending if all(t.name in values for t in group_inputs(_node(n), group))]
        if not ready:
            break
        for item in ready:
            pending.remove(item)
            if isinstance(item, Cut):
                values.update(cut_values(item, values))
            else:
                values[item.outputs[0].name] = node_values(item, group, values, store, versions)
    reached = np.ones(group.width, dtype=bool)
    for reader in group.consumers:
        positions = layout_channels(reader.pieces)
        read = values.get(reader.consumer.node.inputs[0].name)
        if read is None or len(read) != len(positions):
            read = np.full(len(positions), np.nan)
        for k in np.unique(positions):
            reached[k] &= bool(np.all(read[positions == k] == 0))  # NaN (unknown) is not zero
    return dead & reached


def channel_first(group: CoupledGroup, store: WeightStore) -> bool:
    """Whether the group's tensors hold channels on axis 1 (conv nets, rank-2 Gemm/MatMul): the
    layout `data_shape` builds probes in."""
    for member in group.members:
        shape = store.shape(member.producer.node.outputs[0])
        if member.producer.node.op != "Conv" and (shape is None or len(shape) != 2):
            return False
    return True


def _node(item) -> gs.Node:
    return item.node if isinstance(item, Cut) else item


def group_inputs(node: gs.Node, group: CoupledGroup) -> list[gs.Tensor]:
    return [t for t in node.inputs if t.name in group.tensors and not isinstance(t, gs.Constant)]


def node_values(node: gs.Node, group: CoupledGroup, values: dict, store: WeightStore, versions) -> np.ndarray:
    """`node`'s output value at each position of its index map where it is the same constant for
    every input of the network; NaN where it is not known to be."""
    inputs = group_inputs(node, group)
    layout = group.tensors.get(node.outputs[0].name)
    if layout is None:
        return np.zeros(0)
    width = layout_width(layout)
    unknown = np.full(width, np.nan)
    others = [t for t in node.inputs if t.name and all(t is not i for i in inputs)]
    sized = [values[t.name] for t in inputs if len(values[t.name]) == width]
    if node.op == "Concat":
        out = np.concatenate([values[t.name] for t in inputs]) if len(inputs) == len(node.inputs) else unknown
    elif node.op in _CARRY and len(sized) == 1:
        out = sized[0]
    elif len(inputs) == 1 and len(sized) == 1 and all(isinstance(t, gs.Constant) for t in others):
        dtype = np.float64 if store[group.members[0].producer.weight.name].dtype == np.float64 else np.float32
        out = evaluate_on_constants(node, inputs[0], sized[0], store, dtype, versions)
    elif node.op in _ADDS and len(sized) == len(inputs) and not others:
        signs = [1.0] + [(-1.0 if node.op == "Sub" else 1.0)] * (len(sized) - 1)
        out = sum(sign * v for sign, v in zip(signs, sized, strict=True))  # NaN stays NaN
    elif node.op in _MULS and len(sized) == len(inputs) and not others:
        product = np.prod(sized, axis=0)
        zero = np.logical_or.reduce([v == 0 for v in sized])  # 0 times a finite unknown (a gate)
        out = np.where(zero, 0.0, product)
    else:
        out = unknown
    return out if len(out) == width else unknown


def evaluate_on_constants(
    node: gs.Node, source: gs.Tensor, constants: np.ndarray, store: WeightStore, dtype, versions
) -> np.ndarray:
    """The per-channel `node` on an input holding `constants` (NaN positions: unknown, run as 0):
    its output where that is one constant over the batch and every spatial position (a padded
    depthwise conv on a non-zero constant is not: its borders differ), NaN elsewhere."""
    width = len(constants)
    rank = len(store.shape(source) or []) or 4
    shape = data_shape(source, store, width, False, [node], rank)
    known = ~np.isnan(constants)
    fill = np.where(known, constants, 0.0).reshape((1, width) + (1,) * (len(shape) - 2))
    x = np.broadcast_to(fill, shape).astype(dtype)
    out = evaluate_chain([node], source, node.outputs[0], store, x, versions).reshape(shape[0], width, -1)
    first = out[:1, :, :1]
    constant = np.all(out == first, axis=(0, 2)) & np.all(np.isfinite(out), axis=(0, 2))
    return np.where(known & constant, first.reshape(width).astype(np.float64), np.nan)


def cut_values(cut: Cut, values: dict) -> dict[str, np.ndarray]:
    """A Split's parts and a Slice's window carry their source's values."""
    source = values[cut.node.inputs[0].name]
    if cut.node.op == "Slice":
        return {cut.node.outputs[0].name: source[cut.start : cut.start + layout_width(cut.parts[0])]}
    if cut.node.op != "Split":
        return {}
    parts, start = {}, 0
    for output, part in zip(cut.node.outputs, cut.parts, strict=True):
        parts[output.name] = source[start : start + layout_width(part)]
        start += layout_width(part)
    return parts
