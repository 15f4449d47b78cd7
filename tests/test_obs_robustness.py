"""Structured OBS (`method="auto"` with data) and the global width allocation on patterns users have.

The expected failures pin bugs found in review (each docstring says what is wrong and what correct
behaviour is); the passing tests pin behaviour of the new code not covered elsewhere: conv
consumers with strides, dilation, asymmetric pads and auto_pad (the proxy path), Flatten
consumers, dead and constant channels, several outputs under max_error, float16 models, integer
inputs and a model without reducible layers.
"""

import numpy as np
import onnx
import pytest
from builders import planted_mlp, run
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg
from condense_graph.errors import CondenseError

OPSET, IR_VERSION = 17, 8


def widths(result) -> list[int]:
    return [layer["width_after"] for layer in result.report["layers"]]


def make_model(nodes, inits: dict, inputs, outputs) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def small_cnn(
    conv2_attrs: dict, kernel2: int = 3, dead: int = 0, constant: int = 0, head: str = "gap", seed=0
):
    """x[N,3,8,8] -> conv1(16) -> Relu -> conv2(12, `conv2_attrs`) -> Relu -> head -> Gemm(5), and
    with head="two" a second Gemm output z (3) a hundred times larger. conv1 has `dead` channels
    (zero weights, negative bias: always 0 after Relu) and `constant` ones (zero weights, bias 0.7)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((16, 3, 3, 3)), rng.standard_normal(16) * 0.1
    w1[:dead], b1[:dead] = 0.0, -1.0
    w1[dead : dead + constant], b1[dead : dead + constant] = 0.0, 0.7
    inits = {
        "w1": w1,
        "b1": b1,
        "w2": rng.standard_normal((12, 16, kernel2, kernel2)),
        "b2": rng.standard_normal(12),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **conv2_attrs),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
    ]
    if head == "flatten":  # a Flatten consumer: 8x8 features per channel
        nodes.append(helper.make_node("Flatten", ["r2"], ["f"], name="flat"))
        features = 12 * 64
    else:
        nodes += [
            helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        ]
        features = 12
    inits |= {"w3": rng.standard_normal((features, 5)), "b3": rng.standard_normal(5)}
    nodes.append(helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if head == "two":
        inits |= {"w4": rng.standard_normal((features, 3)) * 100, "b4": np.zeros(3)}
        nodes.append(helper.make_node("Gemm", ["f", "w4", "b4"], ["z"], name="fc_b"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3]))
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    return make_model(nodes, inits, inputs, outputs)


@pytest.fixture(scope="module")
def images():
    return {"x": np.random.default_rng(1).standard_normal((120, 3, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def states():
    return {"x": np.random.default_rng(2).standard_normal((200, 8)).astype(np.float32)}


# ---- bugs found in review (fixed; each failed before) -----------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 0.99}, {"layer_widths": {"fc1": 24}}],
    ids=["threshold", "layer_width"],
)
def test_obs_honours_round_to_when_exact_merges_leave_fewer_groups(states, kwargs):
    """32 neurons, 21 distinct directions (11 exact copies), round_to=8. The paper's rule gives 24
    (a multiple of 8); obs gives 21: `StructuredOBS.select` returns the exact groups as they are
    when `width >= n` (n = exact groups), and a width-targeted `Grouping` never applies round_to,
    so the README's "round_to rounds every new width up to a multiple of it" breaks with the
    default method. Correct: 24 (split exact groups, or keep a channel, to land on a multiple)."""
    model = planted_mlp([8, 32, 4], [21])
    assert widths(cg.condense(model, calibration=states, method="condense", round_to=8, **kwargs)) == [24]
    result = cg.condense(model, calibration=states, round_to=8, **kwargs)
    assert all(w % 8 == 0 for w in widths(result)), widths(result)
    # only exact multiples merged (some split off to land on 24): the outputs equal the original's
    x = {"x": states["x"][:50]}
    expected, actual = run(model, x)[0], run(result.model, x)[0]
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def test_allocation_with_round_to_gives_layer_widths_that_are_multiples(images):
    """target_params with round_to=4 on a conv whose 16 channels include 5 dead and 2 constant ones:
    the allocation reports conv1 at 12 (a multiple of 4), but the widths are over the selector's
    candidates (dead, constant and silent channels excluded) and OBS keeps min(width, exact groups),
    so the written conv1 has 11 channels. Correct: every reduced layer's width_after a multiple of
    round_to (or the layer's original width), and the allocation's widths equal to what was written."""
    model = small_cnn({"pads": [1, 1, 1, 1]}, dead=5, constant=2)
    result = cg.condense(model, calibration=images, target_params=0.5, round_to=4)
    layers = result.report["layers"]
    assert all(x["width_after"] % 4 == 0 or x["width_after"] == x["width_before"] for x in layers), layers
    allocated = result.report["allocation"]["widths"]
    assert [allocated[x["name"]] for x in layers] == widths(result)


def test_target_params_measures_sizes_of_the_model_obs_writes(states):
    """8 hidden neurons, no two alike. obs at width 1 keeps 17 of 108 parameters (0.157), the floor
    of min_width_fraction 0.1 is 1 neuron, yet target_params=0.2 is refused with "the smallest
    reachable is 0.278": `Reductions.params_fraction` counts the parameters of the paper's merge
    (`selector="condense"`, no data) at the allocated widths, and the paper's rule cannot merge
    neurons of negative cosine, so it stops at 2 where OBS goes to 1 (the same widths do not give
    the same sizes; with exact copies and round_to the two differ the other way). Correct: sizes
    measured on the model the chosen rule writes, so target_params=0.2 succeeds at width 1."""
    model = planted_mlp([8, 8, 4], [8])
    assert widths(cg.condense(model, calibration=states, layer_widths={"fc1": 1})) == [1]
    result = cg.condense(model, calibration=states, target_params=0.2)
    assert result.report["params_after"] / result.report["params_before"] <= 0.2


# ---- behaviour pinned (passes) ----------------------------------------------------------------

CONV_CONSUMERS = {
    "stride2": ({"pads": [1, 1, 1, 1], "strides": [2, 2]}, 3),
    "dilation2": ({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, 3),
    "asymmetric_pads": ({"pads": [0, 1, 2, 0]}, 3),
    "auto_pad": ({"auto_pad": "SAME_UPPER"}, 3),  # the proxy path: not refit
    "1x1": ({}, 1),
}


@pytest.mark.parametrize("name", list(CONV_CONSUMERS))
def test_conv_consumers_meet_max_error_on_held_out_rows(images, name):
    attrs, kernel = CONV_CONSUMERS[name]
    model = small_cnn(attrs, kernel)
    result = cg.condense(model, calibration=images, max_error=0.05, verify=True)
    verify = result.report["verify"]
    assert verify["max_rel_err"] <= 0.05 and verify["nonfinite"] == 0
    half = cg.condense(model, calibration=images, layer_widths={"conv1": 8, "conv2": 6}, verify=True)
    assert widths(half) == [8, 6] and np.isfinite(half.report["verify"]["max_rel_err"])


def test_flatten_consumer_with_many_features_per_channel(images):
    model = small_cnn({"pads": [1, 1, 1, 1]}, head="flatten")
    result = cg.condense(model, calibration=images, target_params=0.5, verify=True)
    assert result.report["params_after"] / result.report["params_before"] <= 0.5
    assert np.isfinite(result.report["verify"]["max_rel_err"])


def test_dead_and_constant_channels_go_exactly_before_obs(images):
    """5 dead and 2 constant channels of conv1 go at threshold 0.99 without changing the outputs."""
    model = small_cnn({"pads": [1, 1, 1, 1]}, dead=5, constant=2)
    result = cg.condense(model, calibration=images, threshold=0.99, verify=True)
    assert widths(result)[0] <= 11 and result.report["verify"]["max_rel_err"] < 1e-5


def test_max_error_holds_on_every_output_of_a_two_output_model(images, budget=0.05):
    """A second output 100x larger must not hide the first's error: the budget is per output."""
    model = small_cnn({"pads": [1, 1, 1, 1]}, head="two")
    result = cg.condense(model, calibration=images, max_error=budget, verify=True)
    outputs = result.report["verify"]["outputs"]
    assert set(outputs) == {"y", "z"}
    assert all(o["max_rel_err"] <= budget for o in outputs.values()), outputs


def float16(model: onnx.ModelProto) -> onnx.ModelProto:
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in list(half.graph.input) + list(half.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return half


def test_float16_model_through_obs_and_the_allocation(states):
    model = float16(planted_mlp([8, 32, 16, 4], [32, 16]))
    data = {"x": states["x"].astype(np.float16)}
    result = cg.condense(model, calibration=data, layer_widths={"fc1": 16, "fc2": 8}, verify=True)
    assert widths(result) == [16, 8] and np.isfinite(result.report["verify"]["max_rel_err"])
    budget = cg.condense(model, calibration=data, max_error=0.05, verify=True)
    assert budget.report["verify"]["max_rel_err"] <= 0.05
    (out,) = run(budget.model, {"x": data["x"][:4]})
    assert out.dtype == np.float16 and np.all(np.isfinite(out))


def test_integer_inputs_through_obs_and_the_allocation():
    """ids [N, 6] int64 -> Gather -> ReduceMean -> Gemm(16) -> Relu -> Gemm(4)."""
    rng = np.random.default_rng(3)
    inits = {
        "E": rng.standard_normal((50, 8)).astype(np.float32),
        "w1": rng.standard_normal((8, 16)).astype(np.float32),
        "w2": rng.standard_normal((16, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["h"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["h", "w1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2"),
    ]
    model = make_model(
        nodes,
        inits,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    data = {"ids": rng.integers(0, 50, (120, 6))}
    result = cg.condense(model, calibration=data, max_error=0.05, verify=True)
    assert result.report["verify"]["max_rel_err"] <= 0.05
    assert widths(cg.condense(model, calibration=data, target_macs=0.5)) == [8]


def test_no_reducible_layer_under_budgets(states):
    """A single Gemm (its output is the model's interface): max_error keeps the model as it is, a
    size target is a clean CondenseError."""
    model = planted_mlp([8, 4], [])
    kept = cg.condense(model, calibration=states, max_error=0.05, verify=True)
    assert kept.report["params_after"] == kept.report["params_before"]
    for kwargs in ({"target_params": 0.5}, {"target_macs": 0.5}):
        with pytest.raises(CondenseError, match="cannot be reached"):
            cg.condense(model, calibration=states, **kwargs)


def test_max_error_with_very_few_rows(states):
    """Three rows: one held out, two calibrate (rank-deficient Hessians, damping keeps them
    invertible); one row cannot be split and is a clean CondenseError."""
    model = planted_mlp([8, 32, 4], [32])
    result = cg.condense(model, calibration={"x": states["x"][:3]}, max_error=0.05, verify=True)
    assert result.report["verify"]["max_rel_err"] <= 0.05
    with pytest.raises(CondenseError, match="at least 2"):
        cg.condense(model, calibration={"x": states["x"][:1]}, max_error=0.05)


@pytest.mark.parametrize("method", ["condense", "magnitude", "obs"])
def test_a_requested_width_is_the_written_width_when_channels_are_kept_alone(images, method):
    """conv1 has 5 dead channels (dropped, exactly) and 2 constant ones (kept alone: a conv
    consumer sees a constant channel differently at its padded borders). A requested layer width
    counts the channels kept alone: --layer-width conv1=8 writes 8 channels, whatever the rule."""
    model = small_cnn({"pads": [1, 1, 1, 1]}, dead=5, constant=2)
    kwargs = {"calibration": images} if method == "obs" else {}
    result = cg.condense(model, layer_widths={"conv1": 8, "conv2": 12}, method=method, **kwargs)
    conv1 = next(layer for layer in result.report["layers"] if layer["name"] == "conv1")
    assert conv1["width_after"] == 8
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights["w1"].shape[0] == 8 and weights["w2"].shape[1] == 8  # what was written
    out = run(result.model, {"x": images["x"][:10]})[0]
    assert out.shape == (10, 5) and np.all(np.isfinite(out))
