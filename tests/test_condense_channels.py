"""The dense condensation pass on models built with onnx.helper, checked in ONNX Runtime."""

import numpy as np
import pytest
from builders import IR_VERSION, OPSET, planted_mlp
from conftest import assert_same_outputs, check_full
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg

DEPTHS = {
    1: ([5, 12, 3], [4]),
    2: ([5, 12, 10, 3], [4, 6]),
    3: ([6, 16, 12, 10, 2], [5, 3, 7]),
    4: ([7, 20, 16, 12, 8, 3], [6, 4, 5, 2]),
}


def widths_after(report):
    return [layer["width_after"] for layer in report["layers"]]


@pytest.mark.parametrize("depth", sorted(DEPTHS))
@pytest.mark.parametrize("form,seq", [("gemm", None), ("matmul", None), ("matmul", 5)])
def test_planted_multiples_reduce_to_distinct_directions(depth, form, seq, rng):
    widths, distinct = DEPTHS[depth]
    model = planted_mlp(widths, distinct, form=form, seq=seq, seed=depth)
    result = cg.condense(model, threshold=0.9999)
    assert widths_after(result.report) == distinct
    assert all(layer["exact"] for layer in result.report["layers"])
    check_full(result.model)
    shape = (8, widths[0]) if seq is None else (8, seq, widths[0])
    assert_same_outputs(model, result.model, {"x": rng.normal(size=shape).astype(np.float32)})


@pytest.mark.parametrize("trans_b,alpha,beta", [(False, 1.0, 1.0), (True, 0.5, 2.0), (False, 3.0, 0.25)])
def test_gemm_attributes_are_honoured(trans_b, alpha, beta, rng):
    model = planted_mlp([5, 14, 9, 2], [3, 4], trans_b=trans_b, alpha=alpha, beta=beta)
    result = cg.condense(model, threshold=0.9999)
    assert widths_after(result.report) == [3, 4]
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": rng.normal(size=(6, 5)).astype(np.float32)})


def test_negative_multiples_are_kept(rng):
    r = rng.normal(size=(3, 5))
    rows = np.stack([r[0], -2.0 * r[0], 3.0 * r[0], r[1], r[2]])  # cosine(0, 1) = -1
    model = mlp_with_rows(rows[:, :4], rows[:, 4], rng.normal(size=(2, 5)), rng.normal(size=2), "Relu")
    result = cg.condense(model, threshold=0.9999)
    assert widths_after(result.report) == [4]
    assert_same_outputs(model, result.model, {"x": rng.normal(size=(9, 4)).astype(np.float32)})


def test_random_network_is_unchanged_at_threshold_one(rng):
    model = planted_mlp([6, 16, 12, 3], [16, 12])  # every direction distinct
    result = cg.condense(model, threshold=1.0)
    assert widths_after(result.report) == [16, 12]
    assert result.report["params_after"] == result.report["params_before"]
    assert_same_outputs(model, result.model, {"x": rng.normal(size=(4, 6)).astype(np.float32)}, rtol=0)


def mlp_with_rows(w1, b1, w2, b2, activation, extra_attrs=None):
    """x -> Gemm(w1, b1) -> activation -> Gemm(w2, b2), torch layout (transB=1)."""
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node(activation, ["h"], ["a"], name="act", **(extra_attrs or {})),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [_input("x", ["N", w1.shape[1]])], [_input("y", ["N", w2.shape[0]])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _input(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.mark.parametrize("activation,constant", [("Relu", 0.0), ("Sigmoid", 0.5), ("Tanh", 0.0)])
def test_dead_neurons_are_removed_exactly(activation, constant, rng):
    w1, b1 = rng.normal(size=(6, 4)), rng.normal(size=6)
    w1[2], b1[2] = 0.0, 0.0  # zero incoming weights and bias: outputs act(0)
    w1[4], b1[4] = 0.0, 0.7  # zero incoming weights: outputs act(0.7)
    w2, b2 = rng.normal(size=(3, 6)), rng.normal(size=3)
    w2[:, 5] = 0.0  # zero outgoing weights
    model = mlp_with_rows(w1, b1, w2, b2, activation)
    result = cg.condense(model, threshold=1.0)
    layer = result.report["layers"][0]
    assert (layer["width_after"], layer["constant_removed"], layer["zero_output_removed"]) == (3, 2, 1)
    check_full(result.model)
    feeds = {"x": rng.normal(size=(5, 4)).astype(np.float32)}
    assert_same_outputs(model, result.model, feeds, rtol=1e-6)
    folded = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "b2"))
    act = {"Relu": lambda z: max(z, 0.0), "Sigmoid": lambda z: 1 / (1 + np.exp(-z)), "Tanh": np.tanh}
    expected = b2 + w2[:, 2] * constant + w2[:, 4] * act[activation](0.7)
    np.testing.assert_allclose(folded, expected, rtol=1e-6, atol=1e-6)  # float32 of O(1) terms


@pytest.mark.parametrize(
    "activation,attrs,exact",
    [
        ("LeakyRelu", {"alpha": 0.1}, True),
        ("Sigmoid", {}, False),
        ("Tanh", {}, False),
        ("Elu", {}, False),
        ("Selu", {}, False),
        ("Softplus", {}, False),
        ("HardSigmoid", {}, False),
        ("HardSwish", {}, False),
        ("Identity", {}, True),
        ("Softsign", {}, False),
    ],
)
def test_activations_are_carried_and_flagged(activation, attrs, exact, rng):
    base = rng.normal(size=(3, 5))
    rows = base[[0, 0, 1, 2, 2, 2]] * np.array([1.0, 3.0, 1.0, 0.5, 1.0, 2.0])[:, None]
    model = mlp_with_rows(
        rows[:, :4], rows[:, 4], rng.normal(size=(2, 6)), rng.normal(size=2), activation, attrs
    )
    result = cg.condense(model, threshold=0.9999)
    layer = result.report["layers"][0]
    assert (layer["width_after"], layer["exact"]) == (3, exact)
    check_full(result.model)
    if exact:
        assert_same_outputs(model, result.model, {"x": rng.normal(size=(7, 4)).astype(np.float32)})


def test_removing_dead_relu_neurons_changes_no_bit(rng):
    w1, b1 = rng.normal(size=(8, 4)), rng.normal(size=8)
    w1[[1, 6]], b1[[1, 6]] = 0.0, 0.0  # relu(0) = 0: nothing to fold
    w2, b2 = rng.normal(size=(3, 8)), rng.normal(size=3)
    w2[:, 3] = 0.0
    model = mlp_with_rows(w1, b1, w2, b2, "Relu")
    result = cg.condense(model, threshold=1.0)
    assert widths_after(result.report) == [5]
    feeds = {"x": rng.normal(size=(16, 4)).astype(np.float32)}
    assert_same_outputs(model, result.model, feeds, rtol=0.0)


def test_constant_channel_into_a_matmul_consumer_gets_a_bias_add(rng):
    model = planted_mlp([5, 10, 8, 3], [10, 8], form="matmul", activation="Sigmoid", seed=5)
    weight = next(t for t in model.graph.initializer if t.name == "fc1.weight")
    values = numpy_helper.to_array(weight).copy()
    values[:, 3] = 0.0  # channel 3 now outputs sigmoid(bias_3), a constant
    weight.CopyFrom(numpy_helper.from_array(values, "fc1.weight"))
    result = cg.condense(model, threshold=1.0)
    layers = result.report["layers"]
    assert [(layer["width_after"], layer["constant_removed"]) for layer in layers] == [(9, 1), (8, 0)]
    assert sum(n.op_type == "Add" for n in result.model.graph.node) == 4  # 3 biases + the fold
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": rng.normal(size=(6, 5)).astype(np.float32)})


def test_round_to_rounds_widths_up_and_stays_exact(rng):
    model = planted_mlp([6, 40, 30, 3], [5, 9], seed=11)
    result = cg.condense(model, threshold=0.9999, round_to=8)
    assert widths_after(result.report) == [8, 16]
    assert_same_outputs(model, result.model, {"x": rng.normal(size=(4, 6)).astype(np.float32)})
