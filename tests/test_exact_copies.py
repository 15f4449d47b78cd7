"""Exact copies merge exactly through any per-channel op.

A neuron that is an exact copy of another (same weights, same bias, same per-channel constants:
lambda = 1) computes the same activation whatever the activation is, so merging it (summing its
consumer weights into the kept neuron's) changes nothing but float rounding. That pins numbers on
the paths where planted *multiples* can only pin widths: every non-homogeneous activation, after
dense (Gemm, MatMul+Add) and conv producers, with and without a BatchNormalization before it.
"""

import numpy as np
import pytest
from builders import IR_VERSION, OPSET
from conftest import assert_same_outputs, check_full
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg

WIDTH, DISTINCT, FAN_IN, OUT = 9, 4, 5, 3
CHANNELS_IN, SIDE = 3, 6


def copied_rows(rng, width: int, distinct: int, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """[width, fan_in + 1] rows (weights | bias) with `distinct` directions, each used at least once,
    every other row an exact copy (lambda = 1) of one of them; and the index of each row's original."""
    base = rng.normal(size=(distinct, fan_in + 1))
    which = np.concatenate([np.arange(distinct), rng.integers(0, distinct, width - distinct)])
    rng.shuffle(which)
    return base[which].astype(np.float32), which


# ---- activations: (nodes from "h" to "a", constants, opset) ----------------------------------


def _single(op, **attrs):
    return lambda which, conv: ([helper.make_node(op, ["h"], ["a"], **attrs)], {}, OPSET)


def _gelu_op(approximate):
    return lambda which, conv: ([helper.make_node("Gelu", ["h"], ["a"], approximate=approximate)], {}, 20)


def _gelu_decomposed(which, conv):
    nodes = [
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["h", "p"], ["q"]),
        helper.make_node("Mul", ["q", "half"], ["a"]),
    ]
    return nodes, {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}, OPSET


def _silu(which, conv):
    return [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["a"])], {}, OPSET


def _clip6(which, conv):
    return [helper.make_node("Clip", ["h", "lo", "hi"], ["a"])], {"lo": 0.0, "hi": 6.0}, OPSET


def _prelu(which, conv):
    """Per-channel slopes, the copies' slopes copied: constants inside the activation agree."""
    slopes = np.linspace(0.05, 0.4, DISTINCT)[which]
    slopes = slopes[:, None, None] if conv else slopes  # [C, 1, 1] broadcasts on [N, C, H, W]
    return [helper.make_node("PRelu", ["h", "slope"], ["a"])], {"slope": slopes}, OPSET


ACTIVATIONS = {
    "Gelu": _gelu_op("none"),
    "Gelu-tanh": _gelu_op("tanh"),
    "Gelu-decomposed": _gelu_decomposed,
    "SiLU": _silu,
    "Sigmoid": _single("Sigmoid"),
    "Tanh": _single("Tanh"),
    "HardSwish": _single("HardSwish"),
    "HardSigmoid": _single("HardSigmoid", alpha=0.3, beta=0.6),
    "Clip6": _clip6,
    "Elu": _single("Elu"),
    "Selu": _single("Selu"),
    "Softplus": _single("Softplus"),
    "Softsign": _single("Softsign"),
    "Mish": lambda which, conv: ([helper.make_node("Mish", ["h"], ["a"])], {}, 18),
    "LeakyRelu": _single("LeakyRelu", alpha=0.1),
    "PRelu": _prelu,
    "Relu": _single("Relu"),
}
HOMOGENEOUS = {"LeakyRelu", "PRelu", "Relu"}


def batchnorm(rng, which):
    """BN in front of the activation with per-channel parameters, the copies' parameters copied."""
    params = {
        "bn.s": rng.uniform(0.5, 2.0, DISTINCT),
        "bn.t": rng.normal(size=DISTINCT),
        "bn.m": rng.normal(size=DISTINCT),
        "bn.v": rng.uniform(0.5, 2.0, DISTINCT),
    }
    node = helper.make_node("BatchNormalization", ["h0", *params], ["h"], epsilon=1e-5)
    return node, {k: v[which] for k, v in params.items()}


def build(producer: str, activation: str, bn: bool, seed: int = 0):
    """producer -> [BN] -> activation -> consumer, WIDTH neurons of which DISTINCT are distinct."""
    rng = np.random.default_rng(seed)
    conv = producer.startswith("conv")
    fan_in = CHANNELS_IN * 9 if conv else FAN_IN
    rows, which = copied_rows(rng, WIDTH, DISTINCT, fan_in)
    act_nodes, consts, opset = ACTIVATIONS[activation](which, conv)
    h = "h0" if bn else "h"
    nodes, inits = [], dict(consts)
    if conv:
        inits |= {"w1": rows[:, :-1].reshape(WIDTH, CHANNELS_IN, 3, 3), "b1": rows[:, -1]}
        nodes.append(
            helper.make_node(
                "Conv", ["x", "w1", "b1"], [h], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
        x_shape = ["N", CHANNELS_IN, SIDE, SIDE]
    elif producer == "gemm":
        inits |= {"w1": rows[:, :-1], "b1": rows[:, -1]}
        nodes.append(helper.make_node("Gemm", ["x", "w1", "b1"], [h], name="fc1", transB=1))
        x_shape = ["N", FAN_IN]
    else:
        inits |= {"w1": rows[:, :-1].T, "b1": rows[:, -1]}
        nodes += [
            helper.make_node("MatMul", ["x", "w1"], ["mm"], name="fc1"),
            helper.make_node("Add", ["mm", "b1"], [h], name="fc1_bias"),
        ]
        x_shape = ["N", FAN_IN]
    if bn:
        node, params = batchnorm(rng, which)
        nodes.append(node)
        inits |= params
    nodes += act_nodes
    if producer == "conv":  # a 3x3 conv consumer
        inits |= {"w2": rng.normal(size=(OUT, WIDTH, 3, 3)), "b2": rng.normal(size=OUT)}
        nodes.append(
            helper.make_node(
                "Conv", ["a", "w2", "b2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
        y_shape = ["N", OUT, SIDE, SIDE]
    elif producer == "conv-flatten":  # channel c is a block of SIDE * SIDE consumer rows
        inits |= {"w2": rng.normal(size=(OUT, WIDTH * SIDE * SIDE)), "b2": rng.normal(size=OUT)}
        nodes += [
            helper.make_node("Flatten", ["a"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="head", transB=1),
        ]
        y_shape = ["N", OUT]
    else:
        inits |= {"w2": rng.normal(size=(OUT, WIDTH)), "b2": rng.normal(size=OUT)}
        nodes.append(helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1))
        y_shape = ["N", OUT]
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    graph = helper.make_graph(nodes, "copies", [x_info], [y_info], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    feeds = {"x": rng.normal(size=[7 if d == "N" else d for d in x_shape]).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("producer", ["gemm", "matmul", "conv", "conv-flatten"])
def test_exact_copies_merge_to_float_rounding(producer, activation, bn):
    model, feeds = build(producer, activation, bn)
    check_full(model)
    result = cg.condense(model, threshold=1.0)
    assert len(result.report["layers"]) == 1, result.report["skipped"]
    layer = result.report["layers"][0]
    assert (layer["width_before"], layer["width_after"]) == (WIDTH, DISTINCT), layer
    assert layer["block_error"]["max_rel_err"] < 1e-5, layer["block_error"]
    if activation in HOMOGENEOUS:
        assert layer["exact"] is True, layer
    check_full(result.model)
    assert_same_outputs(model, result.model, feeds, rtol=1e-5)
