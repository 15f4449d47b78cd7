"""Chains between producer and consumer: exporter patterns, per-channel constants, and the
parts of a graph the pass must leave alone (graph outputs; weight tying and control flow are in
test_robustness.py)."""

import numpy as np
import pytest
from builders import IR_VERSION, OPSET
from conftest import assert_same_outputs, check_full
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg

WIDTH = 6


def planted(rng, fan_in=4):
    """Six neurons in three directions, positive multiples: exact width 3."""
    base = rng.normal(size=(3, fan_in + 1))
    return base[[0, 0, 1, 2, 2, 2]] * np.array([1.0, 3.0, 1.0, 0.5, 1.0, 2.0])[:, None]


def model_from(nodes, inits, opset=OPSET, outputs=("y",)):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 2]) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def dense_around(chain_nodes, extra_inits, rng, chain_out="a", opset=OPSET):
    rows = planted(rng)
    inits = {"w1": rows[:, :4], "b1": rows[:, 4], "w2": rng.normal(size=(2, WIDTH)), "b2": rng.normal(size=2)}
    inits.update(extra_inits)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        *chain_nodes,
        helper.make_node("Gemm", [chain_out, "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    return model_from(nodes, inits, opset)


def reduce_and_check(model, rng, width, exact, rtol=1e-5):
    result = cg.condense(model, threshold=0.9999)
    assert result.report["layers"], result.report["skipped"]
    layer = result.report["layers"][0]
    assert (layer["width_after"], layer["exact"]) == (width, exact)
    check_full(result.model)
    feeds = {"x": rng.normal(size=(11, 4)).astype(np.float32)}
    if exact:
        assert_same_outputs(model, result.model, feeds, rtol=rtol)
    return result


def test_decomposed_gelu_as_torchscript_exports_it(rng):
    nodes = [
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["h", "p"], ["q"]),
        helper.make_node("Mul", ["q", "half"], ["a"]),
    ]
    model = dense_around(nodes, {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}, rng)
    result = reduce_and_check(model, rng, 3, exact=False)
    assert result.report["layers"][0]["activation"] == "Div+Erf+Add+Mul+Mul"


def test_decomposed_silu(rng):
    nodes = [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["a"])]
    reduce_and_check(dense_around(nodes, {}, rng), rng, 3, exact=False)


def test_gelu_op(rng):
    nodes = [helper.make_node("Gelu", ["h"], ["a"], approximate="tanh")]
    reduce_and_check(dense_around(nodes, {}, rng, opset=20), rng, 3, exact=False)


def test_batchnorm_before_relu_is_folded_into_the_neuron_vector(rng):
    # BN makes channels 0 and 1 differ although their Gemm rows are parallel, unless scale/shift
    # keep them parallel: here BN keeps group {3,4,5} parallel and breaks {0,1}.
    scale = np.array([1.0, 2.0, 1.5, 0.7, 0.7, 0.7])
    shift = np.array([0.3, 0.0, -0.2, 0.0, 0.0, 0.0])
    mean, var = np.zeros(WIDTH), np.ones(WIDTH) - 1e-5
    nodes = [
        helper.make_node("BatchNormalization", ["h", "s", "t", "m", "v"], ["n"], epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["a"]),
    ]
    model = dense_around(nodes, {"s": scale, "t": shift, "m": mean, "v": var}, rng)
    result = reduce_and_check(model, rng, 4, exact=True, rtol=1e-4)
    sliced = {t.name: t.dims for t in result.model.graph.initializer}
    assert sliced["s"] == [4] and sliced["m"] == [4]


def test_prelu_with_equal_slopes_is_exact_and_unequal_is_not(rng):
    nodes = [helper.make_node("PRelu", ["h", "slope"], ["a"])]
    reduce_and_check(dense_around(nodes, {"slope": np.full(WIDTH, 0.2)}, rng), rng, 3, exact=True)
    unequal = np.array([0.2, 0.3, 0.2, 0.2, 0.2, 0.2])  # neurons 0 and 1 differ in slope: not merged
    reduce_and_check(dense_around(nodes, {"slope": unequal}, rng), rng, 4, exact=True)


@pytest.mark.parametrize("low,high,exact", [(0.0, None, True), (0.0, 6.0, False), (-1.0, 1.0, False)])
def test_clip(low, high, exact, rng):
    inputs = ["h", "lo"] + (["hi"] if high is not None else [])
    inits = {"lo": low} | ({"hi": high} if high is not None else {})
    reduce_and_check(dense_around([helper.make_node("Clip", inputs, ["a"])], inits, rng), rng, 3, exact)


def test_dropout_cast_identity_and_post_scaling(rng):
    nodes = [
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("Cast", ["d"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["c", "gain"], ["g"]),
        helper.make_node("Add", ["g", "off"], ["a"]),
    ]
    gain, off = rng.uniform(0.5, 2.0, WIDTH), rng.normal(size=WIDTH)
    reduce_and_check(dense_around(nodes, {"gain": gain, "off": off}, rng), rng, 3, exact=True)


def test_channels_reaching_a_graph_output_are_left_alone(rng):
    model = dense_around([helper.make_node("Relu", ["h"], ["a"])], {}, rng)
    model.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", WIDTH]))
    result = cg.condense(model, threshold=0.9999)
    assert result.report["layers"] == []
    assert any("graph output" in s["reason"] for s in result.report["skipped"])
    assert result.report["params_after"] == result.report["params_before"]


def test_two_consumers_are_rewritten_together(rng):
    model = dense_around([helper.make_node("Relu", ["h"], ["a"])], {}, rng)
    model.graph.initializer.append(
        numpy_helper.from_array(rng.normal(size=(WIDTH, 3)).astype(np.float32), "w3")
    )
    model.graph.node.append(helper.make_node("MatMul", ["a", "w3"], ["y2"], name="fc3"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3]))
    reduce_and_check(model, rng, 3, exact=True)


def test_constant_nodes_and_identity_weights_count_as_initializers(rng):
    model = dense_around([helper.make_node("Relu", ["h"], ["a"])], {}, rng)
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w1c"], value=w1))
    model.graph.node.insert(1, helper.make_node("Identity", ["w1c"], ["w1i"]))
    model.graph.node[2].input[1] = "w1i"
    model.graph.initializer.remove(w1)
    reduce_and_check(model, rng, 3, exact=True)
